//! The etcd store against a real etcd started by the test on loopback: flannel's keys and values
//! (read back with etcdctl), TTLs as etcd leases, racing nodes, the watch, and a restart of etcd
//! in the middle of it.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use common::Etcd;
use ipnet::Ipv4Net;
use serde_json::{json, Value};
use weft_lease::etcd::{EtcdStore, DEFAULT_PREFIX};
use weft_lease::{LeaseAttrs, LeaseEvent, LeaseStore};
use weft_netconf::NetworkConfig;

fn attrs(ip: &str, mac: &str) -> LeaseAttrs {
    LeaseAttrs {
        public_ip: ip.parse().unwrap(),
        public_ipv6: None,
        backend_type: "vxlan".into(),
        backend_data: json!({"VNI": 1, "VtepMAC": mac}),
    }
}

fn config() -> NetworkConfig {
    NetworkConfig::parse(r#"{"Network": "198.19.0.0/16"}"#).unwrap()
}

#[test]
fn flannel_layout_ttl_and_renewal() {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(&[etcd.url()], DEFAULT_PREFIX).unwrap();
    store.set_network_config(r#"{"Network": "198.19.0.0/16"}"#).unwrap();
    assert_eq!(store.network_config().unwrap().unwrap(), r#"{"Network": "198.19.0.0/16"}"#);
    let now = SystemTime::now();
    let ttl = Some(Duration::from_secs(60));
    let lease =
        store.acquire(&config(), &attrs("198.18.0.1", "0a:58:00:00:00:01"), None, ttl, now, &mut |_| 3).unwrap();
    assert_eq!(lease.subnet.to_string(), "198.19.4.0/24");

    // Read back with etcdctl: flannel's key and value, attached to an etcd lease.
    let out = etcd.ctl(&["get", "--prefix", "/coreos.com/network/subnets/", "-w", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let kv = &v["kvs"][0];
    let key = String::from_utf8(base64(kv["key"].as_str().unwrap())).unwrap();
    assert_eq!(key, "/coreos.com/network/subnets/198.19.4.0-24");
    let value: Value = serde_json::from_slice(&base64(kv["value"].as_str().unwrap())).unwrap();
    assert_eq!(
        value,
        json!({"PublicIP": "198.18.0.1", "PublicIPv6": null, "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": "0a:58:00:00:00:01"}})
    );
    let lease_id = kv["lease"].as_i64().unwrap();
    assert_ne!(lease_id, 0, "the lease has no TTL");
    let ttl_out = etcd.ctl(&["lease", "timetolive", &format!("{lease_id:x}")]);
    assert!(String::from_utf8_lossy(&ttl_out.stdout).contains("granted with TTL(60s)"), "{ttl_out:?}");

    // The same node again gets the same subnet; renewal moves the key to a fresh etcd lease.
    let again =
        store.acquire(&config(), &attrs("198.18.0.1", "0a:58:00:00:00:01"), None, ttl, now, &mut |_| 7).unwrap();
    assert_eq!(again.subnet, lease.subnet);
    store.renew(&again, ttl, SystemTime::now()).unwrap();
    store.delete(&lease.subnet).unwrap();
    assert!(store.renew(&again, ttl, SystemTime::now()).is_err());
}

fn base64(s: &str) -> Vec<u8> {
    let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| *c != b'=') {
        buf = (buf << 6) | table.iter().position(|t| *t == c).unwrap() as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    out
}

#[test]
fn racing_nodes_never_share_a_subnet() {
    let etcd = Etcd::start();
    let url = etcd.url();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let store = EtcdStore::connect(&[url], DEFAULT_PREFIX).unwrap();
                // Every node picks the same "random" subnet: the transaction must keep them apart.
                store
                    .acquire(
                        &config(),
                        &attrs(&format!("198.18.0.{}", i + 1), "0a:58:00:00:00:01"),
                        None,
                        None,
                        SystemTime::now(),
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

fn poll_until(
    watcher: &mut Box<dyn weft_lease::LeaseWatcher>,
    what: &str,
    want: impl Fn(&[LeaseEvent]) -> bool,
) -> Vec<LeaseEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut all = Vec::new();
    loop {
        all.extend(watcher.poll(SystemTime::now()).unwrap());
        if want(&all) {
            return all;
        }
        assert!(Instant::now() < deadline, "{what}: got {all:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn watch_follows_changes_across_an_etcd_restart() {
    let mut etcd = Etcd::start();
    let store = EtcdStore::connect(&[etcd.url()], DEFAULT_PREFIX).unwrap();
    let a = store
        .acquire(&config(), &attrs("198.18.0.1", "0a:58:00:00:00:01"), None, None, SystemTime::now(), &mut |_| 0)
        .unwrap();
    let mut watcher = store.watch().unwrap();
    poll_until(&mut watcher, "the initial lease", |e| e.contains(&LeaseEvent::Added(a.clone())));
    let b = store
        .acquire(&config(), &attrs("198.18.0.2", "0a:58:00:00:00:02"), None, None, SystemTime::now(), &mut |_| 0)
        .unwrap();
    poll_until(&mut watcher, "a new lease", |e| {
        e.iter().any(|ev| matches!(ev, LeaseEvent::Added(l) if l.subnet == b.subnet))
    });
    store.delete(&a.subnet).unwrap();
    poll_until(&mut watcher, "a removal", |e| {
        e.iter().any(|ev| matches!(ev, LeaseEvent::Removed(l) if l.subnet == a.subnet))
    });

    // etcd goes away; meanwhile another client changes things; etcd comes back.
    etcd.stop();
    std::thread::sleep(Duration::from_secs(2));
    etcd.run();
    let other = EtcdStore::connect(&[etcd.url()], DEFAULT_PREFIX).unwrap();
    other.delete(&b.subnet).unwrap();
    let c = other
        .acquire(&config(), &attrs("198.18.0.3", "0a:58:00:00:00:03"), None, None, SystemTime::now(), &mut |_| 5)
        .unwrap();
    let events = poll_until(&mut watcher, "changes made while disconnected", |e| {
        e.iter().any(|ev| matches!(ev, LeaseEvent::Removed(l) if l.subnet == b.subnet))
            && e.iter().any(|ev| matches!(ev, LeaseEvent::Added(l) if l.subnet == c.subnet))
    });
    assert!(!events.is_empty());
    assert_eq!(watcher.leases().len(), 1);
    // The first store's client reconnects too.
    assert_eq!(store.list(SystemTime::now()).unwrap().len(), 1);
}

#[test]
fn watch_from_a_compacted_revision_lists_again() {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(&[etcd.url()], DEFAULT_PREFIX).unwrap();
    let a = store
        .acquire(&config(), &attrs("198.18.0.1", "0a:58:00:00:00:01"), None, None, SystemTime::now(), &mut |_| 0)
        .unwrap();
    // What a watcher knew at this revision...
    let known = store.list(SystemTime::now()).unwrap();
    let revision = store.revision().unwrap();
    // ...then changes it never saw, and a compaction that erases their history.
    store.delete(&a.subnet).unwrap();
    let b = store
        .acquire(&config(), &attrs("198.18.0.2", "0a:58:00:00:00:02"), None, None, SystemTime::now(), &mut |n| n - 1)
        .unwrap();
    assert_ne!(a.subnet, b.subnet);
    let current = store.revision().unwrap();
    assert!(etcd.ctl(&["compact", &current.to_string()]).status.success());
    let mut watcher: Box<dyn weft_lease::LeaseWatcher> = Box::new(store.watch_from(known, revision).unwrap());
    let events = poll_until(&mut watcher, "the difference after compaction", |e| {
        e.iter().any(|ev| matches!(ev, LeaseEvent::Removed(l) if l.subnet == a.subnet))
            && e.iter().any(|ev| matches!(ev, LeaseEvent::Added(l) if l.subnet == b.subnet))
    });
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(watcher.leases().len(), 1);
}

/// Keys as flannel writes them, and what weft makes of odd ones: a key with host bits over a
/// node's subnet is not a lease; a dual-stack key and an IPv4-only key naming one subnet are two
/// claims (the older counts), and deleting the dual-stack one does not remove the other.
#[test]
fn only_canonical_keys_count_and_the_older_claim_wins() {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(&[etcd.url()], DEFAULT_PREFIX).unwrap();
    let key = |name: &str| format!("{DEFAULT_PREFIX}/subnets/{name}");
    let value = |ip: &str, mac: &str| serde_json::to_string(&attrs(ip, mac)).unwrap();
    assert!(etcd.ctl(&["put", &key("198.19.20.0-24"), &value("198.18.0.20", "0a:00:00:00:00:20")]).status.success());
    let mut watcher = store.watch().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while watcher.count() < 1 {
        assert!(Instant::now() < deadline);
        watcher.wait(Duration::from_millis(100));
        watcher.poll(SystemTime::now()).unwrap();
    }
    // Host bits: not a lease, neither listed nor watched.
    assert!(etcd.ctl(&["put", &key("198.19.20.5-24"), &value("198.18.0.66", "0a:00:00:00:00:66")]).status.success());
    // A dual-stack key over the same subnet, younger: it does not displace the older claim.
    let dual = key("198.19.20.0-24&fc00::-64");
    assert!(etcd.ctl(&["put", &dual, &value("198.18.0.77", "0a:00:00:00:00:77")]).status.success());
    std::thread::sleep(Duration::from_millis(300));
    watcher.poll(SystemTime::now()).unwrap();
    let listed = store.list(SystemTime::now()).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].attrs.public_ip.to_string(), "198.18.0.20");
    let known = watcher.leases();
    assert_eq!(known.len(), 1, "{known:?}");
    assert_eq!(known[0].attrs.public_ip.to_string(), "198.18.0.20");
    // Deleting the dual-stack key leaves the IPv4-only lease alone.
    assert!(etcd.ctl(&["del", &dual]).status.success());
    std::thread::sleep(Duration::from_millis(300));
    let events = watcher.poll(SystemTime::now()).unwrap();
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(watcher.count(), 1);
    // A subnet taken only by a dual-stack key is not handed out.
    assert!(etcd
        .ctl(&["put", &key("198.19.1.0-24&fc00:1::-64"), &value("198.18.0.88", "0a:00:00:00:00:88")])
        .status
        .success());
    let prev: Ipv4Net = "198.19.1.0/24".parse().unwrap();
    let got = store
        .acquire(&config(), &attrs("198.18.0.1", "0a:00:00:00:00:01"), Some(prev), None, SystemTime::now(), &mut |_| 0)
        .unwrap();
    assert_ne!(got.subnet, prev);
}

/// Polls `watcher` until `want` holds of its outcome.
fn poll_outcome(
    watcher: &mut Box<dyn weft_lease::LeaseWatcher>,
    what: &str,
    limit: Duration,
    want: impl Fn(bool) -> bool,
) {
    let deadline = Instant::now() + limit;
    loop {
        let ok = watcher.poll(SystemTime::now()).is_ok();
        if want(ok) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}");
        watcher.wait(Duration::from_millis(200));
    }
}

/// A watch says when etcd stops answering — paused (its connections stay open and silent) or
/// gone — and when it answers again, so an outage shows in readiness at once and not at the
/// next renewal, up to 12 hours later.
#[test]
fn a_watch_reports_an_etcd_that_does_not_answer() {
    let mut etcd = Etcd::start();
    let store = EtcdStore::connect(&[etcd.url()], DEFAULT_PREFIX).unwrap();
    let a = store
        .acquire(&config(), &attrs("198.18.0.1", "0a:58:00:00:00:01"), None, None, SystemTime::now(), &mut |_| 0)
        .unwrap();
    let mut watcher = store.watch().unwrap();
    poll_until(&mut watcher, "the first listing", |e| e.contains(&LeaseEvent::Added(a.clone())));
    etcd.signal("STOP");
    poll_outcome(&mut watcher, "a paused etcd reported", Duration::from_secs(15), |ok| !ok);
    etcd.signal("CONT");
    poll_outcome(&mut watcher, "etcd answering again", Duration::from_secs(15), |ok| ok);
    etcd.stop();
    poll_outcome(&mut watcher, "a stopped etcd reported", Duration::from_secs(15), |ok| !ok);
    etcd.run();
    poll_outcome(&mut watcher, "etcd back", Duration::from_secs(15), |ok| ok);
    let other = EtcdStore::connect(&[etcd.url()], DEFAULT_PREFIX).unwrap();
    let b = other
        .acquire(&config(), &attrs("198.18.0.2", "0a:58:00:00:00:02"), None, None, SystemTime::now(), &mut |_| 0)
        .unwrap();
    poll_until(&mut watcher, "changes after the outage", |e| {
        e.iter().any(|ev| matches!(ev, LeaseEvent::Added(l) if l.subnet == b.subnet))
    });
}

/// The node's key deleted, or overwritten with garbage, by someone else: the node takes it back
/// and gives back the etcd lease (grant) it had attached before — it was left to live out its
/// TTL, a day by default, one per such event.
#[test]
fn a_key_taken_back_leaves_no_grant_behind() {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(&[etcd.url()], DEFAULT_PREFIX).unwrap();
    let ttl = Some(Duration::from_secs(86400));
    let mine = attrs("198.18.0.1", "0a:58:00:00:00:01");
    let lease = store.acquire(&config(), &mine, None, ttl, SystemTime::now(), &mut |_| 0).unwrap();
    let key = format!("{DEFAULT_PREFIX}/subnets/{}", lease.key());
    // etcdctl says "found N leases", then their ids.
    let grants = || {
        let out = String::from_utf8(etcd.ctl(&["lease", "list"]).stdout).unwrap();
        out.split_whitespace().nth(1).and_then(|n| n.parse::<usize>().ok()).unwrap()
    };
    assert_eq!(grants(), 1, "{}", String::from_utf8_lossy(&etcd.ctl(&["lease", "list"]).stdout));
    assert!(etcd.ctl(&["del", &key]).status.success());
    store.acquire(&config(), &mine, Some(lease.subnet), ttl, SystemTime::now(), &mut |_| 0).unwrap();
    assert_eq!(grants(), 1, "after a deletion: {}", String::from_utf8_lossy(&etcd.ctl(&["lease", "list"]).stdout));
    assert!(etcd.ctl(&["put", &key, "garbage{"]).status.success());
    store.acquire(&config(), &mine, Some(lease.subnet), ttl, SystemTime::now(), &mut |_| 0).unwrap();
    assert_eq!(grants(), 1, "after garbage: {}", String::from_utf8_lossy(&etcd.ctl(&["lease", "list"]).stdout));
    store.delete(&lease.subnet).unwrap();
    assert_eq!(grants(), 0);
}
