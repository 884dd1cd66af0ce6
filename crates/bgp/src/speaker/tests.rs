//! Speakers wired to each other in memory: what one sends, the other receives. Sessions come
//! up, tables go out, changes propagate, reflection and graceful restart — no sockets.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use super::*;
use crate::packet::{self, Codec, Message};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Speakers and the bytes in flight between them; link `(a, peer id at a) <-> (b, peer id at b)`.
struct World {
    speakers: Vec<Speaker>,
    links: Vec<((usize, PeerId), (usize, PeerId))>,
    wire: VecDeque<(usize, PeerId, Vec<u8>)>,
    routes: Vec<Vec<(IpNet, Option<IpAddr>)>>,
    stale: Vec<(usize, PeerId, Duration)>,
    sent: Vec<(usize, PeerId, Message)>,
    /// Sessions linked from now on say they restarted (the Restart State bit).
    restarting: bool,
}

impl World {
    fn new(ids: &[(u32, &str)]) -> World {
        let speakers: Vec<Speaker> = ids
            .iter()
            .map(|(asn, ip)| {
                let id: Ipv4Addr = ip.parse().unwrap();
                let mut speaker = Speaker::new(Rib::new(*asn, id), IpAddr::V4(id));
                speaker.next_hop_v6 = Some(format!("fd00::{}", id.octets()[3]).parse().unwrap());
                speaker
            })
            .collect();
        let n = speakers.len();
        World {
            speakers,
            links: vec![],
            wire: VecDeque::new(),
            routes: vec![vec![]; n],
            stale: vec![],
            sent: vec![],
            restarting: false,
        }
    }

    /// Neighbours `a` and `b` (`b_is_client`: `b` is `a`'s reflection client).
    fn link(&mut self, a: usize, b: usize, b_is_client: bool) {
        let (pa, pb) = (b as PeerId + 1, a as PeerId + 1);
        let (asn_a, id_a) = (self.speakers[a].rib.local_as, self.speakers[a].rib.router_id);
        let (asn_b, id_b) = (self.speakers[b].rib.local_as, self.speakers[b].rib.router_id);
        let mut ca = Config::new(asn_a, id_a, asn_b);
        let mut cb = Config::new(asn_b, id_b, asn_a);
        ca.families = vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST];
        cb.families = vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST];
        cb.passive = true;
        ca.restarting = self.restarting;
        cb.restarting = self.restarting;
        self.links.push(((a, pa), (b, pb)));
        let out_a = self.speakers[a].add_neighbor(pa, IpAddr::V4(id_b), ca, b_is_client);
        let out_b = self.speakers[b].add_neighbor(pb, IpAddr::V4(id_a), cb, false);
        self.handle(a, out_a);
        self.handle(b, out_b);
    }

    fn other_end(&self, s: usize, p: PeerId) -> (usize, PeerId) {
        self.links
            .iter()
            .find_map(|(x, y)| {
                if *x == (s, p) {
                    Some(*y)
                } else if *y == (s, p) {
                    Some(*x)
                } else {
                    None
                }
            })
            .unwrap()
    }

    fn handle(&mut self, s: usize, outputs: Vec<Output>) {
        for o in outputs {
            match o {
                Output::Session(p, Action::Connect) => {
                    // The transport comes up at both ends.
                    let (t, q) = self.other_end(s, p);
                    let here = self.speakers[s].connected(p);
                    self.handle(s, here);
                    let there = self.speakers[t].connected(q);
                    self.handle(t, there);
                }
                Output::Session(p, Action::Send(bytes)) => {
                    let (m, _) = packet::decode(&bytes, Codec::default()).unwrap().unwrap();
                    self.sent.push((s, p, m));
                    let (t, q) = self.other_end(s, p);
                    self.wire.push_back((t, q, bytes));
                }
                Output::Route(prefix, nh) => self.routes[s].push((prefix, nh)),
                Output::StaleTimer(p, d) => self.stale.push((s, p, d)),
                _ => {}
            }
        }
    }

    /// Delivers everything in flight.
    fn settle(&mut self) {
        let mut delivered = 0;
        while let Some((t, q, bytes)) = self.wire.pop_front() {
            delivered += 1;
            assert!(delivered < 10_000, "the speakers never settle (an update storm)");
            let out = self.speakers[t].received(q, &bytes);
            self.handle(t, out);
        }
    }

    /// The route speaker `s` has for `prefix` in the kernel now.
    fn route(&self, s: usize, prefix: &str) -> Option<IpAddr> {
        self.routes[s].iter().rev().find(|(p, _)| *p == net(prefix)).and_then(|(_, nh)| *nh)
    }
}

#[test]
fn ebgp_sessions_exchange_tables_and_changes() {
    let mut w = World::new(&[(64512, "198.18.0.1"), (64513, "198.18.0.2")]);
    let out = w.speakers[0].originate(net("198.19.1.0/24"));
    w.handle(0, out);
    w.link(0, 1, false);
    w.settle();
    assert_eq!(w.speakers[0].state(2), Some(State::Established));
    assert_eq!(w.speakers[1].state(1), Some(State::Established));
    assert_eq!(w.route(1, "198.19.1.0/24"), Some("198.18.0.1".parse().unwrap()), "the table on coming up");
    assert!(
        w.sent.iter().any(|(s, _, m)| *s == 0 && *m == Message::Update(Update::default())),
        "End-of-RIB after the table"
    );
    let out = w.speakers[1].originate(net("198.19.2.0/24"));
    w.handle(1, out);
    w.settle();
    assert_eq!(w.route(0, "198.19.2.0/24"), Some("198.18.0.2".parse().unwrap()), "a change after");
    let out = w.speakers[1].withdraw(net("198.19.2.0/24"));
    w.handle(1, out);
    w.settle();
    assert_eq!(w.route(0, "198.19.2.0/24"), None);
    assert!(w.routes[0].contains(&(net("198.19.2.0/24"), None)), "the kernel route removed");
}

/// RFC 4456 with three speakers in one AS: 0 reflects for its clients 1 and 2.
#[test]
fn a_route_reflector_reflects_between_its_clients() {
    let mut w = World::new(&[(64512, "198.18.0.1"), (64512, "198.18.0.2"), (64512, "198.18.0.3")]);
    w.link(0, 1, true);
    w.link(0, 2, true);
    w.settle();
    let out = w.speakers[1].originate(net("198.19.1.0/24"));
    w.handle(1, out);
    w.settle();
    assert_eq!(w.route(2, "198.19.1.0/24"), Some("198.18.0.2".parse().unwrap()), "reflected with the next hop kept");
    let reflected = w
        .sent
        .iter()
        .find_map(|(s, p, m)| match m {
            Message::Update(u) if *s == 0 && *p == 3 && !u.nlri.is_empty() => Some(u.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(reflected.attribute(9), Some(&packet::Attribute::OriginatorId("198.18.0.2".parse().unwrap())));
    assert_eq!(reflected.attribute(10), Some(&packet::Attribute::ClusterList(vec!["198.18.0.1".parse().unwrap()])));
}

/// A neighbour that goes away without a word (graceful restart): its routes stay in the kernel
/// until it is back and done, or its time runs out.
#[test]
fn graceful_restart_keeps_routes_until_the_neighbour_is_back_or_late() {
    let mut w = World::new(&[(64512, "198.18.0.1"), (64513, "198.18.0.2")]);
    let out = w.speakers[1].originate(net("198.19.2.0/24"));
    w.handle(1, out);
    let out = w.speakers[1].originate(net("198.19.3.0/24"));
    w.handle(1, out);
    w.link(0, 1, false);
    w.settle();
    assert!(w.route(0, "198.19.2.0/24").is_some());
    let routes_before = w.routes[0].len();
    let out = w.speakers[0].transport_lost(2);
    w.handle(0, out);
    assert_eq!(w.routes[0].len(), routes_before, "nothing withdrawn");
    assert_eq!(w.stale, vec![(0, 2, Duration::from_secs(120))]);
    // It comes back without 198.19.3.0/24: that one goes at End-of-RIB.
    let out = w.speakers[1].withdraw(net("198.19.3.0/24"));
    w.handle(1, out);
    let out = w.speakers[1].transport_lost(1);
    w.handle(1, out);
    w.wire.clear();
    let out = w.speakers[0].timer(2, Timer::ConnectRetry);
    w.handle(0, out);
    w.settle();
    assert_eq!(w.speakers[0].state(2), Some(State::Established));
    assert!(w.route(0, "198.19.2.0/24").is_some());
    assert_eq!(w.route(0, "198.19.3.0/24"), None, "swept at End-of-RIB");
    // Gone for good: its time runs out.
    let out = w.speakers[0].transport_lost(2);
    w.handle(0, out);
    assert!(w.route(0, "198.19.2.0/24").is_some());
    let out = w.speakers[0].stale_expired(2);
    w.handle(0, out);
    assert_eq!(w.route(0, "198.19.2.0/24"), None);
}

#[test]
fn a_neighbor_over_its_prefix_limit_is_ceased() {
    let mut w = World::new(&[(64512, "198.18.0.1"), (64513, "198.18.0.2")]);
    w.speakers[0].rib.policy.max_prefix = Some(1);
    for p in ["198.19.2.0/24", "198.19.3.0/24"] {
        let out = w.speakers[1].originate(net(p));
        w.handle(1, out);
    }
    w.link(0, 1, false);
    w.settle();
    let cease = w.sent.iter().find_map(|(s, _, m)| match m {
        Message::Notification(n) if *s == 0 => Some(n.clone()),
        _ => None,
    });
    assert_eq!(cease.map(|n| (n.code, n.subcode)), Some((6, 1)));
    assert_eq!(w.route(0, "198.19.2.0/24"), None, "its routes withdrawn");
    assert_eq!(w.speakers[0].state(2), Some(State::Idle));
}

/// IPv6 prefixes go in MP_REACH_NLRI with the speaker's IPv6 next hop, and arrive with it (they
/// were dropped on receipt for want of an IPv4 next hop); a session that did not negotiate IPv6
/// is sent none.
#[test]
fn ipv6_prefixes_travel_with_their_own_next_hop() {
    let mut w = World::new(&[(64512, "198.18.0.1"), (64513, "198.18.0.2")]);
    w.link(0, 1, false);
    w.settle();
    let out = w.speakers[1].originate(net("fd00:19:2::/64"));
    w.handle(1, out);
    w.settle();
    assert_eq!(w.route(0, "fd00:19:2::/64"), Some("fd00::2".parse().unwrap()));
    // Its UPDATE carries the next hop in MP_REACH_NLRI only (no IPv4 NEXT_HOP beside it).
    let v6_update = w.sent.iter().rev().find_map(|(s, _, m)| match m {
        Message::Update(u) if *s == 1 && !u.announcements().is_empty() => Some(u.clone()),
        _ => None,
    });
    assert!(v6_update.is_some_and(|u| u.attribute(3).is_none()), "NEXT_HOP in an IPv6-only UPDATE");
    let out = w.speakers[1].withdraw(net("fd00:19:2::/64"));
    w.handle(1, out);
    w.settle();
    assert_eq!(w.route(0, "fd00:19:2::/64"), None);

    let mut w = World::new(&[(64512, "198.18.0.1"), (64513, "198.18.0.2")]);
    w.link(0, 1, false);
    // Speaker 0's side of the session offered IPv4 only.
    w.speakers[0].members.get_mut(&2).unwrap().session.config.families = vec![Family::IPV4_UNICAST];
    let out = w.speakers[0].transport_lost(2);
    w.handle(0, out);
    w.wire.clear();
    let out = w.speakers[1].transport_lost(1);
    w.handle(1, out);
    let out = w.speakers[0].timer(2, Timer::ConnectRetry);
    w.handle(0, out);
    w.settle();
    let out = w.speakers[1].originate(net("fd00:19:2::/64"));
    w.handle(1, out);
    w.settle();
    assert_eq!(w.route(0, "fd00:19:2::/64"), None);
    assert!(!w
        .sent
        .iter()
        .any(|(s, _, m)| *s == 1 && matches!(m, Message::Update(u) if !u.announcements().is_empty())));
}

/// A path whose UPDATE would be longer than 4096 bytes once this speaker adds its AS is not
/// advertised (the neighbour would end the session with "bad message length"), and a shorter
/// path advertised before it is withdrawn; the session and the route itself stay.
#[test]
fn a_path_too_long_for_one_update_is_not_advertised() {
    use crate::packet::{AsPath, Attribute, Origin};
    let mut w = World::new(&[(64512, "198.18.0.1"), (64513, "198.18.0.2"), (64514, "198.18.0.3")]);
    w.link(0, 1, false);
    w.link(1, 2, false);
    w.settle();
    let update = |communities: usize| {
        let attrs = vec![
            Attribute::Origin(Origin::Igp),
            Attribute::AsPath(AsPath::sequence(&[64512])),
            Attribute::NextHop("198.18.0.1".parse().unwrap()),
            Attribute::Communities((0..communities as u32).collect()),
        ];
        packet::to_bytes(&Message::Update(Update::announce(&[net("198.19.3.0/24")], attrs, None)), Codec::default())
    };
    // From 0 to 1 by hand: first a path that fits, then one of 4,095 bytes.
    let out = w.speakers[1].received(1, &update(10));
    w.handle(1, out);
    w.settle();
    assert_eq!(w.route(2, "198.19.3.0/24"), Some("198.18.0.2".parse().unwrap()));
    let big = update(1011);
    assert_eq!(big.len(), 4095);
    let out = w.speakers[1].received(1, &big);
    w.handle(1, out);
    w.settle();
    assert_eq!(w.route(1, "198.19.3.0/24"), Some("198.18.0.1".parse().unwrap()), "1 keeps it");
    assert_eq!(w.route(2, "198.19.3.0/24"), None, "2 has it withdrawn");
    assert!(!w.sent.iter().any(|(_, _, m)| matches!(m, Message::Notification(_))), "no session ended");
    assert_eq!(w.speakers[2].state(2), Some(State::Established));
}

/// Graceful restart, the helper's edge cases (RFC 4724 §4.2): a neighbour that goes down again
/// while restarting does not get its time started anew; one that comes back without the
/// capability has its stale paths removed at once (not at End-of-RIB, which it need not send).
#[test]
fn graceful_restart_edges() {
    use crate::neighbor::{Negotiated, Reason};
    let mut w = World::new(&[(64512, "198.18.0.1"), (64513, "198.18.0.2")]);
    let out = w.speakers[1].originate(net("198.19.2.0/24"));
    w.handle(1, out);
    w.link(0, 1, false);
    w.settle();
    let negotiated = w.speakers[0].members[&2].session.negotiated().unwrap().clone();
    // Back after its restart: forwarding state kept for IPv4 (the F bit).
    let restarted =
        Negotiated { peer_restart: Some((120, true, vec![crate::packet::Family::IPV4_UNICAST])), ..negotiated.clone() };
    let down = || Action::Down { reason: Reason::TransportLost, keep_for: Some(Duration::from_secs(120)) };
    let out = w.speakers[0].carry_on(2, vec![down()]);
    w.handle(0, out);
    assert_eq!(w.stale.len(), 1);
    // Up again (and not done yet: no End-of-RIB), down again: no second timer.
    let out = w.speakers[0].carry_on(2, vec![Action::Established(restarted)]);
    w.handle(0, out);
    let out = w.speakers[0].carry_on(2, vec![down()]);
    w.handle(0, out);
    assert_eq!(w.stale.len(), 1, "the restart time is not started again: {:?}", w.stale);
    assert!(w.route(0, "198.19.2.0/24").is_some());
    // Back without graceful restart: its stale path goes at once.
    let without = Negotiated { peer_restart: None, ..negotiated };
    let out = w.speakers[0].carry_on(2, vec![Action::Established(without)]);
    w.handle(0, out);
    assert_eq!(w.route(0, "198.19.2.0/24"), None, "stale path removed without waiting for End-of-RIB");
}

/// A neighbour over its prefix limit is ceased, then started again after a while; a ROUTE-
/// REFRESH is answered with the table again.
#[test]
fn max_prefix_restarts_later_and_refresh_is_answered() {
    let mut w = World::new(&[(64512, "198.18.0.1"), (64513, "198.18.0.2")]);
    w.speakers[0].rib.policy.max_prefix = Some(1);
    for p in ["198.19.2.0/24", "198.19.3.0/24"] {
        let out = w.speakers[1].originate(net(p));
        w.handle(1, out);
    }
    let out = w.speakers[0].originate(net("198.19.1.0/24"));
    w.handle(0, out);
    w.link(0, 1, false);
    w.settle();
    assert_eq!(w.speakers[0].state(2), Some(State::Idle));
    let restart = w.speakers[0].timer(2, Timer::ConnectRetry);
    assert!(restart.iter().any(|o| matches!(o, Output::Session(_, Action::Connect))), "{restart:?}");
    // Refresh: speaker 1 asks speaker 0 for IPv4 again.
    w.speakers[0].rib.policy.max_prefix = None;
    w.handle(0, restart);
    w.settle();
    assert_eq!(w.speakers[0].state(2), Some(State::Established));
    let sent_before = w.sent.iter().filter(|(s, _, m)| *s == 0 && matches!(m, Message::Update(_))).count();
    let refresh = packet::to_bytes(
        &Message::RouteRefresh(crate::packet::RouteRefresh { family: crate::packet::Family::IPV4_UNICAST }),
        Codec::default(),
    );
    let out = w.speakers[0].received(2, &refresh);
    w.handle(0, out);
    let sent_after = w.sent.iter().filter(|(s, _, m)| *s == 0 && matches!(m, Message::Update(_))).count();
    assert!(sent_after > sent_before, "the table sent again");
}

/// Restarting (RFC 4724 §4.1): the speaker advertises nothing, End-of-RIB included, until every
/// neighbour has sent its End-of-RIB — a neighbour that got this speaker's End-of-RIB at once
/// would drop the routes it kept for it before they are back.
#[test]
fn a_restarting_speaker_waits_for_every_end_of_rib() {
    let mut w = World::new(&[(64512, "198.18.0.1"), (64513, "198.18.0.2"), (64514, "198.18.0.3")]);
    let out = w.speakers[2].originate(net("198.19.3.0/24"));
    w.handle(2, out);
    w.speakers[0].defer_until_end_of_rib();
    // Both are configured neighbours of 0 from the start (2 not up yet).
    let mut waiting = Config::new(64512, "198.18.0.1".parse().unwrap(), 64514);
    waiting.passive = true;
    let out = w.speakers[0].add_neighbor(3, "198.18.0.3".parse().unwrap(), waiting, false);
    w.handle(0, out);
    // 1 comes up first: it is sent nothing yet.
    w.link(0, 1, false);
    w.settle();
    assert_eq!(w.speakers[0].state(2), Some(State::Established));
    let to_1 =
        |w: &World| w.sent.iter().filter(|(s, p, m)| *s == 0 && *p == 2 && matches!(m, Message::Update(_))).count();
    assert_eq!(to_1(&w), 0, "no table and no End-of-RIB while 2 has not sent its own");
    // 2 comes up and sends its table and End-of-RIB: now 1 gets everything, 2's route too.
    w.link(0, 2, false);
    w.settle();
    assert!(to_1(&w) >= 2, "table and End-of-RIB to 1");
    assert_eq!(w.route(1, "198.19.3.0/24"), Some("198.18.0.1".parse().unwrap()));
}

/// The export filter: only prefixes inside its networks (within their length bound) are
/// advertised, this speaker's own and learned ones alike.
#[test]
fn the_export_filter_limits_what_is_advertised() {
    let mut w = World::new(&[(64512, "198.18.0.1"), (64513, "198.18.0.2")]);
    w.speakers[0].rib.policy.export = vec![(net("198.19.0.0/16"), 24)];
    for p in ["198.19.1.0/24", "198.19.2.0/25", "10.1.0.0/16"] {
        let out = w.speakers[0].originate(net(p));
        w.handle(0, out);
    }
    w.link(0, 1, false);
    w.settle();
    assert!(w.route(1, "198.19.1.0/24").is_some());
    assert_eq!(w.route(1, "198.19.2.0/25"), None, "longer than the bound");
    assert_eq!(w.route(1, "10.1.0.0/16"), None, "outside the networks");
}

/// Two speakers restarting together (RFC 4724 §4.1): each one's Restart State bit excuses it
/// from the other's wait, so both advertise at once instead of waiting on each other until the
/// deferral ends (found in a lab whose agents were killed together: new blocks went nowhere
/// for two minutes).
#[test]
fn restarting_speakers_do_not_wait_for_each_other() {
    let mut w = World::new(&[(64512, "198.18.0.1"), (64513, "198.18.0.2")]);
    for s in 0..2 {
        w.speakers[s].defer_until_end_of_rib();
    }
    let out = w.speakers[1].originate(net("198.19.2.0/24"));
    w.handle(1, out);
    w.restarting = true;
    w.link(0, 1, false);
    w.settle();
    assert_eq!(w.route(0, "198.19.2.0/24"), Some("198.18.0.2".parse().unwrap()));
    // And what comes later flows too.
    let out = w.speakers[0].originate(net("198.19.1.0/24"));
    w.handle(0, out);
    w.settle();
    assert_eq!(w.route(1, "198.19.1.0/24"), Some("198.18.0.1".parse().unwrap()));
}

/// A client of two reflectors goes without a word (graceful restart: its path kept, stale, on
/// both). Each reflector also has the other's reflected copy of that path; they settle on the
/// client's own path and send nothing more — before, each preferred the other's fresh copy to
/// its own stale one, withdrew, took it back, for the whole restart time (an update storm that
/// grew the write queues to their cap and took the mesh down, in a lab).
#[test]
fn reflectors_keeping_a_gone_clients_path_settle() {
    let mut w = World::new(&[(64512, "198.18.0.1"), (64512, "198.18.0.2"), (64512, "198.18.0.3")]);
    w.link(0, 2, true);
    w.link(1, 2, true);
    w.link(0, 1, false);
    w.settle();
    let out = w.speakers[2].originate(net("198.19.3.0/26"));
    w.handle(2, out);
    w.settle();
    for rr in 0..2 {
        assert_eq!(w.route(rr, "198.19.3.0/26"), Some("198.18.0.3".parse().unwrap()));
    }
    // The client's connections break (no NOTIFICATION): both reflectors keep its path.
    for rr in 0..2 {
        let out = w.speakers[rr].transport_lost(3);
        w.handle(rr, out);
    }
    let before = w.sent.len();
    w.settle();
    assert!(w.sent.len() - before < 10, "{} messages after the client went", w.sent.len() - before);
    for rr in 0..2 {
        assert_eq!(w.route(rr, "198.19.3.0/26"), Some("198.18.0.3".parse().unwrap()), "kept for the restart");
    }
}

/// A neighbour forgotten while its paths are kept for its restart (a node removed from the
/// cluster after it went without a word): its paths go with it, from the kernel too.
#[test]
fn a_neighbour_removed_takes_its_kept_paths_along() {
    let mut w = World::new(&[(64512, "198.18.0.1"), (64512, "198.18.0.2")]);
    w.link(0, 1, false);
    let out = w.speakers[1].originate(net("198.19.2.0/26"));
    w.handle(1, out);
    w.settle();
    let out = w.speakers[0].transport_lost(2);
    w.handle(0, out);
    assert_eq!(w.route(0, "198.19.2.0/26"), Some("198.18.0.2".parse().unwrap()), "kept for its restart");
    let out = w.speakers[0].remove_neighbor(2);
    w.handle(0, out);
    assert_eq!(w.route(0, "198.19.2.0/26"), None);
}
