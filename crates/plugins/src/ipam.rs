//! Calling the IPAM plugin named in `ipam.type`. When `CNI_PATH` resolves it to this very binary
//! (weft's own host-local), the call runs in-process and saves a fork and exec per container;
//! anything else (the reference host-local, dhcp, static) is executed like libcni would.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use weft_cni::args::{CmdArgs, Command};
use weft_cni::exec::{exec_plugin, find_in_path};
use weft_cni::skel::Attachment;
use weft_cni::{CniError, CniResult, NetConf};

/// Whether `binary` is the running executable (same file, through any symlink or hard link).
fn is_self(binary: &Path) -> bool {
    let (Ok(target), Ok(me)) = (std::fs::metadata(binary), std::fs::metadata("/proc/self/exe")) else {
        return false;
    };
    target.dev() == me.dev() && target.ino() == me.ino()
}

enum Delegate {
    InProcess,
    Exec(std::path::PathBuf),
}

fn resolve(ipam_type: &str, args: &CmdArgs) -> Result<Delegate, CniError> {
    let binary = find_in_path(ipam_type, &args.path)?;
    if ipam_type == "host-local" && is_self(&binary) {
        return Ok(Delegate::InProcess);
    }
    Ok(Delegate::Exec(binary))
}

fn exec(binary: &Path, command: Command, stdin: &[u8]) -> Result<Option<serde_json::Value>, CniError> {
    exec_plugin(binary, command, &[], stdin)
}

/// IPAM ADD with the plugin's own stdin.
pub fn add(ipam_type: &str, args: &CmdArgs) -> Result<CniResult, CniError> {
    match resolve(ipam_type, args)? {
        Delegate::InProcess => crate::host_local::add(args),
        Delegate::Exec(binary) => {
            let value = exec(&binary, Command::Add, &args.stdin)?
                .ok_or_else(|| CniError::internal(format!("IPAM plugin {ipam_type} returned no result")))?;
            CniResult::from_value(&value)
        }
    }
}

/// IPAM DEL with the plugin's own stdin.
pub fn del(ipam_type: &str, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
    match resolve(ipam_type, args)? {
        Delegate::InProcess => crate::host_local::del(args, conf),
        Delegate::Exec(binary) => exec(&binary, Command::Del, &args.stdin).map(drop),
    }
}

/// IPAM CHECK with the plugin's own stdin.
pub fn check(ipam_type: &str, args: &CmdArgs) -> Result<(), CniError> {
    match resolve(ipam_type, args)? {
        Delegate::InProcess => crate::host_local::check(args),
        Delegate::Exec(binary) => exec(&binary, Command::Check, &args.stdin).map(drop),
    }
}

/// IPAM GC with the plugin's own stdin.
pub fn gc(ipam_type: &str, args: &CmdArgs, valid: &[Attachment]) -> Result<(), CniError> {
    match resolve(ipam_type, args)? {
        Delegate::InProcess => crate::host_local::gc(args, valid),
        Delegate::Exec(binary) => exec(&binary, Command::Gc, &args.stdin).map(drop),
    }
}

/// The `ipam.type` of a config, or `None` for an L2-only config (`"ipam": {}`).
pub fn ipam_type(conf: &NetConf) -> Option<String> {
    conf.ipam.as_ref()?.get("type")?.as_str().filter(|t| !t.is_empty()).map(String::from)
}
