//! The embedded store: a key is a file under a directory, safe across processes on one machine.
//!
//! ```text
//! DIR/subnets/10.244.1.0-24  {"PublicIP": ..., "BackendData": ..., "Created": 3, "Modified": 9, "Expires": 1732735000}
//! DIR/config                 net-conf.json (a document, not versioned)
//! DIR/revision               the store's revision (what watchers poll)
//! DIR/journal                "<revision> <key>" per change (what watchers re-read)
//! DIR/lock                   flock held by every change
//! ```
//!
//! A value is a JSON object; the store keeps its bookkeeping (`Created`, `Modified`, `Expires`)
//! in it, so a lease file is flannel's lease JSON with three more fields (and readers see them:
//! readers of JSON objects ignore fields they do not know). Every file is replaced
//! atomically (write, then rename): readers never see half a value. A file that is not such an
//! object (garbage, an absurd `Expires`) is reported as a damaged entry, never fails a listing.
//! The revision never goes backwards: it is the larger of the `revision` file and the journal's
//! last line, so a damaged `revision` file cannot make watchers skip changes; watchers list
//! again when it does go backwards (a replaced store) or the journal was started afresh.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde_json::{Map, Value};

use super::{check_key, Entry, Kv, KvWatch, Ttl, Update};
use crate::{LeaseError, Result};

/// The journal is started afresh past this size.
const JOURNAL_LIMIT: u64 = 1 << 20;
/// No store makes this many changes: a revision beyond it is damage, never continued from (it
/// would run past what entries can hold, or saturate and stop every watch).
pub const MAX_REVISION: u64 = 1 << 53;
/// How long a change waits for the store's lock before failing (a holder that hangs must not
/// hold up every writer for ever: the failure is reported, and retried).
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// A revision as written, unless it is beyond [`MAX_REVISION`].
fn revision_of(text: &str) -> Option<u64> {
    text.trim().parse().ok().filter(|r| *r <= MAX_REVISION)
}
/// The bookkeeping fields kept in every value.
const CREATED: &str = "Created";
const MODIFIED: &str = "Modified";
const EXPIRES: &str = "Expires";

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LeaseError + 'a {
    move |source| LeaseError::Io { op, path: path.display().to_string(), source }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp{}", path.display(), std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming", path))
}

/// The bookkeeping fields of a value (the rest is ignored here).
#[derive(serde::Deserialize)]
struct Bookkeeping {
    #[serde(rename = "Created")]
    created: Option<u64>,
    #[serde(rename = "Modified")]
    modified: Option<u64>,
    #[serde(rename = "Expires")]
    expires: Option<u64>,
}

/// A file's content as an entry of `key`: the value is the content as stored (its bookkeeping
/// fields left in: readers of JSON objects ignore fields they do not know), read once.
fn decode(key: &str, bytes: &[u8]) -> Entry {
    let mut entry =
        Entry { key: key.to_string(), value: Vec::new(), created: 0, modified: 0, expires: None, damaged: None };
    let parsed = (|| -> std::result::Result<(), String> {
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err("not a JSON object".into());
        }
        let meta: Bookkeeping = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let revision = |n: Option<u64>, name: &str| -> std::result::Result<i64, String> {
            match n.unwrap_or(0) {
                r if r <= MAX_REVISION => Ok(r as i64),
                r => Err(format!("{name} {r} is not a revision")),
            }
        };
        entry.created = revision(meta.created, CREATED)?;
        entry.modified = revision(meta.modified, MODIFIED)?;
        entry.expires = match meta.expires {
            None => None,
            Some(s) => {
                Some(UNIX_EPOCH.checked_add(Duration::from_secs(s)).ok_or(format!("Expires {s} is not a time"))?)
            }
        };
        Ok(())
    })();
    match parsed {
        Ok(()) => entry.value = bytes.to_vec(),
        Err(reason) => entry.damaged = Some(reason),
    }
    entry
}

/// A store in a directory.
#[derive(Debug, Clone)]
pub struct FileKv {
    dir: PathBuf,
    lock_wait: Duration,
}

/// Holds the store's lock while alive.
struct Locked(#[allow(dead_code)] File);

impl FileKv {
    pub fn open(dir: impl Into<PathBuf>) -> Result<FileKv> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        Ok(FileKv { dir, lock_wait: LOCK_WAIT })
    }

    /// The same store, its changes waiting at most `wait` for the lock.
    pub fn with_lock_wait(mut self, wait: Duration) -> FileKv {
        self.lock_wait = wait;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> Result<Locked> {
        let path = self.dir.join("lock");
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&path)
        }
        .map_err(io("opening", &path))?;
        let deadline = std::time::Instant::now() + self.lock_wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Locked(file)),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(LeaseError::Store(format!(
                        "{} is held by another process for more than {} s",
                        path.display(),
                        self.lock_wait.as_secs_f64()
                    )))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io("locking", &path)(e)),
            }
        }
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.dir.join(key))
    }

    /// The current revision: the `revision` file, or the journal's last line when the file is
    /// damaged, whichever is larger for writers.
    fn current(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("revision"))
            .ok()
            .and_then(|t| revision_of(&t))
            .unwrap_or_else(|| self.journal_revision())
    }

    /// The revision on the journal's last complete line (0 without one).
    fn journal_revision(&self) -> u64 {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut file) = File::open(self.dir.join("journal")) else { return 0 };
        let len = file.metadata().map_or(0, |m| m.len());
        let mut tail = Vec::new();
        if file.seek(SeekFrom::Start(len.saturating_sub(4096))).is_err() || file.read_to_end(&mut tail).is_err() {
            return 0;
        }
        let text = String::from_utf8_lossy(&tail);
        let complete = text.rfind('\n').map_or("", |i| &text[..i]);
        complete.lines().rev().find_map(|l| l.split_once(' ').and_then(|(r, _)| revision_of(r))).unwrap_or(0)
    }

    /// The revision the next change gets (never backwards, whatever the revision file says).
    /// Past [`MAX_REVISION`] (only a damaged store gets there) the store starts a new epoch at 1
    /// with an empty journal: watchers see the revision go back and list again.
    fn next(&self) -> u64 {
        let next = self.current().max(self.journal_revision()).saturating_add(1);
        if next <= MAX_REVISION {
            return next;
        }
        tracing::warn!("file store {}: the revision ran past {MAX_REVISION}; starting again at 1", self.dir.display());
        let _ = OpenOptions::new().write(true).open(self.dir.join("journal")).and_then(|j| j.set_len(0));
        1
    }

    /// Records a change of `key` at `revision`: a line in the journal (so watchers re-read only
    /// what changed), then the revision (what watchers are woken by).
    fn bump(&self, key: &str, revision: u64) -> Result<()> {
        let path = self.dir.join("journal");
        let mut journal = OpenOptions::new().create(true).append(true).open(&path).map_err(io("opening", &path))?;
        if journal.metadata().map_err(io("reading", &path))?.len() > JOURNAL_LIMIT {
            // Watchers that see the journal shrink list everything again.
            journal.set_len(0).map_err(io("truncating", &path))?;
        }
        writeln!(journal, "{revision} {key}").map_err(io("writing", &path))?;
        write_atomic(&self.dir.join("revision"), revision.to_string().as_bytes())
    }

    fn read(&self, key: &str) -> Result<Option<Entry>> {
        let path = self.path(key)?;
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(decode(key, &bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading", &path)(e)),
        }
    }

    /// Writes `value` at `key` as a change at the next revision, keeping `created`.
    fn write(&self, key: &str, value: &[u8], ttl: Option<Ttl>, created: Option<i64>) -> Result<Entry> {
        let path = self.path(key)?;
        let mut object: Map<String, Value> = serde_json::from_slice(value)
            .map_err(|e| LeaseError::Store(format!("{key}: the file store keeps JSON objects: {e}")))?;
        let revision = self.next();
        let created = created.unwrap_or(revision as i64);
        let expires = ttl.and_then(|t| t.expires());
        object.insert(CREATED.into(), created.into());
        object.insert(MODIFIED.into(), revision.into());
        if let Some(e) = expires {
            object.insert(EXPIRES.into(), e.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()).into());
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        let bytes = serde_json::to_vec(&object).map_err(|e| LeaseError::Store(e.to_string()))?;
        write_atomic(&path, &bytes)?;
        self.bump(key, revision)?;
        Ok(decode(key, &bytes))
    }

    fn entries(&self, prefix: &str) -> Result<Vec<Entry>> {
        // The store's own directory gone (removed, moved away) is an outage, not an empty store:
        // a listing of nothing would remove every peer.
        if !self.dir.is_dir() {
            return Err(LeaseError::Store(format!("the store directory {} is gone", self.dir.display())));
        }
        let dir = self.dir.join(prefix.trim_end_matches('/'));
        let mut out = Vec::new();
        let listing = match std::fs::read_dir(&dir) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io("reading", &dir)(e)),
        };
        for item in listing {
            let item = item.map_err(io("reading", &dir))?;
            let key = format!("{}/{}", prefix.trim_end_matches('/'), item.file_name().to_string_lossy());
            if check_key(&key).is_err() {
                continue; // a temporary file, or not a key
            }
            let Ok(bytes) = std::fs::read(item.path()) else { continue }; // removed meanwhile
            out.push(decode(&key, &bytes));
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// A watch on `prefix` (see [`Kv::watch`]).
    pub fn watcher(&self, prefix: &str, from: Option<i64>) -> FileWatch {
        // Every change renames a new `revision` file into the directory: inotify wakes the
        // watch at once. Without inotify, `wait` sleeps.
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).ok().filter(|i| {
            i.add_watch(self.dir.as_path(), AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE).is_ok()
        });
        FileWatch {
            kv: self.clone(),
            prefix: format!("{}/", prefix.trim_end_matches('/')),
            revision: from.and_then(|r| u64::try_from(r).ok()),
            offset: 0,
            inotify,
        }
    }
}

impl Kv for FileKv {
    fn describe(&self) -> String {
        format!("file store {}", self.dir.display())
    }

    fn revision(&self) -> Result<i64> {
        Ok(self.current().max(self.journal_revision()) as i64)
    }

    fn get(&self, key: &str) -> Result<Option<Entry>> {
        self.read(key)
    }

    fn list(&self, prefix: &str) -> Result<(Vec<Entry>, i64)> {
        // The revision first: a change during the listing is then seen again, never missed.
        let revision = self.revision()?;
        Ok((self.entries(prefix)?, revision))
    }

    fn create(&self, key: &str, value: &[u8], ttl: Option<Ttl>) -> Result<Option<Entry>> {
        let _lock = self.lock()?;
        if self.read(key)?.is_some() {
            return Ok(None);
        }
        self.write(key, value, ttl, None).map(Some)
    }

    fn put(&self, key: &str, value: &[u8], ttl: Option<Ttl>, expected: Option<i64>) -> Result<Option<Entry>> {
        let _lock = self.lock()?;
        let current = self.read(key)?;
        if let Some(expected) = expected {
            if current.as_ref().map(|c| c.modified) != Some(expected) {
                return Ok(None);
            }
        }
        let created = current.filter(|c| c.damaged.is_none()).map(|c| c.created).filter(|c| *c > 0);
        self.write(key, value, ttl, created).map(Some)
    }

    fn delete(&self, key: &str, expected: Option<i64>) -> Result<bool> {
        let _lock = self.lock()?;
        let Some(current) = self.read(key)? else { return Ok(false) };
        if expected.is_some_and(|e| e != current.modified) {
            return Ok(false);
        }
        let path = self.path(key)?;
        match std::fs::remove_file(&path) {
            Ok(()) => {
                let revision = self.next();
                self.bump(key, revision)?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io("removing", &path)(e)),
        }
    }

    fn watch(&self, prefix: &str, from: Option<i64>) -> Result<Box<dyn KvWatch>> {
        Ok(Box::new(self.watcher(prefix, from)))
    }

    fn read_document(&self, key: &str) -> Result<Option<String>> {
        let path = self.path(key)?;
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading", &path)(e)),
        }
    }

    fn write_document(&self, key: &str, text: &str) -> Result<()> {
        let path = self.path(key)?;
        let _lock = self.lock()?;
        write_atomic(&path, text.as_bytes())?;
        let revision = self.next();
        self.bump(key, revision)
    }
}

/// Follows the journal: cheap when nothing changed (one small file read).
pub struct FileWatch {
    kv: FileKv,
    /// `subnets/`.
    prefix: String,
    /// The revision reported up to (`None`: nothing reported yet).
    revision: Option<u64>,
    /// How much of the journal has been read.
    offset: u64,
    inotify: Option<Inotify>,
}

impl KvWatch for FileWatch {
    fn poll(&mut self) -> Result<Vec<Update>> {
        let revision = self.kv.current();
        if self.revision == Some(revision) {
            return Ok(Vec::new());
        }
        let journal = std::fs::read(self.kv.dir.join("journal")).unwrap_or_default();
        // Only whole lines: a writer may be in the middle of one.
        let complete = journal.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1) as u64;
        let changed = match self.revision {
            // The revision went backwards (a damaged or replaced store): list everything.
            Some(seen) if revision < seen => None,
            Some(seen) if complete >= self.offset => {
                journal_keys(&journal[self.offset as usize..complete as usize], seen)
            }
            _ => None,
        };
        self.offset = complete;
        let mut updates = Vec::new();
        match changed {
            // Only what the journal names changed: re-read those keys.
            Some((keys, last)) => {
                for key in keys.into_iter().filter(|k| k.starts_with(&self.prefix)) {
                    updates.push(match self.kv.read(&key)? {
                        Some(entry) => Update::Put(entry),
                        None => Update::Delete(key),
                    });
                }
                self.revision = Some(last.max(revision));
            }
            // First poll, or the journal lost track: list everything.
            None => {
                updates.push(Update::Snapshot(self.kv.entries(&self.prefix)?));
                self.revision = Some(revision);
            }
        }
        Ok(updates)
    }

    fn wait(&mut self, timeout: Duration) {
        let Some(inotify) = &self.inotify else {
            std::thread::sleep(timeout);
            return;
        };
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        if matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0) {
            // Drain; what changed is read from the store by the next poll.
            while inotify.read_events().is_ok_and(|e| !e.is_empty()) {}
        }
    }
}

/// The keys journal lines after revision `seen` name, and the last revision; `None` when the
/// journal does not reach back to `seen` (entries were lost: list everything instead).
fn journal_keys(tail: &[u8], seen: u64) -> Option<(Vec<String>, u64)> {
    let text = String::from_utf8_lossy(tail);
    let mut keys: Vec<String> = Vec::new();
    let mut last = seen;
    for line in text.lines() {
        let (rev, key) = line.split_once(' ')?;
        let rev = revision_of(rev)?;
        if rev <= seen {
            continue;
        }
        if rev != last + 1 {
            return None;
        }
        last = rev;
        if !keys.iter().any(|k| k == key) {
            keys.push(key.to_string());
        }
    }
    Some((keys, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bookkeeping_is_kept_in_the_value_and_damage_is_reported() {
        let e = decode("subnets/a", br#"{"PublicIP":"198.18.0.1","Created":3,"Modified":9,"Expires":100}"#);
        assert_eq!((e.created, e.modified, e.expires), (3, 9, Some(UNIX_EPOCH + Duration::from_secs(100))));
        assert!(e.damaged.is_none() && e.value.starts_with(br#"{"PublicIP":"198.18.0.1""#));
        for (bytes, why) in [
            (&br#"{"Expires":18446744073709551615}"#[..], "not a time"),
            (b"{garbage", "key must be a string"),
            (b"[1]", "not a JSON object"),
            (br#"{"Created":"x"}"#, "invalid type"),
            (br#"{"Modified":18446744073709551615}"#, "not a revision"),
        ] {
            let e = decode("subnets/a", bytes);
            assert!(
                e.damaged.as_deref().is_some_and(|d| d.contains(why)),
                "{:?}: {:?}",
                String::from_utf8_lossy(bytes),
                e
            );
        }
    }
}
