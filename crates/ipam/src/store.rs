//! The host-local on-disk store, byte-compatible with the reference plugin so a node can switch
//! between the two without losing a reservation:
//!
//! - `<dataDir>/<network>/<ip>`: one file per reserved address holding `<containerID>\r\n<ifname>`;
//! - `<dataDir>/<network>/last_reserved_ip.<set>`: the last address handed out from range set N;
//! - `<dataDir>/<network>/lock`: an exclusive `flock` held for the whole ADD or DEL.
//!
//! On top of that weft keeps an index entry `.weft-index/<containerID>@<ifname>` per attachment,
//! so finding an attachment's addresses is O(1) instead of the reference's walk over the whole
//! directory (see `docs/adr/0002-host-local-index.md`).
//!
//! **Crash consistency.** A plugin can be killed between any two system calls. weft orders its
//! writes so that every intermediate state is one the next call understands:
//!
//! 1. the entry is created first and holds the reservation's content (`<id>\r\n<ifname>`);
//! 2. an address is reserved by hard-linking the entry to the address's name: `link` either
//!    fails (the address is taken) or makes a complete reservation in one step — there is never
//!    an empty or half-written address file, and every reservation weft makes shares the entry's
//!    inode;
//! 3. the entry's extended attribute `user.weft.ips` lists the addresses.
//!
//! What ties it together is a *clean mark*, the attribute `user.weft.clean` on the lock file: a
//! call removes it before its first change and sets it again, to a fingerprint of the directory
//! (its modification time and the `last_reserved_ip` files), once the store is consistent. A
//! call that opens the store and finds no mark, or a mark that does not match (a killed call; the
//! reference plugin wrote here), walks the directory once under the lock and repairs it: every
//! attachment holding addresses gets an entry listing exactly them (reservations made by the
//! reference plugin are adopted that way), entries holding nothing are removed, and empty address
//! files — a writer killed between create and write; only the reference writes that way — are
//! removed. With the mark in place, an attachment without an entry holds nothing, so neither ADD
//! nor DEL ever walks the directory. Where user xattrs are not supported, every call walks.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::{IpamError, Result};

const LINE_BREAK: &str = "\r\n";
const INDEX_DIR: &str = ".weft-index";
const LAST_RESERVED_PREFIX: &str = "last_reserved_ip.";
const INDEX_XATTR: &str = "user.weft.ips";
const CLEAN_XATTR: &str = "user.weft.clean";

/// An attachment: (containerID, ifname).
pub type Attachment = (String, String);

/// One network's store, locked for as long as it lives.
pub struct Store {
    dir: PathBuf,
    lock: File,
    /// The `last_reserved_ip.N` contents, as read at open and written since.
    last: Vec<Option<String>>,
    /// Every attachment's addresses when the store was walked at open (no clean mark).
    walked: Option<BTreeMap<Attachment, Vec<IpAddr>>>,
    /// Whether the clean mark has been removed (by this call's first change, or before it).
    dirty: std::cell::Cell<bool>,
}

/// The longest a call waits for the store's lock.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Takes `file`'s lock, waiting at most `wait`.
fn lock_within(file: &File, path: &Path, wait: std::time::Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + wait;
    let mut pause = std::time::Duration::from_micros(200);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(io("lock", path)(std::io::Error::other(format!("held by another process for {wait:?}"))))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io("lock", path)(e)),
        }
    }
}

fn io<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> IpamError + 'p {
    move |source| IpamError::Io { op, path: path.display().to_string(), source }
}

fn errno(e: rustix::io::Errno) -> std::io::Error {
    e.into()
}

/// The file name of a reservation (the address as text, as the reference writes it on Linux).
fn ip_file(ip: IpAddr) -> String {
    ip.to_string()
}

fn owner_text(container_id: &str, ifname: &str) -> String {
    format!("{}{LINE_BREAK}{ifname}", container_id.trim())
}

impl Store {
    /// Opens (creating it if needed) the store of `network` under `data_dir`, takes its lock and,
    /// when it is not marked clean, repairs it.
    pub fn open(data_dir: &Path, network: &str) -> Result<Store> {
        let dir = data_dir.join(network);
        let lock_path = dir.join("lock");
        let open_lock = || {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new().create(true).truncate(false).read(true).write(true).mode(0o600).open(&lock_path)
        };
        // The directory exists after the first call: create it only when the lock cannot be.
        let lock = match open_lock() {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
                open_lock()
            }
            other => other,
        }
        .map_err(io("open", &lock_path))?;
        // Root's alone (the reference makes it 0644: any user could open it and hold the lock).
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = lock.set_permissions(std::fs::Permissions::from_mode(0o600));
        }
        lock_within(&lock, &lock_path, LOCK_WAIT)?;
        let mut store = Store { dir, lock, last: Vec::new(), walked: None, dirty: std::cell::Cell::new(false) };
        store.last = store.read_last_reserved();
        if !store.marked_clean() {
            store.dirty.set(true);
            store.walked = Some(store.repair()?);
        }
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether opening walked the directory (it was not marked clean).
    pub fn was_walked(&self) -> bool {
        self.walked.is_some()
    }

    /// Marks the store clean again (see the module doc): call once it is consistent. A store
    /// dropped without it stays marked dirty, and the next call repairs it.
    pub fn commit(self) -> Result<()> {
        if !self.dirty.get() {
            return Ok(());
        }
        let mark = self.fingerprint().map_err(io("read", &self.dir))?;
        match rustix::fs::fsetxattr(&self.lock, CLEAN_XATTR, mark.as_bytes(), rustix::fs::XattrFlags::empty()) {
            // No user xattrs here: every call walks, as the reference does.
            Err(e) if e == rustix::io::Errno::NOTSUP => Ok(()),
            other => other.map_err(|e| io("mark clean", &self.dir)(errno(e))),
        }
    }

    /// Removes the clean mark before the first change of this call.
    fn mark_dirty(&self) -> Result<()> {
        if self.dirty.replace(true) {
            return Ok(());
        }
        match rustix::fs::fremovexattr(&self.lock, CLEAN_XATTR) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::NODATA || e == rustix::io::Errno::NOTSUP => Ok(()),
            Err(e) => Err(io("mark dirty", &self.dir)(errno(e))),
        }
    }

    /// The directory's modification time and the round-robin positions: anything that reserves
    /// an address changes one of them.
    fn fingerprint(&self) -> std::io::Result<String> {
        let meta = std::fs::metadata(&self.dir)?;
        // The index directory too: an entry removed by hand changes it.
        let index = std::fs::metadata(self.dir.join(INDEX_DIR)).map_or(0, |m| m.mtime_nsec() ^ (m.mtime() << 30));
        // The round-robin positions hashed, so the mark stays small whatever the files hold.
        let positions = self.last.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, last| {
            last.as_deref()
                .unwrap_or("\0")
                .bytes()
                .chain([b'|'])
                .fold(h, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
        });
        Ok(format!("{}.{:09}.{}.{positions:016x}.{index:x}", meta.mtime(), meta.mtime_nsec(), self.last.len()))
    }

    fn marked_clean(&self) -> bool {
        let mut buf = [0u8; 256];
        let Ok(n) = rustix::fs::fgetxattr(&self.lock, CLEAN_XATTR, &mut buf[..]) else { return false };
        self.fingerprint().is_ok_and(|mark| mark.as_bytes() == &buf[..n])
    }

    fn read_last_reserved(&self) -> Vec<Option<String>> {
        use std::io::Read;
        let mut out = Vec::new();
        loop {
            let path = self.dir.join(format!("{LAST_RESERVED_PREFIX}{}", out.len()));
            // An address is short: more than that is damage, and is not read whole.
            let mut text = String::new();
            match File::open(path).and_then(|f| f.take(64).read_to_string(&mut text)) {
                Ok(_) => out.push(Some(text)),
                Err(e) if e.kind() == ErrorKind::NotFound => return out,
                Err(_) => out.push(None),
            }
        }
    }

    /// The last address reserved from range set `set`.
    pub fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        self.last.get(set)?.as_deref()?.trim().parse().ok()
    }

    /// Who holds `ip`: `(containerID, ifname)`.
    pub fn owner(&self, ip: IpAddr) -> Option<Attachment> {
        let text = std::fs::read_to_string(self.dir.join(ip_file(ip))).ok()?;
        parse_owner(&text)
    }

    /// Whether the attachment holds `ip`: its reservation names the container and the
    /// interface, or only the container (the reference's old format, which it still honours).
    fn owned_by(&self, ip: IpAddr, container_id: &str, ifname: &str) -> bool {
        self.owner(ip).is_some_and(|(c, i)| c == container_id.trim() && (i == ifname || i.is_empty()))
    }

    /// Every address the attachment holds. O(1): the entry's list, each address checked against
    /// its reservation (or the walk made at open, where there was one).
    pub fn held(&mut self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>> {
        let mut listed = Vec::new();
        // The attachment's entry, and the container's entry of the reference's old format.
        for i in [ifname, ""] {
            if self.walked.is_none() {
                // An entry without a list, an empty one or one that is not a list: damage the
                // mark cannot vouch for. Walk.
                let found = match read_index(&self.index_path(container_id, i)) {
                    Entry::Missing => Some(Vec::new()),
                    Entry::Listed(text) => parse_index(&text).filter(|ips| !ips.is_empty()),
                    Entry::Unlisted => None,
                };
                match found {
                    Some(ips) => listed.extend(ips),
                    None => {
                        self.dirty.set(true);
                        self.walked = Some(self.repair()?);
                    }
                }
            }
            if let Some(walked) = &self.walked {
                listed
                    .extend(walked.get(&(container_id.trim().to_string(), i.to_string())).cloned().unwrap_or_default());
            }
        }
        listed.sort();
        listed.dedup();
        Ok(listed.into_iter().filter(|ip| self.owned_by(*ip, container_id, ifname)).collect())
    }

    /// Makes sure the attachment has an entry that reservations can be linked to. An entry that
    /// already backs reservations (`keep`) stays; anything else under its name is replaced.
    pub fn open_entry(&self, container_id: &str, ifname: &str, keep: bool) -> Result<()> {
        self.mark_dirty()?;
        let path = self.index_path(container_id, ifname);
        if keep && path.exists() {
            return Ok(());
        }
        remove_if_present(&path)?;
        let create = || OpenOptions::new().write(true).create_new(true).open(&path);
        let mut file = match create() {
            Err(e) if e.kind() == ErrorKind::NotFound || e.kind() == ErrorKind::NotADirectory => {
                self.ensure_index_dir()?;
                create()
            }
            other => other,
        }
        .map_err(io("create", &path))?;
        file.write_all(owner_text(container_id, ifname).as_bytes()).map_err(io("write", &path))
    }

    /// Reserves `ip` for the attachment (whose entry [`Store::open_entry`] made) in one step: the
    /// entry is hard-linked to the address's name. False when someone holds it already.
    pub fn reserve(&mut self, container_id: &str, ifname: &str, ip: IpAddr, set: usize) -> Result<bool> {
        self.mark_dirty()?;
        let path = self.dir.join(ip_file(ip));
        let entry = self.index_path(container_id, ifname);
        match std::fs::hard_link(&entry, &path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(false),
            // No hard links on this filesystem: created and written, as the reference does (a
            // kill in between leaves an empty file, which the next call's repair removes).
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) => {
                if !create_with(&path, owner_text(container_id, ifname).as_bytes())? {
                    return Ok(false);
                }
            }
            Err(e) => return Err(io("link", &path)(e)),
        }
        // Written in place: it is only where round robin resumes. Not with O_TRUNC: truncating
        // a file to zero and rewriting it makes ext4 flush it on close (auto_da_alloc), which
        // costs more than everything else host-local does.
        let last = self.dir.join(format!("{LAST_RESERVED_PREFIX}{set}"));
        let text = ip.to_string();
        if let Err(e) = overwrite(&last, text.as_bytes()) {
            // Not handed out after all: the address goes back (no disk, no space, a directory
            // in the file's place), so a failed ADD leaks nothing.
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        if self.last.len() <= set {
            self.last.resize(set + 1, None);
        }
        self.last[set] = Some(text);
        Ok(true)
    }

    /// Records the attachment's addresses in its entry; none removes the entry.
    pub fn close_entry(&mut self, container_id: &str, ifname: &str, ips: &[IpAddr]) -> Result<()> {
        self.mark_dirty()?;
        let path = self.index_path(container_id, ifname);
        if let Some(walked) = &mut self.walked {
            let key = (container_id.trim().to_string(), ifname.to_string());
            if ips.is_empty() {
                walked.remove(&key);
            } else {
                walked.insert(key, ips.to_vec());
            }
        }
        if ips.is_empty() {
            return remove_if_present(&path);
        }
        let text: String = ips.iter().map(|ip| format!("{ip}\n")).collect();
        match rustix::fs::setxattr(&path, INDEX_XATTR, text.as_bytes(), rustix::fs::XattrFlags::empty()) {
            // No user xattrs: the store is walked on every call instead.
            Err(e) if e == rustix::io::Errno::NOTSUP => Ok(()),
            other => other.map_err(|e| io("set the index attribute of", &path)(errno(e))),
        }
    }

    /// Releases `ip` if the attachment holds it.
    pub fn release_if_owned(&self, container_id: &str, ifname: &str, ip: IpAddr) -> Result<bool> {
        if !self.owned_by(ip, container_id, ifname) {
            return Ok(false);
        }
        self.mark_dirty()?;
        let path = self.dir.join(ip_file(ip));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io("remove", &path)(e)),
        }
    }

    /// Whether the attachment has an entry (possibly holding nothing: a call killed early).
    pub fn has_entry(&self, container_id: &str, ifname: &str) -> bool {
        self.index_path(container_id, ifname).symlink_metadata().is_ok()
    }

    /// Every reservation: `(ip, containerID, ifname)`. A full walk, for GC.
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

    /// The attachments that have entries.
    pub fn entries(&self) -> Vec<Attachment> {
        let Ok(entries) = std::fs::read_dir(self.dir.join(INDEX_DIR)) else { return Vec::new() };
        let mut out: Vec<Attachment> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.split_once('@').map(|(c, i)| (c.to_string(), i.to_string())))
            .collect();
        out.sort();
        out
    }

    /// Brings the store back to consistency after a killed call or the reference plugin's
    /// changes (see the module doc) and returns every attachment's addresses.
    fn repair(&mut self) -> Result<BTreeMap<Attachment, Vec<IpAddr>>> {
        let mut held: BTreeMap<Attachment, Vec<IpAddr>> = BTreeMap::new();
        let read_dir = match std::fs::read_dir(&self.dir) {
            Ok(d) => d,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(held),
            Err(e) => return Err(io("read", &self.dir)(e)),
        };
        for entry in read_dir {
            let entry = entry.map_err(io("read", &self.dir))?;
            let Some(ip) = entry.file_name().to_str().and_then(|n| n.parse::<IpAddr>().ok()) else { continue };
            let path = entry.path();
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            match parse_owner(&text) {
                Some(owner) => held.entry(owner).or_default().push(ip),
                // An empty reservation: its writer was killed between create and write (we hold
                // the lock, so nobody is writing it now). Nobody can ever release it.
                None => remove_if_present(&path)?,
            }
        }
        for ips in held.values_mut() {
            ips.sort();
        }
        // Entries first: those holding nothing go, the others list exactly what they hold.
        let index = self.dir.join(INDEX_DIR);
        let mut with_entry = std::collections::BTreeSet::new();
        for (c, i) in self.entries() {
            let key = (c, i);
            match held.get(&key) {
                Some(ips) => {
                    self.close_entry(&key.0, &key.1, &ips.clone())?;
                    with_entry.insert(key);
                }
                None => remove_if_present(&self.index_path(&key.0, &key.1))?,
            }
        }
        if let Ok(names) = std::fs::read_dir(&index) {
            for name in names.flatten().filter(|e| !e.file_name().to_string_lossy().contains('@')) {
                let _ = std::fs::remove_file(name.path());
            }
        }
        // Reservations nobody indexed (the reference plugin's): adopt them.
        for (key, ips) in &held {
            if with_entry.contains(key) {
                continue;
            }
            let path = self.index_path(&key.0, &key.1);
            self.ensure_index_dir()?;
            let first = self.dir.join(ip_file(ips[0]));
            if let Err(e) = std::fs::hard_link(&first, &path) {
                if e.kind() != ErrorKind::AlreadyExists {
                    create_with(&path, owner_text(&key.0, &key.1).as_bytes())?;
                }
            }
            self.close_entry(&key.0, &key.1, ips)?;
        }
        Ok(held)
    }

    /// The index directory, made when missing or when something else is in its place (not
    /// weft's: it is made anew).
    fn ensure_index_dir(&self) -> Result<()> {
        let index = self.dir.join(INDEX_DIR);
        if index.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
            std::fs::remove_file(&index).map_err(io("remove", &index))?;
        }
        std::fs::create_dir_all(&index).map_err(io("create", &index))
    }

    fn index_path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.dir.join(INDEX_DIR).join(format!("{}@{ifname}", container_id.trim()))
    }
}

/// `(containerID, ifname)` of a reservation's content; `None` for an empty one.
fn parse_owner(text: &str) -> Option<Attachment> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let (c, i) = text.split_once(LINE_BREAK).unwrap_or((text, ""));
    Some((c.trim().to_string(), i.trim().to_string()))
}

/// The addresses of an entry's list; `None` when it is not a list of addresses.
fn parse_index(text: &str) -> Option<Vec<IpAddr>> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(|l| l.parse().ok()).collect()
}

/// What an index entry holds, read with one system call.
enum Entry {
    /// No entry.
    Missing,
    /// An entry without a readable list.
    Unlisted,
    /// The entry's list, as text.
    Listed(String),
}

fn read_index(path: &Path) -> Entry {
    use rustix::io::Errno;
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).map_or(Entry::Unlisted, Entry::Listed);
    let mut buf = [0u8; 512];
    match rustix::fs::getxattr(path, INDEX_XATTR, &mut buf[..]) {
        Ok(n) => text(buf[..n].to_vec()),
        Err(e) if e == Errno::NOENT || e == Errno::NOTDIR => Entry::Missing,
        Err(e) if e == Errno::RANGE => {
            let Ok(size) = rustix::fs::getxattr_query(path, INDEX_XATTR) else { return Entry::Unlisted };
            let mut big = vec![0u8; size];
            match rustix::fs::getxattr(path, INDEX_XATTR, &mut big[..]) {
                Ok(n) => {
                    big.truncate(n);
                    text(big)
                }
                Err(_) => Entry::Unlisted,
            }
        }
        Err(_) => Entry::Unlisted,
    }
}

/// Creates `path` with `bytes`; false when it exists.
fn create_with(path: &Path, bytes: &[u8]) -> Result<bool> {
    let mut file = match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(io("create", path)(e)),
    };
    file.write_all(bytes).map_err(io("write", path))?;
    Ok(true)
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

    /// What an ADD does, step by step.
    fn add(store: &mut Store, c: &str, ips: &[&str]) {
        store.open_entry(c, "eth0", false).unwrap();
        let ips: Vec<IpAddr> = ips.iter().map(|t| ip(t)).collect();
        for (set, addr) in ips.iter().enumerate() {
            assert!(store.reserve(c, "eth0", *addr, set).unwrap());
        }
        store.close_entry(c, "eth0", &ips).unwrap();
    }

    #[test]
    fn reservations_are_links_to_the_entry_with_the_addresses_attached() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), "net").unwrap();
        add(&mut store, "c1", &["10.0.0.2", "fd00::2"]);
        store.commit().unwrap();

        let entry = dir.path().join("net/.weft-index/c1@eth0");
        let reservation = dir.path().join("net/10.0.0.2");
        assert_eq!(std::fs::metadata(&entry).unwrap().ino(), std::fs::metadata(&reservation).unwrap().ino());
        assert_eq!(std::fs::read_to_string(&reservation).unwrap(), "c1\r\neth0", "the reference's format");
        assert_eq!(std::fs::read_to_string(dir.path().join("net/fd00::2")).unwrap(), "c1\r\neth0");
        let mut store = Store::open(dir.path(), "net").unwrap();
        assert!(store.walked.is_none(), "a committed store is not walked again");
        assert_eq!(store.held("c1", "eth0").unwrap(), [ip("10.0.0.2"), ip("fd00::2")]);
        assert!(store.held("c2", "eth0").unwrap().is_empty());
    }

    #[test]
    fn a_store_left_uncommitted_is_repaired_by_the_next_call() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), "net").unwrap();
        store.open_entry("c1", "eth0", false).unwrap();
        assert!(store.reserve("c1", "eth0", ip("10.0.0.2"), 0).unwrap());
        drop(store); // killed before the entry listed the address

        let mut store = Store::open(dir.path(), "net").unwrap();
        assert_eq!(store.held("c1", "eth0").unwrap(), [ip("10.0.0.2")]);
        store.commit().unwrap();
        let mut store = Store::open(dir.path(), "net").unwrap();
        assert!(store.walked.is_none());
        assert_eq!(store.held("c1", "eth0").unwrap(), [ip("10.0.0.2")], "the repair wrote the entry's list");
    }

    #[test]
    fn an_entry_holding_nothing_and_empty_address_files_are_removed_by_a_repair() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "net").unwrap();
        store.open_entry("c1", "eth0", false).unwrap();
        drop(store);
        std::fs::write(dir.path().join("net/10.0.0.9"), "").unwrap();
        let store = Store::open(dir.path(), "net").unwrap();
        assert!(!store.has_entry("c1", "eth0"));
        assert!(!dir.path().join("net/10.0.0.9").exists());
        assert!(store.entries().is_empty());
    }

    #[test]
    fn reservations_of_the_reference_plugin_are_adopted() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path(), "net").unwrap().commit().unwrap();
        // The reference plugin reserves (a new file, the directory's time changes) and writes
        // last_reserved_ip.0.
        std::fs::write(dir.path().join("net/10.0.0.9"), "ref1\r\neth0").unwrap();
        std::fs::write(dir.path().join("net/last_reserved_ip.0"), "10.0.0.9").unwrap();
        let mut store = Store::open(dir.path(), "net").unwrap();
        assert_eq!(store.held("ref1", "eth0").unwrap(), [ip("10.0.0.9")]);
        store.commit().unwrap();
        let mut store = Store::open(dir.path(), "net").unwrap();
        assert!(store.walked.is_none());
        assert_eq!(store.held("ref1", "eth0").unwrap(), [ip("10.0.0.9")], "indexed since");
        assert_eq!(std::fs::read_to_string(dir.path().join("net/10.0.0.9")).unwrap(), "ref1\r\neth0");
    }

    #[test]
    fn a_changed_round_robin_position_alone_makes_the_store_walked() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), "net").unwrap();
        add(&mut store, "c1", &["10.0.0.2"]);
        store.commit().unwrap();
        // Written in place: the directory's time stays.
        std::fs::write(dir.path().join("net/last_reserved_ip.0"), "10.0.0.7").unwrap();
        assert!(Store::open(dir.path(), "net").unwrap().walked.is_some());
    }

    #[test]
    fn an_entry_outliving_its_reservation_names_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), "net").unwrap();
        add(&mut store, "c1", &["10.0.0.2"]);
        // The reference plugin's DEL removes the address file; someone else takes the address.
        std::fs::remove_file(dir.path().join("net/10.0.0.2")).unwrap();
        assert!(store.held("c1", "eth0").unwrap().is_empty());
        store.open_entry("c2", "eth0", false).unwrap();
        assert!(store.reserve("c2", "eth0", ip("10.0.0.2"), 0).unwrap());
        assert!(store.held("c1", "eth0").unwrap().is_empty());
        assert_eq!(store.owner(ip("10.0.0.2")), Some(("c2".into(), "eth0".into())));
    }
}
