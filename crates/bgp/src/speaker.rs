//! The speaker, sans-IO: every neighbour's session and the RIBs together. Events for a
//! neighbour go to its FSM; what the FSM says is carried on — an UPDATE into the RIB, a session
//! up (the table goes out, then End-of-RIB), a session down (its paths withdrawn or kept stale)
//! — and every change of a best path is sent to the neighbours it goes to and reported for the
//! kernel. The I/O layer carries out [`Output`]s.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use crate::neighbor::{self, Action, Config, Neighbor, State, Timer};
use crate::packet::{error, Family, Update};
use crate::rib::{Change, Path, Peer, PeerId, Rib};

/// What the I/O layer is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// For neighbour `PeerId`'s transport and timers.
    Session(PeerId, Action),
    /// Keep `PeerId`'s stale paths this long, then call [`Speaker::stale_expired`].
    StaleTimer(PeerId, Duration),
    /// The best path to a prefix changed: put this route in the kernel (`None`: remove it).
    Route(IpNet, Option<IpAddr>),
}

/// One neighbour as the speaker holds it.
pub(crate) struct Member {
    pub(crate) session: Neighbor,
    address: IpAddr,
    rr_client: bool,
}

/// How long a neighbour that sent more prefixes than allowed waits before its session is
/// started again (RFC 4486 leaves it to the implementation; BIRD's `receive limit ... action
/// restart` waits too).
pub const MAX_PREFIX_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// The speaker.
pub struct Speaker {
    pub rib: Rib,
    pub(crate) members: BTreeMap<PeerId, Member>,
    /// The address this speaker gives as next hop.
    next_hop: IpAddr,
    /// Its IPv6 next hop, for IPv6 prefixes (without one, they are not announced).
    pub next_hop_v6: Option<std::net::Ipv6Addr>,
    /// Prefixes each neighbour was last sent, so withdrawals go only where announcements went.
    sent: HashMap<PeerId, std::collections::HashSet<IpNet>>,
    /// Restarting (RFC 4724 §4.1): nothing is advertised until every neighbour has sent its
    /// End-of-RIB (or the restart time is over), so that none is sent this speaker's End-of-RIB
    /// — and drops what it kept for this speaker — before the routes to send it are back.
    deferring: bool,
    /// Neighbours whose End-of-RIB arrived.
    end_of_rib: std::collections::HashSet<PeerId>,
}

impl Speaker {
    pub fn new(rib: Rib, next_hop: IpAddr) -> Speaker {
        let next_hop_v6 = match next_hop {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        };
        Speaker {
            rib,
            members: BTreeMap::new(),
            next_hop,
            next_hop_v6,
            sent: HashMap::new(),
            deferring: false,
            end_of_rib: Default::default(),
        }
    }

    /// Adds neighbour `id` at `address` and starts its session.
    pub fn add_neighbor(&mut self, id: PeerId, address: IpAddr, config: Config, rr_client: bool) -> Vec<Output> {
        let mut session = Neighbor::new(config);
        let actions = session.start();
        self.members.insert(id, Member { session, address, rr_client });
        actions.into_iter().map(|a| Output::Session(id, a)).collect()
    }

    /// How many prefixes neighbour `id` was last sent.
    pub fn advertised(&self, id: PeerId) -> usize {
        self.sent.get(&id).map_or(0, |s| s.len())
    }

    pub fn state(&self, id: PeerId) -> Option<State> {
        self.members.get(&id).map(|m| m.session.state())
    }

    /// The neighbour whose address is `address` (an incoming connection is matched by it).
    pub fn neighbor_at(&self, address: IpAddr) -> Option<PeerId> {
        self.members.iter().find(|(_, m)| m.address == address).map(|(id, _)| *id)
    }

    /// See [`Neighbor::wake`].
    pub fn wake(&mut self, id: PeerId) -> bool {
        self.members.get_mut(&id).is_some_and(|m| m.session.wake())
    }

    pub fn connected(&mut self, id: PeerId) -> Vec<Output> {
        self.session(id, |n| n.connected())
    }

    /// Restarting: advertise nothing until every neighbour's End-of-RIB (or [`Speaker::end_deferral`]).
    pub fn defer_until_end_of_rib(&mut self) {
        self.deferring = true;
    }

    /// The wait of a restart is over: every neighbour up gets the table and End-of-RIB.
    pub fn end_deferral(&mut self) -> Vec<Output> {
        if !std::mem::take(&mut self.deferring) {
            return Vec::new();
        }
        let up: Vec<(PeerId, Vec<Family>)> = self
            .members
            .iter()
            .filter_map(|(id, m)| Some((*id, m.session.negotiated()?.families.clone())))
            .filter(|(id, _)| self.members[id].session.state() == State::Established)
            .collect();
        let mut out = Vec::new();
        for (id, families) in up {
            out.extend(self.send_table(id, &families));
        }
        out
    }

    /// Whether every neighbour has sent its End-of-RIB, or is up without graceful restart (it
    /// sends none to wait for), or is restarting itself (RFC 4724 §4.1: its Restart State bit
    /// set; it waits for this speaker's End-of-RIB in turn — two restarting together would
    /// wait on each other until the deferral timer ran out, advertising nothing meanwhile).
    fn all_ended_their_rib(&self) -> bool {
        self.members.iter().all(|(id, m)| {
            // (A neighbour not up yet is waited for until the selection deferral ends.)
            self.end_of_rib.contains(id)
                || m.session.state() == State::Established
                    && m.session.negotiated().is_some_and(|n| n.peer_restart.as_ref().is_none_or(|(_, r, _)| *r))
        })
    }

    /// Forgets neighbour `id`: the paths it left (kept stale for a restart it will not finish)
    /// go too, and where they were best the change goes out.
    pub fn remove_neighbor(&mut self, id: PeerId) -> Vec<Output> {
        let changes = self.rib.peer_down(id, false);
        let out = self.propagate(changes);
        self.members.remove(&id);
        self.sent.remove(&id);
        self.rib.remove_peer(id);
        out
    }

    /// The OPEN neighbour `id`'s session sends (for a second connection during a collision).
    pub fn open_bytes(&self, id: PeerId) -> Option<Vec<u8>> {
        self.members.get(&id).map(|m| m.session.open_bytes())
    }

    /// The session of `id` goes on over the other connection (collision resolved for it; this
    /// speaker's OPEN already sent there).
    pub fn switch_connection(&mut self, id: PeerId) -> Vec<Output> {
        self.session(id, |n| n.switch_connection())
    }

    pub fn transport_lost(&mut self, id: PeerId) -> Vec<Output> {
        self.session(id, |n| n.transport_lost())
    }

    pub fn timer(&mut self, id: PeerId, timer: Timer) -> Vec<Output> {
        self.session(id, |n| n.timer(timer))
    }

    pub fn received(&mut self, id: PeerId, bytes: &[u8]) -> Vec<Output> {
        self.session(id, |n| n.received(bytes))
    }

    pub fn stop(&mut self, id: PeerId) -> Vec<Output> {
        self.session(id, |n| n.stop())
    }

    /// A restarting neighbour's time ran out: its paths still stale go.
    pub fn stale_expired(&mut self, id: PeerId) -> Vec<Output> {
        let changes = self.rib.sweep(id);
        self.propagate(changes)
    }

    /// This speaker announces `prefix`.
    pub fn originate(&mut self, prefix: IpNet) -> Vec<Output> {
        let next_hop = match (prefix, self.next_hop_v6) {
            (IpNet::V6(_), Some(v6)) => IpAddr::V6(v6),
            _ => self.next_hop,
        };
        let changes: Vec<Change> = self.rib.originate(prefix, next_hop).into_iter().collect();
        self.propagate(changes)
    }

    /// This speaker stops announcing `prefix`.
    pub fn withdraw(&mut self, prefix: IpNet) -> Vec<Output> {
        let changes: Vec<Change> = self.rib.withdraw_own(prefix).into_iter().collect();
        self.propagate(changes)
    }

    /// Runs `f` on neighbour `id`'s session and carries its actions on.
    fn session(&mut self, id: PeerId, f: impl FnOnce(&mut Neighbor) -> Vec<Action>) -> Vec<Output> {
        let Some(member) = self.members.get_mut(&id) else { return Vec::new() };
        let actions = f(&mut member.session);
        self.carry_on(id, actions)
    }

    fn carry_on(&mut self, id: PeerId, actions: Vec<Action>) -> Vec<Output> {
        let mut out = Vec::new();
        for action in actions {
            match action {
                Action::Established(negotiated) => {
                    out.push(Output::Session(id, Action::Established(negotiated.clone())));
                    let member = &self.members[&id];
                    self.rib.add_peer(
                        id,
                        Peer {
                            address: member.address,
                            asn: negotiated.peer_as,
                            router_id: negotiated.peer_id,
                            ibgp: member.session.config.ibgp(),
                            rr_client: member.rr_client,
                            originated_only: member.session.config.originated_only,
                        },
                    );
                    // RFC 4724 §4.2: a neighbour back without graceful restart (or not having
                    // kept its forwarding state) gets its stale paths removed now.
                    let kept = negotiated.peer_restart.as_ref().is_some_and(|(_, _, families)| !families.is_empty());
                    if !kept && self.rib.has_stale(id) {
                        let changes = self.rib.sweep(id);
                        out.extend(self.propagate(changes));
                    }
                    if !self.deferring {
                        out.extend(self.send_table(id, &negotiated.families));
                    } else if self.all_ended_their_rib() {
                        out.extend(self.end_deferral());
                    }
                }
                Action::RefreshRequested(family) => {
                    // RFC 2918: everything this speaker advertises of `family`, again.
                    let best: Vec<(IpNet, Path)> = self
                        .rib
                        .best_paths()
                        .filter(|(p, _)| Family::of(p) == family)
                        .map(|(p, b)| (*p, b.clone()))
                        .collect();
                    for (prefix, path) in best {
                        out.extend(self.send_path(id, prefix, Some(&path)));
                    }
                }
                Action::Received(update) => {
                    // An empty UPDATE is End-of-RIB (RFC 4724): what is still stale goes.
                    let end_of_rib =
                        update.withdrawn.is_empty() && update.nlri.is_empty() && update.attributes.is_empty();
                    if end_of_rib {
                        let changes = self.rib.sweep(id);
                        out.extend(self.propagate(changes));
                        self.end_of_rib.insert(id);
                        if self.deferring && self.all_ended_their_rib() {
                            out.extend(self.end_deferral());
                        }
                        continue;
                    }
                    let imported = self.rib.import(id, &update);
                    out.extend(self.propagate(imported.changes));
                    if imported.over_limit {
                        // RFC 4486: the session ends with a Cease, maximum number of prefixes
                        // reached, and comes back only when started again.
                        if let Some(member) = self.members.get_mut(&id) {
                            let actions = member.session.cease_for_a_while(error::CEASE_MAX_PREFIXES, MAX_PREFIX_IDLE);
                            out.extend(self.carry_on(id, actions));
                        }
                    }
                }
                Action::Down { reason, keep_for } => {
                    out.push(Output::Session(id, Action::Down { reason, keep_for }));
                    self.sent.remove(&id);
                    // A neighbour that goes down again before its restart is over keeps the
                    // time it had: the timer is not started anew (its paths would never go).
                    let restarting_already = self.rib.has_stale(id);
                    let changes = self.rib.peer_down(id, keep_for.is_some());
                    if let Some(time) = keep_for.filter(|_| !restarting_already) {
                        out.push(Output::StaleTimer(id, time));
                    }
                    out.extend(self.propagate(changes));
                }
                other => out.push(Output::Session(id, other)),
            }
        }
        out
    }

    /// Each change to the kernel and to every established neighbour it goes to.
    fn propagate(&mut self, changes: Vec<Change>) -> Vec<Output> {
        let mut out = Vec::new();
        for change in changes {
            let best = change.best.as_ref();
            out.push(Output::Route(change.prefix, best.filter(|p| p.from.is_some()).and_then(|p| p.attrs.next_hop)));
            let ids: Vec<PeerId> = self
                .members
                .iter()
                .filter(|(_, m)| m.session.state() == State::Established)
                .map(|(id, _)| *id)
                .collect();
            if self.deferring {
                continue;
            }
            for id in ids {
                out.extend(self.send_path(id, change.prefix, best));
            }
        }
        out
    }

    /// `prefix`'s best path (or its withdrawal) to neighbour `id`, as export rules say.
    fn send_path(&mut self, id: PeerId, prefix: IpNet, best: Option<&Path>) -> Vec<Output> {
        let v6 = matches!(prefix, IpNet::V6(_));
        // Only families the session negotiated.
        let family = Family::of(&prefix);
        if !self.members.get(&id).and_then(|m| m.session.negotiated()).is_some_and(|n| n.families.contains(&family)) {
            return Vec::new();
        }
        let exported = best.filter(|_| crate::rib::passes(&self.rib.policy.export, &prefix)).and_then(|p| {
            let attrs = self.rib.export(p, id, self.next_hop)?;
            if !v6 {
                return Some((attrs, None));
            }
            let nh = self.rib.export_next_hop_v6(p, id, self.next_hop_v6)?;
            // Its next hop goes in MP_REACH_NLRI; NEXT_HOP is for IPv4 NLRI alone.
            let attrs = attrs.into_iter().filter(|a| !matches!(a, crate::packet::Attribute::NextHop(_))).collect();
            Some((attrs, Some(nh)))
        });
        let sent = self.sent.entry(id).or_default();
        let was_sent = sent.contains(&prefix);
        let update = match exported {
            Some((attrs, v6_next_hop)) => {
                sent.insert(prefix);
                Update::announce(&[prefix], attrs, v6_next_hop)
            }
            None if sent.remove(&prefix) => Update::withdraw(&[prefix]),
            None => return Vec::new(),
        };
        let Some(member) = self.members.get_mut(&id) else { return Vec::new() };
        let actions = member.session.send_update(&update);
        if actions.iter().any(|a| matches!(a, Action::Send(b) if b.len() > crate::packet::MAX_LEN)) {
            // More than one message may hold (RFC 4271 §4: 4096 bytes; the neighbour would end
            // the session): not advertised to this neighbour, and withdrawn if it was.
            tracing::warn!(
                "the path to {prefix} does not fit in one UPDATE to {}; not advertised there",
                member.address
            );
            self.sent.entry(id).or_default().remove(&prefix);
            if !was_sent {
                return Vec::new();
            }
            let withdraw = member.session.send_update(&Update::withdraw(&[prefix]));
            return withdraw.into_iter().map(|a| Output::Session(id, a)).collect();
        }
        actions.into_iter().map(|a| Output::Session(id, a)).collect()
    }

    /// The whole table to a neighbour that just came up, then End-of-RIB per family.
    fn send_table(&mut self, id: PeerId, families: &[Family]) -> Vec<Output> {
        let best: Vec<(IpNet, Path)> = self.rib.best_paths().map(|(p, b)| (*p, b.clone())).collect();
        let mut out = Vec::new();
        for (prefix, path) in best {
            out.extend(self.send_path(id, prefix, Some(&path)));
        }
        let Some(member) = self.members.get_mut(&id) else { return out };
        for family in families {
            let end = if *family == Family::IPV4_UNICAST {
                Update::default()
            } else {
                Update {
                    attributes: vec![crate::packet::Attribute::MpUnreach { family: *family, withdrawn: vec![] }],
                    ..Update::default()
                }
            };
            out.extend(member.session.send_update(&end).into_iter().map(|a| Output::Session(id, a)));
        }
        out
    }
}

/// Re-exported for the I/O layer: which of two colliding connections stays.
pub use neighbor::keep_own_connection;

#[cfg(test)]
mod tests;
