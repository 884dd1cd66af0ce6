//! One attachment's calls, one at a time: ADD, DEL and CHECK of one (plugin, network,
//! container, interface) hold a lock of their own, so none of them sees another half done (a DEL
//! releasing the address an ADD is about to return). Calls of different attachments never wait
//! for each other; a plugin delegating to another (the meta plugin to bridge) takes its own lock,
//! not its delegate's, so nothing waits for itself.
//!
//! The lock is an abstract unix socket name, `weft-cni/<plugin>/<network>/<container>@<ifname>`
//! (hashed when long): binding it either succeeds or fails with `EADDRINUSE` in one step, and the
//! name goes away with its process however that ends — a killed plugin never leaves a stale lock,
//! and there is no file to leak or to clean up. Abstract names are per network namespace; a
//! runtime runs every plugin call of a node in the same one (the node's own).

use std::io::ErrorKind;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::time::Duration;

use weft_cni::args::CmdArgs;
use weft_cni::CniError;

use crate::common::fnv64;

/// What every lock name starts with.
pub const PREFIX: &str = "weft-cni/";

/// An attachment's lock, held until dropped.
pub struct AttachmentLock {
    _socket: UnixListener,
}

/// The lock's name: at most 107 bytes, as abstract socket names are.
pub fn name(plugin: &str, network: &str, container_id: &str, ifname: &str) -> String {
    let full = format!("{PREFIX}{plugin}/{network}/{container_id}@{ifname}");
    if full.len() <= 100 {
        return full;
    }
    format!("{PREFIX}{plugin}/{}/{}", fnv64(network), fnv64(&format!("{container_id}@{ifname}")))
}

impl AttachmentLock {
    /// Waits for and takes the lock of `plugin`'s attachment `args` in `network`.
    pub fn take(plugin: &str, network: &str, args: &CmdArgs) -> Result<AttachmentLock, CniError> {
        let name = name(plugin, network, &args.container_id, &args.ifname);
        let addr = SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(|e| CniError::internal(format!("the attachment lock {name:?}: {e}")))?;
        // Another call of this attachment holds it: it finishes in milliseconds.
        let mut wait = Duration::from_micros(200);
        loop {
            match UnixListener::bind_addr(&addr) {
                Ok(socket) => return Ok(AttachmentLock { _socket: socket }),
                Err(e) if e.kind() == ErrorKind::AddrInUse => {
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_millis(20));
                }
                Err(e) => return Err(CniError::internal(format!("taking the attachment lock {name:?}: {e}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_per_plugin_network_and_attachment_and_bounded() {
        let a = name("bridge", "net", "c1", "eth0");
        assert_eq!(a, "weft-cni/bridge/net/c1@eth0");
        assert_ne!(a, name("weft", "net", "c1", "eth0"));
        assert_ne!(a, name("bridge", "net2", "c1", "eth0"));
        let long = name("bridge", &"n".repeat(500), &"c".repeat(500), "eth0");
        assert!(long.len() <= 100 && long.starts_with("weft-cni/bridge/"), "{long}");
        assert_ne!(long, name("bridge", &"n".repeat(500), &"c".repeat(499), "eth0"));
    }

    #[test]
    fn a_held_lock_is_waited_for_and_taken_when_released() {
        let args = CmdArgs {
            command: weft_cni::args::Command::Add,
            container_id: format!("lock-test-{}", std::process::id()),
            netns: String::new(),
            ifname: "eth0".into(),
            args: String::new(),
            path: Vec::new(),
            stdin: Vec::new(),
        };
        let held = AttachmentLock::take("bridge", "n", &args).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let args = args.clone();
            std::thread::spawn(move || {
                let lock = AttachmentLock::take("bridge", "n", &args).unwrap();
                tx.send(()).unwrap();
                drop(lock);
            })
        };
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "taken while held");
        // Another attachment is not held up.
        drop(AttachmentLock::take("bridge", "n2", &args).unwrap());
        drop(held);
        rx.recv_timeout(Duration::from_secs(5)).expect("taken once released");
        waiter.join().unwrap();
    }
}
