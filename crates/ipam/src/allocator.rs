//! The allocator: reserves one address per range set for an attachment (the requested one, or
//! the next free one round-robin after the last handed out), and releases them again. All calls
//! run under the store's lock.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::range::{describe, round_robin, Range, RangeSet};
use crate::store::Store;
use crate::{IpamError, Result};

/// One address handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub set: usize,
    pub address: IpNet,
    pub gateway: IpAddr,
}

impl Allocation {
    fn new(set: usize, ip: IpAddr, range: &Range) -> Allocation {
        // The prefix length comes from a parsed subnet, so it is valid for the family.
        let address = IpNet::new(ip, range.subnet.prefix_len()).unwrap_or_else(|_| IpNet::from(ip));
        Allocation { set, address, gateway: range.gateway }
    }
}

pub struct Allocator<'a> {
    store: &'a mut Store,
    sets: &'a [RangeSet],
}

impl<'a> Allocator<'a> {
    pub fn new(store: &'a mut Store, sets: &'a [RangeSet]) -> Self {
        Self { store, sets }
    }

    /// Reserves an address from every range set for `(container_id, ifname)`. `requested` are
    /// addresses asked for by the runtime; each must fall in one of the sets. An attachment that
    /// holds an address of these sets already is refused, as the reference refuses it. On
    /// failure nothing new stays reserved.
    pub fn allocate(&mut self, container_id: &str, ifname: &str, requested: &[IpAddr]) -> Result<Vec<Allocation>> {
        let held = self.store.held(container_id, ifname)?;
        if let Some(ip) = held.iter().find(|ip| self.set_of(**ip).is_some()) {
            return Err(IpamError::Duplicate { ip: *ip, container_id: container_id.to_string() });
        }
        let mut wanted: Vec<Option<IpAddr>> = vec![None; self.sets.len()];
        for ip in requested {
            let set = self.set_of(*ip).ok_or(IpamError::RequestedOutOfRange(*ip))?;
            wanted[set] = Some(*ip);
        }
        // The entry first: every reservation is a link to it (see the store's doc).
        self.store.open_entry(container_id, ifname, !held.is_empty())?;
        let mut done: Vec<Allocation> = Vec::with_capacity(self.sets.len());
        let mut outcome = Ok(());
        for (set, want) in wanted.into_iter().enumerate() {
            match self.allocate_one(container_id, ifname, set, want) {
                Ok(a) => done.push(a),
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        let mut ips = held.clone();
        ips.extend(done.iter().map(|a| a.address.addr()));
        if outcome.is_ok() {
            outcome = self.store.close_entry(container_id, ifname, &ips);
        }
        if let Err(e) = outcome {
            for a in &done {
                self.store.release_if_owned(container_id, ifname, a.address.addr())?;
            }
            self.store.close_entry(container_id, ifname, &held)?;
            return Err(e);
        }
        Ok(done)
    }

    fn allocate_one(
        &mut self,
        container_id: &str,
        ifname: &str,
        set: usize,
        want: Option<IpAddr>,
    ) -> Result<Allocation> {
        let ranges = &self.sets[set];
        if let Some(ip) = want {
            let range = ranges.iter().find(|r| r.contains(ip)).ok_or(IpamError::RequestedOutOfRange(ip))?;
            if ip == range.gateway || !self.store.reserve(container_id, ifname, ip, set)? {
                return Err(IpamError::RequestedUnavailable(ip, describe(ranges)));
            }
            return Ok(Allocation::new(set, ip, range));
        }
        for (idx, ip) in round_robin(ranges, self.store.last_reserved(set)) {
            if self.store.reserve(container_id, ifname, ip, set)? {
                return Ok(Allocation::new(set, ip, &ranges[idx]));
            }
        }
        Err(IpamError::Exhausted(describe(ranges)))
    }

    /// Releases every address `(container_id, ifname)` holds, and any of `hints` (addresses the
    /// caller believes it holds, from `prevResult`) that it owns. Returns what was released.
    pub fn release(&mut self, container_id: &str, ifname: &str, hints: &[IpAddr]) -> Result<Vec<IpAddr>> {
        let mut candidates = self.store.held(container_id, ifname)?;
        for ip in hints {
            if !candidates.contains(ip) {
                candidates.push(*ip);
            }
        }
        let mut released = Vec::new();
        for ip in candidates {
            if self.store.release_if_owned(container_id, ifname, ip)? {
                released.push(ip);
            }
        }
        if !released.is_empty() || self.store.has_entry(container_id, ifname) {
            self.store.close_entry(container_id, ifname, &[])?;
        }
        Ok(released)
    }

    fn set_of(&self, ip: IpAddr) -> Option<usize> {
        self.sets.iter().position(|set| set.iter().any(|r| r.contains(ip)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::{canonicalize, RangeConfig};

    fn sets(subnets: &[&str]) -> Vec<RangeSet> {
        let cfg: Vec<Vec<RangeConfig>> = subnets
            .iter()
            .map(|s| vec![RangeConfig { subnet: s.to_string(), range_start: None, range_end: None, gateway: None }])
            .collect();
        canonicalize(&cfg).unwrap()
    }

    #[test]
    fn allocates_round_robin_in_reference_format() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), "net").unwrap();
        let sets = sets(&["10.0.0.0/29", "fd00::/125"]);
        let mut alloc = Allocator::new(&mut store, &sets);
        let a = alloc.allocate("c1", "eth0", &[]).unwrap();
        assert_eq!(a[0].address.to_string(), "10.0.0.2/29");
        assert_eq!(a[1].address.to_string(), "fd00::2/125");
        assert_eq!(std::fs::read_to_string(dir.path().join("net/10.0.0.2")).unwrap(), "c1\r\neth0");
        assert_eq!(std::fs::read_to_string(dir.path().join("net/last_reserved_ip.0")).unwrap(), "10.0.0.2");
        assert!(matches!(alloc.allocate("c1", "eth0", &[]), Err(IpamError::Duplicate { .. })));
        let b = alloc.allocate("c2", "eth0", &[]).unwrap();
        assert_eq!(b[0].address.addr().to_string(), "10.0.0.3");
        assert_eq!(alloc.release("c1", "eth0", &[]).unwrap().len(), 2);
        // Round robin: the next one is .4, not the freed .2.
        let c = alloc.allocate("c3", "eth0", &[]).unwrap();
        assert_eq!(c[0].address.addr().to_string(), "10.0.0.4");
    }

    #[test]
    fn exhaustion_leaves_nothing_reserved() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), "net").unwrap();
        let sets = sets(&["fd00::/126", "10.0.0.0/30"]);
        let mut alloc = Allocator::new(&mut store, &sets);
        alloc.allocate("c1", "eth0", &[]).unwrap();
        let err = alloc.allocate("c2", "eth0", &[]).unwrap_err();
        assert!(matches!(err, IpamError::Exhausted(_)), "{err}");
        let held: Vec<String> = store.reservations().unwrap().into_iter().map(|(_, c, _)| c).collect();
        assert_eq!(held, ["c1", "c1"]);
        assert_eq!(store.entries(), [("c1".to_string(), "eth0".to_string())], "c2's entry went with it");
    }

    #[test]
    fn requested_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), "net").unwrap();
        let sets = sets(&["10.0.0.0/24"]);
        let mut alloc = Allocator::new(&mut store, &sets);
        let ip: IpAddr = "10.0.0.77".parse().unwrap();
        assert_eq!(alloc.allocate("c1", "eth0", &[ip]).unwrap()[0].address.addr(), ip);
        assert!(matches!(alloc.allocate("c2", "eth0", &[ip]), Err(IpamError::RequestedUnavailable(..))));
        let gw: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(matches!(alloc.allocate("c2", "eth0", &[gw]), Err(IpamError::RequestedUnavailable(..))));
        let out: IpAddr = "10.9.0.1".parse().unwrap();
        assert!(matches!(alloc.allocate("c2", "eth0", &[out]), Err(IpamError::RequestedOutOfRange(_))));
    }

    #[test]
    fn the_reference_plugins_reservations_are_refused_again_and_released() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path(), "net").unwrap().commit().unwrap();
        // A reservation written by the reference plugin (no index entry), after weft's last call.
        std::fs::write(dir.path().join("net/10.0.0.9"), "ref1\r\neth0").unwrap();
        let sets = sets(&["10.0.0.0/24"]);
        let mut store = Store::open(dir.path(), "net").unwrap();
        let mut alloc = Allocator::new(&mut store, &sets);
        assert!(matches!(alloc.allocate("ref1", "eth0", &[]), Err(IpamError::Duplicate { .. })));
        assert_eq!(alloc.release("ref1", "eth0", &[]).unwrap(), vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
        assert!(alloc.release("ref1", "eth0", &[]).unwrap().is_empty());
        store.commit().unwrap();
        assert!(Store::open(dir.path(), "net").unwrap().reservations().unwrap().is_empty());
    }

    /// Every prefix of an ADD's file operations (what a kill leaves), then what a runtime does
    /// next: ADD again, DEL, ADD, DEL. Never a second address, nothing left.
    #[test]
    fn an_add_cut_short_at_any_step_leaks_nothing() {
        let sets = sets(&["10.0.0.0/24", "fd00::/120"]);
        for cut in 0usize..=4 {
            let dir = tempfile::tempdir().unwrap();
            let mut store = Store::open(dir.path(), "net").unwrap();
            let ips: [IpAddr; 2] = ["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()];
            if cut >= 1 {
                store.open_entry("c1", "eth0", false).unwrap();
            }
            for (set, ip) in ips.iter().enumerate().take(cut.saturating_sub(1).min(2)) {
                assert!(store.reserve("c1", "eth0", *ip, set).unwrap());
            }
            if cut >= 4 {
                store.close_entry("c1", "eth0", &ips).unwrap();
            }
            drop(store);

            let mut store = Store::open(dir.path(), "net").unwrap();
            let retried = Allocator::new(&mut store, &sets).allocate("c1", "eth0", &[]);
            store.commit().unwrap();
            let mut store = Store::open(dir.path(), "net").unwrap();
            let held = store.held("c1", "eth0").unwrap();
            match &retried {
                Ok(a) => assert_eq!(held, a.iter().map(|a| a.address.addr()).collect::<Vec<_>>(), "cut {cut}"),
                Err(IpamError::Duplicate { .. }) => assert!(!held.is_empty(), "cut {cut}"),
                Err(e) => panic!("cut {cut}: {e}"),
            }
            assert!(held.len() <= 2, "cut {cut}: {held:?}");
            Allocator::new(&mut store, &sets).release("c1", "eth0", &[]).unwrap();
            Allocator::new(&mut store, &sets).allocate("c1", "eth0", &[]).unwrap();
            Allocator::new(&mut store, &sets).release("c1", "eth0", &[]).unwrap();
            store.commit().unwrap();
            let store = Store::open(dir.path(), "net").unwrap();
            assert!(store.reservations().unwrap().is_empty(), "cut {cut}");
            assert!(store.entries().is_empty(), "cut {cut}");
        }
    }

    /// Damage in weft's own files and the reference's old format, each as an adversarial test
    /// found it: never a second address, never an address leaked, never a call that fails for good.
    #[test]
    fn damage_never_leaks_or_doubles_an_address() {
        let sets = sets(&["10.0.0.0/24"]);
        let fresh = || {
            let dir = tempfile::tempdir().unwrap();
            let mut store = Store::open(dir.path(), "net").unwrap();
            Allocator::new(&mut store, &sets).allocate("c0", "eth0", &[]).unwrap();
            store.commit().unwrap();
            dir
        };
        let held = |dir: &std::path::Path, c: &str| -> Vec<String> {
            Store::open(dir, "net")
                .unwrap()
                .reservations()
                .unwrap()
                .into_iter()
                .filter(|(_, owner, _)| owner == c)
                .map(|(ip, _, _)| ip.to_string())
                .collect()
        };

        // The round-robin file cannot be written (a directory in its place): the ADD fails and
        // takes nothing.
        let dir = fresh();
        std::fs::remove_file(dir.path().join("net/last_reserved_ip.0")).unwrap();
        std::fs::create_dir(dir.path().join("net/last_reserved_ip.0")).unwrap();
        let mut store = Store::open(dir.path(), "net").unwrap();
        assert!(matches!(Allocator::new(&mut store, &sets).allocate("c1", "eth0", &[]), Err(IpamError::Io { .. })));
        drop(store);
        assert!(held(dir.path(), "c1").is_empty(), "{:?}", held(dir.path(), "c1"));

        // A huge round-robin file: calls still work and mark the store clean.
        let dir = fresh();
        std::fs::write(dir.path().join("net/last_reserved_ip.1"), "x".repeat(8192)).unwrap();
        let mut store = Store::open(dir.path(), "net").unwrap();
        Allocator::new(&mut store, &sets).allocate("c1", "eth0", &[]).unwrap();
        store.commit().unwrap();
        assert!(!Store::open(dir.path(), "net").unwrap().was_walked());

        // The index directory replaced by a file.
        let dir = fresh();
        std::fs::remove_dir_all(dir.path().join("net/.weft-index")).unwrap();
        std::fs::write(dir.path().join("net/.weft-index"), "junk").unwrap();
        let mut store = Store::open(dir.path(), "net").unwrap();
        Allocator::new(&mut store, &sets).allocate("c1", "eth0", &[]).unwrap();
        Allocator::new(&mut store, &sets).release("c1", "eth0", &[]).unwrap();
        store.commit().unwrap();
        assert!(held(dir.path(), "c1").is_empty());

        // An entry's list damaged while the store is marked clean: the ADD is refused, not given
        // a second address, and DEL frees the first.
        let dir = fresh();
        let entry = dir.path().join("net/.weft-index/c0@eth0");
        rustix::fs::setxattr(&entry, "user.weft.ips", b"garbage\n", rustix::fs::XattrFlags::empty()).unwrap();
        let mut store = Store::open(dir.path(), "net").unwrap();
        assert!(!store.was_walked(), "the mark was still valid");
        assert!(matches!(
            Allocator::new(&mut store, &sets).allocate("c0", "eth0", &[]),
            Err(IpamError::Duplicate { .. })
        ));
        Allocator::new(&mut store, &sets).release("c0", "eth0", &[]).unwrap();
        store.commit().unwrap();
        assert!(held(dir.path(), "c0").is_empty());

        // Index entries tampered with by hand while the store is marked clean: removed, emptied,
        // stripped of their list. DEL still frees every address and ADD never gives a second.
        for tamper in ["remove", "empty", "strip"] {
            let dir = fresh();
            let entry = dir.path().join("net/.weft-index/c0@eth0");
            match tamper {
                "remove" => std::fs::remove_file(&entry).unwrap(),
                "empty" => rustix::fs::setxattr(&entry, "user.weft.ips", b"", rustix::fs::XattrFlags::empty()).unwrap(),
                _ => rustix::fs::removexattr(&entry, "user.weft.ips").unwrap(),
            }
            let mut store = Store::open(dir.path(), "net").unwrap();
            assert!(
                matches!(
                    Allocator::new(&mut store, &sets).allocate("c0", "eth0", &[]),
                    Err(IpamError::Duplicate { .. })
                ),
                "{tamper}"
            );
            Allocator::new(&mut store, &sets).release("c0", "eth0", &[]).unwrap();
            store.commit().unwrap();
            assert!(held(dir.path(), "c0").is_empty(), "{tamper}");
        }

        // The reference's old format (the container ID alone): the container holds it.
        let dir = fresh();
        std::fs::write(dir.path().join("net/10.0.0.9"), "old1").unwrap();
        let mut store = Store::open(dir.path(), "net").unwrap();
        assert!(matches!(
            Allocator::new(&mut store, &sets).allocate("old1", "eth0", &[]),
            Err(IpamError::Duplicate { .. })
        ));
        assert_eq!(Allocator::new(&mut store, &sets).release("old1", "eth0", &[]).unwrap().len(), 1);
        store.commit().unwrap();
        assert!(held(dir.path(), "old1").is_empty());
    }
}
