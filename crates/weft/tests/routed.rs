//! The `routed` plugin on the real kernel: Calico's pod shape (a veth, no bridge, /32 routes,
//! proxy ARP, the fixed MAC, 169.254.1.1), rollback, CHECK, DEL with the namespace gone, GC.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};

fn conf(data: &Dir, name: &str) -> Value {
    json!({
        "cniVersion": "1.0.0", "name": name, "type": "routed", "mtu": 1400,
        "ipam": {"type": "host-local", "dataDir": data.path(),
                 "ranges": [[{"subnet": "198.19.60.0/26"}], [{"subnet": "fd00:60::/120"}]],
                 "routes": [{"dst": "198.18.0.0/16"}]}
    })
}

fn neigh(ns: &Ns, dev: &str) -> String {
    ns.sh(&["ip", "neigh", "show", "dev", dev])
}

#[test]
fn routed_pods_are_host_routes_through_their_own_veth() {
    let node = Ns::new("n");
    let (a, b) = (Ns::new("a"), Ns::new("b"));
    let dir = weft_plugin_dir();
    let data = Dir::new("ipam");
    let cfg = conf(&data, "rt");
    let add = |id: &str, ns: &Ns| {
        Call::new(dir.path(), id, &ns.path()).run(&node, "routed", "ADD", &cfg.to_string()).ok().json()
    };
    let ra = add("pa", &a);
    let rb = add("pb", &b);
    assert_eq!(ra["ips"][0], json!({"interface": 1, "address": "198.19.60.2/32", "gateway": "169.254.1.1"}));
    assert_eq!(
        ra["ips"][1],
        json!({"interface": 1, "address": "fd00:60::2/128", "gateway": "fe80::ecee:eeff:feee:eeee"})
    );
    assert_eq!(ra["interfaces"][0]["mac"], "ee:ee:ee:ee:ee:ee");
    let host_a = ra["interfaces"][0]["name"].as_str().unwrap().to_string();
    let host_b = rb["interfaces"][0]["name"].as_str().unwrap().to_string();

    // The pod: host prefixes only, the link-local gateway, a neighbour entry for it.
    assert_eq!(a.addrs("eth0"), ["198.19.60.2/32", "fd00:60::2/128"]);
    let routes = a.sh(&["ip", "route"]);
    for want in [
        "default via 169.254.1.1 dev eth0",
        "169.254.1.1 dev eth0 scope link",
        "198.18.0.0/16 via 169.254.1.1 dev eth0",
    ] {
        assert!(routes.contains(want), "{want:?} missing: {routes}");
    }
    let routes6 = a.sh(&["ip", "-6", "route"]);
    assert!(routes6.contains("default via fe80::ecee:eeff:feee:eeee dev eth0"), "{routes6}");
    let pod_neigh = neigh(&a, "eth0");
    assert!(pod_neigh.contains("169.254.1.1 lladdr ee:ee:ee:ee:ee:ee PERMANENT"), "{pod_neigh}");
    assert_eq!(a.ip_json(&["link", "show", "eth0"])[0]["mtu"], 1400);

    // The host: no address on the veth, the fixed MAC, proxy ARP, a /32 and a /128 of weft's pods.
    let link = node.ip_json(&["-d", "link", "show", &host_a]);
    assert_eq!(link[0]["address"], "ee:ee:ee:ee:ee:ee");
    assert!(node.addrs(&host_a).iter().all(|a| a.starts_with("fe80:")), "{:?}", node.addrs(&host_a));
    assert_eq!(node.sh(&["sysctl", "-n", &format!("net.ipv4.conf.{host_a}.proxy_arp")]).trim(), "1");
    let host_routes = node.sh(&["ip", "route", "show", "proto", "201"]);
    assert!(host_routes.contains(&format!("198.19.60.2 dev {host_a} scope link")), "{host_routes}");
    assert!(host_routes.contains(&format!("198.19.60.3 dev {host_b} scope link")), "{host_routes}");
    let host_routes6 = node.sh(&["ip", "-6", "route", "show", "proto", "201"]);
    assert!(host_routes6.contains(&format!("fd00:60::2 dev {host_a}")), "{host_routes6}");
    assert!(neigh(&node, &host_a).contains("198.19.60.2 lladdr"), "{}", neigh(&node, &host_a));

    // Pod to pod through the node, both families; the node to a pod.
    node.sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let server = TcpServer::start(&b, "198.19.60.3", 7000, "routed");
    assert_eq!(tcp_get(&a, "198.19.60.3", 7000).unwrap(), "routed to 198.19.60.2");
    let server6 = TcpServer::start(&b, "fd00:60::3", 7000, "routed");
    assert_eq!(tcp_get(&a, "fd00:60::3", 7000).unwrap(), "routed to fd00:60::2");

    // Proxy ARP answers for the gateway when the pod's entry is gone (the node needs a route
    // to it elsewhere, as a node's default route is).
    node.sh(&["ip", "link", "add", "other0", "up", "type", "veth", "peer", "name", "other1"]);
    node.sh(&["ip", "route", "add", "169.254.0.0/16", "dev", "other0"]);
    a.sh(&["ip", "neigh", "del", "169.254.1.1", "dev", "eth0"]);
    assert_eq!(tcp_get(&a, "198.19.60.3", 7000).unwrap(), "routed to 198.19.60.2");
    // The node (with an address of its own, as a node has) reaches a pod.
    node.sh(&["ip", "addr", "add", "198.18.60.1/24", "dev", "other0"]);
    let _server_a = TcpServer::start(&a, "198.19.60.2", 7000, "pod a");
    assert_eq!(tcp_get(&node, "198.19.60.2", 7000).unwrap(), "pod a to 198.18.60.1");
    let learned = neigh(&a, "eth0");
    let entry = learned.lines().find(|l| l.starts_with("169.254.1.1 ")).unwrap_or_default();
    assert!(entry.contains("lladdr ee:ee:ee:ee:ee:ee") && !entry.contains("PERMANENT"), "{learned}");

    // CHECK: good, then each thing it looks at broken in turn.
    let mut with_prev = cfg.clone();
    with_prev["prevResult"] = ra.clone();
    let check = || Call::new(dir.path(), "pa", &a.path()).run(&node, "routed", "CHECK", &with_prev.to_string());
    check().ok();
    node.sh(&["sysctl", "-qw", &format!("net.ipv4.conf.{host_a}.proxy_arp=0")]);
    assert!(check().stdout.contains("proxy ARP is off"), "{:?}", check());
    node.sh(&["sysctl", "-qw", &format!("net.ipv4.conf.{host_a}.proxy_arp=1")]);
    node.sh(&["ip", "route", "del", "198.19.60.2/32"]);
    assert!(check().stdout.contains("host route to 198.19.60.2 missing"), "{:?}", check());
    a.sh(&["ip", "route", "del", "default"]);
    assert!(check().stdout.contains("route to 0.0.0.0/0 is missing"), "{:?}", check());

    // DEL: the veth, its routes and the reservation go; twice is fine.
    Call::new(dir.path(), "pa", &a.path()).run(&node, "routed", "DEL", &with_prev.to_string()).ok();
    Call::new(dir.path(), "pa", &a.path()).run(&node, "routed", "DEL", &with_prev.to_string()).ok();
    assert_retired(&node, &host_a);
    assert!(!node.sh(&["ip", "route", "show", "proto", "201"]).contains(&host_a));
    // DEL with the namespace gone: the reservation is still released.
    let b_path = b.path();
    drop((server, server6, b)); // their sockets would keep the namespace alive

    Call::new(dir.path(), "pb", &b_path).run(&node, "routed", "DEL", &cfg.to_string()).ok();
    assert!(reservations(data.path(), "rt").is_empty(), "{:?}", reservations(data.path(), "rt"));
    eventually("pod routes gone", || node.sh(&["ip", "route", "show", "proto", "201"]).trim().is_empty());
    assert_reaped(&node);
    // GC with nothing valid leaves nothing.
    let mut gc = cfg.clone();
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([]);
    Call::new(dir.path(), "", "").run(&node, "routed", "GC", &gc.to_string()).ok();
}

#[test]
fn a_failed_routed_add_leaves_nothing() {
    let node = Ns::new("n");
    let pod = Ns::new("p");
    let dir = weft_plugin_dir();
    let data = Dir::new("ipam");
    let cfg = conf(&data, "rtfail");
    let links_before = node.links();
    // The address the pod would get is routed elsewhere on the node already: refused after
    // the veth and the reservation were made, and both are undone.
    node.sh(&["ip", "link", "add", "other0", "up", "type", "veth", "peer", "name", "other1"]);
    node.sh(&["ip", "route", "add", "198.19.60.2/32", "dev", "other0", "proto", "201"]);
    let out = Call::new(dir.path(), "p1", &pod.path()).run(&node, "routed", "ADD", &cfg.to_string());
    assert_ne!(out.code, 0);
    assert!(out.stdout.contains("another route to 198.19.60.2"), "{out:?}");
    assert!(reservations(data.path(), "rtfail").is_empty(), "reservation left");
    assert_eq!(pod.links(), ["lo"], "a link left in the pod");
    let mut now = node.links();
    now.retain(|l| l != "other0" && l != "other1");
    assert_eq!(now, links_before, "a veth left on the node");
    // Refused before anything is made: no IPAM, a bad MTU, the interface name taken.
    let mut no_ipam = cfg.clone();
    no_ipam.as_object_mut().unwrap().remove("ipam");
    let out = Call::new(dir.path(), "p1", &pod.path()).run(&node, "routed", "ADD", &no_ipam.to_string());
    assert!(out.stdout.contains("routed needs an IPAM plugin"), "{out:?}");
    let mut bad_mtu = cfg.clone();
    bad_mtu["mtu"] = json!(20);
    let out = Call::new(dir.path(), "p1", &pod.path()).run(&node, "routed", "ADD", &bad_mtu.to_string());
    assert!(out.stdout.contains("out of range"), "{out:?}");
    pod.sh(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"]);
    let out = Call::new(dir.path(), "p1", &pod.path()).run(&node, "routed", "ADD", &cfg.to_string());
    assert!(out.stdout.contains("already exists"), "{out:?}");
    assert!(reservations(data.path(), "rtfail").is_empty());
}

/// A node agent in `ns`, killed when dropped.
struct AgentProcess(std::process::Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Routed mode across subnets (CrossSubnet): two nodes on different subnets behind a router
/// mesh over BGP through it, reach each other's blocks through the VXLAN fallback (the BGP
/// next hop is not on their segment), and their pods talk.
#[test]
fn cross_subnet_nodes_reach_each_other_through_vxlan() {
    let router = Ns::new("r");
    let (a, b) = (Ns::new("a"), Ns::new("b"));
    for (node, side, net) in [(&a, "ra", "61"), (&b, "rb", "62")] {
        router.sh(&["ip", "link", "add", side, "type", "veth", "peer", "name", "eth0", "netns", &node.name]);
        router.sh(&["ip", "addr", "add", &format!("198.18.{net}.1/24"), "dev", side]);
        router.sh(&["ip", "link", "set", side, "up"]);
        node.sh(&["ip", "addr", "add", &format!("198.18.{net}.2/24"), "dev", "eth0"]);
        node.sh(&["ip", "link", "set", "eth0", "up"]);
        node.sh(&["ip", "route", "add", "default", "via", &format!("198.18.{net}.1")]);
    }
    router.sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let dir = Dir::new("xs");
    let conf = dir.path().join("net-conf.json");
    std::fs::write(&conf, r#"{"Network": "198.19.0.0/16", "Backend": {"Type": "bgp", "CrossSubnet": true}}"#).unwrap();
    let plugins = weft_plugin_dir();
    let mut agents = Vec::new();
    for (node, name) in [(&a, "a"), (&b, "b")] {
        let state = dir.path().join(name);
        std::fs::create_dir_all(&state).unwrap();
        let log = std::fs::File::create(state.join("agent.log")).unwrap();
        let mut cmd = std::process::Command::new(weft_bin());
        cmd.args(["agent", "--iface", "eth0", "--node-name", name, "--store"])
            .arg(dir.path().join("store"))
            .arg("--net-conf")
            .arg(&conf)
            .arg("--state-dir")
            .arg(&state)
            .arg("--subnet-file")
            .arg(state.join("subnet.env"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        agents.push(AgentProcess(node.handle.run(|| cmd.spawn()).unwrap().unwrap()));
    }
    let log = |name: &str| std::fs::read_to_string(dir.path().join(name).join("agent.log")).unwrap_or_default();
    let pod = |node: &Ns, name: &str, id: &str, pod_ns: &Ns| {
        let state = dir.path().join(name);
        let subnet_file = state.join("subnet.env");
        eventually("the agent wrote its subnet file", || subnet_file.exists());
        let cfg = json!({"cniVersion": "1.0.0", "name": "xs", "type": "weft", "subnetFile": subnet_file,
                         "dataDir": state.join("cni")});
        Call::new(plugins.path(), id, &pod_ns.path()).run(node, "weft", "ADD", &cfg.to_string()).ok().json()
    };
    let (pa, pb) = (Ns::new("pa"), Ns::new("pb"));
    let ra = pod(&a, "a", "xa", &pa);
    let rb = pod(&b, "b", "xb", &pb);
    assert_eq!(pa.ip_json(&["link", "show", "eth0"])[0]["mtu"], 1450, "pods lose VXLAN's 50 bytes");
    let addr = |r: &Value| r["ips"][0]["address"].as_str().unwrap().trim_end_matches("/32").to_string();
    let (a_ip, b_ip) = (addr(&ra), addr(&rb));
    // Each node routes the other's block through its VTEP, onlink via the block's .0.
    let start = std::time::Instant::now();
    while !a.sh(&["ip", "route", "show", "proto", "200"]).contains("dev weft.1 onlink") {
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "no VXLAN route on a:\n{}", log("a"));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _server = TcpServer::start(&pb, &b_ip, 7100, "across");
    let got = (0..50).find_map(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        tcp_get(&pa, &b_ip, 7100).ok()
    });
    assert_eq!(got.as_deref(), Some(format!("across to {a_ip}").as_str()), "a:\n{}\nb:\n{}", log("a"), log("b"));
    // The session runs through the router; its next hop (b's address) is not on a's segment,
    // so the learned route is not in the kernel: the VXLAN route carries the block.
    let status = || {
        let out = std::process::Command::new(weft_bin())
            .args(["bgp", "status", "--json", "--socket"])
            .arg(dir.path().join("a").join("bgp.sock"))
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null)
    };
    eventually("a's session with b established", || status()["neighbors"][0]["state"] == "Established");
    assert!(a.sh(&["ip", "route", "show", "proto", "202"]).trim().is_empty());
    drop(agents);
}

/// One routed node's lifetime of blocks, on a network of four /28 blocks: the node claims a
/// block ahead of demand as pods come, every address of the network is used, the next pod gets
/// a clear error and nothing half-made; pods gone, the emptied blocks are given back (but the
/// first).
#[test]
fn blocks_are_claimed_ahead_used_up_and_given_back() {
    let node = Ns::new("n");
    node.sh(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
    node.sh(&["ip", "addr", "add", "198.18.63.1/24", "dev", "eth0"]);
    node.sh(&["ip", "link", "set", "eth0", "up"]);
    let dir = Dir::new("blocks");
    let conf = dir.path().join("net-conf.json");
    std::fs::write(
        &conf,
        r#"{"Network": "198.19.63.0/26", "Backend": {"Type": "bgp", "BlockSize": 28, "BlockReleaseSeconds": 1}}"#,
    )
    .unwrap();
    let subnet_file = dir.path().join("subnet.env");
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let mut cmd = std::process::Command::new(weft_bin());
    cmd.args(["agent", "--iface", "eth0", "--node-name", "n", "--store"])
        .arg(dir.path().join("store"))
        .arg("--net-conf")
        .arg(&conf)
        .arg("--state-dir")
        .arg(dir.path())
        .arg("--subnet-file")
        .arg(&subnet_file)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let _agent = AgentProcess(node.handle.run(|| cmd.spawn()).unwrap().unwrap());
    eventually("the agent wrote its subnet file", || subnet_file.exists());
    let blocks = || weft_netconf::SubnetEnv::read(&subnet_file).unwrap().routed.unwrap().blocks.len();
    assert_eq!(blocks(), 1);
    let plugins = weft_plugin_dir();
    let cfg = json!({"cniVersion": "1.0.0", "name": "bl", "type": "weft", "subnetFile": subnet_file,
                     "dataDir": dir.path().join("cni")})
    .to_string();
    let mut pods = Vec::new();
    let add = |id: &str, pod: &Ns| -> Outcome {
        // "Full, try again" (11) while the agent claims the next block.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let out = Call::new(plugins.path(), id, &pod.path()).run(&node, "weft", "ADD", &cfg);
            if out.code == 0 || out.error_code() != 11 || std::time::Instant::now() > deadline {
                return out;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    // Fifteen addresses a block (its .0 is never a pod's); four blocks: sixty pods.
    for i in 0..60 {
        let pod = Ns::new("p");
        let out = add(&format!("p{i}"), &pod);
        assert_eq!(out.code, 0, "pod {i}: {out:?}");
        if i == 9 {
            eventually("a second block claimed ahead of demand", || blocks() >= 2);
        }
        pods.push(pod);
    }
    eventually("every block held", || blocks() == 4);
    // The store loses a block its pods still use (an entry deleted, an old backup restored):
    // the agent takes it back.
    let store = || weft_lease::file::FileStore::open(dir.path().join("store")).unwrap();
    let lost = weft_netconf::SubnetEnv::read(&subnet_file).unwrap().routed.unwrap().blocks[2];
    weft_lease::LeaseStore::delete(&store(), &lost).unwrap();
    eventually("the lost block taken back", || {
        weft_lease::LeaseStore::list(&store(), std::time::SystemTime::now()).unwrap().iter().any(|l| l.subnet == lost)
    });
    eventually("every block held again", || blocks() == 4);
    // (Taken back as such: a claim ahead of demand could land on it too, the one free block.)
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(log.contains(&format!("took block {lost} back")), "{log}");
    let links_before = node.links();
    let extra = Ns::new("p");
    let out = add("p60", &extra);
    assert_ne!(out.code, 0);
    assert!(out.stdout.contains("is exhausted"), "{out:?}");
    assert_eq!(extra.links(), ["lo"], "nothing made in the pod");
    assert_eq!(node.links(), links_before, "nothing made on the node");
    assert_eq!(reservations(&dir.path().join("ipam"), "bl").len(), 60);
    // Every pod gone: all blocks but the first are given back (empty a second, then out of
    // the subnet file for a few seconds, then released).
    for (i, pod) in pods.iter().enumerate() {
        Call::new(plugins.path(), &format!("p{i}"), &pod.path()).run(&node, "weft", "DEL", &cfg).ok();
    }
    let start = std::time::Instant::now();
    let held = || {
        let store = weft_lease::file::FileStore::open(dir.path().join("store")).unwrap();
        store.list(std::time::SystemTime::now()).unwrap().len()
    };
    while blocks() > 1 || held() > 1 {
        assert!(start.elapsed() < std::time::Duration::from_secs(15), "blocks not given back: {}", blocks());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    eventually("one blackhole left", || node.sh(&["ip", "route", "show", "proto", "203"]).lines().count() == 1);
}
