//! Calling another plugin (bridge its IPAM, the `weft` meta plugin its delegate). When
//! `CNI_PATH` resolves the type to this very binary and weft implements it, the call runs
//! in-process and saves a fork and exec per container; anything else (the reference plugins,
//! dhcp, static, third-party plugins) is executed like libcni would.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use weft_cni::args::{CmdArgs, Command};
use weft_cni::exec::{exec_plugin, find_in_path};
use weft_cni::skel::{decode_conf, invoke};
use weft_cni::{CniError, CniResult};

/// Whether `binary` is the running executable (same file, through any symlink or hard link).
fn is_self(binary: &Path) -> bool {
    let (Ok(target), Ok(me)) = (std::fs::metadata(binary), std::fs::metadata("/proc/self/exe")) else {
        return false;
    };
    target.dev() == me.dev() && target.ino() == me.ino()
}

/// Runs `plugin_type` for `command` with `stdin` as its config and the caller's environment.
/// ADD returns the delegate's result.
pub fn run(plugin_type: &str, command: Command, args: &CmdArgs, stdin: &[u8]) -> Result<Option<CniResult>, CniError> {
    let binary = find_in_path(plugin_type, &args.path)?;
    if is_self(&binary) {
        if let Some(plugin) = crate::by_name(plugin_type) {
            let args = CmdArgs { command, stdin: stdin.to_vec(), ..args.clone() };
            let conf = decode_conf(stdin)?;
            return invoke(plugin.as_ref(), &args, &conf);
        }
    }
    match exec_plugin(&binary, command, &[], stdin)? {
        Some(value) if command == Command::Add => CniResult::from_value(&value).map(Some),
        Some(_) | None if command == Command::Add => {
            Err(CniError::internal(format!("plugin {plugin_type} returned no result")))
        }
        _ => Ok(None),
    }
}
