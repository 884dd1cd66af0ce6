//! The RIB: the decision process step by step, import policy, loops, graceful restart, and what
//! goes out to eBGP and iBGP neighbours with route reflection.

use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::packet::{AsPath, Attribute, Origin, Update};

const LOCAL_AS: u32 = 64512;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn rib() -> Rib {
    let mut rib = Rib::new(LOCAL_AS, Ipv4Addr::new(198, 18, 0, 1));
    // 1, 2: eBGP in AS 64601 and 64602; 3, 4: iBGP, 4 a reflection client.
    for (id, addr, asn, rid, rr) in [
        (1, "198.18.0.11", 64601, "10.0.0.11", false),
        (2, "198.18.0.12", 64602, "10.0.0.12", false),
        (3, "198.18.0.13", LOCAL_AS, "10.0.0.13", false),
        (4, "198.18.0.14", LOCAL_AS, "10.0.0.14", true),
    ] {
        let peer = Peer {
            address: ip(addr),
            asn,
            router_id: rid.parse().unwrap(),
            ibgp: asn == LOCAL_AS,
            rr_client: rr,
            originated_only: false,
        };
        rib.add_peer(id, peer);
    }
    rib
}

/// An UPDATE announcing `prefix` with a path and extra attributes.
fn update(prefix: &str, path: &[u32], next_hop: &str, extra: Vec<Attribute>) -> Update {
    let mut attrs = vec![
        Attribute::Origin(Origin::Igp),
        Attribute::AsPath(AsPath::sequence(path)),
        Attribute::NextHop(next_hop.parse().unwrap()),
    ];
    attrs.extend(extra);
    Update::announce(&[net(prefix)], attrs, None)
}

fn best_from(rib: &Rib, prefix: &str) -> Option<PeerId> {
    rib.best(&net(prefix)).and_then(|p| p.from)
}

#[test]
fn the_decision_process_in_its_order() {
    let mut rib = rib();
    let p = "198.19.5.0/24";
    // A longer path from 1 loses to a shorter one from 2.
    rib.import(1, &update(p, &[64601, 64700], "198.18.0.11", vec![]));
    rib.import(2, &update(p, &[64602], "198.18.0.12", vec![]));
    assert_eq!(best_from(&rib, p), Some(2));
    // LOCAL_PREF before path length.
    rib.import(3, &update(p, &[64603, 64700, 64701], "198.18.0.13", vec![Attribute::LocalPref(200)]));
    assert_eq!(best_from(&rib, p), Some(3));
    rib.import(3, &Update::withdraw(&[net(p)]));
    assert_eq!(best_from(&rib, p), Some(2));
    // ORIGIN: IGP before INCOMPLETE, at equal length.
    let mut incomplete = update(p, &[64602], "198.18.0.12", vec![]);
    incomplete.attributes[0] = Attribute::Origin(Origin::Incomplete);
    rib.import(2, &incomplete);
    rib.import(1, &update(p, &[64601], "198.18.0.11", vec![]));
    assert_eq!(best_from(&rib, p), Some(1));
    // MED only between paths from the same neighbouring AS.
    let q = "198.19.6.0/24";
    rib.import(3, &update(q, &[64700], "198.18.0.13", vec![Attribute::Med(50)]));
    rib.import(4, &update(q, &[64700], "198.18.0.14", vec![Attribute::Med(10)]));
    assert_eq!(best_from(&rib, q), Some(4), "lower MED from the same AS");
    // eBGP over iBGP, all else equal.
    let r = "198.19.7.0/24";
    rib.import(3, &update(r, &[64700], "198.18.0.13", vec![]));
    rib.import(1, &update(r, &[64700], "198.18.0.11", vec![]));
    assert_eq!(best_from(&rib, r), Some(1));
    // Lower router id last (3's is lower than 4's).
    let s = "198.19.8.0/24";
    rib.import(4, &update(s, &[64700], "198.18.0.14", vec![]));
    rib.import(3, &update(s, &[64700], "198.18.0.13", vec![]));
    assert_eq!(best_from(&rib, s), Some(3));
}

#[test]
fn changes_say_what_the_kernel_must_do() {
    let mut rib = rib();
    let p = "198.19.5.0/24";
    let added = rib.import(1, &update(p, &[64601], "198.18.0.11", vec![]));
    assert_eq!(added.changes.len(), 1);
    assert_eq!(added.changes[0].best.as_ref().unwrap().attrs.next_hop, Some(ip("198.18.0.11")));
    // A worse path elsewhere changes nothing.
    assert!(rib.import(2, &update(p, &[64602, 64700], "198.18.0.12", vec![])).changes.is_empty());
    // The best withdrawn: the other one now.
    let moved = rib.import(1, &Update::withdraw(&[net(p)]));
    assert_eq!(moved.changes[0].best.as_ref().unwrap().from, Some(2));
    let gone = rib.import(2, &Update::withdraw(&[net(p)]));
    assert_eq!(gone.changes, vec![Change { prefix: net(p), best: None }]);
    assert_eq!(rib.count(1) + rib.count(2), 0);
}

#[test]
fn import_policy_loops_and_limits() {
    let mut rib = rib();
    rib.policy.accept = vec![(net("198.19.0.0/16"), 26)];
    rib.policy.max_prefix = Some(2);
    rib.originate(net("198.19.1.0/24"), ip("198.18.0.1"));
    let refused =
        |rib: &mut Rib, prefix: &str, path: &[u32]| rib.import(1, &update(prefix, path, "198.18.0.11", vec![])).refused;
    assert_eq!(refused(&mut rib, "10.0.0.0/8", &[64601]), 1, "outside the accepted networks");
    assert_eq!(refused(&mut rib, "198.19.2.0/27", &[64601]), 1, "longer than allowed");
    assert_eq!(refused(&mut rib, "198.19.1.128/25", &[64601]), 1, "inside this speaker's own prefix");
    assert_eq!(refused(&mut rib, "198.19.0.0/16", &[64601]), 1, "covering this speaker's own prefix");
    assert_eq!(refused(&mut rib, "198.19.3.0/24", &[64601, LOCAL_AS]), 1, "this speaker's AS in the path");
    assert_eq!(rib.refused(1), 5, "5 refused prefixes announced now");
    assert_eq!(refused(&mut rib, "198.19.3.0/24", &[64601]), 0);
    assert_eq!(rib.refused(1), 4, "accepted now: no longer counted as refused");
    let mut withdrawn = update("198.19.9.0/24", &[64601], "198.18.0.11", vec![]);
    withdrawn.withdrawn = vec!["10.0.0.0/8".parse().unwrap()];
    withdrawn.nlri.clear();
    rib.import(1, &withdrawn);
    assert_eq!(rib.refused(1), 3, "a refused prefix withdrawn");
    assert_eq!(best_from(&rib, "198.19.1.0/24"), None, "this speaker's own path is best");
    assert!(!rib.import(1, &update("198.19.4.0/24", &[64601], "198.18.0.11", vec![])).over_limit);
    assert!(rib.import(1, &update("198.19.5.0/24", &[64601], "198.18.0.11", vec![])).over_limit);
    // A reflected path that came back: this speaker's cluster in its list.
    let back =
        update("198.19.9.0/24", &[], "198.18.0.13", vec![Attribute::ClusterList(vec![Ipv4Addr::new(198, 18, 0, 1)])]);
    assert_eq!(rib.import(3, &back).refused, 1);
    rib.peer_down(1, false);
    assert_eq!(rib.refused(1), 0, "nothing counted for a session that ended");
    // Without a next hop there is no path.
    let mut no_next_hop = update("198.19.10.0/24", &[64601], "198.18.0.11", vec![]);
    no_next_hop.attributes.retain(|a| !matches!(a, Attribute::NextHop(_)));
    rib.import(1, &no_next_hop);
    assert_eq!(rib.best(&net("198.19.10.0/24")), None);
}

#[test]
fn attributes_alike_are_held_once() {
    let mut rib = rib();
    let prefixes: Vec<IpNet> = (0..100).map(|i| net(&format!("198.19.{i}.0/24"))).collect();
    let attrs = vec![
        Attribute::Origin(Origin::Igp),
        Attribute::AsPath(AsPath::sequence(&[64601])),
        Attribute::NextHop("198.18.0.11".parse().unwrap()),
    ];
    rib.import(1, &Update::announce(&prefixes, attrs.clone(), None));
    rib.import(1, &Update::announce(&prefixes[..1], attrs, None));
    let first = &rib.best(&prefixes[0]).unwrap().attrs;
    assert!(prefixes.iter().all(|p| Arc::ptr_eq(&rib.best(p).unwrap().attrs, first)));
}

/// RFC 4724: a restarting neighbour's paths stay, stale, competing as before, until it is done
/// (End-of-RIB) or its time runs out; then the ones it did not send again go.
#[test]
fn graceful_restart_keeps_stale_paths_until_swept() {
    let mut rib = rib();
    rib.import(1, &update("198.19.5.0/24", &[64601], "198.18.0.11", vec![]));
    rib.import(1, &update("198.19.6.0/24", &[64601], "198.18.0.11", vec![]));
    rib.import(2, &update("198.19.6.0/24", &[64602, 64700], "198.18.0.12", vec![]));
    let changes = rib.peer_down(1, true);
    assert!(changes.is_empty(), "kept stale, the best paths stay: {changes:?}");
    assert_eq!(best_from(&rib, "198.19.6.0/24"), Some(1));
    assert!(rib.best(&net("198.19.5.0/24")).unwrap().stale);
    // Back, sending one of them again.
    rib.import(1, &update("198.19.5.0/24", &[64601], "198.18.0.11", vec![]));
    assert!(!rib.best(&net("198.19.5.0/24")).unwrap().stale);
    // The other is not sent again: swept, the fresh path of 2 takes over.
    let swept = rib.sweep(1);
    assert_eq!(swept.len(), 1);
    assert_eq!(best_from(&rib, "198.19.6.0/24"), Some(2));
    assert_eq!(rib.count(1), 1);
    // Without graceful restart: gone at once.
    let gone = rib.peer_down(1, false);
    assert_eq!(gone, vec![Change { prefix: net("198.19.5.0/24"), best: None }]);
}

/// RFC 4271 §9.2 and RFC 4456 §8: eBGP gets the own AS prepended and next hop self; iBGP
/// learned from iBGP goes only by reflection, with ORIGINATOR_ID and CLUSTER_LIST.
#[test]
fn what_goes_out_to_whom() {
    let mut rib = rib();
    let me = ip("198.18.0.1");
    rib.import(1, &update("198.19.5.0/24", &[64601], "198.18.0.11", vec![]));
    rib.import(3, &update("198.19.6.0/24", &[], "198.18.0.13", vec![]));
    rib.import(4, &update("198.19.7.0/24", &[], "198.18.0.14", vec![]));
    rib.originate(net("198.19.1.0/24"), me);
    let out = |prefix: &str, to: PeerId| rib.export(rib.best(&net(prefix)).unwrap(), to, me);
    // From eBGP: back to its sender never; to the other eBGP neighbour with this AS first.
    assert_eq!(out("198.19.5.0/24", 1), None);
    let to_ebgp = out("198.19.5.0/24", 2).unwrap();
    assert!(to_ebgp.contains(&Attribute::AsPath(AsPath::sequence(&[LOCAL_AS, 64601]))));
    assert!(to_ebgp.contains(&Attribute::NextHop(Ipv4Addr::new(198, 18, 0, 1))));
    // To iBGP: the path as it is, LOCAL_PREF, the next hop unchanged, no reflection attributes.
    let to_ibgp = out("198.19.5.0/24", 3).unwrap();
    assert!(to_ibgp.contains(&Attribute::NextHop(Ipv4Addr::new(198, 18, 0, 11))));
    assert!(to_ibgp.contains(&Attribute::LocalPref(DEFAULT_LOCAL_PREF)));
    assert!(!to_ibgp.iter().any(|a| matches!(a, Attribute::OriginatorId(_))));
    // From a non-client: to clients only; from a client: to everyone.
    assert_eq!(out("198.19.6.0/24", 3), None);
    let reflected = out("198.19.6.0/24", 4).unwrap();
    assert!(reflected.contains(&Attribute::OriginatorId(Ipv4Addr::new(10, 0, 0, 13))));
    assert!(reflected.contains(&Attribute::ClusterList(vec![Ipv4Addr::new(198, 18, 0, 1)])));
    assert!(out("198.19.7.0/24", 3).is_some(), "a client's path to a non-client");
    assert!(out("198.19.7.0/24", 2).is_some());
    // This speaker's own: to iBGP with next hop self.
    assert!(out("198.19.1.0/24", 3).unwrap().contains(&Attribute::NextHop(Ipv4Addr::new(198, 18, 0, 1))));
}

/// A next hop no router can be (unspecified, loopback, multicast, this speaker's own address)
/// makes no path; LOCAL_PREF counts only from iBGP (RFC 4271 §5.1.5: ignored from eBGP).
#[test]
fn unusable_next_hops_and_ebgp_local_pref() {
    let mut rib = rib();
    for nh in ["0.0.0.0", "127.0.0.1", "224.0.0.5", "255.255.255.255", "198.18.0.1"] {
        let refused = rib.import(1, &update("198.19.8.0/24", &[64601], nh, vec![])).refused;
        assert_eq!(refused, 1, "next hop {nh}");
        assert_eq!(rib.best(&net("198.19.8.0/24")), None, "next hop {nh}");
    }
    let v6 = |nh: &str| {
        let attrs = vec![Attribute::Origin(Origin::Igp), Attribute::AsPath(AsPath::sequence(&[64601]))];
        let mut u = Update::announce(&[net("fd00:8::/64")], attrs, None);
        u.attributes.retain(|a| !matches!(a, Attribute::MpReach { .. }));
        u.attributes.push(Attribute::MpReach {
            family: crate::packet::Family::IPV6_UNICAST,
            next_hop: vec![ip(nh)],
            nlri: vec![net("fd00:8::/64")],
        });
        u
    };
    for nh in ["::", "::1", "ff02::5"] {
        rib.import(1, &v6(nh));
        assert_eq!(rib.best(&net("fd00:8::/64")), None, "next hop {nh}");
    }
    rib.import(1, &v6("fd00::11"));
    assert!(rib.best(&net("fd00:8::/64")).is_some());
    // eBGP's LOCAL_PREF 1000 with a long path loses to a short one; iBGP's counts.
    let p = "198.19.9.0/24";
    rib.import(1, &update(p, &[64601, 64700, 64701, 64702], "198.18.0.11", vec![Attribute::LocalPref(1000)]));
    rib.import(2, &update(p, &[64602], "198.18.0.12", vec![]));
    assert_eq!(best_from(&rib, p), Some(2), "LOCAL_PREF from eBGP ignored");
    rib.import(3, &update(p, &[64603, 64700, 64701], "198.18.0.13", vec![Attribute::LocalPref(1000)]));
    assert_eq!(best_from(&rib, p), Some(3), "LOCAL_PREF from iBGP counts");
}

/// IPv4 unicast sent in MP_REACH_NLRI (as some speakers do) takes that attribute's next hop.
#[test]
fn ipv4_in_mp_reach_takes_its_next_hop() {
    let mut rib = rib();
    let mut u = Update::announce(
        &[],
        vec![Attribute::Origin(Origin::Igp), Attribute::AsPath(AsPath::sequence(&[64601]))],
        None,
    );
    u.attributes.push(Attribute::MpReach {
        family: crate::packet::Family::IPV4_UNICAST,
        next_hop: vec![ip("198.18.0.11")],
        nlri: vec![net("198.19.12.0/24")],
    });
    rib.import(1, &u);
    assert_eq!(rib.best(&net("198.19.12.0/24")).and_then(|p| p.attrs.next_hop), Some(ip("198.18.0.11")));
}

/// What goes on keeps what came: AS_SETs in the path (with this speaker's AS put first to
/// eBGP), ATOMIC_AGGREGATE and AGGREGATOR, and optional transitive attributes weft does not
/// interpret (an extended community here), these with the Partial bit; an optional
/// non-transitive unknown one is not passed on. A set holding this speaker's AS is a loop.
#[test]
fn transitive_attributes_and_as_sets_go_on() {
    use crate::packet::Segment;
    let mut rib = rib();
    let path = AsPath {
        segments: vec![
            Segment { kind: crate::packet::AS_SEQUENCE, asns: vec![64601] },
            Segment { kind: crate::packet::AS_SET, asns: vec![65001, 65002] },
        ],
    };
    let ext = Attribute::Unknown { flags: 0xc0, code: 16, value: vec![0, 2, 0xfc, 0, 0, 0, 0, 7] };
    let private = Attribute::Unknown { flags: 0x80, code: 99, value: vec![1] };
    let aggregator = Attribute::Aggregator { asn: 64601, address: "198.18.0.11".parse().unwrap() };
    let attrs = vec![
        Attribute::Origin(Origin::Igp),
        Attribute::AsPath(path.clone()),
        Attribute::NextHop("198.18.0.11".parse().unwrap()),
        Attribute::AtomicAggregate,
        aggregator.clone(),
        ext,
        private,
    ];
    rib.import(1, &Update::announce(&[net("198.19.13.0/24")], attrs.clone(), None));
    let best = rib.best(&net("198.19.13.0/24")).unwrap().clone();
    let out = rib.export(&best, 2, ip("198.18.0.1")).unwrap();
    assert!(out.contains(&Attribute::AsPath(path.prepend(LOCAL_AS))), "{out:?}");
    assert!(out.contains(&Attribute::AtomicAggregate) && out.contains(&aggregator), "{out:?}");
    assert!(
        out.contains(&Attribute::Unknown { flags: 0xe0, code: 16, value: vec![0, 2, 0xfc, 0, 0, 0, 0, 7] }),
        "{out:?}"
    );
    assert!(!out.iter().any(|a| matches!(a, Attribute::Unknown { code: 99, .. })), "{out:?}");
    let to_ibgp = rib.export(&best, 3, ip("198.18.0.1")).unwrap();
    assert!(to_ibgp.contains(&Attribute::AsPath(path)), "{to_ibgp:?}");
    // This speaker's AS inside a set: refused.
    let looped = AsPath {
        segments: vec![
            Segment { kind: crate::packet::AS_SEQUENCE, asns: vec![64601] },
            Segment { kind: crate::packet::AS_SET, asns: vec![LOCAL_AS] },
        ],
    };
    let mut attrs = attrs;
    attrs[1] = Attribute::AsPath(looped);
    assert_eq!(rib.import(1, &Update::announce(&[net("198.19.14.0/24")], attrs, None)).refused, 1);
}

/// A neighbour that takes only this speaker's own prefixes (routed mode's external peers)
/// hears what this speaker originates and nothing it learned.
#[test]
fn an_originated_only_neighbour_hears_own_prefixes_only() {
    let mut rib = rib();
    let peer = Peer {
        address: ip("198.18.0.15"),
        asn: 65000,
        router_id: "10.0.0.15".parse().unwrap(),
        ibgp: false,
        rr_client: false,
        originated_only: true,
    };
    rib.add_peer(5, peer);
    rib.import(3, &update("198.19.9.0/26", &[], "198.18.0.13", vec![]));
    rib.originate(net("198.19.1.0/26"), ip("198.18.0.1"));
    let learned = rib.best(&net("198.19.9.0/26")).unwrap().clone();
    let own = rib.best(&net("198.19.1.0/26")).unwrap().clone();
    assert!(rib.export(&learned, 5, ip("198.18.0.1")).is_none(), "a learned path");
    assert!(rib.export(&own, 5, ip("198.18.0.1")).is_some(), "an own prefix");
    assert!(rib.export(&learned, 1, ip("198.18.0.1")).is_some(), "another eBGP neighbour hears both");
}
