//! Network namespaces. A [`NetNs`] is an open handle (a file descriptor) to a namespace; work
//! happens inside it only on a short-lived OS thread that enters the namespace, does one job
//! (open a netlink socket, write a sysctl) and exits, so no thread ever returns to a pool in the
//! wrong namespace. Named namespaces live in `/var/run/netns` exactly as `ip netns` keeps them.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::statfs::{statfs, FsType, PROC_SUPER_MAGIC};

/// Where named namespaces are bind-mounted, as `ip netns add` does.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";
/// `NSFS_MAGIC`: a bind-mounted namespace file (nix does not name it).
const NSFS_MAGIC: FsType = FsType(0x6e73_6673);

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("failed to open netns {path:?}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{path:?} is not a network namespace")]
    NotNamespace { path: PathBuf },
    #[error("failed to {op} netns {name:?}: {source}")]
    Manage { op: &'static str, name: String, source: nix::Error },
    #[error("failed to enter netns: {0}")]
    Enter(nix::Error),
    #[error("the thread running in the netns panicked")]
    Panicked,
}

pub type Result<T, E = NetnsError> = std::result::Result<T, E>;

/// An open network namespace.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Opens the namespace at `path` and checks that it is one (nsfs, or a `/proc/PID/ns/net`).
    pub fn open(path: impl AsRef<Path>) -> Result<NetNs> {
        let path = path.as_ref().to_path_buf();
        let fs = statfs(&path).map_err(|e| NetnsError::Open { path: path.clone(), source: e.into() })?;
        let kind = fs.filesystem_type();
        if kind != NSFS_MAGIC && kind != PROC_SUPER_MAGIC {
            return Err(NetnsError::NotNamespace { path });
        }
        let file = File::open(&path).map_err(|source| NetnsError::Open { path: path.clone(), source })?;
        Ok(NetNs { file, path })
    }

    /// The namespace of this thread.
    pub fn current() -> Result<NetNs> {
        // A namespace for sure: no need to check the filesystem as `open` does.
        let path = PathBuf::from(format!("/proc/self/task/{}/ns/net", nix::unistd::gettid()));
        let file = File::open(&path).map_err(|source| NetnsError::Open { path: path.clone(), source })?;
        Ok(NetNs { file, path })
    }

    /// The path the namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a new thread inside this namespace and returns what it returns. The thread
    /// exits afterwards, so nothing else ever runs in the namespace by accident.
    pub fn run<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> Result<R> {
        let fd = self.file.as_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(fd, CloneFlags::CLONE_NEWNET).map_err(NetnsError::Enter)?;
                    Ok(f())
                })
                .join()
                .map_err(|_| NetnsError::Panicked)?
        })
    }

    /// Runs `f` on the calling thread inside this namespace, then returns the thread to the
    /// namespace it was in. Cheaper than [`NetNs::run`] (no thread), for single-threaded
    /// short-lived processes such as CNI plugins; the process aborts rather than go on in the
    /// wrong namespace if the way back fails.
    pub fn run_here<R, F: FnOnce() -> R>(&self, f: F) -> Result<R> {
        let home = NetNs::current()?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(NetnsError::Enter)?;
        let _back = Return(home);
        Ok(f())
    }

    /// Whether two handles name the same namespace (same inode).
    pub fn same_as(&self, other: &NetNs) -> bool {
        let ino = |f: &File| nix::sys::stat::fstat(f.as_fd()).map(|s| (s.st_dev, s.st_ino)).ok();
        ino(&self.file).is_some() && ino(&self.file) == ino(&other.file)
    }
}

impl AsRawFd for NetNs {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Puts the thread back into its namespace when dropped (also when unwinding).
struct Return(NetNs);

impl Drop for Return {
    fn drop(&mut self) {
        if setns(self.0.file.as_fd(), CloneFlags::CLONE_NEWNET).is_err() {
            // Going on in the wrong namespace would change the wrong network.
            std::process::abort();
        }
    }
}

/// The path of the named namespace `name`.
pub fn named_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Creates the named namespace `name` (like `ip netns add`); an existing one is an error.
pub fn create_named(name: &str) -> Result<NetNs> {
    let err = |op: &'static str| move |source| NetnsError::Manage { op, name: name.to_string(), source };
    ensure_run_dir().map_err(err("prepare"))?;
    let path = named_path(name);
    std::fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(|e| NetnsError::Manage {
        op: "create",
        name: name.to_string(),
        source: io_to_nix(&e),
    })?;
    let bound = std::thread::scope(|scope| {
        scope
            .spawn(|| -> nix::Result<()> {
                unshare(CloneFlags::CLONE_NEWNET)?;
                let own = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
                mount(Some(own.as_str()), &path, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            })
            .join()
            .unwrap_or(Err(nix::Error::EIO))
    });
    if let Err(e) = bound {
        let _ = std::fs::remove_file(&path);
        return Err(err("create")(e));
    }
    NetNs::open(&path)
}

/// Deletes the named namespace `name` (like `ip netns delete`); a missing one is success. The
/// namespace itself lives on while a process or open handle still holds it.
pub fn delete_named(name: &str) -> Result<()> {
    let path = named_path(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(NetnsError::Manage { op: "unmount", name: name.to_string(), source: e }),
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(NetnsError::Manage { op: "remove", name: name.to_string(), source: io_to_nix(&e) })
        }
        _ => Ok(()),
    }
}

/// Whether the named namespace exists.
pub fn exists(name: &str) -> bool {
    NetNs::open(named_path(name)).is_ok()
}

/// Makes `/var/run/netns` a shared mount point, so bind mounts under it propagate to every mount
/// namespace, as iproute2 does.
fn ensure_run_dir() -> nix::Result<()> {
    let dir = Path::new(NETNS_RUN_DIR);
    std::fs::create_dir_all(dir).map_err(|e| io_to_nix(&e))?;
    let make_shared = || mount(None::<&str>, dir, None::<&str>, MsFlags::MS_SHARED | MsFlags::MS_REC, None::<&str>);
    match make_shared() {
        Ok(()) => Ok(()),
        Err(nix::Error::EINVAL) => {
            // Not a mount point yet: bind it onto itself, then share it.
            mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)?;
            make_shared()
        }
        Err(e) => Err(e),
    }
}

fn io_to_nix(e: &std::io::Error) -> nix::Error {
    e.raw_os_error().map_or(nix::Error::EIO, nix::Error::from_raw)
}
