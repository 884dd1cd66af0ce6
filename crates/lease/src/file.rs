//! The embedded file store: leases in a directory ([`FileKv`]), safe across processes on one
//! machine. A lease file is flannel's lease JSON with the store's bookkeeping (`Created`,
//! `Modified`, `Expires`):
//!
//! ```text
//! DIR/config                 net-conf.json
//! DIR/subnets/10.244.1.0-24  {"PublicIP": ..., "BackendType": ..., "BackendData": ..., "Expires": 1732735000, ...}
//! DIR/revision, DIR/journal  what watchers follow
//! DIR/lock                   flock held by every change
//! ```

use std::path::{Path, PathBuf};

use crate::kv::FileKv;
use crate::leases::Leases;
use crate::Result;

/// Leases in a directory.
pub type FileStore = Leases<FileKv>;

impl Leases<FileKv> {
    pub fn open(dir: impl Into<PathBuf>) -> Result<FileStore> {
        Ok(Leases::new(FileKv::open(dir)?))
    }

    pub fn dir(&self) -> &Path {
        self.kv().dir()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use ipnet::Ipv4Net;
    use weft_netconf::NetworkConfig;

    use super::*;
    use crate::{LeaseAttrs, LeaseError, LeaseEvent, LeaseWatcher};

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
        let mut watcher = store.watcher().unwrap();
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
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let mut watcher = store.watcher().unwrap();
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
        let mut watcher = store.watcher().unwrap();
        assert_eq!(watcher.poll(now).unwrap().len(), 1);
        let absurd =
            r#"{"PublicIP":"198.18.0.2","BackendType":"vxlan","BackendData":null,"Expires":18446744073709551615}"#;
        std::fs::write(lease_file(dir.path(), "198.19.2.0-24"), absurd).unwrap();
        std::fs::write(lease_file(dir.path(), "198.19.3.0-24"), "{garbage").unwrap();
        std::fs::write(lease_file(dir.path(), "198.19.4.5-24"), serde_json::to_vec(&good.attrs).unwrap()).unwrap();
        assert_eq!(store.list(now).unwrap(), vec![good.clone()]);
        assert!(watcher.poll(now).unwrap().is_empty());
        let mut fresh = store.watcher().unwrap();
        assert_eq!(fresh.poll(now).unwrap(), vec![LeaseEvent::Added(good.clone())]);
        assert_eq!(LeaseWatcher::damaged(&fresh), 2, "every damaged entry with a lease key");
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
        let mut watcher = store.watcher().unwrap();
        assert_eq!(watcher.poll(now).unwrap().len(), 5);
        let mut highest = store.revision().unwrap();
        for damage in ["garbage", "1", ""] {
            std::fs::write(dir.path().join("revision"), damage).unwrap();
            let l = store.acquire(&config(), &attrs("198.18.0.9", damage), None, None, now, &mut |_| 0).unwrap();
            assert!(
                store.revision().unwrap() > highest,
                "{damage:?}: the next write went backwards to {}",
                store.revision().unwrap()
            );
            highest = store.revision().unwrap();
            let events = watcher.poll(now).unwrap();
            assert_eq!(events, vec![LeaseEvent::Added(l.clone())], "{damage:?}: the change was skipped");
            store.delete(&l.subnet).unwrap();
            assert_eq!(watcher.poll(now).unwrap(), vec![LeaseEvent::Removed(l)], "{damage:?}");
        }
    }
}

#[cfg(test)]
mod damage {
    use std::time::{Duration, Instant, SystemTime};

    use weft_netconf::NetworkConfig;

    use crate::kv::FileKv;
    use crate::leases::Leases;
    use crate::{LeaseAttrs, LeaseEvent, LeaseWatcher};

    fn attrs(ip: &str) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: ip.parse().unwrap(),
            public_ipv6: None,
            backend_type: "host-gw".into(),
            backend_data: serde_json::Value::Null,
        }
    }

    fn config() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network": "198.19.0.0/16"}"#).unwrap()
    }

    /// A revision beyond what a store can reach — in the revision file, or on a journal line —
    /// is damage: writes go on from the last good one (it made every lease damaged, and a
    /// saturated one froze every watch), entries stay readable, watches keep seeing changes.
    #[test]
    fn an_absurd_revision_is_not_continued_from() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::FileStore::open(dir.path()).unwrap();
        let now = SystemTime::now();
        store.acquire(&config(), &attrs("198.18.0.1"), None, None, now, &mut |_| 0).unwrap();
        let mut watcher = store.watcher().unwrap();
        assert_eq!(watcher.poll(now).unwrap().len(), 1);
        let journal = dir.path().join("journal");
        for (i, damage) in ["9223372036854775807", "18446744073709551615", "journal"].iter().enumerate() {
            if *damage == "journal" {
                let mut text = std::fs::read_to_string(&journal).unwrap();
                text.push_str("18446744073709551615 subnets/none\n");
                std::fs::write(&journal, text).unwrap();
            } else {
                std::fs::write(dir.path().join("revision"), damage).unwrap();
            }
            let ip = format!("198.18.0.{}", 10 + i);
            let lease = store.acquire(&config(), &attrs(&ip), None, None, now, &mut |_| 0).unwrap();
            let created = lease.created.unwrap();
            assert!(created > 0 && created <= 1 << 53, "{damage}: created at {created}");
            assert_eq!(watcher.poll(now).unwrap(), vec![LeaseEvent::Added(lease.clone())], "{damage}");
            assert_eq!(watcher.damaged(), 0, "{damage}: the write made a damaged entry");
            store.delete(&lease.subnet).unwrap();
            assert_eq!(watcher.poll(now).unwrap(), vec![LeaseEvent::Removed(lease)], "{damage}");
        }
        assert_eq!(store.list(now).unwrap().len(), 1);
    }

    /// A process that holds the store's lock and hangs (a SIGSTOPped agent mid-write) makes the
    /// others' changes fail after a while — reported, retried — instead of waiting for ever.
    #[test]
    fn a_held_lock_fails_a_change_instead_of_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let store = Leases::new(FileKv::open(dir.path()).unwrap().with_lock_wait(Duration::from_millis(300)));
        store.acquire(&config(), &attrs("198.18.0.1"), None, None, SystemTime::now(), &mut |_| 0).unwrap();
        let holder = std::fs::File::options().write(true).open(dir.path().join("lock")).unwrap();
        holder.lock().unwrap();
        let started = Instant::now();
        let err =
            store.acquire(&config(), &attrs("198.18.0.2"), None, None, SystemTime::now(), &mut |_| 0).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(err.to_string().contains("held by another process"), "{err}");
        drop(holder);
        store.acquire(&config(), &attrs("198.18.0.2"), None, None, SystemTime::now(), &mut |_| 0).unwrap();
    }

    /// A node whose key went away while another lease carries its address (stale, or made by
    /// hand) takes its previous subnet back: moving would strand its pods, whose addresses are
    /// in the previous one.
    #[test]
    fn a_lost_lease_is_taken_back_on_the_previous_subnet() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::FileStore::open(dir.path()).unwrap();
        let now = SystemTime::now();
        let own = store.acquire(&config(), &attrs("198.18.0.1"), None, None, now, &mut |_| 0).unwrap();
        let stale = crate::Lease {
            subnet: "198.19.150.0/24".parse().unwrap(),
            attrs: attrs("198.18.0.1"),
            expires: None,
            created: None,
        };
        store.put_lease(&stale).unwrap();
        store.delete(&own.subnet).unwrap();
        let again = store.acquire(&config(), &attrs("198.18.0.1"), Some(own.subnet), None, now, &mut |_| 5).unwrap();
        assert_eq!(again.subnet, own.subnet);
        // Its own lease on the previous subnet is kept even with the other one there.
        let kept = store.acquire(&config(), &attrs("198.18.0.1"), Some(own.subnet), None, now, &mut |_| 5).unwrap();
        assert_eq!(kept.subnet, own.subnet);
    }

    /// A revision just under the limit: writes reach it and the store starts a new epoch
    /// (watchers list again) instead of writing damaged entries and freezing every watch.
    #[test]
    fn a_revision_at_the_limit_starts_a_new_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::FileStore::open(dir.path()).unwrap();
        let now = SystemTime::now();
        store.acquire(&config(), &attrs("198.18.0.1"), None, None, now, &mut |_| 0).unwrap();
        let mut watcher = store.watcher().unwrap();
        watcher.poll(now).unwrap();
        std::fs::write(dir.path().join("revision"), ((1u64 << 53) - 2).to_string()).unwrap();
        for i in 2..6 {
            let lease =
                store.acquire(&config(), &attrs(&format!("198.18.0.{i}")), None, None, now, &mut |_| 0).unwrap();
            let events = watcher.poll(now).unwrap();
            assert!(events.contains(&LeaseEvent::Added(lease)), "{i}: {events:?}");
            assert_eq!(watcher.damaged(), 0, "{i}");
        }
        assert_eq!(store.list(now).unwrap().len(), 5);
    }

    /// The store's directory removed or moved away: an outage (listing fails), not an empty
    /// store (every peer would be removed), and nothing writes a new empty one in its place.
    #[test]
    fn a_store_directory_gone_is_an_outage() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = super::FileStore::open(&root).unwrap();
        let now = SystemTime::now();
        store.acquire(&config(), &attrs("198.18.0.1"), None, None, now, &mut |_| 0).unwrap();
        let mut watcher = store.watcher().unwrap();
        assert_eq!(watcher.poll(now).unwrap().len(), 1);
        std::fs::rename(&root, dir.path().join("moved")).unwrap();
        assert!(watcher.poll(now).is_err());
        assert!(store.list(now).is_err());
        assert!(store.acquire(&config(), &attrs("198.18.0.2"), None, None, now, &mut |_| 0).is_err());
        assert!(!root.exists(), "an empty store was made in its place");
        std::fs::rename(dir.path().join("moved"), &root).unwrap();
        assert!(watcher.poll(now).unwrap().is_empty(), "nothing changed meanwhile");
        assert_eq!(watcher.count(), 1);
    }
}
