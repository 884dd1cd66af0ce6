//! One attachment's calls, one at a time: ADD, DEL and CHECK of one (plugin, network,
//! container, interface) hold an exclusive `flock` on a file of their own, so none of them sees
//! another half done (a DEL releasing the address an ADD is about to return). Calls of different
//! attachments never wait for each other; a plugin delegating to another (the meta plugin to
//! bridge) takes its own lock, not its delegate's, so nothing waits for itself.
//!
//! The files live in [`LOCK_DIR`] (a tmpfs: gone at reboot, with the attachments). DEL removes its
//! attachment's file while still holding it; a call that was waiting for that file finds it
//! unlinked after taking the lock and takes the new one instead.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use weft_cni::args::CmdArgs;
use weft_cni::skel::Attachment;
use weft_cni::CniError;

use crate::common::fnv64;

/// Where the lock files are.
pub const LOCK_DIR: &str = "/run/weft/cni-locks";

/// An attachment's lock, held until dropped (or [`AttachmentLock::remove`]).
pub struct AttachmentLock {
    file: File,
    path: PathBuf,
}

/// `PLUGIN.NETWORKHASH.` — what every lock file of one plugin and network starts with.
fn prefix(plugin: &str, network: &str) -> String {
    format!("{plugin}.{}.", fnv64(network))
}

fn file_name(plugin: &str, network: &str, container_id: &str, ifname: &str) -> String {
    // Container IDs and interface names are validated (no `/`); a very long ID is hashed.
    let rest = format!("{container_id}@{ifname}");
    let rest = if rest.len() > 160 { fnv64(&rest) } else { rest };
    format!("{}{rest}", prefix(plugin, network))
}

fn io_error<'p>(what: &'static str, path: &'p std::path::Path) -> impl FnOnce(std::io::Error) -> CniError + 'p {
    move |e| CniError::io(format!("{what} {}: {e}", path.display()))
}

impl AttachmentLock {
    /// Waits for and takes the lock of `plugin`'s attachment `args` in `network`.
    pub fn take(plugin: &str, network: &str, args: &CmdArgs) -> Result<AttachmentLock, CniError> {
        let path = PathBuf::from(LOCK_DIR).join(file_name(plugin, network, &args.container_id, &args.ifname));
        loop {
            let open = || OpenOptions::new().create(true).truncate(false).write(true).open(&path);
            let file = match open() {
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    std::fs::create_dir_all(LOCK_DIR).map_err(io_error("creating", path.as_path()))?;
                    open()
                }
                other => other,
            }
            .map_err(io_error("opening", &path))?;
            file.lock().map_err(io_error("locking", &path))?;
            // Removed by the DEL that held it while this call waited: take the current one.
            let held = file.metadata().map_err(io_error("reading", &path))?;
            match std::fs::metadata(&path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(AttachmentLock { file, path });
                }
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error("reading", &path)(e)),
            }
        }
    }

    /// Removes the lock file (the attachment is gone) and lets go of the lock.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.file);
    }
}

/// GC: removes the lock files of `plugin`'s attachments in `network` that are not in `valid`
/// and that no call holds right now.
pub fn gc(plugin: &str, network: &str, valid: &[Attachment]) {
    let Ok(entries) = std::fs::read_dir(LOCK_DIR) else { return };
    let prefix = prefix(plugin, network);
    let keep: Vec<String> = valid.iter().map(|a| file_name(plugin, network, &a.container_id, &a.ifname)).collect();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.starts_with(&prefix) || keep.contains(&name) {
            continue;
        }
        let Ok(file) = File::open(entry.path()) else { continue };
        if file.try_lock().is_ok() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_per_plugin_network_and_attachment_and_bounded() {
        let a = file_name("bridge", "net", "c1", "eth0");
        assert!(a.starts_with(&prefix("bridge", "net")) && a.ends_with("c1@eth0"), "{a}");
        assert_ne!(a, file_name("weft", "net", "c1", "eth0"));
        assert_ne!(a, file_name("bridge", "net2", "c1", "eth0"));
        assert!(file_name("bridge", &"n".repeat(500), &"c".repeat(500), "eth0").len() < 100);
    }
}
