//! Retiring a container's veth pair on DEL without waiting for the kernel.
//!
//! Deleting a veth costs 10-30 ms in the kernel (unregistering two devices waits for RCU grace
//! periods), more than everything else a DEL does together. So DEL does the part anyone can
//! observe at once: the host end goes down into the group of retired links, [`RETIRED_GROUP`]
//! (no traffic either way from then on), the container end goes down and is renamed to
//! `wdel<index>` (the container's interface name is free again for a new ADD) — and a reaper
//! process (`weft cni reap`) deletes the group in the background. The kernel unregisters a group
//! in one batch, so a burst of DELs costs it one wait, not one per veth.
//!
//! A DEL killed half-way is finished by the next one: it retires `ifname` and also every
//! `wdel*` link of the container whose host end is still live.
//!
//! One reaper works per network namespace at a time: it holds the lock file [`reaper_lock`] of
//! its namespace in the root-only lock directory (see [`crate::attachment_lock`]; released with
//! its process however that ends), and a DEL starts a reaper only when it can take that lock
//! itself. A reaper that never ran leaves down veths in the group
//! that the next DEL's reaper or the next GC removes; a container namespace that is deleted takes
//! its pair with it.

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

use weft_cni::CniError;
use weft_dataplane::error::ignore_not_found;
use weft_dataplane::{Link, LinkKind, Netlink};

use crate::common::kernel;

/// The prefix of retired container interfaces' names.
const TOMBSTONE_PREFIX: &str = "wdel";

/// The link group of retired host-side veths (`ip link show group 2003134068`): "weft" in ASCII.
pub const RETIRED_GROUP: u32 = 0x7765_6674;

/// How long a reaper waits for more retired links before deleting them.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(100);

/// The lock file the reaper of this network namespace holds while it works:
/// `reaper.<namespace inode>`.
pub fn reaper_lock() -> String {
    let inode = std::fs::metadata("/proc/thread-self/ns/net").map_or(0, |m| m.ino());
    format!("reaper.{inode}")
}

fn tombstone(index: u32) -> String {
    format!("{TOMBSTONE_PREFIX}{index:08x}")
}

/// Retires `ifname` in the container (`cnl`) and its host peer (`hnl`), and whatever a DEL
/// killed half-way left in this container (a renamed interface whose host end is still up). A
/// missing interface is success. When the peer cannot be found on the host, the container end is
/// deleted at once.
///
/// The host end goes first: once it is down in the retired group no traffic flows and the
/// reaper takes the pair, whatever happens to the rest of this DEL.
pub fn retire_veth(cnl: &mut Netlink, hnl: &mut Netlink, ifname: &str) -> Result<(), CniError> {
    let links = cnl.links().map_err(kernel("reading the container's links"))?;
    let mut ours: Option<i32> = None;
    for cont in links.iter().filter(|l| l.name == ifname || l.name.starts_with(TOMBSTONE_PREFIX)) {
        // The peer is this namespace's link of that index only if the container's link says its
        // peer lives here (by the id the container knows this namespace by) and that link's
        // peer is the container's link: an index alone names a link in any namespace, and
        // another pod's veth must never be taken for this one.
        let here = match ours {
            Some(id) => id,
            None => {
                let current = weft_netns::NetNs::current().map_err(|e| CniError::internal(e.to_string()))?;
                let id = cnl.netnsid_of(&current).map_err(kernel("reading the namespace id"))?;
                *ours.insert(id)
            }
        };
        let host = match (cont.peer_index, cont.peer_netnsid) {
            (Some(peer), Some(nsid)) if nsid == here && nsid >= 0 => {
                hnl.link_by_index(peer).map_err(kernel("reading the host veth"))?
            }
            _ => None,
        };
        let host = host.filter(|h| h.kind == LinkKind::Veth && h.peer_index == Some(cont.index));
        match host {
            Some(host) => {
                if host.group != RETIRED_GROUP || host.up {
                    retire_host_link(hnl, &host)?;
                }
                retire_container_end(cnl, cont)?;
            }
            None => {
                ignore_not_found(cnl.delete_link(cont.index)).map_err(kernel("deleting the container interface"))?
            }
        }
    }
    Ok(())
}

/// Retires a host-side veth (its container end goes with it) and makes sure a reaper runs.
pub fn retire_host_link(hnl: &mut Netlink, host: &Link) -> Result<(), CniError> {
    ignore_not_found(hnl.set_down_in_group(host.index, RETIRED_GROUP)).map_err(kernel("retiring the host veth"))?;
    ensure_reaper();
    Ok(())
}

/// Down, then renamed to its tombstone name (a link must be down to be renamed).
fn retire_container_end(nl: &mut Netlink, link: &Link) -> Result<(), CniError> {
    let name = tombstone(link.index);
    if link.name == name {
        return Ok(());
    }
    if link.up {
        ignore_not_found(nl.set_up(link.index, false)).map_err(kernel("setting the interface down"))?;
    }
    ignore_not_found(nl.set_name(link.index, &name)).map_err(kernel("renaming the retired interface"))
}

/// Retires `ifname` in the container and its host peer (see [`teardown`]); a missing link is
/// success.
pub fn retire_container_link(netns: &weft_netns::NetNs, ifname: &str) -> Result<(), CniError> {
    let mut cnl = Netlink::in_netns_here(netns).map_err(kernel("opening netlink in the container"))?;
    let mut hnl = Netlink::new().map_err(kernel("opening netlink"))?;
    retire_veth(&mut cnl, &mut hnl, ifname)
}

/// Takes the namespace's reaper lock: `Ok(None)` when another process holds it.
fn claim() -> Result<Option<crate::attachment_lock::FileLock>, CniError> {
    crate::attachment_lock::FileLock::try_take(&reaper_lock())
}

/// Starts `weft cni reap` detached (own process group, no stdio, not waited for) unless a
/// reaper is at work in this namespace: that one takes every link retired before it finishes.
/// If it cannot start, the reaping is done right here instead.
fn ensure_reaper() {
    match claim() {
        Ok(None) => return,
        Ok(Some(probe)) => drop(probe),
        Err(_) => {}
    }
    let spawned = std::env::current_exe().and_then(|exe| {
        use std::os::unix::process::CommandExt;
        Command::new(exe)
            .arg0("weft")
            .args(["cni", "reap"])
            .env_remove("CNI_COMMAND")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
    });
    if spawned.is_err() {
        let _ = reap_after(std::time::Duration::ZERO);
    }
}

/// The reaper: deletes the retired group, batch after batch, until it is empty; exits at once
/// when another reaper holds the namespace's name.
pub fn reap() -> Result<(), CniError> {
    reap_after(COALESCE)
}

fn reap_after(coalesce: std::time::Duration) -> Result<(), CniError> {
    let mut nl = Netlink::new().map_err(kernel("opening netlink"))?;
    loop {
        let claimed = match claim() {
            Ok(None) => return Ok(()),
            Ok(Some(listener)) => Some(listener),
            Err(_) => None,
        };
        // DELs come in bursts (a node drained, a deployment scaled down): wait for the rest of
        // the burst, so that it is one batch for the kernel and its lock is not held by a
        // deletion while the burst's own DELs want it.
        std::thread::sleep(coalesce);
        while nl.delete_group(RETIRED_GROUP).map_err(kernel("deleting retired links"))? {}
        // Its lock file goes with it: a DEL after this makes a new one (and a new reaper).
        if let Some(lock) = claimed {
            lock.remove();
        }
        // A DEL that retired a link after the last batch and found the name taken left it to
        // this reaper: one more look after letting go of the name.
        if !nl.delete_group(RETIRED_GROUP).map_err(kernel("deleting retired links"))? {
            return Ok(());
        }
    }
}

/// GC: deletes every retired veth still present on the host.
pub fn sweep(hnl: &mut Netlink) -> Result<(), CniError> {
    hnl.delete_group(RETIRED_GROUP).map(drop).map_err(kernel("deleting retired links"))
}
