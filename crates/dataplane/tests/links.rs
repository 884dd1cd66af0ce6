//! Links as weft reads them (only the attributes it uses, straight from the kernel's replies),
//! compared with what `ip -d -j link` reports, in a namespace made for the test: a bridge, a veth
//! pair created the way the plugins create it, bridge-port settings, link groups and their
//! deletion in one batch.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use serde_json::Value;
use weft_dataplane::link::VethSpec;
use weft_dataplane::{LinkKind, Netlink};

struct Ns(String, weft_netns::NetNs);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = weft_netns::delete_named(&self.0);
    }
}

impl Ns {
    fn new(tag: &str) -> Ns {
        assert!(nix::unistd::geteuid().is_root(), "needs root");
        let name = format!("wtl{tag}{}", std::process::id() % 100_000);
        Ns(name.clone(), weft_netns::create_named(&name).unwrap())
    }

    fn sh(&self, argv: &[&str]) -> String {
        let out = Command::new("ip").args(["netns", "exec", &self.0]).args(argv).output().unwrap();
        assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into()
    }

    fn ip_link(&self, name: &str) -> Value {
        let v: Value = serde_json::from_str(&self.sh(&["ip", "-d", "-j", "link", "show", "dev", name])).unwrap();
        v[0].clone()
    }
}

#[test]
fn links_read_back_as_the_kernel_reports_them() {
    let ns = Ns::new("r");
    let cont = Ns::new("c");
    ns.sh(&["ip", "link", "add", "br9", "mtu", "1400", "type", "bridge"]);
    ns.sh(&["ip", "link", "set", "br9", "up", "promisc", "on"]);
    ns.sh(&["ip", "link", "add", "ifb9", "type", "ifb"]);
    let mut nl = ns.1.run(Netlink::new).unwrap().unwrap();
    let br = nl.require_link("br9").unwrap();

    // A veth pair as bridge and ptp make them: host end on the bridge and up, peer in another
    // namespace with a chosen MAC, one queue each; the kernel echoes the new host end.
    let peer_mac = [0x0a, 0x58, 0xc6, 0x13, 0x00, 0x09];
    let spec = VethSpec {
        name: "vh9",
        peer_name: "eth9",
        peer_netns: Some(&cont.1),
        mtu: Some(1400),
        mac: None,
        peer_mac: Some(peer_mac),
        master: Some(br.index),
        up: true,
        queues: Some(1),
    };
    let echoed = nl.create_veth(&spec).unwrap().expect("kernels from 6.3 echo the new link");
    nl.set_hairpin(echoed.index, true).unwrap();

    for name in ["br9", "vh9", "ifb9", "lo"] {
        let link = nl.require_link(name).unwrap();
        let ip = ns.ip_link(name);
        assert_eq!(link.index, ip["ifindex"].as_u64().unwrap() as u32, "{name}");
        assert_eq!(link.name, name);
        assert_eq!(link.mac_string(), ip["address"].as_str().unwrap(), "{name}");
        assert_eq!(link.mtu, ip["mtu"].as_u64().unwrap() as u32, "{name}");
        let flags: Vec<&str> = ip["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
        assert_eq!(link.up, flags.contains(&"UP"), "{name}: {flags:?}");
        assert_eq!(link.promisc, flags.contains(&"PROMISC"), "{name}: {flags:?}");
        assert_eq!(link.group, 0, "{name}");
    }
    assert_eq!(nl.require_link("br9").unwrap().kind, LinkKind::Bridge);
    assert_eq!(nl.require_link("ifb9").unwrap().kind, LinkKind::Other("ifb".into()));
    assert_eq!(nl.require_link("lo").unwrap().kind, LinkKind::None);
    let host = nl.require_link("vh9").unwrap();
    assert_eq!(host.kind, LinkKind::Veth);
    assert_eq!(host.master, Some(br.index));
    assert_eq!(host.hairpin, Some(true));
    assert_eq!((echoed.index, &echoed.mac, echoed.peer_index), (host.index, &host.mac, host.peer_index));
    let detail = ns.ip_link("vh9");
    assert_eq!((detail["num_tx_queues"].as_u64(), detail["num_rx_queues"].as_u64()), (Some(1), Some(1)));

    // The peer: its index is the one the host end names, its MAC the one asked for.
    let mut cnl = cont.1.run(Netlink::new).unwrap().unwrap();
    let peer = cnl.require_link("eth9").unwrap();
    assert_eq!(Some(peer.index), host.peer_index);
    assert_eq!(peer.mac, peer_mac);
    assert!(!peer.up);
    assert_eq!(nl.links().unwrap().len(), 4, "lo, br9, ifb9, vh9");

    // Retired into a group, then the group deleted in one request, peer included.
    nl.set_down_in_group(host.index, 4242).unwrap();
    let retired = nl.require_link("vh9").unwrap();
    assert_eq!((retired.group, retired.up), (4242, false));
    assert!(nl.delete_group(4242).unwrap());
    assert!(nl.link_by_name("vh9").unwrap().is_none());
    assert!(cnl.link_by_name("eth9").unwrap().is_none());
    assert!(!nl.delete_group(4242).unwrap(), "an empty group is not an error");
    assert!(nl.link_by_index(host.index).unwrap().is_none());
}

/// Nexthop objects as `ip nexthop` sees them: made on the device the kernel routes the gateway
/// through, listed back, named by a route (`nhid`), an id taken refused, and deleted with the
/// routes that use it.
#[test]
fn nexthop_objects_and_routes_through_them() {
    use weft_dataplane::{Nexthop, RouteSpec};
    let ns = Ns::new("n");
    ns.sh(&["ip", "link", "add", "nh0", "type", "veth", "peer", "name", "nh1"]);
    ns.sh(&["ip", "link", "set", "nh0", "up"]);
    ns.sh(&["ip", "link", "set", "nh1", "up"]);
    ns.sh(&["ip", "addr", "add", "198.18.5.1/24", "dev", "nh0"]);
    let mut nl = ns.1.run(Netlink::new).unwrap().unwrap();
    let index = nl.require_link("nh0").unwrap().index;

    // The kernel's route to a neighbour on the link: the device, no gateway.
    let to = nl.route_get("198.18.5.2".parse().unwrap()).unwrap();
    assert_eq!((to.oif, to.gateway), (Some(index), None));
    let to = nl.route_get("198.19.9.9".parse().unwrap());
    assert!(to.is_err(), "no route, no answer: {to:?}");

    let nh = Nexthop { id: 4242, gateway: Some("198.18.5.2".parse().unwrap()), oif: Some(index), protocol: 202 };
    nl.add_nexthop(&nh).unwrap();
    assert!(nl.add_nexthop(&nh).unwrap_err().is_exists());
    assert_eq!(nl.nexthops().unwrap(), vec![nh.clone()]);
    let shown = ns.sh(&["ip", "nexthop", "show"]);
    assert!(shown.contains("id 4242 via 198.18.5.2 dev nh0") && shown.contains("proto 202"), "{shown}");

    let route = RouteSpec::new("198.19.7.0/24".parse().unwrap()).protocol(202).nexthop(4242);
    nl.add_route(&route).unwrap();
    let shown = ns.sh(&["ip", "route", "show", "198.19.7.0/24"]);
    assert!(shown.contains("nhid 4242 via 198.18.5.2 dev nh0 proto 202"), "{shown}");
    let listed = nl.routes().unwrap().into_iter().find(|r| r.dst == route.dst).unwrap();
    assert_eq!(listed.nexthop, Some(4242));
    // A route naming an id that is not there is refused.
    let orphan = RouteSpec::new("198.19.8.0/24".parse().unwrap()).protocol(202).nexthop(4243);
    assert!(nl.add_route(&orphan).is_err());

    nl.delete_nexthop(4242).unwrap();
    assert!(nl.nexthops().unwrap().is_empty());
    assert!(ns.sh(&["ip", "route", "show", "198.19.7.0/24"]).is_empty(), "the route goes with its nexthop");
    assert!(nl.delete_nexthop(4242).unwrap_err().is_not_found());
}

/// A route put as one protocol's own: added; replaced when that protocol holds the
/// destination; left alone (and the holder named) when another does — for IPv4 and IPv6, and
/// with a longer prefix at the same address (the kernel's direct answer is then another route).
#[test]
fn owned_routes_are_put_and_foreign_ones_left_alone() {
    use weft_dataplane::RouteSpec;
    let ns = Ns::new("o");
    ns.sh(&["ip", "link", "add", "ro0", "type", "veth", "peer", "name", "ro1"]);
    ns.sh(&["ip", "link", "set", "ro0", "up"]);
    ns.sh(&["ip", "link", "set", "ro1", "up"]);
    ns.sh(&["ip", "addr", "add", "198.18.6.1/24", "dev", "ro0"]);
    ns.sh(&["ip", "-6", "addr", "add", "fd00:6::1/64", "dev", "ro0", "nodad"]);
    let mut nl = ns.1.run(Netlink::new).unwrap().unwrap();
    let ours = |dst: &str, via: &str| RouteSpec::new(dst.parse().unwrap()).protocol(202).via(via.parse().unwrap());
    for (dst, via, via2) in [("198.19.7.0/24", "198.18.6.2", "198.18.6.3"), ("fd00:7::/64", "fd00:6::2", "fd00:6::3")] {
        assert_eq!(nl.put_owned_route(&ours(dst, via)).unwrap(), None, "{dst} added");
        assert_eq!(nl.put_owned_route(&ours(dst, via2)).unwrap(), None, "{dst} replaced");
        let family = if dst.contains(':') { "-6" } else { "-4" };
        assert!(ns.sh(&["ip", family, "route", "show", dst]).contains(via2), "{dst}");
        ns.sh(&["ip", family, "route", "del", dst]);
        ns.sh(&["ip", family, "route", "add", dst, "via", via, "proto", "static"]);
        assert_eq!(nl.put_owned_route(&ours(dst, via2)).unwrap(), Some(4), "{dst}: static holds it");
        let shown = ns.sh(&["ip", family, "route", "show", dst]);
        assert!(shown.contains(via) && shown.contains("proto static"), "{dst} left alone: {shown}");
    }
    // A longer prefix at the same address: the holder of the /24 is still found.
    ns.sh(&["ip", "route", "add", "198.19.7.0/25", "via", "198.18.6.2", "proto", "202"]);
    assert_eq!(nl.put_owned_route(&ours("198.19.7.0/24", "198.18.6.3")).unwrap(), Some(4));
}
