//! The VXLAN pieces on the real kernel, in a namespace made for the test: a VTEP, a permanent
//! neighbour, an FDB entry with a remote and an onlink route, each read back with `ip`/`bridge`
//! and through our own dumps, then removed.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use weft_dataplane::route::RTPROT_WEFT;
use weft_dataplane::{Netlink, RouteSpec, VxlanSpec};

struct Ns(String, weft_netns::NetNs);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = weft_netns::delete_named(&self.0);
    }
}

fn sh(ns: &str, argv: &[&str]) -> String {
    let out = Command::new("ip").args(["netns", "exec", ns]).args(argv).output().unwrap();
    assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into()
}

#[test]
fn vtep_neighbour_fdb_route() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let name = format!("wtdp{}", std::process::id() % 100_000);
    let ns = Ns(name.clone(), weft_netns::create_named(&name).unwrap());
    sh(&name, &["ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink0p"]);
    sh(&name, &["ip", "link", "set", "uplink0p", "up"]);
    sh(&name, &["ip", "addr", "add", "198.18.9.1/24", "dev", "uplink0"]);
    sh(&name, &["ip", "link", "set", "uplink0", "up"]);

    let mut nl = ns.1.run(Netlink::new).unwrap().unwrap();
    let uplink = nl.require_link("uplink0").unwrap();
    let mac = [0x0a, 0x58, 0xc6, 0x13, 0x00, 0x01];
    nl.create_vxlan(&VxlanSpec {
        name: "weft.1",
        vni: 1,
        port: 8472,
        local: Ipv4Addr::new(198, 18, 9, 1),
        underlay: uplink.index,
        mtu: Some(1450),
        mac: Some(mac),
    })
    .unwrap();
    let vtep = nl.require_link("weft.1").unwrap();
    let info = vtep.vxlan.clone().unwrap();
    assert_eq!((info.vni, info.port, info.local, info.learning), (1, 8472, Some(Ipv4Addr::new(198, 18, 9, 1)), false));
    assert_eq!(info.underlay, Some(uplink.index));
    assert_eq!(vtep.mac_string(), "0a:58:c6:13:00:01");
    nl.set_up(vtep.index, true).unwrap();
    let detail = sh(&name, &["ip", "-d", "link", "show", "weft.1"]);
    assert!(
        detail.contains("vxlan id 1 local 198.18.9.1 dev uplink0") && detail.contains("dstport 8472 nolearning"),
        "{detail}"
    );

    // A peer, in flannel's order: neighbour, FDB, onlink route.
    let peer_mac = [0x2a, 0x4b, 0x0f, 0xff, 0xc5, 0x7b];
    let peer_gw: IpAddr = "198.19.2.0".parse().unwrap();
    let peer_ip: IpAddr = "198.18.9.2".parse().unwrap();
    nl.replace_neighbour(vtep.index, peer_gw, &peer_mac).unwrap();
    nl.replace_fdb(vtep.index, &peer_mac, Some(peer_ip)).unwrap();
    let route =
        RouteSpec::new("198.19.2.0/24".parse().unwrap()).via(peer_gw).dev(vtep.index).onlink().protocol(RTPROT_WEFT);
    nl.replace_route(&route).unwrap();
    // Replacing again changes nothing.
    nl.replace_neighbour(vtep.index, peer_gw, &peer_mac).unwrap();
    nl.replace_fdb(vtep.index, &peer_mac, Some(peer_ip)).unwrap();
    nl.replace_route(&route).unwrap();

    assert!(
        sh(&name, &["ip", "neigh", "show", "dev", "weft.1"]).contains("198.19.2.0 lladdr 2a:4b:0f:ff:c5:7b PERMANENT")
    );
    let fdb = sh(&name, &["bridge", "fdb", "show", "dev", "weft.1"]);
    assert!(fdb.contains("2a:4b:0f:ff:c5:7b dst 198.18.9.2 self permanent"), "{fdb}");
    let routes = sh(&name, &["ip", "route", "show", "proto", "200"]);
    assert_eq!(routes.trim(), "198.19.2.0/24 via 198.19.2.0 dev weft.1 onlink");

    let neigh = nl.neighbours(Some(vtep.index)).unwrap();
    assert!(neigh.iter().any(|n| n.ip == peer_gw && n.mac == peer_mac && n.permanent));
    let entries = nl.fdb(vtep.index).unwrap();
    assert!(entries.iter().any(|e| e.mac == peer_mac && e.dst == Some(peer_ip)), "{entries:?}");
    let ours: Vec<RouteSpec> = nl.routes().unwrap().into_iter().filter(|r| r.protocol == RTPROT_WEFT).collect();
    assert_eq!(ours.len(), 1);
    assert!(ours[0].onlink && ours[0].gateway == Some(peer_gw));

    nl.delete_route(&route).unwrap();
    nl.delete_fdb(vtep.index, &peer_mac, Some(peer_ip)).unwrap();
    nl.delete_neighbour(vtep.index, peer_gw).unwrap();
    assert!(sh(&name, &["ip", "route", "show", "proto", "200"]).trim().is_empty());
    assert!(!sh(&name, &["bridge", "fdb", "show", "dev", "weft.1"]).contains("2a:4b"));
    assert!(nl.delete_neighbour(vtep.index, peer_gw).unwrap_err().is_not_found());
}

#[test]
fn link_monitor_reports_deletions() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let name = format!("wtmon{}", std::process::id() % 100_000);
    let ns = Ns(name.clone(), weft_netns::create_named(&name).unwrap());
    sh(&name, &["ip", "link", "add", "gone0", "type", "veth", "peer", "name", "gone1"]);
    let mut monitor = ns.1.run(weft_dataplane::monitor::LinkMonitor::new).unwrap().unwrap();
    assert_eq!(monitor.deleted(), Some(vec![]));
    sh(&name, &["ip", "link", "del", "gone0"]);
    let deleted = monitor.deleted().unwrap();
    assert!(deleted.contains(&"gone0".to_string()) && deleted.contains(&"gone1".to_string()), "{deleted:?}");
    assert_eq!(monitor.deleted(), Some(vec![]));
}
