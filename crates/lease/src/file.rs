//! The embedded file store: leases as files in a directory, safe across processes on one machine.
//!
//! ```text
//! DIR/config                 net-conf.json
//! DIR/subnets/10.244.1.0-24  {"PublicIP": ..., "BackendType": ..., "BackendData": ..., "Expires": 1732735000}
//! DIR/revision               bumped on every change (what watchers poll)
//! DIR/lock                   flock held by every change
//! ```
//!
//! Every file is replaced atomically (write, then rename), so readers never see half a lease.
//! Expired leases count as absent; a watcher reports them removed when their time passes.
//!
//! Damage is contained: a lease file that cannot be read as a lease (garbage, an absurd
//! `Expires`) is skipped with one warning and counted, never fails a listing; its subnet is not
//! handed to another node (only its own node, by its previous subnet, takes it back). The
//! revision never goes backwards: it is the larger of the `revision` file and the journal's last
//! line, so a damaged `revision` file cannot make watchers skip changes.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::os::fd::AsFd;

use ipnet::Ipv4Net;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde::{Deserialize, Serialize};
use weft_netconf::NetworkConfig;

use crate::model::{parse_key, subnet_key};
use crate::{choose_subnet, Lease, LeaseAttrs, LeaseError, LeaseEvent, Result};

#[derive(Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    attrs: LeaseAttrs,
    #[serde(rename = "Expires", default, skip_serializing_if = "Option::is_none")]
    expires: Option<u64>,
    /// The store revision that created the key (orders conflicting claims).
    #[serde(rename = "Created", default, skip_serializing_if = "Option::is_none")]
    created: Option<i64>,
}

/// The journal is started afresh past this size.
const JOURNAL_LIMIT: u64 = 1 << 20;

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LeaseError + 'a {
    move |source| LeaseError::Io { op, path: path.display().to_string(), source }
}

fn to_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A lease file's content as a lease of `subnet`, or why it is not one.
fn decode(subnet: Ipv4Net, bytes: &[u8]) -> std::result::Result<Lease, String> {
    let stored: Stored = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let expires = match stored.expires {
        None => None,
        Some(s) => {
            Some(UNIX_EPOCH.checked_add(Duration::from_secs(s)).ok_or_else(|| format!("Expires {s} is not a time"))?)
        }
    };
    Ok(Lease { subnet, attrs: stored.attrs, expires, created: stored.created })
}

/// Warns about a damaged entry once per process and content.
fn warn_corrupt(key: &str, reason: &str) {
    static SEEN: std::sync::Mutex<Option<HashSet<String>>> = std::sync::Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if seen.get_or_insert_with(HashSet::new).insert(format!("{key}\0{reason}")) {
        tracing::warn!("lease store: skipping {key:?}: {reason}");
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp{}", path.display(), std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming", path))
}

/// A lease store in a directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

/// Holds the store's lock while alive.
struct Locked(#[allow(dead_code)] File);

impl FileStore {
    pub fn open(dir: impl Into<PathBuf>) -> Result<FileStore> {
        let dir = dir.into();
        let subnets = dir.join("subnets");
        std::fs::create_dir_all(&subnets).map_err(io("creating", &subnets))?;
        Ok(FileStore { dir })
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
        file.lock().map_err(io("locking", &path))?;
        Ok(Locked(file))
    }

    fn lease_path(&self, subnet: &Ipv4Net) -> PathBuf {
        self.dir.join("subnets").join(subnet_key(subnet))
    }

    /// The cluster's `net-conf.json`, if one was stored.
    pub fn network_config(&self) -> Result<Option<String>> {
        let path = self.dir.join("config");
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading", &path)(e)),
        }
    }

    pub fn set_network_config(&self, text: &str) -> Result<()> {
        let _lock = self.lock()?;
        write_atomic(&self.dir.join("config"), text.as_bytes())?;
        self.bump("config")
    }

    /// The current revision (changes with every write): the `revision` file, or the journal's
    /// last line when the file is damaged. (A rewound file is caught by the writers, which
    /// continue from the larger of the two, and by watchers, which list again when it goes
    /// backwards.)
    pub fn revision(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("revision"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| self.journal_revision())
    }

    /// The revision on the journal's last complete line (0 without one).
    fn journal_revision(&self) -> u64 {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut file) = File::open(self.dir.join("journal")) else { return 0 };
        let len = file.metadata().map_or(0, |m| m.len());
        let start = len.saturating_sub(4096);
        let mut tail = Vec::new();
        if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut tail).is_err() {
            return 0;
        }
        let text = String::from_utf8_lossy(&tail);
        let complete = text.rfind('\n').map_or("", |i| &text[..i]);
        complete.lines().rev().find_map(|l| l.split_once(' ').and_then(|(r, _)| r.parse().ok())).unwrap_or(0)
    }

    /// Records a change of `key`: a line in the journal (so watchers re-read only what changed),
    /// then the new revision (what watchers are woken by).
    fn bump(&self, key: &str) -> Result<()> {
        // Never backwards, whatever the revision file says.
        let revision = self.revision().max(self.journal_revision()).saturating_add(1);
        let path = self.dir.join("journal");
        let mut journal = OpenOptions::new().create(true).append(true).open(&path).map_err(io("opening", &path))?;
        if journal.metadata().map_err(io("reading", &path))?.len() > JOURNAL_LIMIT {
            // Watchers that see the journal shrink list everything again.
            journal.set_len(0).map_err(io("truncating", &path))?;
        }
        writeln!(journal, "{revision} {key}").map_err(io("writing", &path))?;
        write_atomic(&self.dir.join("revision"), revision.to_string().as_bytes())
    }

    fn read_lease(&self, subnet: &Ipv4Net, now: SystemTime) -> Result<Option<Lease>> {
        Ok(self.read_checked(subnet, now)?.ok().flatten())
    }

    /// The lease on `subnet` (`Ok(None)`: none, or expired), or `Err(())` when its file is damaged.
    fn read_checked(&self, subnet: &Ipv4Net, now: SystemTime) -> Result<std::result::Result<Option<Lease>, ()>> {
        let path = self.lease_path(subnet);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ok(None)),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        match decode(*subnet, &bytes) {
            Ok(lease) => Ok(Ok(Some(lease).filter(|l| !l.is_expired(now)))),
            Err(reason) => {
                warn_corrupt(&subnet_key(subnet), &reason);
                Ok(Err(()))
            }
        }
    }

    /// Every lease that has not expired at `now` (damaged entries skipped).
    pub fn list(&self, now: SystemTime) -> Result<Vec<Lease>> {
        Ok(self.scan(now)?.0)
    }

    /// Every lease that has not expired at `now`, and the subnets of damaged entries.
    fn scan(&self, now: SystemTime) -> Result<(Vec<Lease>, Vec<Ipv4Net>)> {
        let dir = self.dir.join("subnets");
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io("reading", &dir))? {
            let entry = entry.map_err(io("reading", &dir))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.contains(".tmp") {
                continue;
            }
            // Only canonical keys name a lease (`198.19.20.5-24` does not).
            let Some(subnet) = parse_key(&name).ok().filter(|s| subnet_key(s) == name) else {
                warn_corrupt(&name, "not a lease key");
                continue;
            };
            let Ok(bytes) = std::fs::read(entry.path()) else { continue }; // deleted meanwhile
            match decode(subnet, &bytes) {
                Ok(lease) if !lease.is_expired(now) => out.push(lease),
                Ok(_) => {}
                Err(reason) => {
                    warn_corrupt(&name, &reason);
                    damaged.push(subnet);
                }
            }
        }
        out.sort_by_key(|l| l.subnet);
        Ok((out, damaged))
    }

    fn put(&self, lease: &Lease) -> Result<()> {
        // A key keeps the revision it was created at; a new one gets this change's.
        let created = match self.read_checked(&lease.subnet, UNIX_EPOCH)? {
            Ok(Some(existing)) if existing.attrs.public_ip == lease.attrs.public_ip => existing.created,
            _ => None,
        }
        .or(lease.created)
        .or_else(|| i64::try_from(self.revision().max(self.journal_revision()).saturating_add(1)).ok());
        let stored = Stored { attrs: lease.attrs.clone(), expires: lease.expires.map(to_secs), created };
        let bytes = serde_json::to_vec(&stored).map_err(|e| LeaseError::Store(e.to_string()))?;
        write_atomic(&self.lease_path(&lease.subnet), &bytes)?;
        self.bump(&lease.key())
    }

    /// Acquires this node's lease: its existing one (same public IP), else `previous` if free,
    /// else a free subnet chosen at random. The attributes are (re)written and the TTL starts now.
    pub fn acquire(
        &self,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Net>,
        ttl: Option<Duration>,
        now: SystemTime,
        random: &mut dyn FnMut(usize) -> usize,
    ) -> Result<Lease> {
        let _lock = self.lock()?;
        let (leases, damaged) = self.scan(now)?;
        let subnet = match leases.iter().find(|l| l.attrs.public_ip == attrs.public_ip && config.is_leasable(&l.subnet))
        {
            Some(own) => own.subnet,
            None => {
                // A damaged entry may be another node's lease: not handed out, except to the node
                // that had that subnet (it takes its own key back).
                let taken: HashSet<Ipv4Net> = leases
                    .iter()
                    .map(|l| l.subnet)
                    .chain(damaged.into_iter().filter(|d| Some(*d) != previous))
                    .collect();
                choose_subnet(config, &taken, previous, random)
                    .ok_or_else(|| LeaseError::Exhausted(config.network.to_string()))?
            }
        };
        let lease = Lease { subnet, attrs: attrs.clone(), expires: ttl.map(|t| now + t), created: None };
        self.put(&lease)?;
        Ok(self.read_lease(&subnet, now)?.unwrap_or(lease))
    }

    /// Extends `lease` by `ttl` from `now`. Fails with `NotFound` when the lease is gone or
    /// belongs to another node now (the caller acquires again).
    pub fn renew(&self, lease: &Lease, ttl: Option<Duration>, now: SystemTime) -> Result<Lease> {
        let _lock = self.lock()?;
        match self.read_lease(&lease.subnet, now)? {
            Some(c) if c.attrs.public_ip == lease.attrs.public_ip => {
                let renewed = Lease { expires: ttl.map(|t| now + t), created: c.created, ..lease.clone() };
                self.put(&renewed)?;
                Ok(renewed)
            }
            _ => Err(LeaseError::NotFound(lease.key())),
        }
    }

    /// Removes the lease on `subnet` (a missing one is success).
    pub fn delete(&self, subnet: &Ipv4Net) -> Result<()> {
        let _lock = self.lock()?;
        let path = self.lease_path(subnet);
        match std::fs::remove_file(&path) {
            Ok(()) => self.bump(&subnet_key(subnet)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", &path)(e)),
        }
    }

    /// Writes a lease as given (for tests and for reservations, `expires: None`).
    pub fn put_lease(&self, lease: &Lease) -> Result<()> {
        let _lock = self.lock()?;
        self.put(lease)
    }

    /// A watcher that starts from the current leases (reported as added on its first poll).
    pub fn watcher(&self) -> Watcher {
        // Every change renames a new `revision` file into the directory: inotify wakes the
        // watcher at once. Without inotify, `wait` falls back to sleeping.
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).ok().filter(|i| {
            i.add_watch(self.dir.as_path(), AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE).is_ok()
        });
        Watcher {
            store: self.clone(),
            known: HashMap::new(),
            damaged: HashSet::new(),
            revision: None,
            offset: 0,
            inotify,
        }
    }
}

/// Polls the store and reports what changed since the last poll. Cheap when nothing changed:
/// one small file read, unless a known lease's expiry time has passed.
pub struct Watcher {
    store: FileStore,
    known: HashMap<Ipv4Net, Lease>,
    /// Subnets whose entries are damaged, as of the last poll.
    damaged: HashSet<Ipv4Net>,
    revision: Option<u64>,
    /// How much of the journal has been read.
    offset: u64,
    inotify: Option<Inotify>,
}

impl Watcher {
    pub fn poll(&mut self, now: SystemTime) -> Result<Vec<LeaseEvent>> {
        let mut events = Vec::new();
        let expired: Vec<Ipv4Net> = self.known.values().filter(|l| l.is_expired(now)).map(|l| l.subnet).collect();
        for subnet in expired {
            events.extend(self.known.remove(&subnet).map(LeaseEvent::Removed));
        }
        let revision = self.store.revision();
        if self.revision == Some(revision) {
            return Ok(events);
        }
        let journal_path = self.store.dir.join("journal");
        let journal = std::fs::read(&journal_path).unwrap_or_default();
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
        match changed {
            // Only what the journal names changed: re-read those leases.
            Some((keys, last)) => {
                for key in keys {
                    let Ok(subnet) = parse_key(&key) else { continue };
                    let current = match self.store.read_checked(&subnet, now)? {
                        Ok(lease) => {
                            self.damaged.remove(&subnet);
                            lease
                        }
                        Err(()) => {
                            self.damaged.insert(subnet);
                            None
                        }
                    };
                    self.apply(subnet, current, &mut events);
                }
                self.revision = Some(last.max(revision));
            }
            // First poll, or the journal was started afresh: list everything and diff.
            None => {
                let (leases, damaged) = self.store.scan(now)?;
                self.damaged = damaged.into_iter().collect();
                let current: HashMap<Ipv4Net, Lease> = leases.into_iter().map(|l| (l.subnet, l)).collect();
                let gone: Vec<Ipv4Net> = self.known.keys().filter(|s| !current.contains_key(s)).copied().collect();
                for subnet in gone {
                    self.apply(subnet, None, &mut events);
                }
                for (subnet, lease) in current {
                    self.apply(subnet, Some(lease), &mut events);
                }
                self.revision = Some(revision);
            }
        }
        Ok(events)
    }

    fn apply(&mut self, subnet: Ipv4Net, current: Option<Lease>, events: &mut Vec<LeaseEvent>) {
        match current {
            Some(lease) => {
                if self.known.get(&subnet).is_none_or(|old| old.attrs != lease.attrs) {
                    events.push(LeaseEvent::Added(lease.clone()));
                }
                self.known.insert(subnet, lease);
            }
            None => events.extend(self.known.remove(&subnet).map(LeaseEvent::Removed)),
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
        let rev: u64 = rev.parse().ok()?;
        if rev <= seen {
            continue;
        }
        if rev != last + 1 {
            return None;
        }
        last = rev;
        if key != "config" && !keys.iter().any(|k| k == key) {
            keys.push(key.to_string());
        }
    }
    Some((keys, last))
}

impl crate::LeaseStore for FileStore {
    fn network_config(&self) -> Result<Option<String>> {
        FileStore::network_config(self)
    }

    fn list(&self, now: SystemTime) -> Result<Vec<Lease>> {
        FileStore::list(self, now)
    }

    fn acquire(
        &self,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Net>,
        ttl: Option<Duration>,
        now: SystemTime,
        random: &mut dyn FnMut(usize) -> usize,
    ) -> Result<Lease> {
        FileStore::acquire(self, config, attrs, previous, ttl, now, random)
    }

    fn renew(&self, lease: &Lease, ttl: Option<Duration>, now: SystemTime) -> Result<Lease> {
        FileStore::renew(self, lease, ttl, now)
    }

    fn delete(&self, subnet: &Ipv4Net) -> Result<()> {
        FileStore::delete(self, subnet)
    }

    fn watch(&self) -> Result<Box<dyn crate::LeaseWatcher>> {
        Ok(Box::new(self.watcher()))
    }

    fn describe(&self) -> String {
        format!("file store {}", self.dir.display())
    }
}

impl crate::LeaseWatcher for Watcher {
    fn poll(&mut self, now: SystemTime) -> Result<Vec<LeaseEvent>> {
        Watcher::poll(self, now)
    }

    fn known(&self) -> &HashMap<Ipv4Net, Lease> {
        &self.known
    }

    fn damaged(&self) -> usize {
        self.damaged.len()
    }

    fn synced(&self) -> bool {
        self.revision.is_some()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(ip: &str, mac: &str) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: ip.parse().unwrap(),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: serde_json::json!({"VNI": 1, "VtepMAC": mac}),
        }
    }

    fn config() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network": "198.19.0.0/16"}"#).unwrap()
    }

    #[test]
    fn acquire_reuses_own_lease_and_renews() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ttl = Some(Duration::from_secs(3600));
        let a =
            store.acquire(&config(), &attrs("198.18.0.1", "0a:00:00:00:00:01"), None, ttl, now, &mut |_| 0).unwrap();
        assert_eq!(a.subnet.to_string(), "198.19.1.0/24");
        let text = std::fs::read_to_string(dir.path().join("subnets/198.19.1.0-24")).unwrap();
        assert!(
            text.contains(r#""PublicIP":"198.18.0.1""#) && text.contains(r#""VtepMAC":"0a:00:00:00:00:01""#),
            "{text}"
        );
        // The same node again (a restart): the same subnet, new attributes.
        let again =
            store.acquire(&config(), &attrs("198.18.0.1", "0a:00:00:00:00:09"), None, ttl, now, &mut |_| 5).unwrap();
        assert_eq!(again.subnet, a.subnet);
        assert_eq!(again.vxlan().unwrap().vtep_mac, "0a:00:00:00:00:09");
        // Another node gets another subnet; its previous one is honored if free.
        let prev = "198.19.42.0/24".parse().unwrap();
        let b = store
            .acquire(&config(), &attrs("198.18.0.2", "0a:00:00:00:00:02"), Some(prev), ttl, now, &mut |_| 0)
            .unwrap();
        assert_eq!(b.subnet, prev);
        let later = now + Duration::from_secs(1800);
        let renewed = store.renew(&a, ttl, later).unwrap();
        assert_eq!(renewed.expires, Some(later + Duration::from_secs(3600)));
        store.delete(&a.subnet).unwrap();
        assert!(matches!(store.renew(&a, ttl, later), Err(LeaseError::NotFound(_))));
    }

    #[test]
    fn watcher_sees_adds_changes_removals_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut watcher = store.watcher();
        assert!(watcher.poll(now).unwrap().is_empty());
        let a = store
            .acquire(
                &config(),
                &attrs("198.18.0.1", "0a:00:00:00:00:01"),
                None,
                Some(Duration::from_secs(60)),
                now,
                &mut |_| 0,
            )
            .unwrap();
        assert_eq!(watcher.poll(now).unwrap(), vec![LeaseEvent::Added(a.clone())]);
        assert!(watcher.poll(now).unwrap().is_empty());
        let changed = store
            .acquire(
                &config(),
                &attrs("198.18.0.1", "0a:00:00:00:00:02"),
                None,
                Some(Duration::from_secs(60)),
                now,
                &mut |_| 0,
            )
            .unwrap();
        assert_eq!(watcher.poll(now).unwrap(), vec![LeaseEvent::Added(changed.clone())]);
        // Nobody renews: at its expiry the lease is reported removed.
        assert_eq!(watcher.poll(now + Duration::from_secs(61)).unwrap(), vec![LeaseEvent::Removed(changed)]);
    }

    #[test]
    fn racing_processes_never_share_a_subnet() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let dir = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    let store = FileStore::open(dir).unwrap();
                    // Every node's random choice is the same: the lock must still keep them apart.
                    store
                        .acquire(
                            &config(),
                            &attrs(&format!("198.18.0.{}", i + 1), "0a:00:00:00:00:01"),
                            None,
                            None,
                            now,
                            &mut |_| 0,
                        )
                        .unwrap()
                        .subnet
                })
            })
            .collect();
        let subnets: HashSet<Ipv4Net> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(subnets.len(), 8);
    }

    #[test]
    fn wait_wakes_on_a_change() {
        use crate::LeaseWatcher;
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let mut watcher = store.watcher();
        let writer = store.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            writer
                .acquire(
                    &config(),
                    &attrs("198.18.0.1", "0a:00:00:00:00:01"),
                    None,
                    None,
                    SystemTime::now(),
                    &mut |_| 0,
                )
                .unwrap();
        });
        let started = std::time::Instant::now();
        watcher.wait(Duration::from_secs(5));
        assert!(started.elapsed() < Duration::from_secs(2), "wait slept through the change");
        t.join().unwrap();
        assert_eq!(watcher.poll(SystemTime::now()).unwrap().len(), 1);
    }

    fn lease_file(dir: &Path, key: &str) -> PathBuf {
        dir.join("subnets").join(key)
    }

    /// Damaged entries: an absurd `Expires` (it panicked every agent), garbage, a non-canonical
    /// key. Each is skipped, the others listed, watched and acquired around.
    #[test]
    fn damaged_entries_are_skipped_and_not_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let now = SystemTime::now();
        let good =
            store.acquire(&config(), &attrs("198.18.0.1", "0a:00:00:00:00:01"), None, None, now, &mut |_| 0).unwrap();
        let mut watcher = store.watcher();
        assert_eq!(watcher.poll(now).unwrap().len(), 1);
        let absurd =
            r#"{"PublicIP":"198.18.0.2","BackendType":"vxlan","BackendData":null,"Expires":18446744073709551615}"#;
        std::fs::write(lease_file(dir.path(), "198.19.2.0-24"), absurd).unwrap();
        std::fs::write(lease_file(dir.path(), "198.19.3.0-24"), "{garbage").unwrap();
        std::fs::write(lease_file(dir.path(), "198.19.4.5-24"), serde_json::to_vec(&good.attrs).unwrap()).unwrap();
        store.bump("198.19.2.0-24").unwrap();
        assert_eq!(store.list(now).unwrap(), vec![good.clone()]);
        assert!(watcher.poll(now).unwrap().is_empty());
        assert_eq!(crate::LeaseWatcher::damaged(&watcher), 1, "the entry named in the journal");
        let mut fresh = store.watcher();
        assert_eq!(fresh.poll(now).unwrap(), vec![LeaseEvent::Added(good.clone())]);
        assert_eq!(crate::LeaseWatcher::damaged(&fresh), 2, "every damaged entry with a lease key");
        // Nodes asking for a subnet are not given the damaged ones...
        for (i, ip) in ["198.18.0.7", "198.18.0.8"].iter().enumerate() {
            let l = store.acquire(&config(), &attrs(ip, "0a:00:00:00:00:07"), None, None, now, &mut |_| 0).unwrap();
            assert_eq!(l.subnet.to_string(), format!("198.19.{}.0/24", 4 + i), "{ip}");
        }
        // ... but the node that had one takes it back.
        let prev: Ipv4Net = "198.19.3.0/24".parse().unwrap();
        let back = store
            .acquire(&config(), &attrs("198.18.0.3", "0a:00:00:00:00:03"), Some(prev), None, now, &mut |_| 0)
            .unwrap();
        assert_eq!(back.subnet, prev);
        assert!(fresh.poll(now).unwrap().contains(&LeaseEvent::Added(back)));
    }

    /// A damaged or rewound `revision` file: running watchers still see every change.
    #[test]
    fn the_revision_never_goes_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let now = SystemTime::now();
        for i in 1..=5 {
            store
                .acquire(&config(), &attrs(&format!("198.18.0.{i}"), "0a:00:00:00:00:01"), None, None, now, &mut |_| 0)
                .unwrap();
        }
        let mut watcher = store.watcher();
        assert_eq!(watcher.poll(now).unwrap().len(), 5);
        let mut highest = store.revision();
        for damage in ["garbage", "1", ""] {
            std::fs::write(dir.path().join("revision"), damage).unwrap();
            let l = store.acquire(&config(), &attrs("198.18.0.9", damage), None, None, now, &mut |_| 0).unwrap();
            assert!(store.revision() > highest, "{damage:?}: the next write went backwards to {}", store.revision());
            highest = store.revision();
            let events = watcher.poll(now).unwrap();
            assert_eq!(events, vec![LeaseEvent::Added(l.clone())], "{damage:?}: the change was skipped");
            store.delete(&l.subnet).unwrap();
            assert_eq!(watcher.poll(now).unwrap(), vec![LeaseEvent::Removed(l)], "{damage:?}");
        }
    }
}
