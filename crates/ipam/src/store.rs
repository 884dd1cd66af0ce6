//! The host-local on-disk store, byte-compatible with the reference plugin so a node can switch
//! between the two without losing a reservation:
//!
//! - `<dataDir>/<network>/<ip>`: one file per reserved address holding `<containerID>\r\n<ifname>`;
//! - `<dataDir>/<network>/last_reserved_ip.<set>`: the last address handed out from range set N;
//! - `<dataDir>/<network>/lock`: an exclusive `flock` held for the whole ADD or DEL.
//!
//! On top of that weft keeps `.weft-index/<containerID>@<ifname>` listing that attachment's
//! addresses, so finding an attachment's addresses is O(1) instead of the reference's walk over
//! the whole directory. The index is a hint: every entry is checked against the address file
//! before it is acted upon, and the reference plugin never confuses it with a reservation (its
//! content is never `<id>\r\n<ifname>`).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::{IpamError, Result};

const LINE_BREAK: &str = "\r\n";
const INDEX_DIR: &str = ".weft-index";
const LAST_RESERVED_PREFIX: &str = "last_reserved_ip.";

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
        let Ok(text) = std::fs::read_to_string(self.index_path(container_id, ifname)) else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|ip| self.owner(*ip).is_some_and(|(c, i)| c == container_id.trim() && i == ifname))
            .collect()
    }

    /// Records the attachment's addresses in the index (replacing what it had).
    pub fn set_index(&self, container_id: &str, ifname: &str, ips: &[IpAddr]) -> Result<()> {
        let path = self.index_path(container_id, ifname);
        if ips.is_empty() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(io("remove", &path)(e)),
                _ => Ok(()),
            };
        }
        // A hint, checked against the reservations on every read: written in place.
        let text: String = ips.iter().map(|ip| format!("{ip}\n")).collect();
        match overwrite(&path, text.as_bytes()) {
            Err(IpamError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {
                let dir = self.dir.join(INDEX_DIR);
                std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
                overwrite(&path, text.as_bytes())
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

/// Replaces a small file's content without truncating it to zero first.
fn overwrite(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new().write(true).create(true).truncate(false).open(path).map_err(io("open", path))?;
    file.write_all(bytes).map_err(io("write", path))?;
    file.set_len(bytes.len() as u64).map_err(io("truncate", path))
}
