//! The bridge plugin (with host-local) on the real kernel: ADD / CHECK / DEL, idempotent DEL,
//! DEL without the netns, rollback of a failed ADD, L2-only mode and MAC requests.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};

/// What most tests start from: a node, a container, weft's plugins, an IPAM directory and a
/// bridge name of their own.
struct Env {
    node: Ns,
    cont: Ns,
    dir: Dir,
    data: Dir,
    br: String,
}

impl Env {
    fn new() -> Env {
        Env { node: Ns::new("n"), cont: Ns::new("c"), dir: weft_plugin_dir(), data: Dir::new("ipam"), br: unique("br") }
    }
}

fn conf(bridge: &str, data_dir: &std::path::Path, extra: Value) -> Value {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": "brnet",
        "type": "bridge",
        "bridge": bridge,
        "isDefaultGateway": true,
        "ipMasq": true,
        "hairpinMode": true,
        "mtu": 1400,
        "ipam": {
            "type": "host-local",
            "dataDir": data_dir,
            "ranges": [[{"subnet": "198.19.20.0/24"}], [{"subnet": "fd00:19:20::/64"}]],
            "routes": [{"dst": "198.19.0.0/16"}]
        }
    });
    merge(&mut c, extra);
    c
}

fn merge(a: &mut Value, b: Value) {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        for (k, v) in b {
            a.insert(k, v);
        }
    }
}

fn with_prev(conf: &Value, prev: &Value) -> String {
    let mut c = conf.clone();
    c["prevResult"] = prev.clone();
    c.to_string()
}

#[test]
fn add_check_del_dual_stack() {
    let Env { node, cont, dir, data, br } = Env::new();
    let cfg = conf(&br, data.path(), json!({}));
    let call = Call::new(dir.path(), "ctr1", &cont.path());

    let out = call.run(&node, "bridge", "ADD", &cfg.to_string());
    let result = out.ok().json();
    assert_eq!(result["cniVersion"], "1.0.0");
    let ifaces = result["interfaces"].as_array().unwrap();
    assert_eq!(ifaces.len(), 3);
    assert_eq!(ifaces[0]["name"], br.as_str());
    assert!(ifaces[1]["name"].as_str().unwrap().starts_with("veth"));
    assert_eq!(ifaces[2]["name"], "eth0");
    assert_eq!(ifaces[2]["sandbox"], cont.path());
    assert_eq!(result["ips"][0], json!({"interface": 2, "address": "198.19.20.2/24", "gateway": "198.19.20.1"}));
    assert_eq!(result["ips"][1]["address"], "fd00:19:20::2/64");
    assert_eq!(result["dns"], json!({}));

    // Inside the container: addresses, MTU, routes (cluster route and both defaults).
    assert_eq!(cont.addrs("eth0"), ["198.19.20.2/24", "fd00:19:20::2/64"]);
    assert_eq!(cont.ip_json(&["link", "show", "eth0"])[0]["mtu"], 1400);
    let routes = cont.routes();
    for want in [
        "default via 198.19.20.1 dev eth0",
        "198.19.0.0/16 via 198.19.20.1 dev eth0",
        "default via fd00:19:20::1 dev eth0",
    ] {
        assert!(routes.iter().any(|r| r == want), "missing {want} in {routes:?}");
    }
    // On the node: gateway addresses on the bridge, the veth on it with hairpin, masquerade.
    assert_eq!(node.addrs(&br), ["198.19.20.1/24", "fd00:19:20::1/64"]);
    let veth = ifaces[1]["name"].as_str().unwrap();
    let detail = node.ip_json(&["-d", "link", "show", veth]);
    assert_eq!(detail[0]["master"], br.as_str());
    assert_eq!(detail[0]["linkinfo"]["info_slave_data"]["hairpin"], true);
    assert_eq!(detail[0]["mtu"], 1400);
    let rules = node.nft();
    assert!(rules.contains("masq brnet/ctr1/eth0"), "{rules}");
    assert!(rules.contains("ip saddr 198.19.20.2 ip daddr != 198.19.20.0/24"), "{rules}");
    assert_eq!(node.sh(&["sysctl", "-n", "net.ipv4.ip_forward"]).trim(), "1");
    // The reservation is in the reference format.
    let held = std::fs::read_to_string(data.path().join("brnet/198.19.20.2")).unwrap();
    assert_eq!(held, "ctr1\r\neth0");

    call.run(&node, "bridge", "CHECK", &with_prev(&cfg, &result)).ok();

    call.run(&node, "bridge", "DEL", &with_prev(&cfg, &result)).ok();
    assert!(!cont.links().contains(&"eth0".to_string()));
    assert_retired(&node, veth);
    assert_reaped(&node);
    assert!(!node.links().contains(&veth.to_string()));
    assert_reaped(&cont);
    assert!(reservations(data.path(), "brnet").is_empty());
    assert!(!node.nft().contains("brnet/ctr1"), "rules left: {}", node.nft());
    // DEL again, and DEL without prevResult: still success.
    call.run(&node, "bridge", "DEL", &with_prev(&cfg, &result)).ok();
    call.run(&node, "bridge", "DEL", &cfg.to_string()).ok();
}

#[test]
fn check_notices_missing_pieces() {
    let Env { node, cont, dir, data, br } = Env::new();
    let cfg = conf(&br, data.path(), json!({}));
    let call = Call::new(dir.path(), "ctr1", &cont.path());
    let result = call.run(&node, "bridge", "ADD", &cfg.to_string()).ok().json();
    cont.sh(&["ip", "route", "del", "198.19.0.0/16"]);
    let out = call.run(&node, "bridge", "CHECK", &with_prev(&cfg, &result));
    assert_ne!(out.code, 0, "CHECK passed with a route missing");
    assert!(out.stdout.contains("198.19.0.0/16"), "{out:?}");
    // Without prevResult, CHECK is refused.
    assert_ne!(call.run(&node, "bridge", "CHECK", &cfg.to_string()).code, 0);
    call.run(&node, "bridge", "DEL", &with_prev(&cfg, &result)).ok();
}

#[test]
fn del_with_netns_gone_releases_everything() {
    let Env { node, cont, dir, data, br } = Env::new();
    let cfg = conf(&br, data.path(), json!({}));
    let netns_path = cont.path();
    let call = Call::new(dir.path(), "ctr1", &netns_path);
    let result = call.run(&node, "bridge", "ADD", &cfg.to_string()).ok().json();
    let veth = result["interfaces"][1]["name"].as_str().unwrap().to_string();
    drop(cont); // the container is gone, and its veth pair with it

    // With the cached result, DEL removes the host veth at once.
    call.run(&node, "bridge", "DEL", &with_prev(&cfg, &result)).ok();
    assert!(reservations(data.path(), "brnet").is_empty());
    assert!(!node.nft().contains("brnet/ctr1"), "masquerade leaked: {}", node.nft());
    assert_retired(&node, &veth);
    assert_reaped(&node);
    assert!(!node.links().contains(&veth), "host veth left behind");
    // Without it, too (nothing left to do: a repeated DEL).
    call.run(&node, "bridge", "DEL", &cfg.to_string()).ok();
    // Also with CNI_NETNS empty, as runtimes send it after the sandbox is gone.
    let empty = Call::new(dir.path(), "ctr1", "");
    empty.run(&node, "bridge", "DEL", &cfg.to_string()).ok();
}

#[test]
fn exhausted_range_leaves_nothing_behind() {
    let Env { node, cont: c1, dir, data, br } = Env::new();
    let c2 = Ns::new("c");
    let cfg = conf(
        &br,
        data.path(),
        json!({"ipam": {"type": "host-local", "dataDir": data.path(), "ranges": [[{"subnet": "198.19.21.0/30"}]]}}),
    );
    let first = Call::new(dir.path(), "ctr1", &c1.path()).run(&node, "bridge", "ADD", &cfg.to_string());
    first.ok();
    let links_before = node.links();
    let rules_before = node.nft();

    let failed = Call::new(dir.path(), "ctr2", &c2.path()).run(&node, "bridge", "ADD", &cfg.to_string());
    assert_ne!(failed.code, 0);
    assert!(failed.stdout.contains("no IP addresses available"), "{failed:?}");
    assert_eq!(node.links(), links_before);
    assert_eq!(node.nft(), rules_before);
    assert!(!c2.links().contains(&"eth0".to_string()));
    assert_eq!(reservations(data.path(), "brnet"), ["198.19.21.2"]);
}

#[test]
fn failed_first_add_creates_no_bridge() {
    let Env { node, cont, dir, data, br } = Env::new();
    // A range whose only address is the gateway: nothing to hand out.
    let cfg = conf(
        &br,
        data.path(),
        json!({"ipam": {"type": "host-local", "dataDir": data.path(),
                        "ranges": [[{"subnet": "198.19.22.0/24", "rangeStart": "198.19.22.1", "rangeEnd": "198.19.22.1"}]]}}),
    );
    let before = node.links();
    let out = Call::new(dir.path(), "ctr1", &cont.path()).run(&node, "bridge", "ADD", &cfg.to_string());
    assert_ne!(out.code, 0);
    assert_eq!(node.links(), before, "a failed ADD left links behind");
    assert!(!node.nft().contains("weft-cni") || !node.nft().contains("masq brnet"));
}

#[test]
fn interface_name_taken_changes_nothing() {
    let Env { node, cont, dir, data, br } = Env::new();
    let cfg = conf(&br, data.path(), json!({}));
    let mut call = Call::new(dir.path(), "ctr1", &cont.path());
    call.ifname = "lo".into();
    let out = call.run(&node, "bridge", "ADD", &cfg.to_string());
    assert!(out.stdout.contains("already exists"), "{out:?}");
    assert_eq!(out.error_code(), 999);
    assert!(!node.links().contains(&br), "bridge created although the ADD was refused");
    assert!(reservations(data.path(), "brnet").is_empty());
}

#[test]
fn l2_only_and_requested_mac() {
    let node = Ns::new("n");
    let cont = Ns::new("c");
    let dir = weft_plugin_dir();
    let br = unique("br");
    let cfg = json!({"cniVersion": "1.0.0", "name": "l2", "type": "bridge", "bridge": br, "ipam": {},
                     "runtimeConfig": {"mac": "0a:58:c6:13:00:07"}});
    let call = Call::new(dir.path(), "ctr1", &cont.path());
    let result = call.run(&node, "bridge", "ADD", &cfg.to_string()).ok().json();
    assert!(result.get("ips").is_none(), "{result}");
    assert_eq!(result["interfaces"][2]["mac"], "0a:58:c6:13:00:07");
    assert!(cont.addrs("eth0").is_empty());
    let link = cont.ip_json(&["link", "show", "eth0"]);
    assert_eq!(link[0]["address"], "0a:58:c6:13:00:07");
    assert!(link[0]["flags"].as_array().unwrap().contains(&json!("UP")));
    call.run(&node, "bridge", "DEL", &cfg.to_string()).ok();

    // The MAC through CNI_ARGS.
    let mut call = Call::new(dir.path(), "ctr2", &cont.path());
    call.args = "IgnoreUnknown=1;MAC=0a:58:c6:13:00:08".into();
    let plain = json!({"cniVersion": "1.0.0", "name": "l2", "type": "bridge", "bridge": br, "ipam": {}});
    let result = call.run(&node, "bridge", "ADD", &plain.to_string()).ok().json();
    assert_eq!(result["interfaces"][2]["mac"], "0a:58:c6:13:00:08");
    call.run(&node, "bridge", "DEL", &plain.to_string()).ok();
}

#[test]
fn gc_removes_invalid_attachments() {
    let Env { node, cont: c1, dir, data, br } = Env::new();
    let c2 = Ns::new("c");
    let mut cfg = conf(&br, data.path(), json!({}));
    cfg["cniVersion"] = json!("1.1.0");
    Call::new(dir.path(), "keep", &c1.path()).run(&node, "bridge", "ADD", &cfg.to_string()).ok();
    Call::new(dir.path(), "gone", &c2.path()).run(&node, "bridge", "ADD", &cfg.to_string()).ok();
    let mut gc = cfg.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    Call::new(dir.path(), "", "").run(&node, "bridge", "GC", &gc.to_string()).ok();
    let rules = node.nft();
    assert!(rules.contains("brnet/keep/eth0") && !rules.contains("brnet/gone/eth0"), "{rules}");
    let held: Vec<String> = reservations(data.path(), "brnet")
        .into_iter()
        .map(|ip| std::fs::read_to_string(data.path().join("brnet").join(ip)).unwrap())
        .collect();
    assert_eq!(held, ["keep\r\neth0", "keep\r\neth0"]);
}

#[test]
fn one_reaper_per_namespace_deletes_the_retired_group() {
    let node = Ns::new("n");
    let locks = Dir::new("locks");
    let lock_env = format!("{LOCK_DIR_ENV}={}", locks.path().display());
    // Ten pairs retired the way DEL retires a host veth: down, in the retired group.
    for i in 0..10 {
        let (host, peer) = (format!("rv{i}"), format!("rp{i}"));
        node.sh(&["ip", "link", "add", &host, "type", "veth", "peer", "name", &peer]);
        node.sh(&["ip", "link", "set", "dev", &host, "group", &retired_group()]);
    }
    let weft = weft_bin().display().to_string();
    // While another process holds the namespace's reaper lock, a reaper leaves them be.
    let holder = node
        .handle
        .run(|| {
            weft_plugins::attachment_lock::FileLock::try_take_in(locks.path(), &weft_plugins::teardown::reaper_lock())
        })
        .unwrap()
        .unwrap()
        .expect("the reaper lock was free");
    node.sh(&["env", &lock_env, &weft, "cni", "reap"]);
    assert_eq!(retired_links(&node).len(), 10);
    // The lock is per namespace: a reaper elsewhere is not held back by it.
    let other = Ns::new("o");
    other.sh(&["ip", "link", "add", "rv0", "type", "veth", "peer", "name", "rp0"]);
    other.sh(&["ip", "link", "set", "dev", "rv0", "group", &retired_group()]);
    other.sh(&["env", &lock_env, &weft, "cni", "reap"]);
    assert_eq!(other.links(), ["lo"]);
    // Once it is free, one reaper deletes the group, peers included, and nothing else.
    drop(holder);
    node.sh(&["ip", "link", "add", "keep0", "type", "veth", "peer", "name", "keep1"]);
    node.sh(&["env", &lock_env, &weft, "cni", "reap"]);
    let mut left = node.links();
    left.sort();
    assert_eq!(left, ["keep0", "keep1", "lo"]);
}

/// The bridge keeps the MAC it was created with while ports come and go (flannel #1381: a bridge
/// without its own address takes the lowest port MAC, and neighbours' ARP entries for the
/// gateway go stale).
#[test]
fn the_bridge_mac_does_not_follow_its_ports() {
    let Env { node, cont, dir, data, br } = Env::new();
    let cfgv = conf(&br, data.path(), json!({}));
    let cfg = cfgv.to_string();
    let bridge_mac = || node.ip_json(&["link", "show", &br])[0]["address"].as_str().unwrap().to_string();
    let r1 = Call::new(dir.path(), "mac1", &cont.path()).run(&node, "bridge", "ADD", &cfg).ok().json();
    let mac = bridge_mac();
    assert_eq!(r1["interfaces"][0]["mac"], mac.as_str());
    // A port with a MAC lower than any the bridge could have chosen.
    let veth = r1["interfaces"][1]["name"].as_str().unwrap();
    node.sh(&["ip", "link", "set", veth, "address", "02:00:00:00:00:01"]);
    let cont2 = Ns::new("c");
    let r2 = Call::new(dir.path(), "mac2", &cont2.path()).run(&node, "bridge", "ADD", &cfg).ok().json();
    assert_eq!(bridge_mac(), mac, "the bridge took a port's MAC");
    assert_eq!(r2["interfaces"][0]["mac"], mac.as_str());
    Call::new(dir.path(), "mac1", &cont.path()).run(&node, "bridge", "DEL", &with_prev(&cfgv, &r1)).ok();
    assert_reaped(&node);
    assert_eq!(bridge_mac(), mac, "the bridge's MAC changed when a port left");
}

/// CNI_NETNS naming the node's own namespace (where the plugin runs) is refused before anything
/// is changed: no reservation, no bridge, no renamed link.
#[test]
fn the_plugins_own_namespace_is_refused() {
    let Env { node, cont: _, dir, data, br } = Env::new();
    let cfg = conf(&br, data.path(), json!({})).to_string();
    node.sh(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
    let links = node.links();
    for command in ["ADD", "DEL", "CHECK"] {
        let out = Call::new(dir.path(), "own1", &node.path()).run(&node, "bridge", command, &cfg);
        assert_eq!(out.error_code(), 4, "{command}: {out:?}");
        assert!(out.json()["msg"].as_str().unwrap().contains("namespace the plugin runs in"), "{out:?}");
    }
    assert_eq!(node.links(), links);
    assert!(reservations(data.path(), "brnet").is_empty());
}

/// A DEL whose container's interface has a peer in some other namespace with the index of
/// another pod's host veth: that pod's veth is left alone (the index alone named it before, and
/// the other pod lost its network). Only the container's own interface goes.
#[test]
fn del_never_takes_another_pods_veth_for_its_peer() {
    let Env { node, cont, dir, data, br } = Env::new();
    let cfg = conf(&br, data.path(), json!({})).to_string();
    let victim = Call::new(dir.path(), "victim", &cont.path()).run(&node, "bridge", "ADD", &cfg).ok().json();
    let veth = victim["interfaces"][1]["name"].as_str().unwrap().to_string();
    let index = node.ip_json(&["link", "show", &veth])[0]["ifindex"].as_u64().unwrap().to_string();
    // Elsewhere, a veth with the same index whose peer is the other container's eth0.
    let other = Ns::new("c");
    let elsewhere = Ns::new("x");
    elsewhere.sh(&[
        "ip",
        "link",
        "add",
        "q",
        "index",
        &index,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &other.name,
    ]);
    Call::new(dir.path(), "unrelated", &other.path()).run(&node, "bridge", "DEL", &cfg).ok();
    assert!(!other.links().contains(&"eth0".to_string()), "the DEL's own interface is still there");
    let link = &node.ip_json(&["link", "show", &veth])[0];
    assert!(link["flags"].as_array().unwrap().iter().any(|f| f == "UP"), "the other pod's veth was retired: {link}");
    assert_ne!(link["group"], retired_group().as_str(), "{link}");
    assert!(cont.links().contains(&"eth0".to_string()), "the other pod lost its interface");
}

/// The plugins' lock files are in a directory only root may enter: no other user can take an
/// attachment's lock and stall its ADD or DEL (an abstract socket name, which anyone may bind,
/// allowed that).
#[test]
fn lock_files_are_root_only() {
    use std::os::unix::fs::PermissionsExt;
    let Env { node, cont, dir, data, br } = Env::new();
    let cfg = conf(&br, data.path(), json!({})).to_string();
    Call::new(dir.path(), "lk1", &cont.path()).run(&node, "bridge", "ADD", &cfg).ok();
    let locks = lock_dir_of(dir.path());
    let mode = std::fs::metadata(&locks).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{locks:?}");
    let file = std::fs::read_dir(&locks).unwrap().next().unwrap().unwrap().path();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "flock", "-n"])
        .arg(&file)
        .arg("true")
        .output()
        .unwrap();
    assert!(!out.status.success(), "another user took a lock: {}", String::from_utf8_lossy(&out.stderr));
    Call::new(dir.path(), "lk1", &cont.path()).run(&node, "bridge", "DEL", &cfg).ok();
    assert!(!file.exists(), "DEL left its lock file");
}
