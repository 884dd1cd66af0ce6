//! Calling the IPAM plugin named in `ipam.type`, with the calling plugin's own config (see
//! [`crate::delegate`]: weft's host-local runs in-process).

use weft_cni::args::{CmdArgs, Command};
use weft_cni::{CniError, CniResult, NetConf};

use crate::delegate;

/// Refuses weft's own plugins that are not IPAM plugins as IPAM (a bridge, or the meta plugin,
/// as its own IPAM would call itself and wait for its own lock).
fn refuse_non_ipam(ipam_type: &str) -> Result<(), CniError> {
    if ipam_type != "host-local" && crate::PLUGIN_NAMES.contains(&ipam_type) {
        return Err(CniError::invalid_config(format!("{ipam_type:?} is not an IPAM plugin (host-local is weft's)")));
    }
    Ok(())
}

/// IPAM ADD.
pub fn add(ipam_type: &str, args: &CmdArgs) -> Result<CniResult, CniError> {
    refuse_non_ipam(ipam_type)?;
    delegate::run(ipam_type, Command::Add, args, &args.stdin)?
        .ok_or_else(|| CniError::internal(format!("IPAM plugin {ipam_type} returned no result")))
}

/// IPAM DEL.
pub fn del(ipam_type: &str, args: &CmdArgs) -> Result<(), CniError> {
    refuse_non_ipam(ipam_type)?;
    delegate::run(ipam_type, Command::Del, args, &args.stdin).map(drop)
}

/// IPAM CHECK.
pub fn check(ipam_type: &str, args: &CmdArgs) -> Result<(), CniError> {
    delegate::run(ipam_type, Command::Check, args, &args.stdin).map(drop)
}

/// IPAM GC (the config carries `cni.dev/valid-attachments`).
pub fn gc(ipam_type: &str, args: &CmdArgs) -> Result<(), CniError> {
    delegate::run(ipam_type, Command::Gc, args, &args.stdin).map(drop)
}

/// The `ipam.type` of a config, or `None` for an L2-only config (`"ipam": {}`).
pub fn ipam_type(conf: &NetConf) -> Option<String> {
    conf.ipam.as_ref()?.get("type")?.as_str().filter(|t| !t.is_empty()).map(String::from)
}
