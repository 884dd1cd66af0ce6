//! Leases on a versioned key-value store ([`Kv`]): one implementation for every store.
//!
//! A lease is the key `subnets/<a.b.c.d>-<len>` (flannel's; a dual-stack node's
//! `<v4>&<v6>` key names the same IPv4 subnet) holding flannel's lease JSON. What counts:
//! - only canonical keys (`198.19.20.5-24`, host bits set, is not a lease);
//! - of several keys naming one subnet, the older claim (created first);
//! - an entry that cannot be read as a lease is damaged: skipped, counted, and its subnet is not
//!   handed to another node (only the node that had it takes it back);
//! - an expired entry is absent.
//!
//! [`LeaseWatch`] turns the store's updates into lease events: the one watch-diff.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use weft_netconf::NetworkConfig;

use crate::kv::{Entry, Kv, KvWatch, Ttl, Update};
use crate::model::{parse_key, subnet_key};
use crate::{choose_subnet, Lease, LeaseAttrs, LeaseError, LeaseEvent, LeaseStore, LeaseWatcher, Result};

/// Where leases live in the store.
const SUBNETS: &str = "subnets";
/// Where net-conf.json lives.
const CONFIG: &str = "config";

fn lease_key(subnet: &Ipv4Net) -> String {
    format!("{SUBNETS}/{}", subnet_key(subnet))
}

/// An entry's subnet, if its key names one.
fn subnet_of(key: &str) -> Option<Ipv4Net> {
    parse_key(key.strip_prefix(SUBNETS)?.strip_prefix('/')?).ok()
}

/// `attrs` marked as a routed-mode block's (`"Block": true` in the BackendData).
fn as_block(attrs: &LeaseAttrs) -> LeaseAttrs {
    let mut attrs = attrs.clone();
    if let Some(data) = attrs.backend_data.as_object_mut() {
        data.insert(crate::BLOCK_KEY.into(), serde_json::Value::Bool(true));
    }
    attrs
}

/// Warns about a damaged entry once per process and content.
fn warn_damaged(key: &str, reason: &str) {
    static SEEN: std::sync::Mutex<Option<HashSet<String>>> = std::sync::Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if seen.get_or_insert_with(HashSet::new).insert(format!("{key}\0{reason}")) {
        tracing::warn!("lease store: skipping {key:?}: {reason}");
    }
}

/// An entry as a lease: `None` when its key names no subnet; `Err` when it is damaged.
fn decode(entry: &Entry) -> Option<std::result::Result<Lease, String>> {
    let subnet = subnet_of(&entry.key)?;
    if let Some(why) = &entry.damaged {
        return Some(Err(why.clone()));
    }
    Some(
        serde_json::from_slice::<LeaseAttrs>(&entry.value)
            .map(|attrs| Lease { subnet, attrs, expires: entry.expires, created: Some(entry.created) })
            .map_err(|e| e.to_string()),
    )
}

/// The claims on every subnet, from a listing.
#[derive(Default)]
struct Claims {
    /// Subnet → key → (lease, the entry's last change).
    valid: BTreeMap<Ipv4Net, BTreeMap<String, (Arc<Lease>, i64)>>,
    /// Damaged entries with a lease key: key → its last change.
    damaged: BTreeMap<String, i64>,
}

impl Claims {
    fn of(entries: &[Entry]) -> Claims {
        let mut claims = Claims::default();
        for e in entries {
            claims.take(e);
        }
        claims
    }

    fn take(&mut self, entry: &Entry) {
        self.forget(&entry.key);
        match decode(entry) {
            None => {}
            Some(Ok(lease)) => {
                self.valid
                    .entry(lease.subnet)
                    .or_default()
                    .insert(entry.key.clone(), (Arc::new(lease), entry.modified));
            }
            Some(Err(why)) => {
                warn_damaged(&entry.key, &why);
                self.damaged.insert(entry.key.clone(), entry.modified);
            }
        }
    }

    fn forget(&mut self, key: &str) {
        self.damaged.remove(key);
        if let Some(subnet) = subnet_of(key) {
            if let Some(keys) = self.valid.get_mut(&subnet) {
                keys.remove(key);
                if keys.is_empty() {
                    self.valid.remove(&subnet);
                }
            }
        }
    }

    /// The claim that counts on `subnet` at `now`: the older unexpired one (its key, lease and
    /// last change).
    fn winner(&self, subnet: &Ipv4Net, now: SystemTime) -> Option<(&String, &Arc<Lease>, i64)> {
        let keys = self.valid.get(subnet)?;
        let mut best: Option<(&String, &Arc<Lease>, i64)> = None;
        for (key, (lease, modified)) in keys {
            if lease.is_expired(now) {
                continue;
            }
            if best.is_none_or(|(_, b, _)| lease.outranks(b)) {
                best = Some((key, lease, *modified));
            }
        }
        best
    }

    fn leases(&self, now: SystemTime) -> Vec<Lease> {
        self.valid.keys().filter_map(|s| self.winner(s, now)).map(|(_, l, _)| Lease::clone(l)).collect()
    }

    /// Subnets under a damaged entry.
    fn damaged_subnets(&self) -> HashSet<Ipv4Net> {
        self.damaged.keys().filter_map(|k| subnet_of(k)).collect()
    }
}

/// Leases on the store `K`.
#[derive(Debug, Clone)]
pub struct Leases<K: Kv> {
    kv: K,
}

impl<K: Kv + 'static> Leases<K> {
    pub fn new(kv: K) -> Leases<K> {
        Leases { kv }
    }

    /// The store underneath.
    pub fn kv(&self) -> &K {
        &self.kv
    }

    pub fn network_config(&self) -> Result<Option<String>> {
        self.kv.read_document(CONFIG)
    }

    pub fn set_network_config(&self, text: &str) -> Result<()> {
        self.kv.write_document(CONFIG, text)
    }

    fn claims(&self) -> Result<Claims> {
        Ok(Claims::of(&self.kv.list(SUBNETS)?.0))
    }

    /// Every lease that has not expired at `now` (damaged entries skipped).
    pub fn list(&self, now: SystemTime) -> Result<Vec<Lease>> {
        Ok(self.claims()?.leases(now))
    }

    fn value(attrs: &LeaseAttrs) -> Result<Vec<u8>> {
        serde_json::to_vec(attrs).map_err(|e| LeaseError::Store(e.to_string()))
    }

    /// Acquires this node's lease: its existing one (same public IP), else `previous` if free
    /// (or under a damaged entry: this node's own, taken back), else a free subnet chosen at
    /// random; created atomically, so two nodes never share a subnet. The attributes are
    /// (re)written and the TTL starts at `now`.
    pub fn acquire(
        &self,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Net>,
        ttl: Option<Duration>,
        now: SystemTime,
        random: &mut dyn FnMut(usize) -> usize,
    ) -> Result<Lease> {
        let value = Self::value(attrs)?;
        let ttl = ttl.map(|ttl| Ttl { now, ttl });
        let lease_of = |e: Entry, subnet: Ipv4Net| Lease {
            subnet,
            attrs: attrs.clone(),
            expires: ttl.and_then(|t| t.expires()),
            created: Some(e.created),
        };
        for _ in 0..10 {
            let claims = self.claims()?;
            // This node's subnet (from its subnet file) under a damaged value: its own key,
            // taken back.
            if let Some(prev) = previous.filter(|p| config.is_leasable(p)) {
                if let Some(modified) = claims.damaged.get(&lease_key(&prev)) {
                    tracing::warn!("lease store: taking back {} (its value was damaged)", subnet_key(&prev));
                    match self.kv.put(&lease_key(&prev), &value, ttl, Some(*modified))? {
                        Some(e) => return Ok(lease_of(e, prev)),
                        None => continue,
                    }
                }
            }
            // The subnet this node had (its pods have their addresses there) comes first: its
            // own lease on it, or it free; only then another lease with this node's address (a
            // stale or hand-made one would move the node and strand its pods).
            let previous = previous.filter(|p| config.is_leasable(p));
            let on_previous = previous.and_then(|p| claims.winner(&p, now));
            let previous_free = previous.is_some() && on_previous.is_none();
            let mine = |l: &Lease| l.attrs.public_ip == attrs.public_ip;
            let own = match on_previous {
                Some(w) if mine(w.1) => Some(w),
                _ if previous_free => None,
                // (Not one of its routed-mode blocks: those stay blocks.)
                _ => claims
                    .valid
                    .keys()
                    .filter(|s| config.is_leasable(s))
                    .find_map(|s| claims.winner(s, now).filter(|(_, l, _)| mine(l) && !l.is_block())),
            };
            if let Some((key, lease, modified)) = own {
                let subnet = lease.subnet;
                match self.kv.put(key, &value, ttl, Some(modified))? {
                    Some(e) => return Ok(lease_of(e, subnet)),
                    None => continue, // changed meanwhile: look again
                }
            }
            match self.claim_free(config, &claims, &value, ttl, previous, now, random)? {
                Some((e, subnet)) => return Ok(lease_of(e, subnet)),
                None if self.is_exhausted(config, &claims, now) => {
                    return Err(LeaseError::Exhausted(config.network.to_string()))
                }
                None => {} // another node was first: list again and pick another
            }
        }
        Err(LeaseError::Store("no subnet could be leased after 10 tries (too much contention)".into()))
    }

    /// The subnets no new claim may take: leased ones, and damaged entries' (another node's
    /// lease, perhaps).
    fn taken(claims: &Claims, now: SystemTime) -> HashSet<Ipv4Net> {
        claims
            .valid
            .keys()
            .filter(|s| claims.winner(s, now).is_some())
            .copied()
            .chain(claims.damaged_subnets())
            .collect()
    }

    fn is_exhausted(&self, config: &NetworkConfig, claims: &Claims, now: SystemTime) -> bool {
        choose_subnet(config, &Self::taken(claims, now), None, &mut |_| 0).is_none()
    }

    /// Creates a claim on a free subnet (`previous` if it is free): the entry and its subnet, or
    /// `None` when none is free or another node was first.
    #[allow(clippy::too_many_arguments)]
    fn claim_free(
        &self,
        config: &NetworkConfig,
        claims: &Claims,
        value: &[u8],
        ttl: Option<Ttl>,
        previous: Option<Ipv4Net>,
        now: SystemTime,
        random: &mut dyn FnMut(usize) -> usize,
    ) -> Result<Option<(Entry, Ipv4Net)>> {
        let Some(subnet) = choose_subnet(config, &Self::taken(claims, now), previous, random) else { return Ok(None) };
        let key = lease_key(&subnet);
        // An expired lease there is removed first (the new claim is a new key, not the old
        // node's).
        if let Some((_, modified)) = claims.valid.get(&subnet).and_then(|keys| keys.get(&key)) {
            if !self.kv.delete(&key, Some(*modified))? {
                return Ok(None);
            }
        }
        Ok(self.kv.create(&key, value, ttl)?.map(|e| (e, subnet)))
    }

    /// Routed mode: claims one more subnet (an IPAM block) for the node of `attrs`, without a
    /// TTL (a block is held until released, as Calico's block affinities are). `None` when the
    /// network has no free subnet left.
    pub fn claim_block(
        &self,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
        now: SystemTime,
        random: &mut dyn FnMut(usize) -> usize,
    ) -> Result<Option<Lease>> {
        let attrs = &as_block(attrs);
        let value = Self::value(attrs)?;
        for _ in 0..10 {
            let claims = self.claims()?;
            if let Some((e, subnet)) = self.claim_free(config, &claims, &value, None, None, now, random)? {
                return Ok(Some(Lease { subnet, attrs: attrs.clone(), expires: None, created: Some(e.created) }));
            }
            if self.is_exhausted(config, &claims, now) {
                return Ok(None);
            }
        }
        Err(LeaseError::Store("no block could be claimed after 10 tries (too much contention)".into()))
    }

    /// Routed mode: claims `block` again for the node of `attrs` (its pods still have addresses
    /// there, and the store lost it): only when no other claim holds it. Whether it did.
    pub fn take_back_block(&self, attrs: &LeaseAttrs, block: Ipv4Net, now: SystemTime) -> Result<bool> {
        let value = Self::value(&as_block(attrs))?;
        let claims = self.claims()?;
        if Self::taken(&claims, now).contains(&block) {
            return Ok(false);
        }
        let key = lease_key(&block);
        // An expired lease there is removed first.
        if let Some((_, modified)) = claims.valid.get(&block).and_then(|keys| keys.get(&key)) {
            if !self.kv.delete(&key, Some(*modified))? {
                return Ok(false);
            }
        }
        Ok(self.kv.create(&key, &value, None)?.is_some())
    }

    /// Gives a block back: removed only while the store still holds it for `lease`'s node,
    /// unchanged since it was read. Whether it was removed.
    pub fn release_block(&self, lease: &Lease) -> Result<bool> {
        let key = lease_key(&lease.subnet);
        let Some(entry) = self.kv.get(&key)? else { return Ok(false) };
        match decode(&entry) {
            // Only a block of this node's, never its lease.
            Some(Ok(held)) if held.attrs.public_ip == lease.attrs.public_ip && held.is_block() => {
                self.kv.delete(&key, Some(entry.modified))
            }
            _ => Ok(false),
        }
    }

    /// Extends `lease` by `ttl` from `now`. Fails with `NotFound` when the lease is gone, damaged
    /// or another node's now (the caller acquires again).
    pub fn renew(&self, lease: &Lease, ttl: Option<Duration>, now: SystemTime) -> Result<Lease> {
        let key = lease_key(&lease.subnet);
        let current = self.kv.get(&key)?;
        let held = current.as_ref().and_then(|e| decode(e)?.ok().map(|l| (l, e.modified)));
        match held {
            Some((c, modified)) if c.attrs.public_ip == lease.attrs.public_ip && !c.is_expired(now) => {
                let ttl = ttl.map(|ttl| Ttl { now, ttl });
                match self.kv.put(&key, &Self::value(&lease.attrs)?, ttl, Some(modified))? {
                    Some(e) => {
                        Ok(Lease { expires: ttl.and_then(|t| t.expires()), created: Some(e.created), ..lease.clone() })
                    }
                    None => Err(LeaseError::NotFound(lease.key())),
                }
            }
            _ => Err(LeaseError::NotFound(lease.key())),
        }
    }

    /// Removes the lease on `subnet` (a missing one is fine).
    pub fn delete(&self, subnet: &Ipv4Net) -> Result<()> {
        self.kv.delete(&lease_key(subnet), None).map(drop)
    }

    /// Writes a lease as given (tests, reservations with `expires: None`).
    pub fn put_lease(&self, lease: &Lease) -> Result<()> {
        let ttl = lease
            .expires
            .map(|e| Ttl { now: SystemTime::now(), ttl: e.duration_since(SystemTime::now()).unwrap_or_default() });
        self.kv.put(&lease_key(&lease.subnet), &Self::value(&lease.attrs)?, ttl, None).map(drop)
    }

    /// A watch over every lease, starting with the current ones (reported as added).
    pub fn watcher(&self) -> Result<LeaseWatch> {
        Ok(LeaseWatch::new(self.kv.watch(SUBNETS, None)?, Vec::new(), false))
    }

    /// A watch that resumes from `revision`, knowing `leases` as of then (what a caller that
    /// listed before has). When the store has lost the history since, it lists again and
    /// reports the difference.
    pub fn watch_from(&self, leases: Vec<Lease>, revision: i64) -> Result<LeaseWatch> {
        Ok(LeaseWatch::new(self.kv.watch(SUBNETS, Some(revision))?, leases, true))
    }

    /// The store's revision.
    pub fn revision(&self) -> Result<i64> {
        self.kv.revision()
    }
}

impl<K: Kv + 'static> LeaseStore for Leases<K> {
    fn network_config(&self) -> Result<Option<String>> {
        Leases::network_config(self)
    }

    fn list(&self, now: SystemTime) -> Result<Vec<Lease>> {
        Leases::list(self, now)
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
        Leases::acquire(self, config, attrs, previous, ttl, now, random)
    }

    fn renew(&self, lease: &Lease, ttl: Option<Duration>, now: SystemTime) -> Result<Lease> {
        Leases::renew(self, lease, ttl, now)
    }

    fn delete(&self, subnet: &Ipv4Net) -> Result<()> {
        Leases::delete(self, subnet)
    }

    fn claim_block(
        &self,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
        now: SystemTime,
        random: &mut dyn FnMut(usize) -> usize,
    ) -> Result<Option<Lease>> {
        Leases::claim_block(self, config, attrs, now, random)
    }

    fn release_block(&self, lease: &Lease) -> Result<bool> {
        Leases::release_block(self, lease)
    }

    fn take_back_block(&self, attrs: &LeaseAttrs, block: Ipv4Net, now: SystemTime) -> Result<bool> {
        Leases::take_back_block(self, attrs, block, now)
    }

    fn watch(&self) -> Result<Box<dyn LeaseWatcher>> {
        Ok(Box::new(self.watcher()?))
    }

    fn describe(&self) -> String {
        self.kv.describe()
    }
}

/// The leases as a store's watch reports them: the claim that counts per subnet, as events.
pub struct LeaseWatch {
    kv: Box<dyn KvWatch>,
    claims: Claims,
    /// The claim that counts per subnet, as last reported (shared with `claims`).
    known: HashMap<Ipv4Net, Arc<Lease>>,
    synced: bool,
}

impl LeaseWatch {
    /// Over `kv`, knowing `leases` (complete when `synced`).
    pub fn new(kv: Box<dyn KvWatch>, leases: Vec<Lease>, synced: bool) -> LeaseWatch {
        let mut claims = Claims::default();
        let mut known = HashMap::new();
        for lease in leases {
            let lease = Arc::new(lease);
            claims.valid.entry(lease.subnet).or_default().insert(lease_key(&lease.subnet), (lease.clone(), 0));
            known.insert(lease.subnet, lease);
        }
        LeaseWatch { kv, claims, known, synced }
    }

    /// Sets `known[subnet]` to the claim that counts at `now`, with an event when that changed
    /// what the subnet says.
    fn settle(&mut self, subnet: Ipv4Net, now: SystemTime, events: &mut Vec<LeaseEvent>) {
        match self.claims.winner(&subnet, now).map(|(_, l, _)| l.clone()) {
            Some(lease) => {
                if self.known.get(&subnet).is_none_or(|old| old.attrs != lease.attrs) {
                    events.push(LeaseEvent::Added(Lease::clone(&lease)));
                }
                self.known.insert(subnet, lease);
            }
            None => events.extend(self.known.remove(&subnet).map(|l| LeaseEvent::Removed(Lease::clone(&l)))),
        }
    }

    pub fn poll(&mut self, now: SystemTime) -> Result<Vec<LeaseEvent>> {
        let mut touched: HashSet<Ipv4Net> = HashSet::new();
        // Known leases whose time has passed.
        touched.extend(self.known.values().filter(|l| l.is_expired(now)).map(|l| l.subnet));
        for update in self.kv.poll()? {
            match update {
                Update::Snapshot(entries) => {
                    self.synced = true;
                    touched.extend(self.known.keys().copied());
                    self.claims = Claims::of(&entries);
                    touched.extend(self.claims.valid.keys().copied());
                }
                Update::Put(entry) => {
                    touched.extend(subnet_of(&entry.key));
                    self.claims.take(&entry);
                }
                Update::Delete(key) => {
                    touched.extend(subnet_of(&key));
                    self.claims.forget(&key);
                }
            }
        }
        let mut touched: Vec<Ipv4Net> = touched.into_iter().collect();
        touched.sort();
        let mut events = Vec::new();
        for subnet in touched {
            self.settle(subnet, now, &mut events);
        }
        Ok(events)
    }
}

impl LeaseWatcher for LeaseWatch {
    fn poll(&mut self, now: SystemTime) -> Result<Vec<LeaseEvent>> {
        LeaseWatch::poll(self, now)
    }

    fn leases(&self) -> Vec<Lease> {
        self.known.values().map(|l| Lease::clone(l)).collect()
    }

    fn lease(&self, subnet: &Ipv4Net) -> Option<Lease> {
        self.known.get(subnet).map(|l| Lease::clone(l))
    }

    fn count(&self) -> usize {
        self.known.len()
    }

    fn synced(&self) -> bool {
        self.synced
    }

    fn damaged(&self) -> usize {
        self.claims.damaged.len()
    }

    fn wait(&mut self, timeout: Duration) {
        self.kv.wait(timeout);
    }
}
