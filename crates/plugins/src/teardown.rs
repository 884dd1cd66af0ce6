//! Retiring a container's veth pair on DEL without waiting for the kernel.
//!
//! Deleting a veth costs 10-30 ms in the kernel (unregistering two devices waits for RCU grace
//! periods), more than everything else a DEL does together. So DEL does the part anyone can
//! observe at once: both ends go down (no traffic), both are renamed to `wdel<index>` (the
//! container's interface name is free again for a new ADD) — and a detached reaper process
//! (`weft cni reap`) deletes the pair. A reaper that never ran leaves a down, renamed veth that
//! the next GC removes, and a container namespace that is deleted takes the pair with it.

use std::process::{Command, Stdio};

use weft_cni::CniError;
use weft_dataplane::error::ignore_not_found;
use weft_dataplane::{Link, LinkKind, Netlink};

use crate::common::kernel;

/// The prefix of retired links' names.
pub const TOMBSTONE_PREFIX: &str = "wdel";

fn tombstone(index: u32) -> String {
    format!("{TOMBSTONE_PREFIX}{index:08x}")
}

/// Retires `ifname` in the container (`cnl`) and its host peer (`hnl`). A missing interface is
/// success. When the peer cannot be found on the host, the container end is deleted at once.
pub fn retire_veth(cnl: &mut Netlink, hnl: &mut Netlink, ifname: &str) -> Result<(), CniError> {
    let Some(cont) = cnl.link_by_name(ifname).map_err(kernel("reading the container interface"))? else {
        return Ok(());
    };
    let host = match cont.peer_index {
        Some(peer) => hnl.link_by_index(peer).map_err(kernel("reading the host veth"))?,
        None => None,
    };
    match host.filter(|h| h.kind == LinkKind::Veth) {
        Some(host) => {
            retire_link(cnl, &cont)?;
            retire_host_link(hnl, &host)
        }
        None => ignore_not_found(cnl.delete_link(cont.index)).map_err(kernel("deleting the container interface")),
    }
}

/// Retires a host-side veth whose container end is out of reach.
pub fn retire_host_link(hnl: &mut Netlink, host: &Link) -> Result<(), CniError> {
    let name = retire_link(hnl, host)?;
    spawn_reaper(&name, host.index);
    Ok(())
}

/// Down, then renamed to its tombstone name; returns that name.
fn retire_link(nl: &mut Netlink, link: &Link) -> Result<String, CniError> {
    let name = tombstone(link.index);
    if link.name == name {
        return Ok(name);
    }
    ignore_not_found(nl.set_up(link.index, false)).map_err(kernel("setting the interface down"))?;
    ignore_not_found(nl.set_name(link.index, &name)).map_err(kernel("renaming the retired interface"))?;
    Ok(name)
}

/// Starts `weft cni reap` for the link, detached: its own process group, no stdio, not waited
/// for. If it cannot start, the link is deleted right here instead.
fn spawn_reaper(name: &str, index: u32) {
    let spawned = std::env::current_exe().and_then(|exe| {
        use std::os::unix::process::CommandExt;
        Command::new(exe)
            .arg0("weft")
            .args(["cni", "reap", "--name", name, "--index", &index.to_string()])
            .env_remove("CNI_COMMAND")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
    });
    if spawned.is_err() {
        let _ = reap(name, index);
    }
}

/// The reaper: deletes the link `name` if it still has `index` (it is still the one retired).
pub fn reap(name: &str, index: u32) -> Result<(), CniError> {
    let mut nl = Netlink::new().map_err(kernel("opening netlink"))?;
    match nl.link_by_name(name).map_err(kernel("reading the retired link"))? {
        Some(link) if link.index == index => {
            ignore_not_found(nl.delete_link(index)).map_err(kernel("deleting the retired link"))
        }
        _ => Ok(()),
    }
}

/// GC: deletes every retired veth still present on the host.
pub fn sweep(hnl: &mut Netlink) -> Result<(), CniError> {
    for link in hnl.links().map_err(kernel("listing links"))? {
        if link.kind == LinkKind::Veth && link.name.starts_with(TOMBSTONE_PREFIX) && !link.up {
            ignore_not_found(hnl.delete_link(link.index)).map_err(kernel("deleting a retired link"))?;
        }
    }
    Ok(())
}
