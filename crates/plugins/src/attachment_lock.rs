//! One attachment's calls, one at a time: ADD, DEL and CHECK of one (plugin, network,
//! container, interface) hold an exclusive `flock` on a file of their own, so none of them sees
//! another half done (a DEL releasing the address an ADD is about to return). Calls of different
//! attachments never wait for each other; a plugin delegating to another (the meta plugin to
//! bridge) takes its own lock, not its delegate's.
//!
//! The files live in [`LOCK_DIR`] (a tmpfs, gone at reboot with the attachments), a directory
//! only root may enter — a lock anyone could take (an abstract socket name, say) would let any
//! local process stall pod creation — or in the directory [`LOCK_DIR_ENV`] names (the lab and the
//! tests keep theirs with the rest of their state). A call waits at most [`WAIT`] and then fails
//! with the reason. DEL removes its attachment's file while still holding it; a call that was
//! waiting for that file finds it unlinked after taking the lock and takes the new one instead.
//! GC removes the files of attachments that are no longer valid.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use weft_cni::args::CmdArgs;
use weft_cni::skel::Attachment;
use weft_cni::CniError;

use crate::common::fnv64;

/// Where the lock files are by default.
pub const LOCK_DIR: &str = "/run/weft/cni-locks";

/// The environment variable that puts the lock files elsewhere.
pub const LOCK_DIR_ENV: &str = "WEFT_CNI_LOCK_DIR";

/// The longest a call waits for another call of its attachment.
pub const WAIT: Duration = Duration::from_secs(60);

/// Where the lock files are.
pub fn lock_dir() -> PathBuf {
    std::env::var_os(LOCK_DIR_ENV).filter(|d| !d.is_empty()).map_or_else(|| PathBuf::from(LOCK_DIR), PathBuf::from)
}

/// An exclusive lock on a file of the lock directory, held until dropped.
pub struct FileLock {
    file: File,
    path: PathBuf,
}

fn io_error<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> CniError + 'p {
    move |e| CniError::io(format!("{what} {}: {e}", path.display()))
}

/// Opens (creating it, and the root-only directory, if needed) the lock file `name`.
fn open(name: &str) -> Result<(File, PathBuf), CniError> {
    open_in(&lock_dir(), name)
}

fn open_in(dir: &Path, name: &str) -> Result<(File, PathBuf), CniError> {
    let path = dir.join(name);
    let open = || OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&path);
    let file = match open() {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_error("creating", dir))?;
            open()
        }
        other => other,
    }
    .map_err(io_error("opening", &path))?;
    Ok((file, path))
}

/// Whether `file` is still what `path` names (not unlinked by a DEL meanwhile).
fn current(file: &File, path: &Path) -> Result<bool, CniError> {
    let held = file.metadata().map_err(io_error("reading", path))?;
    match std::fs::metadata(path) {
        Ok(now) => Ok(now.ino() == held.ino() && now.dev() == held.dev()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error("reading", path)(e)),
    }
}

impl FileLock {
    /// Waits (at most [`WAIT`]) for and takes the lock `name`; `what` says what it guards.
    pub fn take(name: &str, what: &str) -> Result<FileLock, CniError> {
        let deadline = Instant::now() + WAIT;
        let mut wait = Duration::from_micros(200);
        loop {
            let (file, path) = open(name)?;
            loop {
                match file.try_lock() {
                    Ok(()) => break,
                    Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                        std::thread::sleep(wait);
                        wait = (wait * 2).min(Duration::from_millis(50));
                    }
                    Err(std::fs::TryLockError::WouldBlock) => {
                        return Err(CniError::new(
                            weft_cni::ErrorCode::TryAgainLater,
                            format!("another call of {what} has held its lock {} for {WAIT:?}", path.display()),
                        ));
                    }
                    Err(std::fs::TryLockError::Error(e)) => return Err(io_error("locking", &path)(e)),
                }
            }
            if current(&file, &path)? {
                return Ok(FileLock { file, path });
            }
        }
    }

    /// Takes the lock `name` only if nobody holds it.
    pub fn try_take(name: &str) -> Result<Option<FileLock>, CniError> {
        Self::try_take_in(&lock_dir(), name)
    }

    /// [`FileLock::try_take`] in the lock directory `dir`.
    pub fn try_take_in(dir: &Path, name: &str) -> Result<Option<FileLock>, CniError> {
        let (file, path) = open_in(dir, name)?;
        match file.try_lock() {
            Ok(()) if current(&file, &path)? => Ok(Some(FileLock { file, path })),
            Ok(()) | Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(io_error("locking", &path)(e)),
        }
    }

    /// Removes the lock file (what it guarded is gone) and lets go of the lock.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.file);
    }
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

/// An attachment's lock.
pub struct AttachmentLock(FileLock);

impl AttachmentLock {
    /// Waits for and takes the lock of `plugin`'s attachment `args` in `network`.
    pub fn take(plugin: &str, network: &str, args: &CmdArgs) -> Result<AttachmentLock, CniError> {
        let name = file_name(plugin, network, &args.container_id, &args.ifname);
        let what = format!("{} {}@{}", plugin, args.container_id, args.ifname);
        FileLock::take(&name, &what).map(AttachmentLock)
    }

    /// The attachment is gone (DEL): its lock file goes too.
    pub fn remove(self) {
        self.0.remove();
    }

    /// Ends a DEL that collected `errors`: the first is returned; without any the attachment is
    /// gone and so is its lock file.
    pub fn finish_del(self, errors: Vec<CniError>) -> Result<(), CniError> {
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => {
                self.remove();
                Ok(())
            }
        }
    }
}

/// GC: removes the lock files of `plugin`'s attachments in `network` that are not in `valid`
/// and that no call holds right now.
pub fn gc(plugin: &str, network: &str, valid: &[Attachment]) {
    let Ok(entries) = std::fs::read_dir(lock_dir()) else { return };
    let prefix = prefix(plugin, network);
    let keep: Vec<String> = valid.iter().map(|a| file_name(plugin, network, &a.container_id, &a.ifname)).collect();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.starts_with(&prefix) || keep.contains(&name) {
            continue;
        }
        if let Ok(Some(lock)) = FileLock::try_take(&name) {
            lock.remove();
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
