//! The agent's event loop against a fake kernel, a fake store and an injected clock: start-up
//! ordering, restarts over existing kernel state, a first listing that comes late or never,
//! store outages, a lost lease, a deleted VTEP, an uplink MTU change, failures and retries,
//! owners. No root, milliseconds each.

#![allow(clippy::unwrap_used)]

mod fake;

use std::time::Duration;

use fake::*;
use weft_agent::model::{Route, BGP_ROUTES, PEER_ROUTES, POD_ROUTES};
use weft_agent::renewer::Report;

const VXLAN: &str = r#"{"Network": "198.19.0.0/16"}"#;

fn peers(ids: &[u8]) -> Vec<weft_lease::Lease> {
    ids.iter().map(|i| peer(*i)).collect()
}

/// Journal lines about peer objects or the device (not the rules, rewritten on every replay).
fn peer_changes(h: &Harness) -> Vec<String> {
    h.kernel.borrow().journal.iter().filter(|l| !l.starts_with("firewall")).cloned().collect()
}

#[test]
fn start_up_makes_the_device_and_rules_then_every_peer_then_the_subnet_file() {
    let mut h = Harness::new(VXLAN, &peers(&[2, 3]));
    assert!(!h.ready());
    h.turn();
    let journal = h.kernel.borrow().journal.clone();
    let at =
        |what: &str| journal.iter().position(|l| l.starts_with(what)).unwrap_or_else(|| panic!("{what}: {journal:?}"));
    assert!(at("ensure weft.1") < at("firewall"));
    assert!(at("firewall") < at("put neighbour"));
    assert!(at("put neighbour") < at("put fdb") && at("put fdb") < at("put route"));
    assert_eq!(journal.last().unwrap(), "subnet file", "{journal:?}");
    assert!(h.reaches(2) && h.reaches(3));
    assert!(h.ready(), "{:?}", h.status().readiness());
    let env = h.kernel.borrow().subnet_file.clone().unwrap();
    assert_eq!((env.subnet.to_string().as_str(), env.mtu), ("198.19.1.1/24", 1450));
    assert_eq!(h.status().peers, 2);
    assert_eq!(h.kernel.borrow().removals().len(), 0);
}

/// Fault 1: a restart whose first listing is partial (a large or slow store) or never comes
/// removes nothing; the node is not ready until the listing is complete.
#[test]
fn a_first_listing_that_comes_late_or_never_removes_nothing() {
    let all = peers(&[2, 3, 4, 5]);
    let mut first = Harness::new(VXLAN, &all);
    first.turn();
    assert!((2..=5).all(|i| first.reaches(i)));
    let kernel = first.kernel.clone();
    kernel.borrow_mut().journal.clear();
    drop(first);

    // Restarted: the watch has seen one lease of five so far, for a long time.
    let mut h = Harness::on(VXLAN, &all, kernel.clone());
    h.store.borrow_mut().partial = Some(vec![peer(2).subnet]);
    h.run_for(Duration::from_secs(30));
    assert!(h.kernel.borrow().removals().is_empty(), "{:?}", h.kernel.borrow().journal);
    assert!((2..=5).all(|i| h.reaches(i)));
    assert!(!h.ready());
    assert!(h.status().readiness().unwrap_err().contains("not in place"));
    // The listing completes: nothing to change, ready.
    h.store.borrow_mut().partial = None;
    h.turn();
    assert!(h.ready());
    assert!(peer_changes(&h).is_empty(), "{:?}", peer_changes(&h));

    // A store that never answers after a restart: nothing removed either.
    let mut h = Harness::on(VXLAN, &all, kernel.clone());
    h.store.borrow_mut().fail = Some("etcd did not answer within 5 s".into());
    h.run_for(Duration::from_secs(30));
    assert!(kernel.borrow().removals().is_empty());
    assert!((2..=5).all(|i| h.reaches(i)));
    assert!(!h.ready() && !h.status().store_up);
}

#[test]
fn a_restart_over_the_same_kernel_changes_nothing() {
    let all = peers(&[2, 3, 4]);
    let mut first = Harness::new(VXLAN, &all);
    first.turn();
    let kernel = first.kernel.clone();
    kernel.borrow_mut().journal.clear();
    drop(first);
    let mut h = Harness::on(VXLAN, &all, kernel);
    h.run_for(Duration::from_secs(2));
    assert!(h.ready());
    assert!(peer_changes(&h).is_empty(), "{:?}", peer_changes(&h));
}

#[test]
fn a_change_is_applied_on_its_own() {
    let mut h = Harness::new(VXLAN, &peers(&[2, 3]));
    h.turn();
    h.kernel.borrow_mut().journal.clear();
    h.put(peer(6));
    h.turn();
    assert_eq!(peer_changes(&h), ["put neighbour 198.19.6.0", "put fdb 198.18.0.6", "put route 198.19.6.0/24"]);
    h.kernel.borrow_mut().journal.clear();
    h.remove(peer(3).subnet);
    h.turn();
    assert_eq!(peer_changes(&h), ["del route 198.19.3.0/24", "del fdb 198.18.0.3", "del neighbour 198.19.3.0"]);
    // A new VTEP MAC for peer 2: its old FDB entry goes, the rest is replaced in place.
    h.kernel.borrow_mut().journal.clear();
    let mut moved = peer(2);
    moved.attrs.backend_data["VtepMAC"] = mac(0x22).into();
    h.put(moved);
    h.turn();
    assert_eq!(peer_changes(&h), ["del fdb 198.18.0.2", "put neighbour 198.19.2.0", "put fdb 198.18.0.2"]);
    assert_eq!(h.routes(), ["198.19.2.0/24", "198.19.6.0/24"]);
    assert_eq!(h.status().peers, 2);
}

/// Faults 2 and 6: while the node's own lease cannot be kept (the store fails), peer changes
/// keep flowing; the node is not ready until the store answers again.
#[test]
fn a_store_outage_keeps_peer_changes_flowing() {
    let mut h = Harness::new(VXLAN, &peers(&[2]));
    h.turn();
    assert!(h.ready());
    h.keeper.borrow_mut().reports.push(Report::Failed("etcd did not answer within 5 s".into()));
    h.turn();
    assert!(!h.ready() && !h.status().store_up && h.status().dataplane_up);
    assert_eq!(h.status().store_errors, 1);
    h.put(peer(3));
    h.turn();
    assert!(h.reaches(3), "a peer change waited for the store");
    h.keeper.borrow_mut().reports.push(Report::Held { lease: h.own.clone(), reacquired: false });
    h.turn();
    assert!(h.ready());
    // Polling the watch fails: not ready, nothing removed; ready again once it answers.
    h.kernel.borrow_mut().journal.clear();
    h.store.borrow_mut().fail = Some("connection refused".into());
    h.run_for(Duration::from_secs(5));
    assert!(!h.ready());
    assert!(h.kernel.borrow().removals().is_empty());
    h.store.borrow_mut().fail = None;
    h.turn();
    assert!(h.ready());
}

#[test]
fn a_lost_lease_is_reported_once_and_a_new_one_replays_everything() {
    let mut h = Harness::new(VXLAN, &peers(&[2, 3]));
    h.turn();
    h.remove(h.own.subnet);
    h.run_for(Duration::from_secs(3));
    assert_eq!(h.keeper.borrow().lost, 1, "the renewer is told once");
    assert!(h.reaches(2) && h.reaches(3), "peers stay while the lease is taken back");
    // Other data over the own key (a restored backup with a stale VTEP MAC) is lost too.
    let mut stale = h.own.clone();
    stale.attrs.backend_data["VtepMAC"] = mac(0x77).into();
    h.put(stale);
    h.turn();
    assert_eq!(h.keeper.borrow().lost, 1, "still missing: not told again");
    // The renewer could only get another subnet.
    let mut moved = h.own.clone();
    moved.subnet = "198.19.50.0/24".parse().unwrap();
    h.remove(h.own.subnet);
    h.put(moved.clone());
    h.keeper.borrow_mut().reports.push(Report::Held { lease: moved, reacquired: true });
    h.turn();
    let status = h.status();
    assert_eq!(status.lease_reacquired, 1);
    assert_eq!(status.lease.as_deref(), Some("198.19.50.0/24"));
    let env = h.kernel.borrow().subnet_file.clone().unwrap();
    assert_eq!(env.subnet.to_string(), "198.19.50.1/24");
    let device = h.kernel.borrow().devices["weft.1"].clone();
    let weft_agent::model::DeviceSpec::Vxlan { address, .. } = device else { panic!("{device:?}") };
    assert_eq!(address.to_string(), "198.19.50.0/32");
    assert!(h.reaches(2) && h.reaches(3));
    assert!(h.ready());
    h.turn();
    assert_eq!(h.keeper.borrow().lost, 1);
}

#[test]
fn a_deleted_vtep_is_made_again_and_every_peer_replayed() {
    let mut h = Harness::new(VXLAN, &peers(&[2, 3]));
    h.turn();
    h.kernel.borrow_mut().delete_link("weft.1");
    assert!(!h.reaches(2));
    h.turn();
    assert!(h.reaches(2) && h.reaches(3));
    assert_eq!(h.status().vtep_recreated, 1);
    assert!(h.ready());
}

/// Fault 8: a VTEP with other settings replaced at start is not reported as gone.
#[test]
fn a_device_replaced_at_start_is_not_counted_as_gone() {
    let mut first = Harness::new(r#"{"Network": "198.19.0.0/16", "Backend": {"Port": 4789}}"#, &peers(&[2]));
    first.turn();
    let kernel = first.kernel.clone();
    drop(first);
    let mut h = Harness::on(VXLAN, &peers(&[2]), kernel);
    h.run_for(Duration::from_secs(1));
    assert!(h.kernel.borrow().journal.iter().filter(|l| *l == "ensure weft.1").count() == 2);
    assert_eq!(h.status().vtep_recreated, 0);
    assert!(h.reaches(2) && h.ready());
}

#[test]
fn the_pod_mtu_follows_the_uplink() {
    let mut h = Harness::new(VXLAN, &peers(&[2]));
    h.turn();
    h.kernel.borrow_mut().set_mtu(UPLINK, 9000);
    h.turn();
    assert_eq!(h.kernel.borrow().links["weft.1"].mtu, 8950);
    assert_eq!(h.kernel.borrow().subnet_file.as_ref().unwrap().mtu, 8950);
    assert!(h.reaches(2) && h.ready());
}

/// A dataplane that cannot be programmed: not ready, one try a second (not one a turn), ready
/// once it can.
#[test]
fn a_failure_is_retried_every_second_until_it_recovers() {
    let mut h = Harness::new(VXLAN, &peers(&[2]));
    h.kernel.borrow_mut().fail = Some("put route".into());
    h.run_for(Duration::from_secs(5));
    let status = h.status();
    assert!(!h.ready() && !status.dataplane_up && !status.started);
    assert!((4..=7).contains(&status.reconcile_errors), "{} tries in 5 s", status.reconcile_errors);
    assert!(h.kernel.borrow().subnet_file.is_none(), "no subnet file before the dataplane is in place");
    h.kernel.borrow_mut().fail = None;
    h.run_for(Duration::from_secs(1));
    assert!(h.ready() && h.reaches(2));

    // The uplink gone: everything fails until it is back under its name.
    h.kernel.borrow_mut().delete_link(UPLINK);
    h.kernel.borrow_mut().delete_link("weft.1");
    h.run_for(Duration::from_secs(3));
    assert!(!h.ready());
    h.kernel.borrow_mut().add_link(UPLINK, 1500);
    h.run_for(Duration::from_secs(2));
    assert!(h.ready() && h.reaches(2));
}

#[test]
fn resync_repairs_what_was_changed_by_hand() {
    let mut h = Harness::new(VXLAN, &peers(&[2, 3]));
    h.turn();
    h.kernel.borrow_mut().routes.retain(|(_, r)| r.dst.to_string() != "198.19.3.0/24");
    h.run_for(Duration::from_secs(30));
    assert!(!h.reaches(3), "only the resync looks");
    h.run_for(Duration::from_secs(31));
    assert!(h.reaches(3));
}

/// Owners: a reconcile of peer routes removes its own stale routes and never another
/// producer's (pod routes, BGP routes), whatever they route to.
#[test]
fn a_reconcile_removes_only_its_owners_routes() {
    let kernel = std::rc::Rc::new(std::cell::RefCell::new(KernelState::default()));
    {
        let mut k = kernel.borrow_mut();
        let eth0 = k.add_link(UPLINK, 1500);
        let route = |dst: &str| Route { dst: dst.parse().unwrap(), via: None, dev: eth0, onlink: false, mtu: None };
        k.routes.push((PEER_ROUTES.protocol, route("198.19.99.0/24")));
        k.routes.push((POD_ROUTES.protocol, route("198.19.1.5/32")));
        k.routes.push((BGP_ROUTES.protocol, route("198.19.200.0/24")));
        k.routes.push((3, route("10.0.0.0/8")));
    }
    let mut h = Harness::on(VXLAN, &peers(&[2]), kernel);
    h.turn();
    let k = h.kernel.borrow();
    assert_eq!(k.routes_of(PEER_ROUTES.protocol), ["198.19.2.0/24"]);
    assert_eq!(k.routes_of(POD_ROUTES.protocol), ["198.19.1.5/32"]);
    assert_eq!(k.routes_of(BGP_ROUTES.protocol), ["198.19.200.0/24"]);
    assert_eq!(k.routes_of(3), ["10.0.0.0/8"]);
}

/// A peer whose subnet another producer routes already: its route is neither taken over nor,
/// when the peer goes, removed.
#[test]
fn another_owners_route_to_a_peer_subnet_is_left_alone() {
    let kernel = std::rc::Rc::new(std::cell::RefCell::new(KernelState::default()));
    {
        let mut k = kernel.borrow_mut();
        let eth0 = k.add_link(UPLINK, 1500);
        let route = Route { dst: "198.19.3.0/24".parse().unwrap(), via: None, dev: eth0, onlink: false, mtu: None };
        k.routes.push((BGP_ROUTES.protocol, route));
    }
    let mut h = Harness::on(VXLAN, &peers(&[2, 3]), kernel);
    h.turn();
    assert!(h.ready());
    assert_eq!(h.kernel.borrow().routes_of(BGP_ROUTES.protocol), ["198.19.3.0/24"]);
    h.remove(peer(3).subnet);
    h.turn();
    assert_eq!(h.kernel.borrow().routes_of(BGP_ROUTES.protocol), ["198.19.3.0/24"]);
    assert!(h.reaches(2));
}

/// Fault 3: a lease that claims a live peer's VTEP MAC with another address never takes the
/// peer's FDB entry, whichever order they come in, and the peer keeps it when it goes away.
#[test]
fn a_vtep_mac_claimed_twice_never_flips() {
    let mut h = Harness::new(VXLAN, &peers(&[2]));
    h.turn();
    let mut forged = peer(9);
    forged.attrs.backend_data["VtepMAC"] = mac(2).into();
    forged.created = Some(99);
    h.put(forged.clone());
    for _ in 0..20 {
        h.turn();
        assert!(h.reaches(2));
        assert!(!h.routes().contains(&"198.19.9.0/24".to_string()));
    }
    h.remove(forged.subnet);
    h.turn();
    assert!(h.reaches(2));
    assert!(h.keeper.borrow().published.is_empty(), "the older claim is this node's: nothing to renew");
}

/// A node whose VTEP MAC an older lease of another node claims (its address changed, say, and
/// its old lease is still there) is ignored by its peers: it makes a new MAC, once, publishes it
/// and makes its VTEP again with it.
#[test]
fn a_claim_made_by_an_older_lease_of_another_node_is_renewed() {
    let mut stale = peer(9);
    stale.attrs.backend_data["VtepMAC"] = mac(1).into();
    stale.created = Some(0);
    let mut h = Harness::new(VXLAN, &[peer(2), stale]);
    h.run_for(Duration::from_millis(100));
    let published = h.keeper.borrow().published.clone();
    assert_eq!(published.len(), 1, "{published:?}");
    let new_mac = published[0].backend_data["VtepMAC"].as_str().unwrap().to_string();
    assert_ne!(new_mac, mac(1));
    h.turn();
    let weft_agent::model::DeviceSpec::Vxlan { mac: device_mac, .. } = h.kernel.borrow().devices["weft.1"].clone()
    else {
        panic!()
    };
    assert_eq!(weft_dataplane::format_mac(&device_mac), new_mac, "the VTEP keeps the old MAC");
    // The renewer wrote it; the watch shows it.
    let mut own = h.own.clone();
    own.attrs = published[0].clone();
    h.put(own.clone());
    h.keeper.borrow_mut().reports.push(Report::Held { lease: own, reacquired: false });
    h.run_for(Duration::from_secs(3));
    let keeper = h.keeper.borrow();
    assert_eq!((keeper.published.len(), keeper.lost), (1, 0), "renewed again, or taken for a loss");
    drop(keeper);
    assert!(h.reaches(2) && h.ready());
    assert_eq!(h.status().lease_reacquired, 0);
}

#[test]
fn host_gw_routes_via_peers_on_the_uplink() {
    let mut gw = peers(&[2, 3]);
    gw.iter_mut().for_each(|p| p.attrs.backend_type = "host-gw".into());
    let mut h = Harness::new(r#"{"Network": "198.19.0.0/16", "Backend": {"Type": "host-gw"}}"#, &gw);
    h.turn();
    assert!(h.ready());
    let k = h.kernel.borrow();
    assert!(k.devices.is_empty());
    assert_eq!(k.routes_of(PEER_ROUTES.protocol), ["198.19.2.0/24", "198.19.3.0/24"]);
    let eth0 = k.links[UPLINK].index;
    assert!(k.routes.iter().all(|(_, r)| r.dev == eth0 && r.via.is_some()));
    assert_eq!(k.subnet_file.as_ref().unwrap().mtu, 1500);
}

/// Leases no node can have, or of another backend: ignored with a warning, never handed to the
/// kernel — one of them held up every other peer's programming and made every node not ready
/// (the kernel refuses an FDB entry for a multicast MAC, a route via a broadcast address).
#[test]
fn leases_the_kernel_would_refuse_are_ignored_and_hold_up_nothing() {
    let mut h = Harness::new(VXLAN, &peers(&[2]));
    h.turn();
    let bad = |i: u8, edit: &dyn Fn(&mut weft_lease::Lease)| {
        let mut l = peer(i);
        edit(&mut l);
        l
    };
    for lease in [
        bad(60, &|l| l.attrs.backend_data["VtepMAC"] = "ff:ff:ff:ff:ff:ff".into()),
        bad(61, &|l| l.attrs.backend_data["VtepMAC"] = "00:00:00:00:00:00".into()),
        bad(62, &|l| l.attrs.backend_data["VtepMAC"] = "01:00:5e:00:00:01".into()),
        bad(63, &|l| l.attrs.backend_data["VtepMAC"] = mac(1).into()),
        bad(64, &|l| l.attrs.public_ip = "198.18.0.255".parse().unwrap()),
        bad(65, &|l| l.attrs.public_ip = "0.0.0.0".parse().unwrap()),
        bad(66, &|l| l.attrs.public_ip = "127.0.0.1".parse().unwrap()),
        bad(67, &|l| l.attrs.public_ip = "224.0.0.1".parse().unwrap()),
        bad(68, &|l| l.attrs.public_ip = "198.19.200.1".parse().unwrap()),
        bad(69, &|l| l.attrs.backend_type = "udp".into()),
    ] {
        h.put(lease);
    }
    h.put(peer(7));
    h.turn();
    assert!(h.ready(), "{:?}", h.status().readiness());
    assert!(h.reaches(2) && h.reaches(7));
    assert_eq!(h.routes(), ["198.19.2.0/24", "198.19.7.0/24"]);
}

/// An object the kernel refuses fails the batch (not ready, retried) but every other peer is
/// still programmed; a route left to another owner counts as no change (a resync warned about
/// it, as drift, every time).
#[test]
fn one_refused_object_holds_up_no_other_peer() {
    let mut h = Harness::new(VXLAN, &peers(&[2, 3, 4]));
    h.kernel.borrow_mut().fail = Some("put neighbour 198.19.3.0".into());
    h.turn();
    assert!(!h.ready());
    assert!(h.reaches(2) && h.reaches(4), "{:?}", h.kernel.borrow().journal);
    h.kernel.borrow_mut().fail = None;
    h.run_for(Duration::from_secs(2));
    assert!(h.ready() && h.reaches(3));

    let kernel = std::rc::Rc::new(std::cell::RefCell::new(KernelState::default()));
    let eth0 = kernel.borrow_mut().add_link(UPLINK, 1500);
    let foreign = Route { dst: "198.19.3.0/24".parse().unwrap(), via: None, dev: eth0, onlink: false, mtu: None };
    kernel.borrow_mut().routes.push((BGP_ROUTES.protocol, foreign));
    let mut fake = FakeKernel(kernel.clone());
    let mut h = Harness::on(VXLAN, &peers(&[3]), kernel);
    h.turn();
    let action = weft_agent::core::Action::Reconcile {
        owner: PEER_ROUTES,
        desired: weft_agent::model::State {
            routes: vec![Route {
                dst: "198.19.3.0/24".parse().unwrap(),
                via: None,
                dev: UPLINK.into(),
                onlink: false,
                mtu: None,
            }],
            ..Default::default()
        },
        devices: vec![],
    };
    let done = weft_agent::exec::execute(&mut fake, &[action]).unwrap();
    assert_eq!((done.added, done.removed), (0, 0));
}

/// A store outage fails the watch and the renewer alike: each failure is logged once, not once
/// per alternation (they reset each other's memory and an outage logged a line every few
/// seconds), and "recovered" once when both are well.
#[test]
fn failures_of_several_sources_are_each_logged_once() {
    let mut h = Harness::new(VXLAN, &peers(&[2]));
    h.turn();
    let lines = logged(|| {
        h.store.borrow_mut().fail = Some("etcd did not answer within 3 s".into());
        for _ in 0..5 {
            h.keeper.borrow_mut().reports.push(Report::Failed("etcd did not answer within 5 s".into()));
            h.turn();
            h.turn();
        }
        h.store.borrow_mut().fail = None;
        h.keeper.borrow_mut().reports.push(Report::Held { lease: h.own.clone(), reacquired: false });
        h.turn();
    });
    let warnings: Vec<&String> = lines.iter().filter(|l| l.starts_with("WARN")).collect();
    assert_eq!(warnings.len(), 2, "{lines:#?}");
    assert_eq!(lines.iter().filter(|l| l.contains("recovered")).count(), 1, "{lines:#?}");
    assert!(h.ready());
}

/// A node switched from one backend (or VNI) to another: the device the old one left behind
/// is removed at start (a udp forwarder on it ends with it); weft's own device is kept and
/// nothing that is not weft's is touched.
#[test]
fn devices_other_backends_left_are_removed() {
    let kernel = Harness::new(VXLAN, &peers(&[2])).kernel.clone();
    for name in ["weft-udp", "weft.7", "weft.1", "weft.x", "eth9"] {
        kernel.borrow_mut().add_link(name, 1500);
    }
    let mut h = Harness::on(VXLAN, &peers(&[2]), kernel.clone());
    h.turn();
    let links: Vec<String> = kernel.borrow().links.keys().cloned().collect();
    for gone in ["weft-udp", "weft.7"] {
        assert!(!links.contains(&gone.to_string()), "{gone} left: {links:?}");
    }
    for kept in ["weft.1", "weft.x", "eth9"] {
        assert!(links.contains(&kept.to_string()), "{kept} removed: {links:?}");
    }
    assert!(h.reaches(2));
}

/// Routed mode's desired state on a node: its own blocks are its lease's and the other leases
/// with its address and an AS (a lease without one is not adopted), written into the subnet
/// file for the pods and followed as blocks come and go; peers are programmed with no route
/// (BGP carries them), and nothing is asked of the kernel for them.
#[test]
fn routed_mode_own_blocks_follow_the_store_into_the_subnet_file() {
    let conf = r#"{"Network": "198.19.0.0/16", "Backend": {"Type": "bgp", "BlockSize": 24}}"#;
    let bgp = |subnet: &str, ip: &str, data: serde_json::Value| weft_lease::Lease {
        subnet: subnet.parse().unwrap(),
        attrs: weft_lease::LeaseAttrs {
            public_ip: ip.parse().unwrap(),
            public_ipv6: None,
            backend_type: "bgp".into(),
            backend_data: data,
        },
        expires: None,
        created: Some(5),
    };
    let extra = bgp("198.19.9.0/24", OWN_IP, serde_json::json!({"AS": 64512, "Node": "n1", "Block": true}));
    let no_as = bgp("198.19.10.0/24", OWN_IP, serde_json::json!({"Node": "n1"}));
    let peer = bgp("198.19.2.0/24", "198.18.0.2", serde_json::json!({"AS": 64512, "Node": "n2"}));
    let mut h = Harness::new(conf, &[extra.clone(), no_as, peer]);
    h.run_for(Duration::from_millis(300));
    assert!(h.ready());
    let blocks = |h: &Harness| h.kernel.borrow().subnet_file.clone().unwrap().routed.unwrap().blocks;
    let names = |b: Vec<ipnet::Ipv4Net>| b.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(names(blocks(&h)), ["198.19.1.0/24", "198.19.9.0/24"]);
    assert_eq!(names(h.agent.core.own_blocks()), ["198.19.1.0/24", "198.19.9.0/24"]);
    assert_eq!(h.status().peers, 1, "the peer is programmed (BGP routes it)");
    assert!(h.kernel.borrow().routes_of(200).is_empty(), "no route for a peer on the segment");
    // A block claimed and one given back reach the subnet file.
    h.put(bgp("198.19.11.0/24", OWN_IP, serde_json::json!({"AS": 64512, "Node": "n1", "Block": true})));
    h.run_for(Duration::from_millis(200));
    assert_eq!(names(blocks(&h)), ["198.19.1.0/24", "198.19.9.0/24", "198.19.11.0/24"]);
    h.remove(extra.subnet);
    h.run_for(Duration::from_millis(200));
    assert_eq!(names(blocks(&h)), ["198.19.1.0/24", "198.19.11.0/24"]);
}
