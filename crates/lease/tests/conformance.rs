//! One conformance suite for every store behind `Kv` (the file store, etcd): create-if-absent,
//! compare-and-swap, delete, list with its revision, watches from the start and from a
//! revision, and writers racing as separate processes (no lost update, no key created twice),
//! and leases on top racing the same way.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::Etcd;
use weft_lease::kv::{EtcdKv, FileKv, Kv, KvWatch, Update};
use weft_lease::{LeaseAttrs, LeaseStore};
use weft_netconf::NetworkConfig;

/// A store of each kind, and what keeps it alive.
enum Backing {
    File(tempfile::TempDir),
    Etcd(Etcd),
}

impl Backing {
    fn file() -> Backing {
        Backing::File(tempfile::tempdir().unwrap())
    }

    fn etcd() -> Backing {
        Backing::Etcd(Etcd::start())
    }

    /// How a racer process opens it.
    fn spec(&self) -> String {
        match self {
            Backing::File(dir) => format!("file:{}", dir.path().display()),
            Backing::Etcd(etcd) => format!("etcd:{}", etcd.url()),
        }
    }

    fn open(&self) -> Box<dyn Kv> {
        open(&self.spec())
    }
}

fn open(spec: &str) -> Box<dyn Kv> {
    match spec.split_once(':').unwrap() {
        ("file", dir) => Box::new(FileKv::open(dir).unwrap()),
        ("etcd", url) => Box::new(EtcdKv::connect(&[url.to_string()], "/weft-test").unwrap()),
        _ => panic!("{spec}"),
    }
}

/// Runs `check` against a file store and an etcd.
fn conform(check: impl Fn(&Backing)) {
    for backing in [Backing::file(), Backing::etcd()] {
        check(&backing);
    }
}

fn value(n: u64) -> Vec<u8> {
    format!(r#"{{"n":{n}}}"#).into_bytes()
}

fn n_of(bytes: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(bytes).unwrap()["n"].as_u64().unwrap()
}

#[test]
fn create_if_absent() {
    conform(|b| {
        let kv = b.open();
        let before = kv.revision().unwrap();
        let e = kv.create("things/a", &value(1), None).unwrap().expect("created");
        assert!(e.created > before && e.modified == e.created, "{} {e:?}", b.spec());
        assert!(kv.create("things/a", &value(2), None).unwrap().is_none(), "{}: created twice", b.spec());
        let got = kv.get("things/a").unwrap().unwrap();
        assert_eq!((n_of(&got.value), got.created, got.modified), (1, e.created, e.modified), "{}", b.spec());
        assert!(kv.get("things/b").unwrap().is_none());
        assert!(kv.revision().unwrap() >= e.modified);
        assert!(kv.create("../escape", &value(1), None).is_err(), "{}: a key out of the store", b.spec());
    });
}

#[test]
fn compare_and_swap() {
    conform(|b| {
        let kv = b.open();
        let first = kv.create("things/a", &value(1), None).unwrap().unwrap();
        let second = kv.put("things/a", &value(2), None, Some(first.modified)).unwrap().expect("swapped");
        assert_eq!(second.created, first.created, "{}: a swap keeps the creation", b.spec());
        assert!(second.modified > first.modified);
        // A stale comparison changes nothing.
        assert!(kv.put("things/a", &value(3), None, Some(first.modified)).unwrap().is_none(), "{}", b.spec());
        assert_eq!(n_of(&kv.get("things/a").unwrap().unwrap().value), 2);
        // Nor does one on a key that does not exist.
        assert!(kv.put("things/none", &value(3), None, Some(second.modified)).unwrap().is_none());
        assert!(kv.get("things/none").unwrap().is_none());
        // Unconditional.
        let third = kv.put("things/a", &value(4), None, None).unwrap().unwrap();
        assert!(third.modified > second.modified && third.created == first.created);
    });
}

#[test]
fn delete_when_unchanged() {
    conform(|b| {
        let kv = b.open();
        let e = kv.create("things/a", &value(1), None).unwrap().unwrap();
        let changed = kv.put("things/a", &value(2), None, None).unwrap().unwrap();
        assert!(!kv.delete("things/a", Some(e.modified)).unwrap(), "{}: a stale delete", b.spec());
        assert!(kv.get("things/a").unwrap().is_some());
        assert!(kv.delete("things/a", Some(changed.modified)).unwrap());
        assert!(kv.get("things/a").unwrap().is_none());
        assert!(!kv.delete("things/a", None).unwrap(), "{}: deleted twice", b.spec());
        // Created again: a new key, a new creation revision.
        let again = kv.create("things/a", &value(3), None).unwrap().unwrap();
        assert!(again.created > changed.modified);
    });
}

#[test]
fn list_a_prefix_at_a_revision() {
    conform(|b| {
        let kv = b.open();
        for (i, key) in ["things/b", "things/a", "other/c", "thingsx/d"].iter().enumerate() {
            kv.create(key, &value(i as u64), None).unwrap().unwrap();
        }
        let (entries, revision) = kv.list("things").unwrap();
        let keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["things/a", "things/b"], "{}", b.spec());
        assert!(entries.iter().all(|e| e.modified <= revision));
        assert!(kv.list("nothing").unwrap().0.is_empty());
        kv.delete("things/a", None).unwrap();
        let (after, later) = kv.list("things").unwrap();
        assert_eq!(after.len(), 1);
        assert!(later > revision, "{}: the revision did not move", b.spec());
    });
}

/// Polls `watch` until `want` holds for everything it reported (10 s at most).
fn watch_until(watch: &mut Box<dyn KvWatch>, what: &str, want: impl Fn(&[Update]) -> bool) -> Vec<Update> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut all = Vec::new();
    loop {
        all.extend(watch.poll().unwrap());
        if want(&all) {
            return all;
        }
        assert!(Instant::now() < deadline, "{what}: got {all:?}");
        watch.wait(Duration::from_millis(50));
    }
}

/// Applies what a watch reported to `view` (a snapshot replaces it).
fn apply(view: &mut BTreeMap<String, u64>, updates: &[Update]) {
    for u in updates {
        match u {
            Update::Snapshot(entries) => *view = entries.iter().map(|e| (e.key.clone(), n_of(&e.value))).collect(),
            Update::Put(e) => {
                view.insert(e.key.clone(), n_of(&e.value));
            }
            Update::Delete(key) => {
                view.remove(key);
            }
        }
    }
}

/// A watch reports a listing first, then changes: applied in order, they give what the store
/// holds (the file store may report only the latest state of a key changed several times
/// between two polls; etcd reports every change). From a revision, it reports the changes
/// after it, without a listing.
#[test]
fn watch_from_the_start_and_from_a_revision() {
    conform(|b| {
        let kv = b.open();
        kv.create("things/a", &value(1), None).unwrap().unwrap();
        let mut watch = kv.watch("things", None).unwrap();
        let first = watch_until(&mut watch, "the first listing", |u| !u.is_empty());
        match &first[0] {
            Update::Snapshot(entries) => assert_eq!(entries.len(), 1, "{}", b.spec()),
            other => panic!("{}: the first report is not a listing: {other:?}", b.spec()),
        }
        let mut view = BTreeMap::new();
        apply(&mut view, &first);
        let (_, revision) = kv.list("things").unwrap();
        kv.put("things/a", &value(2), None, None).unwrap().unwrap();
        kv.create("other/x", &value(9), None).unwrap().unwrap();
        kv.create("things/b", &value(3), None).unwrap().unwrap();
        kv.delete("things/a", None).unwrap();
        kv.put("things/b", &value(4), None, None).unwrap().unwrap();
        let want: BTreeMap<String, u64> = [("things/b".to_string(), 4)].into();
        let seen = watch_until(&mut watch, "the changes", |u| {
            let mut v = view.clone();
            apply(&mut v, u);
            v == want
        });
        assert!(!format!("{seen:?}").contains("other/x"), "{}: another prefix reported", b.spec());
        assert!(!seen.iter().any(|u| matches!(u, Update::Snapshot(_))), "{}: listed again: {seen:?}", b.spec());
        // From the revision listed before those changes: the same end, without a listing.
        let mut resumed = kv.watch("things", Some(revision)).unwrap();
        let mut view: BTreeMap<String, u64> = [("things/a".to_string(), 1)].into();
        let again = watch_until(&mut resumed, "the changes again", |u| {
            let mut v = view.clone();
            apply(&mut v, u);
            v == want
        });
        assert!(!again.iter().any(|u| matches!(u, Update::Snapshot(_))), "{}: {again:?}", b.spec());
        apply(&mut view, &again);
        // Nothing more to say.
        std::thread::sleep(Duration::from_millis(200));
        assert!(resumed.poll().unwrap().is_empty());
    });
}

/// What a racer process does with the store `WEFT_RACER` names: `INCREMENTS` compare-and-swap
/// increments of `counters/c`, and a create of every `claims/k<i>`; it prints the claims it
/// won. Not a test of its own: it runs only in a process the racing test starts.
#[test]
fn racer() {
    let Ok(spec) = std::env::var("WEFT_RACER") else { return };
    // The harness's "test racer ... " has no newline yet.
    println!();
    let kv = open(&spec);
    for _ in 0..INCREMENTS {
        loop {
            let current = kv.get("counters/c").unwrap().unwrap();
            let next = value(n_of(&current.value) + 1);
            if kv.put("counters/c", &next, None, Some(current.modified)).unwrap().is_some() {
                break;
            }
        }
    }
    for i in 0..CLAIMS {
        let key = format!("claims/k{i}");
        if kv.create(&key, &value(std::process::id().into()), None).unwrap().is_some() {
            println!("won {key}");
        }
    }
    // Leases: every racer wants the same subnet first.
    let leases = lease_store(&spec);
    let config = NetworkConfig::parse(r#"{"Network": "198.19.0.0/16"}"#).unwrap();
    let attrs = LeaseAttrs {
        public_ip: format!("198.18.0.{}", std::env::var("WEFT_RACER_ID").unwrap()).parse().unwrap(),
        public_ipv6: None,
        backend_type: "host-gw".into(),
        backend_data: serde_json::Value::Null,
    };
    let lease = leases.acquire(&config, &attrs, None, None, SystemTime::now(), &mut |_| 0).unwrap();
    println!("leased {}", lease.subnet);
    // IPAM blocks (routed mode): every racer claims until the network has none left.
    let routed =
        NetworkConfig::parse(r#"{"Network": "198.19.200.0/24", "Backend": {"Type": "bgp", "BlockSize": 28}}"#).unwrap();
    let attrs = LeaseAttrs { backend_type: "bgp".into(), ..attrs };
    while let Some(block) = leases.claim_block(&routed, &attrs, SystemTime::now(), &mut |_| 0).unwrap() {
        println!("block {}", block.subnet);
    }
}

/// The lease store on a backing's spec.
fn lease_store(spec: &str) -> Box<dyn LeaseStore> {
    match spec.split_once(':').unwrap() {
        ("file", dir) => Box::new(weft_lease::file::FileStore::open(dir).unwrap()),
        (_, url) => Box::new(weft_lease::etcd::EtcdStore::connect(&[url.to_string()], "/weft-test").unwrap()),
    }
}

const RACERS: usize = 4;
const INCREMENTS: u64 = 25;
const CLAIMS: usize = 10;

#[test]
fn racing_writer_processes() {
    conform(|b| {
        let kv = b.open();
        kv.create("counters/c", &value(0), None).unwrap().unwrap();
        let children: Vec<_> = (0..RACERS)
            .map(|i| {
                Command::new(std::env::current_exe().unwrap())
                    .args(["racer", "--exact", "--nocapture", "--test-threads", "1"])
                    .env("WEFT_RACER", b.spec())
                    .env("WEFT_RACER_ID", (i + 1).to_string())
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut won: BTreeMap<String, usize> = BTreeMap::new();
        let mut subnets = HashSet::new();
        let mut blocks = HashSet::new();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}: a racer failed", b.spec());
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(key) = line.strip_prefix("won ") {
                    *won.entry(key.to_string()).or_default() += 1;
                }
                if let Some(subnet) = line.strip_prefix("leased ") {
                    assert!(subnets.insert(subnet.to_string()), "{}: {subnet} leased twice", b.spec());
                }
                if let Some(block) = line.strip_prefix("block ") {
                    assert!(blocks.insert(block.to_string()), "{}: block {block} claimed twice", b.spec());
                }
            }
        }
        let total = n_of(&kv.get("counters/c").unwrap().unwrap().value);
        assert_eq!(total, RACERS as u64 * INCREMENTS, "{}: updates were lost", b.spec());
        assert_eq!(won.len(), CLAIMS, "{}: {won:?}", b.spec());
        assert!(won.values().all(|n| *n == 1), "{}: a key created twice: {won:?}", b.spec());
        assert_eq!(subnets.len(), RACERS, "{}", b.spec());
        assert_eq!(blocks.len(), 16, "{}: every /28 of the /24 claimed once", b.spec());
    });
}

/// IPAM blocks on each store (routed mode): subnets of `BlockSize` claimed without a TTL,
/// every one of the network usable, released only by their holder and only unchanged, none
/// left when the network is used up; a damaged entry still counts as taken.
#[test]
fn blocks_are_claimed_once_and_released_by_their_holder() {
    conform(|b| {
        let leases = lease_store(&b.spec());
        let config =
            NetworkConfig::parse(r#"{"Network": "198.19.0.0/24", "Backend": {"Type": "bgp", "BlockSize": 26}}"#)
                .unwrap();
        let node = |n: u8| LeaseAttrs {
            public_ip: std::net::Ipv4Addr::new(198, 18, 0, n),
            public_ipv6: None,
            backend_type: "bgp".into(),
            backend_data: serde_json::json!({"AS": 64512}),
        };
        let now = SystemTime::now();
        let first = &mut |_: usize| 0;
        let a = leases.claim_block(&config, &node(1), now, first).unwrap().unwrap();
        assert_eq!(a.expires, None, "a block has no TTL");
        let b1 = leases.claim_block(&config, &node(2), now, first).unwrap().unwrap();
        assert_eq!((a.subnet.to_string(), b1.subnet.to_string()), ("198.19.0.0/26".into(), "198.19.0.64/26".into()));
        // Something that is not a lease where the third block would be: skipped, as taken.
        b.open().create("subnets/198.19.0.128-26", br#"{"garbage": 1}"#, None).unwrap();
        let a2 = leases.claim_block(&config, &node(1), now, first).unwrap().unwrap();
        assert_eq!(a2.subnet.to_string(), "198.19.0.192/26");
        assert_eq!(leases.claim_block(&config, &node(3), now, first).unwrap(), None, "exhausted");
        let mut held: Vec<String> = leases
            .list(now)
            .unwrap()
            .into_iter()
            .filter(|l| l.attrs.public_ip == node(1).public_ip)
            .map(|l| l.subnet.to_string())
            .collect();
        held.sort();
        assert_eq!(held, ["198.19.0.0/26", "198.19.0.192/26"]);
        let as_b = weft_lease::Lease { attrs: node(2), ..a.clone() };
        assert!(!leases.release_block(&as_b).unwrap(), "not b's to release");
        assert!(leases.release_block(&a).unwrap());
        assert!(!leases.release_block(&a).unwrap(), "released already");
        let again = leases.claim_block(&config, &node(3), now, first).unwrap().unwrap();
        assert_eq!(again.subnet, a.subnet, "free again");
        assert!(again.is_block() && a2.is_block(), "claimed blocks are marked");
        // node1 leasing (a reboot: no previous subnet known) does not take its block over as
        // its lease; and its lease is never released as a block.
        leases.release_block(&again).unwrap();
        let lease =
            leases.acquire(&config, &node(1), None, Some(std::time::Duration::from_secs(60)), now, first).unwrap();
        assert_ne!(lease.subnet, a2.subnet, "a block taken over as the node's lease");
        assert!(!lease.is_block());
        assert!(!leases.release_block(&lease).unwrap(), "the node's lease released as a block");
    });
}
