//! ptp, loopback and host-local on their own, on the real kernel.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;

#[test]
fn ptp_add_check_del() {
    let node = Ns::new("n");
    let cont = Ns::new("c");
    let dir = weft_plugin_dir();
    let data = Dir::new("ipam");
    let cfg = json!({
        "cniVersion": "1.0.0", "name": "ptpnet", "type": "ptp", "ipMasq": true, "mtu": 1450,
        "ipam": {"type": "host-local", "dataDir": data.path(), "ranges": [[{"subnet": "198.19.40.0/24"}]],
                 "routes": [{"dst": "0.0.0.0/0"}]}
    });
    let call = Call::new(dir.path(), "p1", &cont.path());
    let result = call.run(&node, "ptp", "ADD", &cfg.to_string()).ok().json();
    let host_veth = result["interfaces"][0]["name"].as_str().unwrap().to_string();
    assert_eq!(result["interfaces"][1]["sandbox"], cont.path());
    assert_eq!(result["ips"][0], json!({"interface": 1, "address": "198.19.40.2/24", "gateway": "198.19.40.1"}));
    assert_eq!(cont.addrs("eth0"), ["198.19.40.2/24"]);
    let routes = cont.routes();
    assert_eq!(
        routes,
        ["198.19.40.0/24 via 198.19.40.1 dev eth0", "198.19.40.1 dev eth0", "default via 198.19.40.1 dev eth0"]
            .iter()
            .map(|s| s.to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
    assert_eq!(node.addrs(&host_veth), ["198.19.40.1/32"]);
    assert!(node.routes().contains(&format!("198.19.40.2 dev {host_veth}")), "{:?}", node.routes());
    // Traffic: the node reaches the container over the host route.
    let _server = TcpServer::start(&cont, "198.19.40.2", 7000, "ptp");
    assert_eq!(tcp_get(&node, "198.19.40.2", 7000).unwrap(), "ptp to 198.19.40.1");

    let mut with_prev = cfg.clone();
    with_prev["prevResult"] = result.clone();
    call.run(&node, "ptp", "CHECK", &with_prev.to_string()).ok();
    call.run(&node, "ptp", "DEL", &with_prev.to_string()).ok();
    assert_retired(&node, &host_veth);
    assert_reaped(&node);
    assert!(!node.links().contains(&host_veth));
    assert!(!node.routes().iter().any(|r| r.starts_with("198.19.40.2 ")), "host route left");
    assert!(reservations(data.path(), "ptpnet").is_empty());
    assert!(!node.nft().contains("ptpnet/p1"));
    call.run(&node, "ptp", "DEL", &with_prev.to_string()).ok();
    drop(cont);
    call.run(&node, "ptp", "DEL", &cfg.to_string()).ok();
}

#[test]
fn loopback_add_check_del() {
    let node = Ns::new("n");
    let cont = Ns::new("c");
    cont.sh(&["ip", "link", "set", "lo", "down"]);
    let dir = weft_plugin_dir();
    let cfg = json!({"cniVersion": "1.0.0", "name": "lo", "type": "loopback"});
    let call = Call::new(dir.path(), "l1", &cont.path());
    let result = call.run(&node, "loopback", "ADD", &cfg.to_string()).ok().json();
    assert_eq!(result["interfaces"][0]["name"], "lo");
    let up = |ns: &Ns| ns.ip_json(&["link", "show", "lo"])[0]["flags"].as_array().unwrap().contains(&json!("UP"));
    assert!(up(&cont));
    call.run(&node, "loopback", "CHECK", &cfg.to_string()).ok();
    call.run(&node, "loopback", "DEL", &cfg.to_string()).ok();
    assert!(!up(&cont));
    call.run(&node, "loopback", "DEL", &cfg.to_string()).ok();
    let gone = Call::new(dir.path(), "l1", "/var/run/netns/does-not-exist");
    gone.run(&node, "loopback", "DEL", &cfg.to_string()).ok();
}

#[test]
fn host_local_requested_ips_routes_and_dns() {
    let node = Ns::new("n");
    let dir = weft_plugin_dir();
    let data = Dir::new("ipam");
    let resolv = data.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 198.18.0.53\nsearch svc.cluster.local cluster.local\noptions ndots:5\n")
        .unwrap();
    let cfg = json!({
        "cniVersion": "1.0.0", "name": "hl", "type": "host-local",
        "ipam": {"type": "host-local", "dataDir": data.path(), "resolvConf": resolv,
                 "ranges": [[{"subnet": "198.19.50.0/24", "rangeStart": "198.19.50.10", "rangeEnd": "198.19.50.20",
                              "gateway": "198.19.50.254"}],
                            [{"subnet": "fd00:50::/64"}]],
                 "routes": [{"dst": "198.19.0.0/16"}, {"dst": "fd00::/8", "gw": "fd00:50::fe"}]}
    });
    let mut call = Call::new(dir.path(), "h1", "/unused");
    call.args = "IgnoreUnknown=1;IP=198.19.50.15".into();
    let result = call.run(&node, "host-local", "ADD", &cfg.to_string()).ok().json();
    assert_eq!(result["ips"][0], json!({"address": "198.19.50.15/24", "gateway": "198.19.50.254"}));
    assert_eq!(result["ips"][1]["address"], "fd00:50::2/64");
    assert_eq!(result["routes"][1], json!({"dst": "fd00::/8", "gw": "fd00:50::fe"}));
    assert_eq!(result["dns"]["nameservers"], json!(["198.18.0.53"]));
    assert_eq!(result["dns"]["search"], json!(["svc.cluster.local", "cluster.local"]));
    assert!(result.get("interfaces").is_none());

    // runtimeConfig.ips, and an address already taken.
    let mut with_ips = cfg.clone();
    with_ips["runtimeConfig"] = json!({"ips": ["198.19.50.15/24"]});
    let taken = Call::new(dir.path(), "h2", "/unused").run(&node, "host-local", "ADD", &with_ips.to_string());
    assert!(taken.stdout.contains("not available"), "{taken:?}");
    with_ips["runtimeConfig"] = json!({"ips": ["198.19.50.16/24"]});
    let r2 = Call::new(dir.path(), "h2", "/unused").run(&node, "host-local", "ADD", &with_ips.to_string()).ok().json();
    assert_eq!(r2["ips"][0]["address"], "198.19.50.16/24");
    // Round robin from the last reservation, inside rangeStart..rangeEnd.
    let r3 = Call::new(dir.path(), "h3", "/unused").run(&node, "host-local", "ADD", &cfg.to_string()).ok().json();
    assert_eq!(r3["ips"][0]["address"], "198.19.50.17/24");
    // A duplicate ADD for the same attachment is refused.
    assert_ne!(Call::new(dir.path(), "h3", "/unused").run(&node, "host-local", "ADD", &cfg.to_string()).code, 0);

    Call::new(dir.path(), "h3", "/unused").run(&node, "host-local", "CHECK", &cfg.to_string()).ok();
    for id in ["h1", "h2", "h3"] {
        Call::new(dir.path(), id, "").run(&node, "host-local", "DEL", &cfg.to_string()).ok();
    }
    assert!(reservations(data.path(), "hl").is_empty());
    assert_ne!(Call::new(dir.path(), "h3", "/unused").run(&node, "host-local", "CHECK", &cfg.to_string()).code, 0);
}

#[test]
fn host_local_is_compatible_with_the_reference_store() {
    if !reference_available() {
        panic!("the reference plugins are needed in {REFERENCE_DIR} (apt-get install containernetworking-plugins)");
    }
    let node = Ns::new("n");
    let weft = weft_plugin_dir();
    let reference = std::path::Path::new(REFERENCE_DIR);
    let data = Dir::new("ipam");
    let cfg = json!({"cniVersion": "1.0.0", "name": "mix", "type": "host-local",
                     "ipam": {"type": "host-local", "dataDir": data.path(), "ranges": [[{"subnet": "198.19.51.0/29"}]]}})
    .to_string();
    // The reference reserves, weft continues round robin after it and releases the reference's
    // reservation; the reference releases weft's.
    let r1 = Call::new(reference, "ref1", "/x").run(&node, "host-local", "ADD", &cfg).ok().json();
    assert_eq!(r1["ips"][0]["address"], "198.19.51.2/29");
    let w1 = Call::new(weft.path(), "weft1", "/x").run(&node, "host-local", "ADD", &cfg).ok().json();
    assert_eq!(w1["ips"][0]["address"], "198.19.51.3/29");
    let r2 = Call::new(reference, "ref2", "/x").run(&node, "host-local", "ADD", &cfg).ok().json();
    assert_eq!(r2["ips"][0]["address"], "198.19.51.4/29");
    Call::new(weft.path(), "ref1", "").run(&node, "host-local", "DEL", &cfg).ok();
    Call::new(reference, "weft1", "").run(&node, "host-local", "DEL", &cfg).ok();
    assert_eq!(reservations(data.path(), "mix"), ["198.19.51.4"]);
    // The lock file is root's alone once weft has used it (the reference makes it 0644: anyone
    // could open it and hold every call up).
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.path().join("mix/lock")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    // weft's index entry is a hard link to the reservation: the reference's DEL removes it too.
    // The reference's own reservations were adopted into the index (weft saw them) and are
    // still held by ref2.
    let index = data.path().join("mix/.weft-index");
    let entries: Vec<String> =
        std::fs::read_dir(&index).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(entries, ["ref2@eth0"], "index entries left behind");
    // ... and never looks like an address to the reference.
    Call::new(weft.path(), "weft2", "/x").run(&node, "host-local", "ADD", &cfg).ok();
    Call::new(reference, "ref2", "").run(&node, "host-local", "DEL", &cfg).ok();
    assert_eq!(std::fs::read_dir(&index).unwrap().count(), 1);
    let r3 = Call::new(reference, "ref3", "/x").run(&node, "host-local", "ADD", &cfg).ok().json();
    assert_eq!(r3["ips"][0]["address"], "198.19.51.6/29");
    Call::new(reference, "weft2", "").run(&node, "host-local", "DEL", &cfg).ok();
    Call::new(reference, "ref3", "").run(&node, "host-local", "DEL", &cfg).ok();
    assert!(reservations(data.path(), "mix").is_empty());
    assert_eq!(std::fs::read_dir(&index).unwrap().count(), 0);

    // A node switched from the reference to weft: an attachment the reference gave an address
    // is refused a second one, as the reference refuses it, and weft's DEL frees it.
    Call::new(reference, "ref4", "/x").run(&node, "host-local", "ADD", &cfg).ok();
    let again = Call::new(weft.path(), "ref4", "/x").run(&node, "host-local", "ADD", &cfg);
    assert_ne!(again.code, 0, "{again:?}");
    assert!(again.json()["msg"].as_str().unwrap().contains("duplicate allocation is not allowed"), "{again:?}");
    assert_eq!(reservations(data.path(), "mix").len(), 1);
    Call::new(weft.path(), "ref4", "").run(&node, "host-local", "DEL", &cfg).ok();
    assert!(reservations(data.path(), "mix").is_empty());
}
