//! The host-local on-disk store, byte-compatible with the reference plugin so a node can switch
//! between the two without losing a reservation:
//!
//! - `<dataDir>/<network>/<ip>`: one file per reserved address holding `<containerID>\r\n<ifname>`;
//! - `<dataDir>/<network>/last_reserved_ip.<set>`: the last address handed out from range set N;
//! - `<dataDir>/<network>/lock`: an exclusive `flock` held for the whole ADD or DEL.
//!
//! On top of that weft keeps an index entry `.weft-index/<containerID>@<ifname>` per attachment,
//! so finding an attachment's addresses is O(1) instead of the reference's walk over the whole
//! directory. The entry is a hard link to the attachment's first reservation with the addresses
//! in the extended attribute `user.weft.ips`: it costs no inode of its own (allocating one is the
//! most expensive thing host-local does on ext4 without a journal). Where hard links or user
//! xattrs are not supported it is a plain file listing the addresses. The index is a hint: every
//! address it names is checked against the address file before it is acted upon. The reference
//! plugin reads the link as one more file of the attachment, so its DEL removes it too, and never
//! as an address (its name is not one).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::{IpamError, Result};

const LINE_BREAK: &str = "\r\n";
const INDEX_DIR: &str = ".weft-index";
const LAST_RESERVED_PREFIX: &str = "last_reserved_ip.";
const INDEX_XATTR: &str = "user.weft.ips";

/// One network's store, locked for as long as it lives.
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

fn io<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> IpamError + 'p {
    move |source| IpamError::Io { op, path: path.display().to_string(), source }
}

/// The file name of a reservation (the address as text, as the reference writes it on Linux).
fn ip_file(ip: IpAddr) -> String {
    ip.to_string()
}

impl Store {
    /// Opens (creating it if needed) the store of `network` under `data_dir` and takes its lock.
    pub fn open(data_dir: &Path, network: &str) -> Result<Store> {
        let dir = data_dir.join(network);
        let lock_path = dir.join("lock");
        let open_lock = || OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&lock_path);
        // The directory exists after the first call: create it only when the lock cannot be.
        let lock = match open_lock() {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
                open_lock()
            }
            other => other,
        }
        .map_err(io("open", &lock_path))?;
        lock.lock().map_err(io("lock", &lock_path))?;
        Ok(Store { dir, _lock: lock })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reserves `ip` for the attachment; false when someone holds it already.
    pub fn reserve(&self, container_id: &str, ifname: &str, ip: IpAddr, set: usize) -> Result<bool> {
        let path = self.dir.join(ip_file(ip));
        let mut file = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io("create", &path)(e)),
        };
        let written = file.write_all(format!("{}{LINE_BREAK}{ifname}", container_id.trim()).as_bytes());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&path);
            return Err(io("write", &path)(e));
        }
        // Written in place: it is only where round robin resumes. Not with O_TRUNC: truncating
        // a file to zero and rewriting it makes ext4 flush it on close (auto_da_alloc), which
        // costs more than everything else host-local does.
        let last = self.dir.join(format!("{LAST_RESERVED_PREFIX}{set}"));
        overwrite(&last, ip.to_string().as_bytes())?;
        Ok(true)
    }

    /// The last address reserved from range set `set`.
    pub fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        std::fs::read_to_string(self.dir.join(format!("{LAST_RESERVED_PREFIX}{set}"))).ok()?.trim().parse().ok()
    }

    /// Who holds `ip`: `(containerID, ifname)`.
    pub fn owner(&self, ip: IpAddr) -> Option<(String, String)> {
        let text = std::fs::read_to_string(self.dir.join(ip_file(ip))).ok()?;
        parse_owner(&text)
    }

    /// Releases `ip` if the attachment holds it.
    pub fn release_if_owned(&self, container_id: &str, ifname: &str, ip: IpAddr) -> Result<bool> {
        if self.owner(ip).is_some_and(|(c, i)| c == container_id.trim() && i == ifname) {
            let path = self.dir.join(ip_file(ip));
            match std::fs::remove_file(&path) {
                Ok(()) => return Ok(true),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &path)(e)),
            }
        }
        Ok(false)
    }

    /// The addresses the index lists for the attachment, checked against the reservations.
    pub fn indexed(&self, container_id: &str, ifname: &str) -> Vec<IpAddr> {
        let Some(text) = read_index(&self.index_path(container_id, ifname)) else { return Vec::new() };
        text.lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|ip| self.owner(*ip).is_some_and(|(c, i)| c == container_id.trim() && i == ifname))
            .collect()
    }

    /// Records the attachment's addresses in the index (replacing what it had; none removes it).
    pub fn set_index(&self, container_id: &str, ifname: &str, ips: &[IpAddr]) -> Result<()> {
        let path = self.index_path(container_id, ifname);
        let Some(first) = ips.first() else { return remove_if_present(&path) };
        let text: String = ips.iter().map(|ip| format!("{ip}\n")).collect();
        let reservation = self.dir.join(ip_file(*first));
        match self.link_index(&reservation, &path) {
            Ok(()) => {
                match rustix::fs::setxattr(&path, INDEX_XATTR, text.as_bytes(), rustix::fs::XattrFlags::empty()) {
                    Ok(()) => return Ok(()),
                    // No user xattrs here: the entry becomes a plain file (below).
                    Err(e) if e == rustix::io::Errno::NOTSUP => {}
                    Err(e) => {
                        let _ = std::fs::remove_file(&path);
                        return Err(io("set the index attribute of", &path)(e.into()));
                    }
                }
            }
            // No hard links on this filesystem: a plain file too.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) => {}
            Err(e) => return Err(io("link", &path)(e)),
        }
        // Never written through an existing entry: it may be a link to a reservation.
        remove_if_present(&path)?;
        let mut file = OpenOptions::new().write(true).create_new(true).open(&path).map_err(io("create", &path))?;
        file.write_all(text.as_bytes()).map_err(io("write", &path))
    }

    /// Hard-links `path` to `reservation`, replacing a stale entry and creating the index
    /// directory on first use.
    fn link_index(&self, reservation: &Path, path: &Path) -> std::io::Result<()> {
        match std::fs::hard_link(reservation, path) {
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                std::fs::remove_file(path)?;
                std::fs::hard_link(reservation, path)
            }
            Err(e) if e.kind() == ErrorKind::NotFound && reservation.exists() => {
                std::fs::create_dir_all(self.dir.join(INDEX_DIR))?;
                std::fs::hard_link(reservation, path)
            }
            other => other,
        }
    }

    /// Every reservation: `(ip, containerID, ifname)`. A full walk, for GC and fallbacks only.
    pub fn reservations(&self) -> Result<Vec<(IpAddr, String, String)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io("read", &self.dir))? {
            let entry = entry.map_err(io("read", &self.dir))?;
            let Some(ip) = entry.file_name().to_str().and_then(|n| n.parse::<IpAddr>().ok()) else { continue };
            if let Some((c, i)) = std::fs::read_to_string(entry.path()).ok().as_deref().and_then(parse_owner) {
                out.push((ip, c, i));
            }
        }
        Ok(out)
    }

    /// The attachments the index knows, for GC.
    pub fn indexed_attachments(&self) -> Vec<(String, String)> {
        let Ok(entries) = std::fs::read_dir(self.dir.join(INDEX_DIR)) else { return Vec::new() };
        let names: BTreeSet<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
        names.into_iter().filter_map(|n| n.split_once('@').map(|(c, i)| (c.to_string(), i.to_string()))).collect()
    }

    fn index_path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.dir.join(INDEX_DIR).join(format!("{}@{ifname}", container_id.trim()))
    }
}

fn parse_owner(text: &str) -> Option<(String, String)> {
    let text = text.trim();
    let (c, i) = text.split_once(LINE_BREAK).unwrap_or((text, ""));
    Some((c.trim().to_string(), i.trim().to_string()))
}

/// The addresses an index entry lists: its attribute, or the content of a plain-file entry.
fn read_index(path: &Path) -> Option<String> {
    let mut buf = [0u8; 512];
    match rustix::fs::getxattr(path, INDEX_XATTR, &mut buf[..]) {
        Ok(n) => return String::from_utf8(buf[..n].to_vec()).ok(),
        Err(e) if e == rustix::io::Errno::NOENT => return None,
        Err(e) if e == rustix::io::Errno::RANGE => {
            let mut big = vec![0u8; rustix::fs::getxattr_query(path, INDEX_XATTR).ok()?];
            let n = rustix::fs::getxattr(path, INDEX_XATTR, &mut big[..]).ok()?;
            big.truncate(n);
            return String::from_utf8(big).ok();
        }
        // No attribute (a plain-file entry) or no xattrs on this filesystem.
        Err(_) => {}
    }
    std::fs::read_to_string(path).ok()
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(io("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Replaces a small file's content without truncating it to zero first.
fn overwrite(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new().write(true).create(true).truncate(false).open(path).map_err(io("open", path))?;
    file.write_all(bytes).map_err(io("write", path))?;
    file.set_len(bytes.len() as u64).map_err(io("truncate", path))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn index_entry_is_a_link_to_the_reservation_with_the_addresses_attached() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "net").unwrap();
        assert!(store.reserve("c1", "eth0", ip("10.0.0.2"), 0).unwrap());
        assert!(store.reserve("c1", "eth0", ip("fd00::2"), 1).unwrap());
        store.set_index("c1", "eth0", &[ip("10.0.0.2"), ip("fd00::2")]).unwrap();

        let entry = dir.path().join("net/.weft-index/c1@eth0");
        let reservation = dir.path().join("net/10.0.0.2");
        assert_eq!(std::fs::metadata(&entry).unwrap().ino(), std::fs::metadata(&reservation).unwrap().ino());
        assert_eq!(std::fs::read_to_string(&reservation).unwrap(), "c1\r\neth0", "the reservation is untouched");
        assert_eq!(store.indexed("c1", "eth0"), [ip("10.0.0.2"), ip("fd00::2")]);

        // Replaced by a new set of addresses, the old reservation still intact.
        assert!(store.reserve("c1", "eth0", ip("10.0.0.3"), 0).unwrap());
        store.set_index("c1", "eth0", &[ip("10.0.0.3")]).unwrap();
        assert_eq!(store.indexed("c1", "eth0"), [ip("10.0.0.3")]);
        assert_eq!(std::fs::read_to_string(&reservation).unwrap(), "c1\r\neth0");

        store.set_index("c1", "eth0", &[]).unwrap();
        assert!(!entry.exists());
        assert_eq!(std::fs::read_to_string(dir.path().join("net/10.0.0.3")).unwrap(), "c1\r\neth0");
    }

    #[test]
    fn a_plain_file_entry_is_read_and_replaced_without_writing_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "net").unwrap();
        assert!(store.reserve("c1", "eth0", ip("10.0.0.2"), 0).unwrap());
        // What weft writes where links or user xattrs are missing (and wrote before links).
        std::fs::create_dir_all(dir.path().join("net/.weft-index")).unwrap();
        std::fs::write(dir.path().join("net/.weft-index/c1@eth0"), "10.0.0.2\n").unwrap();
        assert_eq!(store.indexed("c1", "eth0"), [ip("10.0.0.2")]);
        store.set_index("c1", "eth0", &[ip("10.0.0.2")]).unwrap();
        assert_eq!(store.indexed("c1", "eth0"), [ip("10.0.0.2")]);
        assert_eq!(std::fs::read_to_string(dir.path().join("net/10.0.0.2")).unwrap(), "c1\r\neth0");
    }

    #[test]
    fn an_entry_outliving_its_reservation_names_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "net").unwrap();
        assert!(store.reserve("c1", "eth0", ip("10.0.0.2"), 0).unwrap());
        store.set_index("c1", "eth0", &[ip("10.0.0.2")]).unwrap();
        // The reference plugin's DEL removes the address file (and, walking, the link too);
        // here only the address file goes, and someone else takes the address.
        std::fs::remove_file(dir.path().join("net/10.0.0.2")).unwrap();
        assert!(store.indexed("c1", "eth0").is_empty());
        assert!(store.reserve("c2", "eth0", ip("10.0.0.2"), 0).unwrap());
        assert!(store.indexed("c1", "eth0").is_empty());
        assert_eq!(store.owner(ip("10.0.0.2")), Some(("c2".into(), "eth0".into())));
    }
}
