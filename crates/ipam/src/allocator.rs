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
    store: &'a Store,
    sets: &'a [RangeSet],
}

impl<'a> Allocator<'a> {
    pub fn new(store: &'a Store, sets: &'a [RangeSet]) -> Self {
        Self { store, sets }
    }

    /// Reserves an address from every range set for `(container_id, ifname)`. `requested` are
    /// addresses asked for by the runtime; each must fall in one of the sets. On failure nothing
    /// stays reserved.
    pub fn allocate(&self, container_id: &str, ifname: &str, requested: &[IpAddr]) -> Result<Vec<Allocation>> {
        if let Some(ip) = self.store.indexed(container_id, ifname).into_iter().find(|ip| self.set_of(*ip).is_some()) {
            return Err(IpamError::Duplicate { ip, container_id: container_id.to_string() });
        }
        let mut wanted: Vec<Option<IpAddr>> = vec![None; self.sets.len()];
        for ip in requested {
            let set = self.set_of(*ip).ok_or(IpamError::RequestedOutOfRange(*ip))?;
            wanted[set] = Some(*ip);
        }
        let mut done: Vec<Allocation> = Vec::with_capacity(self.sets.len());
        for (set, want) in wanted.into_iter().enumerate() {
            match self.allocate_one(container_id, ifname, set, want) {
                Ok(a) => done.push(a),
                Err(e) => {
                    for a in &done {
                        let _ = self.store.release_if_owned(container_id, ifname, a.address.addr());
                    }
                    return Err(e);
                }
            }
        }
        let ips: Vec<IpAddr> = done.iter().map(|a| a.address.addr()).collect();
        if let Err(e) = self.store.set_index(container_id, ifname, &ips) {
            for ip in ips {
                let _ = self.store.release_if_owned(container_id, ifname, ip);
            }
            return Err(e);
        }
        Ok(done)
    }

    fn allocate_one(&self, container_id: &str, ifname: &str, set: usize, want: Option<IpAddr>) -> Result<Allocation> {
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

    /// Releases every address `(container_id, ifname)` holds. `hints` are addresses the caller
    /// believes it holds (from `prevResult`); only when neither the index nor the hints know the
    /// attachment is the whole store walked. Returns what was released.
    pub fn release(&self, container_id: &str, ifname: &str, hints: &[IpAddr]) -> Result<Vec<IpAddr>> {
        let mut candidates = self.store.indexed(container_id, ifname);
        for ip in hints {
            if !candidates.contains(ip) {
                candidates.push(*ip);
            }
        }
        if candidates.is_empty() {
            candidates = self
                .store
                .reservations()?
                .into_iter()
                .filter(|(_, c, i)| c == container_id.trim() && i == ifname)
                .map(|(ip, _, _)| ip)
                .collect();
        }
        let mut released = Vec::new();
        for ip in candidates {
            if self.store.release_if_owned(container_id, ifname, ip)? {
                released.push(ip);
            }
        }
        self.store.set_index(container_id, ifname, &[])?;
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
        let store = Store::open(dir.path(), "net").unwrap();
        let sets = sets(&["10.0.0.0/29", "fd00::/125"]);
        let alloc = Allocator::new(&store, &sets);
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
        let store = Store::open(dir.path(), "net").unwrap();
        let sets = sets(&["fd00::/126", "10.0.0.0/30"]);
        let alloc = Allocator::new(&store, &sets);
        alloc.allocate("c1", "eth0", &[]).unwrap();
        let err = alloc.allocate("c2", "eth0", &[]).unwrap_err();
        assert!(matches!(err, IpamError::Exhausted(_)), "{err}");
        let held: Vec<String> = store.reservations().unwrap().into_iter().map(|(_, c, _)| c).collect();
        assert_eq!(held, ["c1", "c1"]);
    }

    #[test]
    fn requested_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "net").unwrap();
        let sets = sets(&["10.0.0.0/24"]);
        let alloc = Allocator::new(&store, &sets);
        let ip: IpAddr = "10.0.0.77".parse().unwrap();
        assert_eq!(alloc.allocate("c1", "eth0", &[ip]).unwrap()[0].address.addr(), ip);
        assert!(matches!(alloc.allocate("c2", "eth0", &[ip]), Err(IpamError::RequestedUnavailable(..))));
        let gw: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(matches!(alloc.allocate("c2", "eth0", &[gw]), Err(IpamError::RequestedUnavailable(..))));
        let out: IpAddr = "10.9.0.1".parse().unwrap();
        assert!(matches!(alloc.allocate("c2", "eth0", &[out]), Err(IpamError::RequestedOutOfRange(_))));
    }

    #[test]
    fn release_without_index_walks_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "net").unwrap();
        // A reservation written by the reference plugin: no index entry.
        std::fs::write(dir.path().join("net/10.0.0.9"), "ref1\r\neth0").unwrap();
        let sets = sets(&["10.0.0.0/24"]);
        let alloc = Allocator::new(&store, &sets);
        assert_eq!(alloc.release("ref1", "eth0", &[]).unwrap(), vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
        assert!(alloc.release("ref1", "eth0", &[]).unwrap().is_empty());
    }
}
