//! The RIBs, sans-IO: Adj-RIB-In per neighbour, the Loc-RIB with the RFC 4271 §9.1 decision
//! process, import policy (prefix filters, never a prefix overlapping the speaker's own, a
//! maximum number of prefixes), graceful-restart stale marking, and what goes out to each
//! neighbour (eBGP: own AS prepended, next hop self; iBGP: route reflection, RFC 4456).
//!
//! Attributes are interned: every prefix of an UPDATE shares one `Arc<PathAttrs>`, so a
//! hundred thousand routes from one neighbour hold one copy of the attributes that are alike.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::packet::{AsPath, Attribute, Origin, Update};

/// A neighbour, as the RIB knows it.
pub type PeerId = u32;

/// The attributes of a path (what the decision process and the export need).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathAttrs {
    pub origin: Origin,
    pub as_path: Vec<u32>,
    /// AS_SETs in the path (each counts as one for the length).
    pub as_sets: usize,
    /// The AS numbers inside those sets (a loop if this speaker's is among them).
    pub set_asns: Vec<u32>,
    /// The AS_PATH as received, segments and all (what goes on, this speaker's AS put first
    /// for eBGP).
    pub path: AsPath,
    /// Transitive attributes passed on as they came: ATOMIC_AGGREGATE, AGGREGATOR, and optional
    /// transitive ones weft does not interpret (extended and large communities, ...), with the
    /// Partial bit set as RFC 4271 §5 says.
    pub transitive: Vec<Attribute>,
    pub next_hop: Option<IpAddr>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub communities: Vec<u32>,
    pub originator_id: Option<Ipv4Addr>,
    pub cluster_list: Vec<Ipv4Addr>,
}

impl PathAttrs {
    /// The attributes of an UPDATE (its announced prefixes share them); `None` when it lacks
    /// what a path needs (no next hop for its family).
    pub fn of(update: &Update) -> PathAttrs {
        let mut attrs = PathAttrs {
            origin: Origin::Incomplete,
            as_path: Vec::new(),
            as_sets: 0,
            set_asns: Vec::new(),
            path: AsPath::default(),
            transitive: Vec::new(),
            next_hop: None,
            med: None,
            local_pref: None,
            communities: Vec::new(),
            originator_id: None,
            cluster_list: Vec::new(),
        };
        for a in &update.attributes {
            match a {
                Attribute::Origin(o) => attrs.origin = *o,
                Attribute::AsPath(p) => {
                    for s in &p.segments {
                        if s.kind == crate::packet::AS_SEQUENCE {
                            attrs.as_path.extend_from_slice(&s.asns);
                        } else if s.kind == crate::packet::AS_SET {
                            attrs.as_sets += 1;
                            attrs.set_asns.extend_from_slice(&s.asns);
                        }
                    }
                    attrs.path = p.clone();
                }
                Attribute::AtomicAggregate | Attribute::Aggregator { .. } => attrs.transitive.push(a.clone()),
                Attribute::Unknown { flags, code, value } if flags & 0xc0 == 0xc0 => {
                    attrs.transitive.push(Attribute::Unknown {
                        flags: flags | crate::packet::PARTIAL,
                        code: *code,
                        value: value.clone(),
                    })
                }
                Attribute::NextHop(nh) => attrs.next_hop = attrs.next_hop.or(Some(IpAddr::V4(*nh))),
                Attribute::Med(m) => attrs.med = Some(*m),
                Attribute::LocalPref(l) => attrs.local_pref = Some(*l),
                Attribute::Communities(c) => attrs.communities = c.clone(),
                Attribute::OriginatorId(id) => attrs.originator_id = Some(*id),
                Attribute::ClusterList(l) => attrs.cluster_list = l.clone(),
                _ => {}
            }
        }
        attrs
    }

    fn path_len(&self) -> usize {
        self.as_path.len() + self.as_sets
    }
}

/// One neighbour's relation to this speaker.
#[derive(Debug, Clone)]
pub struct Peer {
    pub address: IpAddr,
    pub asn: u32,
    pub router_id: Ipv4Addr,
    pub ibgp: bool,
    /// A route reflection client of this speaker.
    pub rr_client: bool,
    /// Only this speaker's own paths are advertised to it.
    pub originated_only: bool,
}

/// What this speaker accepts from its neighbours.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Accept only prefixes inside one of these, no longer than the bound (empty: anything).
    pub accept: Vec<(IpNet, u8)>,
    /// At most this many prefixes from one neighbour (the session is to end past it).
    pub max_prefix: Option<usize>,
    /// Advertise only prefixes inside one of these, no longer than the bound (empty: anything).
    pub export: Vec<(IpNet, u8)>,
}

/// Whether `prefix` is inside one of `filter`'s networks within its length bound (an empty
/// filter lets everything through).
pub fn passes(filter: &[(IpNet, u8)], prefix: &IpNet) -> bool {
    filter.is_empty() || filter.iter().any(|(net, le)| net.contains(prefix) && prefix.prefix_len() <= *le)
}

/// A path in the RIB: from a neighbour (or this speaker, `None`), with its attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    pub from: Option<PeerId>,
    pub attrs: Arc<PathAttrs>,
    /// Kept for a neighbour that is restarting (graceful restart), until it says it is done or
    /// its time runs out.
    pub stale: bool,
}

/// A change of the best path to a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub prefix: IpNet,
    /// The best path now (`None`: no path left: withdraw it).
    pub best: Option<Path>,
}

/// What importing an UPDATE did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Imported {
    pub changes: Vec<Change>,
    /// Prefixes the import policy refused.
    pub refused: usize,
    /// The neighbour now has more prefixes than it may: its session is to end.
    pub over_limit: bool,
}

/// The RIBs of one speaker.
pub struct Rib {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    /// The cluster ID when reflecting (the router id by default).
    pub cluster_id: Ipv4Addr,
    pub policy: Policy,
    peers: HashMap<PeerId, Peer>,
    /// Per prefix, every path to it (at most one per neighbour, and this speaker's own).
    paths: BTreeMap<IpNet, Vec<Path>>,
    /// How many prefixes each neighbour has in the RIB.
    counts: HashMap<PeerId, usize>,
    /// The prefixes each neighbour announces that the import policy refused (received, not
    /// accepted), up to [`MAX_REFUSED_KEPT`] each.
    refused: HashMap<PeerId, std::collections::HashSet<IpNet>>,
    /// The prefixes this speaker announces itself (no neighbour's may overlap them).
    own: std::collections::BTreeSet<IpNet>,
    /// This speaker's own addresses: no learned path may have one as its next hop.
    pub own_addresses: Vec<IpAddr>,
    /// Attributes already held, shared.
    interned: HashMap<Arc<PathAttrs>, ()>,
    since_gc: u32,
}

/// How many refused prefixes of one neighbour are remembered (to count them): a neighbour that
/// sends more only makes the count stop there.
pub const MAX_REFUSED_KEPT: usize = 100_000;

/// The LOCAL_PREF a path without one counts with.
pub const DEFAULT_LOCAL_PREF: u32 = 100;

impl Rib {
    pub fn new(local_as: u32, router_id: Ipv4Addr) -> Rib {
        Rib {
            local_as,
            router_id,
            cluster_id: router_id,
            policy: Policy::default(),
            peers: HashMap::new(),
            paths: BTreeMap::new(),
            counts: HashMap::new(),
            refused: HashMap::new(),
            own: Default::default(),
            own_addresses: vec![IpAddr::V4(router_id)],
            interned: HashMap::new(),
            since_gc: 0,
        }
    }

    pub fn add_peer(&mut self, id: PeerId, peer: Peer) {
        self.peers.insert(id, peer);
    }

    /// Forgets neighbour `id` (its paths must be gone already).
    pub fn remove_peer(&mut self, id: PeerId) {
        self.peers.remove(&id);
        self.counts.remove(&id);
        self.refused.remove(&id);
    }

    /// Interned attributes no path holds any more are let go, every thousand imports.
    fn forget_unused(&mut self) {
        self.since_gc += 1;
        if self.since_gc >= 1000 {
            self.since_gc = 0;
            self.interned.retain(|a, _| Arc::strong_count(a) > 1);
        }
    }

    fn intern(&mut self, attrs: PathAttrs) -> Arc<PathAttrs> {
        let attrs = Arc::new(attrs);
        if let Some((held, _)) = self.interned.get_key_value(&attrs) {
            return held.clone();
        }
        self.interned.insert(attrs.clone(), ());
        attrs
    }

    /// The best path to `prefix`, if any.
    pub fn best(&self, prefix: &IpNet) -> Option<&Path> {
        self.paths.get(prefix).and_then(|paths| paths.first())
    }

    /// The prefixes whose best path is a neighbour's (what goes into the kernel), with its next hop.
    pub fn learned(&self) -> impl Iterator<Item = (&IpNet, IpAddr)> {
        self.best_paths().filter(|(_, p)| p.from.is_some()).filter_map(|(prefix, p)| Some((prefix, p.attrs.next_hop?)))
    }

    /// Every prefix with its best path.
    pub fn best_paths(&self) -> impl Iterator<Item = (&IpNet, &Path)> {
        self.paths.iter().filter_map(|(p, paths)| paths.first().map(|b| (p, b)))
    }

    /// How many prefixes `peer` has in the RIB.
    pub fn count(&self, peer: PeerId) -> usize {
        self.counts.get(&peer).copied().unwrap_or(0)
    }

    /// How many prefixes `peer` announces now that the import policy refused.
    pub fn refused(&self, peer: PeerId) -> usize {
        self.refused.get(&peer).map_or(0, |r| r.len())
    }

    /// Whether a learned path may go via `next_hop` (RFC 4271 §5.1.3, §6.3: a next hop that is
    /// no address of another router is semantically incorrect): not unspecified, loopback,
    /// multicast, broadcast or link-local, and not one of this speaker's own addresses.
    fn usable_next_hop(&self, next_hop: Option<IpAddr>) -> bool {
        let Some(nh) = next_hop else { return false };
        let bad = match nh {
            IpAddr::V4(a) => a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast(),
            IpAddr::V6(a) => a.is_unspecified() || a.is_loopback() || a.is_multicast(),
        };
        !bad && !self.own_addresses.contains(&nh)
    }

    /// Whether `peer` has paths kept stale (a restart it is in the middle of).
    pub fn has_stale(&self, peer: PeerId) -> bool {
        self.paths.values().any(|ps| ps.iter().any(|p| p.from == Some(peer) && p.stale))
    }

    /// Whether `prefix` passes the import policy: inside an accepted network within its
    /// length bound, and not overlapping a prefix this speaker announces.
    fn acceptable(&self, prefix: &IpNet) -> bool {
        let own = self.own.iter().any(|p| p.contains(prefix) || prefix.contains(p));
        if own {
            return false;
        }
        passes(&self.policy.accept, prefix)
    }

    /// Puts `path` (or, `None`, removes the path from `from`) for `prefix`; the change of its
    /// best path, if it changed.
    fn set(&mut self, prefix: IpNet, from: Option<PeerId>, path: Option<Path>) -> Option<Change> {
        // Most prefixes have one path: room for just that.
        let paths = self.paths.entry(prefix).or_insert_with(|| Vec::with_capacity(1));
        let before = paths.first().cloned();
        let had = paths.iter().position(|p| p.from == from);
        match (had, path) {
            (Some(i), Some(p)) => paths[i] = p,
            (Some(i), None) => {
                paths.remove(i);
            }
            (None, Some(p)) => paths.push(p),
            (None, None) => return None,
        }
        if let Some(peer) = from {
            let count = self.counts.entry(peer).or_default();
            match had {
                Some(_) if paths.iter().all(|p| p.from != from) => *count = count.saturating_sub(1),
                None => *count += 1,
                _ => {}
            }
        }
        let mut paths = std::mem::take(self.paths.get_mut(&prefix).expect("just touched"));
        paths.sort_by(|a, b| self.compare(a, b));
        let best = paths.first().cloned();
        if paths.is_empty() {
            self.paths.remove(&prefix);
        } else {
            self.paths.insert(prefix, paths);
        }
        (best != before).then_some(Change { prefix, best })
    }

    /// An UPDATE from `peer` into its Adj-RIB-In and the Loc-RIB.
    pub fn import(&mut self, peer: PeerId, update: &Update) -> Imported {
        let mut out = Imported::default();
        let mut refused = self.refused.remove(&peer).unwrap_or_default();
        for prefix in update.withdrawals() {
            refused.remove(&prefix);
            out.changes.extend(self.set(prefix, Some(peer), None));
        }
        self.import_announced(peer, update, &mut out, &mut refused);
        if !refused.is_empty() {
            self.refused.insert(peer, refused);
        }
        out
    }

    fn import_announced(
        &mut self,
        peer: PeerId,
        update: &Update,
        out: &mut Imported,
        refused: &mut std::collections::HashSet<IpNet>,
    ) {
        let announced = update.announcements();
        if announced.is_empty() {
            return;
        }
        let mut attrs = PathAttrs::of(update);
        // RFC 4271 §5.1.5: LOCAL_PREF from an eBGP neighbour is ignored.
        if !self.peers.get(&peer).is_some_and(|p| p.ibgp) {
            attrs.local_pref = None;
        }
        // The next hop of MP_REACH_NLRI (its first, global, address).
        let mp_next_hop = update.attributes.iter().find_map(|a| match a {
            Attribute::MpReach { next_hop, .. } => next_hop.first().copied(),
            _ => None,
        });
        let v6_attrs = PathAttrs { next_hop: mp_next_hop, ..attrs.clone() };
        let ebgp_without_path = attrs.as_path.is_empty() && !self.peers.get(&peer).is_some_and(|p| p.ibgp);
        // A path that holds this speaker's AS (from eBGP), or that this speaker reflected
        // (its router id as originator, its cluster in the list), is a loop.
        let looped = (attrs.as_path.contains(&self.local_as) || attrs.set_asns.contains(&self.local_as))
            && !self.peers.get(&peer).is_some_and(|p| p.ibgp)
            || attrs.originator_id == Some(self.router_id)
            || attrs.cluster_list.contains(&self.cluster_id);
        let shared = self.intern(attrs);
        let shared_v6 = self.intern(v6_attrs);
        // Prefixes in MP_REACH_NLRI (IPv6, and IPv4 when a neighbour sends it there) take its
        // next hop; the classic NLRI takes NEXT_HOP.
        let classic: std::collections::HashSet<IpNet> = update.nlri.iter().map(|n| IpNet::V4(*n)).collect();
        for prefix in announced {
            let attrs = if classic.contains(&prefix) { &shared } else { &shared_v6 };
            // Without a next hop for its family (or, from eBGP, without the neighbour's AS)
            // there is no path.
            if attrs.next_hop.is_none() || ebgp_without_path {
                refused.remove(&prefix);
                out.changes.extend(self.set(prefix, Some(peer), None));
                continue;
            }
            if looped || !self.acceptable(&prefix) || !self.usable_next_hop(attrs.next_hop) {
                out.refused += 1;
                if refused.len() < MAX_REFUSED_KEPT {
                    refused.insert(prefix);
                }
                out.changes.extend(self.set(prefix, Some(peer), None));
                continue;
            }
            refused.remove(&prefix);
            let path = Path { from: Some(peer), attrs: attrs.clone(), stale: false };
            out.changes.extend(self.set(prefix, Some(peer), Some(path)));
        }
        out.over_limit = self.policy.max_prefix.is_some_and(|max| self.count(peer) > max);
        self.forget_unused();
    }

    /// This speaker announces `prefix` itself (next hop: itself).
    pub fn originate(&mut self, prefix: IpNet, next_hop: IpAddr) -> Option<Change> {
        let attrs = self.intern(PathAttrs {
            origin: Origin::Igp,
            as_path: Vec::new(),
            as_sets: 0,
            set_asns: Vec::new(),
            path: AsPath::default(),
            transitive: Vec::new(),
            next_hop: Some(next_hop),
            med: None,
            local_pref: None,
            communities: Vec::new(),
            originator_id: None,
            cluster_list: Vec::new(),
        });
        self.own.insert(prefix);
        self.set(prefix, None, Some(Path { from: None, attrs, stale: false }))
    }

    /// This speaker stops announcing `prefix`.
    pub fn withdraw_own(&mut self, prefix: IpNet) -> Option<Change> {
        self.own.remove(&prefix);
        self.set(prefix, None, None)
    }

    /// `peer`'s session ended: its paths are withdrawn, or (graceful restart) kept but marked
    /// stale until [`Rib::sweep`].
    pub fn peer_down(&mut self, peer: PeerId, keep: bool) -> Vec<Change> {
        self.refused.remove(&peer);
        let prefixes: Vec<IpNet> =
            self.paths.iter().filter(|(_, ps)| ps.iter().any(|p| p.from == Some(peer))).map(|(p, _)| *p).collect();
        let mut changes = Vec::new();
        for prefix in prefixes {
            if keep {
                if let Some(paths) = self.paths.get_mut(&prefix) {
                    paths.iter_mut().filter(|p| p.from == Some(peer)).for_each(|p| p.stale = true);
                }
                // (Marked stale, they compete as before; the order is kept up to date all the same.)
                let mut paths = self.paths.remove(&prefix).unwrap_or_default();
                let before = paths.first().cloned();
                paths.sort_by(|a, b| self.compare(a, b));
                let best = paths.first().cloned();
                self.paths.insert(prefix, paths);
                if best != before {
                    changes.push(Change { prefix, best });
                }
            } else {
                changes.extend(self.set(prefix, Some(peer), None));
            }
        }
        changes
    }

    /// The paths of `peer` still stale are withdrawn (it finished restarting — End-of-RIB — or
    /// its restart time ran out).
    pub fn sweep(&mut self, peer: PeerId) -> Vec<Change> {
        let stale: Vec<IpNet> = self
            .paths
            .iter()
            .filter(|(_, ps)| ps.iter().any(|p| p.from == Some(peer) && p.stale))
            .map(|(p, _)| *p)
            .collect();
        stale.into_iter().filter_map(|prefix| self.set(prefix, Some(peer), None)).collect()
    }

    /// RFC 4271 §9.1.2.2 (with RFC 4456's tie-breakers): `Less` when `a` is better.
    fn compare(&self, a: &Path, b: &Path) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        let (x, y) = (&a.attrs, &b.attrs);
        let peer = |p: &Path| p.from.and_then(|id| self.peers.get(&id));
        let ebgp = |p: &Path| peer(p).is_some_and(|n| !n.ibgp);
        // This speaker's own paths first. (A stale path competes as it did before its neighbour
        // went: preferring fresh ones made two speakers that both kept a gone neighbour's path
        // trade each other's copy of it back and forth — each copy fresh to the other — for
        // the whole restart time.)
        a.from
            .is_some()
            .cmp(&b.from.is_some())
            // Higher LOCAL_PREF.
            .then_with(|| y.local_pref.unwrap_or(DEFAULT_LOCAL_PREF).cmp(&x.local_pref.unwrap_or(DEFAULT_LOCAL_PREF)))
            // Shorter AS_PATH, lower ORIGIN.
            .then_with(|| x.path_len().cmp(&y.path_len()))
            .then_with(|| x.origin.cmp(&y.origin))
            // Lower MED, between paths from the same neighbouring AS.
            .then_with(|| match (x.as_path.first(), y.as_path.first()) {
                (Some(p), Some(q)) if p == q => x.med.unwrap_or(0).cmp(&y.med.unwrap_or(0)),
                _ => Ordering::Equal,
            })
            // eBGP over iBGP.
            .then_with(|| ebgp(b).cmp(&ebgp(a)))
            // Lower router id (the originator's for a reflected path), shorter cluster list,
            // lower neighbour address.
            .then_with(|| {
                let id = |p: &Path| p.attrs.originator_id.or_else(|| peer(p).map(|n| n.router_id)).map_or(0, u32::from);
                id(a).cmp(&id(b))
            })
            .then_with(|| x.cluster_list.len().cmp(&y.cluster_list.len()))
            .then_with(|| peer(a).map(|n| n.address).cmp(&peer(b).map(|n| n.address)))
    }

    /// Whether the best path `path` goes out to neighbour `to`, and with which attributes
    /// (RFC 4271 §9.2, RFC 4456 §8): never back to where it came from; from iBGP, to iBGP
    /// neighbours only by reflection (from a client to everyone, from a non-client to clients).
    pub fn export(&self, path: &Path, to: PeerId, next_hop_self: IpAddr) -> Option<Vec<Attribute>> {
        let target = self.peers.get(&to)?;
        if path.from == Some(to) || (target.originated_only && path.from.is_some()) {
            return None;
        }
        let source = path.from.and_then(|id| self.peers.get(&id));
        let x = &path.attrs;
        let mut attrs = vec![Attribute::Origin(x.origin)];
        if target.ibgp {
            let reflected = match source {
                None => false,
                Some(s) if !s.ibgp => false,
                Some(s) if s.rr_client => true,
                Some(_) if target.rr_client => true,
                Some(_) => return None,
            };
            attrs.push(Attribute::AsPath(x.path.clone()));
            attrs.push(Attribute::NextHop(match x.next_hop.filter(|_| source.is_some()) {
                Some(IpAddr::V4(nh)) => nh,
                _ => v4(next_hop_self),
            }));
            attrs.push(Attribute::LocalPref(x.local_pref.unwrap_or(DEFAULT_LOCAL_PREF)));
            if let Some(med) = x.med {
                attrs.push(Attribute::Med(med));
            }
            if reflected {
                let source = source.expect("a reflected path has a source");
                attrs.push(Attribute::OriginatorId(x.originator_id.unwrap_or(source.router_id)));
                let mut list = vec![self.cluster_id];
                list.extend_from_slice(&x.cluster_list);
                attrs.push(Attribute::ClusterList(list));
            }
        } else {
            attrs.push(Attribute::AsPath(x.path.prepend(self.local_as)));
            attrs.push(Attribute::NextHop(v4(next_hop_self)));
        }
        if !x.communities.is_empty() {
            attrs.push(Attribute::Communities(x.communities.clone()));
        }
        attrs.extend(x.transitive.iter().cloned());
        Some(attrs)
    }
}

impl Rib {
    /// The IPv6 next hop `path` goes out to `to` with (in MP_REACH_NLRI): unchanged to iBGP for
    /// a learned path, else this speaker's own (`None`: it has none, and the path cannot go).
    pub fn export_next_hop_v6(
        &self,
        path: &Path,
        to: PeerId,
        own: Option<std::net::Ipv6Addr>,
    ) -> Option<std::net::Ipv6Addr> {
        let target = self.peers.get(&to)?;
        match path.attrs.next_hop {
            Some(IpAddr::V6(nh)) if target.ibgp && path.from.is_some() => Some(nh),
            _ => own,
        }
    }
}

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => a.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
    }
}

#[cfg(test)]
mod tests;
