//! The lab with real agents: every pod reaches every other; each node holds exactly one route,
//! FDB entry and neighbour per peer; joins, MAC changes and leaves reach every node within a
//! second; bad leases are never programmed; a VTEP deleted by hand comes back; an agent killed
//! and restarted loses no packet and leaves no duplicate.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use serde_json::{json, Value};
use weft_lease::file::FileStore;
use weft_lease::{Lease, LeaseAttrs};

/// A lab removed (`weft lab down`) when dropped.
struct TestLab {
    name: String,
}

impl TestLab {
    fn up(backend: &str, nodes: usize, pods: usize) -> TestLab {
        Self::up_with(&["--backend", backend, "--nodes", &nodes.to_string(), "--pods", &pods.to_string()])
    }

    /// `weft lab up --name UNIQUE ARGS...`, which must succeed.
    fn up_with(args: &[&str]) -> TestLab {
        require_root();
        let lab = TestLab { name: unique("lab") };
        let out = Command::new(weft_bin()).args(["lab", "up", "--name", &lab.name]).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "lab up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    fn weft(&self, args: &[&str]) -> std::process::Output {
        let mut argv = vec!["lab"];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["--name", &self.name]);
        Command::new(weft_bin()).args(&argv).output().unwrap()
    }

    /// `weft lab check`, which must pass (its output shown when it does not).
    fn check_ok(&self) {
        let out = self.weft(&["check"]);
        assert!(
            out.status.success(),
            "lab check failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn show(&self) -> Value {
        let out = self.weft(&["show", "--json"]);
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn store(&self) -> FileStore {
        FileStore::open(self.show()["store"]["endpoint"].as_str().unwrap()).unwrap()
    }

    fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.name)
    }

    fn ip(&self, node: &str, args: &[&str]) -> Value {
        let out = Command::new(args[0]).args(["-n", &self.ns(node), "-j"]).args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text }).unwrap()
    }

    /// (routes proto weft, FDB entries with a remote, permanent neighbours) on a node's VTEP.
    fn peer_state(&self, node: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
        let routes = self.ip(node, &["ip", "route", "show", "proto", "200"]);
        let mut routes: Vec<String> = routes
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                format!(
                    "{} via {} dev {}",
                    r["dst"].as_str().unwrap(),
                    r["gateway"].as_str().unwrap_or("-"),
                    r["dev"].as_str().unwrap()
                )
            })
            .collect();
        routes.sort();
        let has_vtep =
            self.ip(node, &["ip", "link", "show"]).as_array().unwrap().iter().any(|l| l["ifname"] == "weft.1");
        if !has_vtep {
            return (routes, vec![], vec![]);
        }
        let mut fdb: Vec<String> = self
            .ip(node, &["bridge", "fdb", "show", "dev", "weft.1"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e.get("dst").is_some())
            .map(|e| format!("{} dst {}", e["mac"].as_str().unwrap(), e["dst"].as_str().unwrap()))
            .collect();
        fdb.sort();
        let mut neigh: Vec<String> = self
            .ip(node, &["ip", "neigh", "show", "dev", "weft.1", "nud", "permanent"])
            .as_array()
            .unwrap()
            .iter()
            .map(|n| format!("{} lladdr {}", n["dst"].as_str().unwrap(), n["lladdr"].as_str().unwrap()))
            .collect();
        neigh.sort();
        (routes, fdb, neigh)
    }

    /// What every node should hold for its peers, from the store.
    fn expected(&self, node: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
        let show = self.show();
        let own = show["nodes"].as_array().unwrap().iter().find(|n| n["name"] == node).unwrap()["subnet"]
            .as_str()
            .unwrap()
            .to_string();
        let mut out = (vec![], vec![], vec![]);
        for lease in self.store().list(SystemTime::now()).unwrap() {
            if lease.subnet.to_string() == own {
                continue;
            }
            let gw = lease.subnet.network();
            let mac = lease.vxlan().unwrap().vtep_mac;
            out.0.push(format!("{} via {gw} dev weft.1", lease.subnet));
            out.1.push(format!("{mac} dst {}", lease.attrs.public_ip));
            out.2.push(format!("{gw} lladdr {mac}"));
        }
        out.0.sort();
        out.1.sort();
        out.2.sort();
        out
    }

    fn nodes(&self) -> Vec<String> {
        self.show()["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap().to_string()).collect()
    }

    /// The udp forwarder's status on `node` (Null when none answers).
    fn forwarder(&self, node: &str) -> Value {
        let socket = std::path::PathBuf::from(format!("/run/weft-lab/{}/{node}/udp-forwarder.sock", self.name));
        weft_udp::forwarder::ask(&socket, &json!({"op": "status"})).unwrap_or(Value::Null)
    }

    /// The udp forwarder's table on `node`: "subnet -> ip", sorted (none without a forwarder).
    fn forwarder_peers(&self, node: &str) -> Vec<String> {
        let mut peers: Vec<String> = self.forwarder(node)["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| format!("{} -> {}", p["subnet"].as_str().unwrap(), p["ip"].as_str().unwrap()))
            .collect();
        peers.sort();
        peers
    }

    fn agent_pid(&self, node: &str) -> i32 {
        let show = self.show();
        show["nodes"].as_array().unwrap().iter().find(|n| n["name"] == node).unwrap()["agent_pid"].as_i64().unwrap()
            as i32
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = self.weft(&["down"]);
    }
}

fn within(limit: Duration, what: &str, cond: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

fn peer_lease(subnet: &str, ip: &str, mac: &str) -> Lease {
    Lease {
        subnet: subnet.parse().unwrap(),
        attrs: LeaseAttrs {
            public_ip: ip.parse().unwrap(),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: json!({"VNI": 1, "VtepMAC": mac}),
        },
        expires: None,
        created: None,
    }
}

#[test]
fn vxlan_lab_programs_every_peer_and_follows_the_store() {
    let lab = TestLab::up("vxlan", 3, 2);
    lab.check_ok();
    let nodes = lab.nodes();
    for node in &nodes {
        let state = lab.peer_state(node);
        assert_eq!(state.0.len(), 2, "{node}: {state:?}");
        assert_eq!(state, lab.expected(node), "{node}");
    }

    // A node joins: every node has it within a second.
    let store = lab.store();
    store.put_lease(&peer_lease("198.19.250.0/24", "198.18.0.99", "0a:00:00:00:00:99")).unwrap();
    let took = within(Duration::from_secs(1), "the new peer everywhere", || {
        nodes.iter().all(|n| lab.peer_state(n).1.contains(&"0a:00:00:00:00:99 dst 198.18.0.99".to_string()))
    });
    eprintln!("join programmed on every node in {took:?}");
    for node in &nodes {
        assert_eq!(lab.peer_state(node), lab.expected(node), "{node} after the join");
    }
    // Its VTEP MAC changes: the old FDB entry goes, nothing stale is left.
    store.put_lease(&peer_lease("198.19.250.0/24", "198.18.0.99", "0a:00:00:00:00:98")).unwrap();
    within(Duration::from_secs(1), "the new MAC everywhere", || {
        nodes.iter().all(|n| {
            let fdb = lab.peer_state(n).1;
            fdb.contains(&"0a:00:00:00:00:98 dst 198.18.0.99".to_string())
                && !fdb.iter().any(|e| e.starts_with("0a:00:00:00:00:99"))
        })
    });
    for node in &nodes {
        assert_eq!(lab.peer_state(node), lab.expected(node), "{node} after the MAC change");
    }
    // It leaves.
    store.delete(&"198.19.250.0/24".parse().unwrap()).unwrap();
    within(Duration::from_secs(1), "the peer gone everywhere", || nodes.iter().all(|n| lab.peer_state(n).0.len() == 2));
    for node in &nodes {
        assert_eq!(lab.peer_state(node), lab.expected(node), "{node} after the leave");
    }

    // Bad leases are never programmed: outside the network, not a node-sized subnet.
    store.put_lease(&peer_lease("10.99.0.0/24", "198.18.0.97", "0a:00:00:00:00:97")).unwrap();
    // Half of node1's own subnet: overlapping it (and not a node-sized subnet).
    let node1_subnet: ipnet::Ipv4Net = lab.show()["nodes"][0]["subnet"].as_str().unwrap().parse().unwrap();
    let overlapping = ipnet::Ipv4Net::new(node1_subnet.network(), 25).unwrap();
    store.put_lease(&peer_lease(&overlapping.to_string(), "198.18.0.96", "0a:00:00:00:00:96")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for node in &nodes {
        let (routes, fdb, _) = lab.peer_state(node);
        assert_eq!(routes.len(), 2, "{node} programmed a bad lease: {routes:?}");
        assert!(!fdb.iter().any(|e| e.contains("198.18.0.97") || e.contains("198.18.0.96")));
    }
    let log = std::fs::read_to_string(format!("/run/weft-lab/{}/node1/agent.log", lab.name)).unwrap();
    assert!(log.contains("ignoring peer 198.18.0.97") && log.contains("ignoring peer 198.18.0.96"), "{log}");
    store.delete(&"10.99.0.0/24".parse().unwrap()).unwrap();
    store.delete(&overlapping).unwrap();

    // The VTEP deleted by hand is back with every peer.
    let before = lab.peer_state("node2");
    let out = Command::new("ip").args(["-n", &lab.ns("node2"), "link", "del", "weft.1"]).output().unwrap();
    assert!(out.status.success());
    // Within a second: the agent's link watch noticed (its periodic resync is every 2 s).
    within(Duration::from_secs(1), "the VTEP and its peers back", || lab.peer_state("node2") == before);
    lab.check_ok();
}

#[test]
fn agent_restart_loses_no_packet() {
    restart_loses_no_packet("vxlan", nix::sys::signal::Signal::SIGKILL);
}

/// The same on `udp`, whose packets go through the forwarder: it is a process of its own that
/// the agent's death does not stop.
#[test]
fn udp_agent_restart_loses_no_packet() {
    restart_loses_no_packet("udp", nix::sys::signal::Signal::SIGKILL);
}

/// Both nodes' agents SIGKILLed (and started again by the lab's supervisor) while a pod sends
/// numbered datagrams to a pod on the other node: none lost, and the kernel (and forwarder)
/// state is what it was.
fn restart_loses_no_packet(backend: &str, signal: nix::sys::signal::Signal) {
    let lab = TestLab::up(backend, 2, 1);
    let show = lab.show();
    let pods = show["pods"].as_array().unwrap();
    let (a, b) = (&pods[0], &pods[1]);
    assert_ne!(a["node"], b["node"]);
    let ns_a = weft_netns::NetNs::open(weft_netns::named_path(a["namespace"].as_str().unwrap())).unwrap();
    let ns_b = weft_netns::NetNs::open(weft_netns::named_path(b["namespace"].as_str().unwrap())).unwrap();
    let b_addr = format!("{}:9999", b["address"].as_str().unwrap());
    let receiver = ns_b.run(|| UdpSocket::bind(&b_addr)).unwrap().unwrap();
    receiver.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let sender = ns_a.run(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    let state = |n: &String| (lab.peer_state(n), lab.forwarder_peers(n), lab.routed_state(n));
    let before: Vec<_> = lab.nodes().iter().map(state).collect();
    let pids: Vec<i32> = lab.nodes().iter().map(|n| lab.agent_pid(n)).collect();

    const N: u32 = 2000;
    let recv = std::thread::spawn(move || {
        let mut seen = vec![false; N as usize];
        let mut buf = [0u8; 64];
        while let Ok(n) = receiver.recv(&mut buf) {
            if n == 4 {
                let i = u32::from_be_bytes(buf[..4].try_into().unwrap());
                seen[i as usize] = true;
            }
        }
        seen.iter().filter(|s| !**s).count()
    });
    for i in 0..N {
        if i == 300 {
            for pid in &pids {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), signal).unwrap();
            }
        }
        sender.send_to(&i.to_be_bytes(), &b_addr).unwrap();
        std::thread::sleep(Duration::from_micros(1000));
    }
    let lost = recv.join().unwrap();
    eprintln!("{backend}: {lost} of {N} datagrams lost while both agents were stopped ({signal}) and restarted");
    assert_eq!(lost, 0, "{lost} of {N} datagrams lost while the agents restarted");
    // The agents came back (new pids), and the kernel holds exactly what it held before.
    within(Duration::from_secs(3), "agents restarted", || {
        lab.nodes().iter().zip(&pids).all(|(n, p)| lab.agent_pid(n) != *p)
    });
    std::thread::sleep(Duration::from_millis(500));
    let after: Vec<_> = lab.nodes().iter().map(state).collect();
    assert_eq!(after, before, "kernel objects changed across the restart");
}

/// `GET path` on the agent's health listener inside a node: (status line, body). An agent not
/// listening (yet: just restarted) answers "no answer: ..." with no body, so that a test can wait
/// for it.
fn http_get(lab: &TestLab, node: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let ns = weft_netns::NetNs::open(weft_netns::named_path(&lab.ns(node))).unwrap();
    let text = ns
        .run(|| {
            let mut conn = match std::net::TcpStream::connect("127.0.0.1:9901") {
                Ok(conn) => conn,
                Err(e) => return format!("no answer: {e}\r\n\r\n"),
            };
            write!(conn, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
            let mut text = String::new();
            conn.read_to_string(&mut text).unwrap();
            text
        })
        .unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[test]
fn agent_health_rules_and_lost_lease() {
    let lab = TestLab::up("vxlan", 2, 1);
    assert_eq!(http_get(&lab, "node1", "/healthz").0, "HTTP/1.0 200 OK");
    assert_eq!(http_get(&lab, "node1", "/readyz").0, "HTTP/1.0 200 OK");
    let (_, metrics) = http_get(&lab, "node1", "/metrics");
    for line in ["weft_ready 1", "weft_peers 1", "weft_leases 2"] {
        assert!(metrics.lines().any(|l| l == line), "{line} not in\n{metrics}");
    }
    // The masquerade and forward rules, in weft's own table.
    let rules = Command::new("ip")
        .args(["netns", "exec", &lab.ns("node1"), "nft", "list", "table", "ip", "weft-agent"])
        .output()
        .unwrap();
    assert!(rules.status.success());
    let text = String::from_utf8_lossy(&rules.stdout);
    assert!(text.contains("ip saddr 198.19.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random"), "{text}");
    assert!(
        text.contains("ip saddr 198.19.0.0/16 accept") && text.contains("meta mark & 0x00004000 == 0x00004000 return"),
        "{text}"
    );

    // node1's own lease disappears from the store: the agent takes it again (same subnet), and
    // the pods never notice.
    let show = lab.show();
    let subnet: ipnet::Ipv4Net = show["nodes"][0]["subnet"].as_str().unwrap().parse().unwrap();
    lab.store().delete(&subnet).unwrap();
    within(Duration::from_secs(2), "the lease taken again", || {
        lab.store().list(SystemTime::now()).unwrap().iter().any(|l| l.subnet == subnet)
    });
    lab.check_ok();
    // The renewer reports to the loop on its next tick.
    within(Duration::from_secs(1), "the lost lease counted", || {
        http_get(&lab, "node1", "/metrics").1.contains("weft_lease_reacquired_total 1")
    });

    // `up` again is a no-op; `down` twice is fine.
    let again = lab.weft(&["up"]);
    assert!(again.status.success() && String::from_utf8_lossy(&again.stdout).contains("already up"));
    assert!(lab.weft(&["down"]).status.success());
    assert!(lab.weft(&["down"]).status.success());
    assert!(!weft_netns::exists(&lab.ns("node1")));
}

#[test]
fn vxlan_direct_routing_and_lease_expiry() {
    let lab = TestLab::up_with(&["--nodes", "2", "--pods", "1", "--direct-routing"]);
    lab.check_ok();
    let show = lab.show();
    let peer = &show["nodes"][1];
    let (routes, fdb, _) = lab.peer_state("node1");
    // Same L2 segment: a plain route via the peer's address, nothing through the VTEP.
    assert_eq!(
        routes,
        vec![format!("{} via {} dev eth0", peer["subnet"].as_str().unwrap(), peer["address"].as_str().unwrap())]
    );
    assert!(fdb.is_empty(), "{fdb:?}");

    // A lease that nobody renews is removed everywhere when it expires.
    let mut expiring = peer_lease("198.19.240.0/24", "198.18.0.98", "0a:00:00:00:00:aa");
    expiring.expires = Some(SystemTime::now() + Duration::from_secs(2));
    lab.store().put_lease(&expiring).unwrap();
    within(Duration::from_secs(1), "the expiring peer programmed", || lab.peer_state("node1").0.len() == 2);
    within(Duration::from_secs(4), "the expired peer removed", || lab.peer_state("node1").0.len() == 1);
}

#[test]
fn host_gw_lab_routes_via_peers() {
    let lab = TestLab::up("host-gw", 3, 1);
    lab.check_ok();
    let show = lab.show();
    for node in show["nodes"].as_array().unwrap() {
        let name = node["name"].as_str().unwrap();
        let (routes, fdb, neigh) = lab.peer_state(name);
        let mut want: Vec<String> = show["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["name"] != name)
            .map(|n| format!("{} via {} dev eth0", n["subnet"].as_str().unwrap(), n["address"].as_str().unwrap()))
            .collect();
        want.sort();
        assert_eq!(routes, want, "{name}");
        assert!(fdb.is_empty() && neigh.is_empty());
    }
}

#[test]
fn agent_refuses_bad_network_configs() {
    let node = Ns::new("n");
    node.sh(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
    node.sh(&["ip", "addr", "add", "198.18.40.1/24", "dev", "eth0"]);
    node.sh(&["ip", "link", "set", "eth0", "up"]);
    let dir = Dir::new("agent");
    for (conf, message) in [
        (r#"{"Network": "198.18.0.0/16"}"#, "overlaps the node network"),
        (r#"{"Network": "198.19.0.0/29"}"#, "too small"),
        (r#"{"Network": "198.19.0.0/16", "Backend": {"Type": "ipip"}}"#, "unknown backend"),
    ] {
        let path = dir.path().join("net-conf.json");
        std::fs::write(&path, conf).unwrap();
        let out = node
            .handle
            .run(|| {
                Command::new(weft_bin())
                    .args(["agent", "--iface", "eth0", "--store"])
                    .arg(dir.path().join("store"))
                    .arg("--net-conf")
                    .arg(&path)
                    .arg("--subnet-file")
                    .arg(dir.path().join("subnet.env"))
                    .arg("--state-dir")
                    .arg(dir.path())
                    .output()
            })
            .unwrap()
            .unwrap();
        assert!(!out.status.success(), "{conf}: the agent started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(message), "{conf}: {err}");
    }
    assert!(!dir.path().join("subnet.env").exists());
}

fn etcd_lease_ids(lab: &TestLab) -> Vec<(String, i64)> {
    let out = Command::new("ip")
        .args(["netns", "exec", &format!("{}-sw", lab.name), "etcdctl", "--endpoints", "http://198.18.0.1:2379"])
        .args(["get", "--prefix", "/coreos.com/network/subnets/", "-w", "fields"])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // `"Key" : "/coreos.com/..."` then, later, `"Lease" : 1234` for each key.
    let text = String::from_utf8_lossy(&out.stdout);
    let mut out = Vec::new();
    let mut key = None;
    for line in text.lines() {
        let Some((name, value)) = line.split_once(" : ") else { continue };
        match name.trim_matches('"') {
            "Key" => key = Some(value.trim_matches('"').to_string()),
            "Lease" => out.extend(key.take().map(|k| (k, value.trim().parse::<i64>().unwrap()))),
            _ => {}
        }
    }
    out
}

#[test]
fn etcd_lab_survives_an_etcd_outage() {
    let lab = TestLab::up_with(&["--store", "etcd", "--nodes", "2", "--pods", "1", "--lease-ttl", "20s"]);
    let show = lab.show();
    assert_eq!(show["store"]["kind"], "etcd");
    assert_eq!(show["store"]["endpoint"], "http://198.18.0.1:2379");
    assert_eq!(show["store"]["namespace"], format!("{}-sw", lab.name));
    // flannel's layout, read back with etcdctl: one key per node, each with a TTL lease.
    let before = etcd_lease_ids(&lab);
    assert_eq!(before.len(), 2, "{before:?}");
    for node in show["nodes"].as_array().unwrap() {
        let key = format!("/coreos.com/network/subnets/{}", node["subnet"].as_str().unwrap().replace('/', "-"));
        assert!(before.iter().any(|(k, lease)| *k == key && *lease != 0), "{key} missing in {before:?}");
    }
    lab.check_ok();

    // etcd stops answering for 30 s: pods keep talking.
    let node1_state = lab.peer_state("node1");
    let pid = nix::unistd::Pid::from_raw(show["store"]["pid"].as_i64().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let paused = Instant::now();
    // node1's agent restarts while etcd is away: it stays up (no crash loop), retries, and
    // removes nothing of what the kernel holds.
    let old = lab.agent_pid("node1");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), nix::sys::signal::Signal::SIGKILL).unwrap();
    within(Duration::from_secs(3), "node1's agent started again", || lab.agent_pid("node1") != old);
    let restarted = lab.agent_pid("node1");
    // node2's loop is not held up by renewals that cannot reach etcd (its 20 s lease is due every
    // 10 s): a VTEP deleted by hand is back within 2 s.
    std::thread::sleep(Duration::from_secs(3));
    let del = Command::new("ip").args(["-n", &lab.ns("node2"), "link", "del", "weft.1"]).status().unwrap();
    assert!(del.success());
    within(Duration::from_secs(2), "node2's VTEP recreated with etcd away", || {
        lab.ip("node2", &["ip", "link", "show"]).as_array().unwrap().iter().any(|l| l["ifname"] == "weft.1")
    });
    let mut during = None;
    while paused.elapsed() < Duration::from_secs(30) {
        assert_eq!(lab.peer_state("node1"), node1_state, "node1 lost peer objects while its agent could not list");
        if during.is_none() && paused.elapsed() > Duration::from_secs(15) {
            during = Some(lab.weft(&["check"]));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(lab.agent_pid("node1"), restarted, "node1's agent exited while etcd was away");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let during = during.unwrap();
    assert!(
        during.status.success(),
        "pods lost connectivity while etcd was away: {}",
        String::from_utf8_lossy(&during.stdout)
    );
    within(Duration::from_secs(20), "node1's agent ready once etcd is back", || {
        http_get(&lab, "node1", "/readyz").0 == "HTTP/1.0 200 OK"
    });
    // The agents reconnect and renew: every key gets a fresh etcd lease, on the same subnets.
    within(Duration::from_secs(30), "leases renewed after the outage", || {
        let now = etcd_lease_ids(&lab);
        now.len() == 2 && now.iter().all(|(k, l)| before.iter().any(|(bk, bl)| bk == k && bl != l))
    });
    // Leases that expired while etcd was stopped were removed and made again: each node has
    // its peer back (a moment after the store shows it, on a loaded machine).
    for (node, peer) in [("node1", 1), ("node2", 0)] {
        let subnet = show["nodes"][peer]["subnet"].as_str().unwrap().to_string();
        within(Duration::from_secs(10), "the peer programmed again", || {
            lab.peer_state(node).0.iter().any(|r| r.starts_with(&subnet))
        });
    }
    lab.check_ok();
}

#[test]
fn lab_on_an_etcd_of_ones_own() {
    let etcd = LoopbackEtcd::start();
    let store = format!("etcd={}", etcd.url);
    let lab = TestLab::up_with(&["--store", &store, "--nodes", "2", "--pods", "1"]);
    lab.check_ok();
    let show = lab.show();
    assert_eq!(show["store"]["endpoint"], etcd.url.as_str());
    let keys = String::from_utf8(etcd.ctl(&["get", "--prefix", "/coreos.com/network/subnets/", "--keys-only"]).stdout)
        .unwrap();
    for node in show["nodes"].as_array().unwrap() {
        let key = format!("/coreos.com/network/subnets/{}", node["subnet"].as_str().unwrap().replace('/', "-"));
        assert!(keys.contains(&key), "{key} not in {keys}");
    }
}

/// Damage in the file store — a lease with an absurd `Expires` (it panicked every agent in a
/// crash loop), garbage, a damaged `revision` file — is skipped and counted: running agents keep
/// following changes, a restarted agent starts, every pod still reaches every other.
#[test]
fn file_store_damage_is_skipped_and_counted() {
    let lab = TestLab::up("vxlan", 2, 1);
    let dir = std::path::PathBuf::from(lab.show()["store"]["endpoint"].as_str().unwrap());
    let absurd = r#"{"PublicIP":"198.18.9.9","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:00:00:00:09:09"},"Expires":18446744073709551615}"#;
    std::fs::write(dir.join("subnets/198.19.250.0-24"), absurd).unwrap();
    std::fs::write(dir.join("subnets/198.19.251.0-24"), "{garbage").unwrap();
    std::fs::write(dir.join("revision"), "garbage").unwrap();
    // A change after the damage reaches the running agents.
    let extra = Lease {
        subnet: "198.19.252.0/24".parse().unwrap(),
        attrs: LeaseAttrs {
            public_ip: "198.18.9.10".parse().unwrap(),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: json!({"VNI": 1, "VtepMAC": "0a:00:00:00:09:0a"}),
        },
        expires: None,
        created: None,
    };
    lab.store().put_lease(&extra).unwrap();
    within(Duration::from_secs(2), "the change after the damage programmed", || {
        lab.peer_state("node1").0.iter().any(|r| r.starts_with("198.19.252.0/24"))
    });
    // A restarted agent starts (it listed the damage).
    let pid = lab.agent_pid("node2");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    within(Duration::from_secs(5), "node2's agent back and serving", || {
        lab.agent_pid("node2") != pid && http_get(&lab, "node2", "/readyz").0 == "HTTP/1.0 200 OK"
    });
    let restarted = lab.agent_pid("node2");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(lab.agent_pid("node2"), restarted, "the agent is in a crash loop");
    let (_, metrics) = http_get(&lab, "node2", "/metrics");
    assert!(metrics.contains("weft_leases_damaged 2"), "{metrics}");
    lab.store().delete(&extra.subnet).unwrap();
    lab.check_ok();
}

/// A lease reusing node2's VTEP MAC with another public IP, and a file with host bits over
/// node2's subnet: node2 keeps its FDB entry and neighbour on node1 through several resyncs (it
/// flipped on every one: ~50 % loss to node2), and every pod still reaches every other.
#[test]
fn conflicting_claims_resolve_the_same_way_every_time() {
    let lab = TestLab::up("vxlan", 2, 1);
    let show = lab.show();
    let node2 = &show["nodes"][1];
    let node2_ip = node2["address"].as_str().unwrap().to_string();
    let node2_subnet: ipnet::Ipv4Net = node2["subnet"].as_str().unwrap().parse().unwrap();
    let mac = lab
        .store()
        .list(SystemTime::now())
        .unwrap()
        .into_iter()
        .find(|l| l.subnet == node2_subnet)
        .unwrap()
        .vxlan()
        .unwrap()
        .vtep_mac;
    let before = lab.peer_state("node1");
    lab.store().put_lease(&peer_lease("198.19.251.0/24", "198.18.9.51", &mac)).unwrap();
    let dir = std::path::PathBuf::from(show["store"]["endpoint"].as_str().unwrap());
    let host_bits = format!("{}-24", std::net::Ipv4Addr::from(u32::from(node2_subnet.network()) + 5));
    std::fs::write(
        dir.join("subnets").join(host_bits),
        json!({"PublicIP": "198.18.9.52", "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": "0a:00:00:00:09:52"}})
            .to_string(),
    )
    .unwrap();
    // Two resync periods (2 s each), looked at every 100 ms.
    let deadline = Instant::now() + Duration::from_millis(4500);
    while Instant::now() < deadline {
        let (routes, fdb, neigh) = lab.peer_state("node1");
        assert!(fdb.contains(&format!("{mac} dst {node2_ip}")), "node2's FDB entry moved: {fdb:?}");
        assert_eq!(fdb.iter().filter(|e| e.starts_with(&mac)).count(), 1, "{fdb:?}");
        assert_eq!(neigh, before.2);
        assert!(routes.iter().all(|r| !r.starts_with("198.19.251.0")), "the younger claim was programmed: {routes:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.check_ok();
}

/// Garbage written over node1's own lease key, then an etcd restart: node1 takes its key back
/// (it owns that subnet), the etcd leases it grants do not pile up, and the pods keep talking.
#[test]
fn etcd_garbage_over_the_own_lease_is_taken_back() {
    let lab = TestLab::up_with(&["--store", "etcd", "--nodes", "2", "--pods", "1"]);
    let show = lab.show();
    let subnet = show["nodes"][0]["subnet"].as_str().unwrap().replace('/', "-");
    let key = format!("/coreos.com/network/subnets/{subnet}");
    let etcdctl = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &format!("{}-sw", lab.name), "etcdctl", "--endpoints", "http://198.18.0.1:2379"])
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .unwrap()
    };
    let leases = || String::from_utf8_lossy(&etcdctl(&["lease", "list"]).stdout).lines().count();
    let before = leases();
    assert!(etcdctl(&["put", &key, "{garbage"]).status.success());
    // etcd restarted (killed, then `up` starts it again with its data).
    let pid = show["store"]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    within(Duration::from_secs(5), "etcd gone", || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.is_empty() || stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    });
    let up = lab.weft(&["up"]);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let node1_ip = show["nodes"][0]["address"].as_str().unwrap().to_string();
    within(Duration::from_secs(15), "node1's key taken back", || {
        let value = String::from_utf8_lossy(&etcdctl(&["get", &key, "--print-value-only"]).stdout).to_string();
        serde_json::from_str::<Value>(value.trim()).is_ok_and(|v| v["PublicIP"] == node1_ip.as_str())
    });
    std::thread::sleep(Duration::from_secs(3));
    let after = leases();
    assert!(after <= before + 2, "etcd leases piled up: {before} before, {after} after");
    lab.check_ok();
}

/// A lease of another address holding node2's VTEP MAC and older than node2's (what a node whose
/// address changed leaves behind until it expires): peers count the older claim, so node2 would
/// be unreachable; node2 makes itself a new VTEP MAC, publishes it, and every pod reaches every
/// other again.
#[test]
fn a_vtep_mac_taken_by_an_older_lease_is_replaced() {
    let lab = TestLab::up("vxlan", 2, 1);
    let show = lab.show();
    let node2_subnet: ipnet::Ipv4Net = show["nodes"][1]["subnet"].as_str().unwrap().parse().unwrap();
    let node2_ip = show["nodes"][1]["address"].as_str().unwrap().to_string();
    let lease_of = |subnet: ipnet::Ipv4Net| {
        lab.store().list(SystemTime::now()).unwrap().into_iter().find(|l| l.subnet == subnet).unwrap()
    };
    let old_mac = lease_of(node2_subnet).vxlan().unwrap().vtep_mac;
    // Written by hand with the oldest creation revision there is.
    let dir = std::path::PathBuf::from(show["store"]["endpoint"].as_str().unwrap());
    let stale = json!({"PublicIP": "198.18.9.77", "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": old_mac},
        "Created": 1, "Modified": 1});
    std::fs::write(dir.join("subnets/198.19.250.0-24"), stale.to_string()).unwrap();
    // Watchers list again (the journal lost track) and see it.
    let revision: u64 = std::fs::read_to_string(dir.join("revision")).unwrap().trim().parse().unwrap();
    std::fs::write(dir.join("journal"), "").unwrap();
    std::fs::write(dir.join("revision"), (revision + 1).to_string()).unwrap();
    within(Duration::from_secs(10), "node2 publishes a new VTEP MAC", || {
        lease_of(node2_subnet).vxlan().unwrap().vtep_mac != old_mac
    });
    let new_mac = lease_of(node2_subnet).vxlan().unwrap().vtep_mac;
    within(Duration::from_secs(5), "node1 programs node2's new MAC", || {
        lab.peer_state("node1").1.contains(&format!("{new_mac} dst {node2_ip}"))
    });
    within(Duration::from_secs(5), "node2's VTEP has its new MAC", || {
        let links = lab.ip("node2", &["ip", "link", "show"]);
        links.as_array().unwrap().iter().any(|l| l["ifname"] == "weft.1" && l["address"] == new_mac.as_str())
    });
    // The VTEP made again with it, and every peer replayed on it.
    let node1_subnet = show["nodes"][0]["subnet"].as_str().unwrap().to_string();
    within(Duration::from_secs(5), "node2 routes to node1 again", || {
        lab.peer_state("node2").0.iter().any(|r| r.starts_with(&node1_subnet))
    });
    lab.check_ok();
    let (_, metrics) = http_get(&lab, "node2", "/metrics");
    assert!(metrics.contains("weft_lease_reacquired_total 0"), "{metrics}");
}

/// An IPv4/UDP packet `src` -> `dst`:`port` carrying `payload` (header checksum right, UDP
/// checksum 0: none, as IPv4 allows).
fn inner_udp(src: &str, dst: &str, port: u16, payload: &[u8]) -> Vec<u8> {
    let (src, dst): (std::net::Ipv4Addr, std::net::Ipv4Addr) = (src.parse().unwrap(), dst.parse().unwrap());
    let len = 28 + payload.len();
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let checksum = weft_udp::packet::checksum(&p);
    p[10..12].copy_from_slice(&checksum.to_be_bytes());
    p.extend_from_slice(&4000u16.to_be_bytes());
    p.extend_from_slice(&port.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// The udp backend end to end: every pod reaches every other (TCP both ways, and pings of
/// exactly the pod MTU); joins, a peer's new PublicIP and leaves reach every node's forwarder
/// within a second; a destination in no lease gets ICMP net unreachable; datagrams forged from
/// the underlay never reach a pod and are counted by reason.
#[test]
fn udp_lab_carries_every_pod_pair_and_admits_only_peers() {
    let lab = TestLab::up("udp", 3, 2);
    lab.check_ok();
    let show = lab.show();
    let nodes = lab.nodes();
    // The check's 64 KiB echoes: large packets handed to the kernel to cut, received whole
    // (over the lab's veth nothing cuts them).
    let sum = |key: &str| -> u64 { nodes.iter().map(|n| lab.forwarder(n)["counters"][key].as_u64().unwrap()).sum() };
    assert!(sum("kernel_cut") > 0 && sum("whole_received") > 0, "{}", lab.forwarder("node1"));
    assert_eq!(lab.forwarder("node1")["kernel_cut"]["device"], "weft-udp-tx");
    // Uplinks that cannot cut packets already in UDP: the kernel cuts them before the veth,
    // whose checksum offload leaves every inner TCP checksum partial; the receiving
    // forwarders have the kernel complete them.
    let ethtool = |node: &str, on: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.ns(node), "ethtool", "-K", "eth0", "tx-udp_tnl-segmentation", on])
            .args(["tx-udp_tnl-csum-segmentation", on])
            .output()
            .unwrap();
        assert!(out.status.success(), "ethtool: {}", String::from_utf8_lossy(&out.stderr));
    };
    for node in &nodes {
        ethtool(node, "off");
    }
    let partial_before = sum("tun_writes");
    lab.check_ok();
    assert!(sum("tun_writes") > partial_before);
    for node in &nodes {
        ethtool(node, "on");
    }
    let subnet_of = |node: &str| -> String {
        show["nodes"].as_array().unwrap().iter().find(|n| n["name"] == node).unwrap()["subnet"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let address_of = |node: &str| -> String {
        show["nodes"].as_array().unwrap().iter().find(|n| n["name"] == node).unwrap()["address"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for node in &nodes {
        let mut expected: Vec<String> =
            nodes.iter().filter(|n| *n != node).map(|n| format!("{} -> {}", subnet_of(n), address_of(n))).collect();
        expected.sort();
        assert_eq!(lab.forwarder_peers(node), expected, "{node}");
        let route = Command::new("ip").args(["-n", &lab.ns(node), "route", "show", "proto", "200"]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&route.stdout).trim(), "198.19.0.0/16 dev weft-udp", "{node}");
    }
    // Pings of exactly the pod MTU (1472: 1444 bytes of payload), both ways.
    let pods = show["pods"].as_array().unwrap();
    let pod = |node: &str| pods.iter().find(|p| p["node"] == node).unwrap();
    let (p1, p2) = (pod("node1"), pod("node2"));
    let mtu = Command::new("ip").args(["-n", p1["namespace"].as_str().unwrap(), "-j", "link", "show", "eth0"]).output();
    assert!(String::from_utf8_lossy(&mtu.unwrap().stdout).contains("\"mtu\":1472"));
    for (from, to) in [(p1, p2), (p2, p1)] {
        let out = Command::new("ip")
            .args(["netns", "exec", from["namespace"].as_str().unwrap(), "busybox", "ping", "-c", "2", "-s", "1444"])
            .arg(to["address"].as_str().unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ping {} -> {}: {}",
            from["name"],
            to["name"],
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // Join, PublicIP change, leave: every forwarder within a second.
    let store = lab.store();
    let mut lease = peer_lease("198.19.250.0/24", "198.18.0.99", "0a:00:00:00:00:99");
    lease.attrs.backend_type = "udp".into();
    lease.attrs.backend_data = Value::Null;
    store.put_lease(&lease).unwrap();
    let has = |entry: &str| nodes.iter().all(|n| lab.forwarder_peers(n).contains(&entry.to_string()));
    let took = within(Duration::from_secs(1), "the join in every forwarder", || has("198.19.250.0/24 -> 198.18.0.99"));
    eprintln!("udp join in every forwarder in {took:?}");
    lease.attrs.public_ip = "198.18.0.98".parse().unwrap();
    store.put_lease(&lease).unwrap();
    within(Duration::from_secs(1), "the new PublicIP in every forwarder", || has("198.19.250.0/24 -> 198.18.0.98"));
    assert!(nodes.iter().all(|n| lab.forwarder_peers(n).len() == 3), "the old address left behind");
    // A destination in no lease: ICMP net unreachable back to the pod.
    let unreachable_before = lab.forwarder("node1")["counters"]["icmp_sent"].as_u64().unwrap();
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            p1["namespace"].as_str().unwrap(),
            "busybox",
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            "198.19.251.9",
        ])
        .output();
    let counters = lab.forwarder("node1")["counters"].clone();
    assert!(counters["icmp_sent"].as_u64().unwrap() > unreachable_before, "{counters}");
    store.delete(&"198.19.250.0/24".parse().unwrap()).unwrap();
    within(Duration::from_secs(1), "the leave in every forwarder", || {
        nodes.iter().all(|n| lab.forwarder_peers(n).len() == 2)
    });

    // Forged datagrams to node1's forwarder, each carrying a packet for a pod there.
    let target = p1["address"].as_str().unwrap();
    let target_ns = weft_netns::NetNs::open(weft_netns::named_path(p1["namespace"].as_str().unwrap())).unwrap();
    let listener = target_ns.run(|| UdpSocket::bind(format!("{target}:7777"))).unwrap().unwrap();
    listener.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let node1 = format!("{}:8285", address_of("node1"));
    let node2_ns = weft_netns::NetNs::open(weft_netns::named_path(&lab.ns("node2"))).unwrap();
    let from_node2 = node2_ns.run(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    let node2_pod = p2["address"].as_str().unwrap();
    let node3_pod = pod("node3")["address"].as_str().unwrap();
    // A stranger on the underlay (an address no node has).
    let switch = show["underlay"]["namespace"].as_str().unwrap();
    let free = show["underlay"]["free_address"].as_str().unwrap();
    let ok =
        Command::new("ip").args(["-n", switch, "addr", "add", &format!("{free}/16"), "dev", "sw0"]).status().unwrap();
    assert!(ok.success());
    let switch_ns = weft_netns::NetNs::open(weft_netns::named_path(switch)).unwrap();
    let stranger = switch_ns.run(|| UdpSocket::bind(format!("{free}:0"))).unwrap().unwrap();
    stranger.send_to(&inner_udp(node2_pod, target, 7777, b"forged: stranger"), &node1).unwrap();
    // node2's address, but another node's pod as inner source; a destination not on node1;
    // a truncated packet; something that is not IP.
    from_node2.send_to(&inner_udp(node3_pod, target, 7777, b"forged: spoofed source"), &node1).unwrap();
    from_node2.send_to(&inner_udp(node2_pod, node3_pod, 7777, b"forged: not for node1"), &node1).unwrap();
    let truncated = inner_udp(node2_pod, target, 7777, b"forged: truncated, forged: truncated");
    from_node2.send_to(&truncated[..40], &node1).unwrap();
    from_node2.send_to(b"forged: not an IP packet at all", &node1).unwrap();
    let mut bad_checksum = inner_udp(node2_pod, target, 7777, b"forged: bad header checksum");
    bad_checksum[10] ^= 0xff;
    from_node2.send_to(&bad_checksum, &node1).unwrap();
    // And one that is fine: node2's pod to node1's pod, from node2.
    from_node2.send_to(&inner_udp(node2_pod, target, 7777, b"genuine"), &node1).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = listener.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert_eq!(got, ["genuine"], "only the genuine datagram reaches the pod");
    let drops = lab.forwarder("node1")["counters"]["drops"].clone();
    for (reason, at_least) in
        [("unknown_source", 1), ("source_not_in_peer_subnet", 1), ("destination_not_local", 1), ("malformed", 2)]
    {
        assert!(drops[reason].as_u64().unwrap() >= at_least, "{reason}: {drops}");
    }
    // A pod posing as a node on the underlay: a raw datagram from node1's pod with node3's
    // address as source, to node2's forwarder, carrying a packet "from node3's pod" to node2's
    // pod. node1 does not forward it (the tunnel port from a source that is no pod).
    let node2_target = p2["address"].as_str().unwrap();
    let node2_ns = weft_netns::NetNs::open(weft_netns::named_path(p2["namespace"].as_str().unwrap())).unwrap();
    let on_node2 = node2_ns.run(|| UdpSocket::bind(format!("{node2_target}:7778"))).unwrap().unwrap();
    on_node2.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let inner = inner_udp(node3_pod, node2_target, 7778, b"spoofed by a pod");
    let hex: String = inner.iter().map(|b| format!("{b:02x}")).collect();
    let raw = "import socket,struct,sys\n\
src,dst,inner=sys.argv[1],sys.argv[2],bytes.fromhex(sys.argv[3])\n\
udp=struct.pack('!HHHH',40000,8285,8+len(inner),0)+inner\n\
ip=struct.pack('!BBHHHBBH4s4s',0x45,0,20+len(udp),1,0,64,17,0,socket.inet_aton(src),socket.inet_aton(dst))\n\
socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_RAW).sendto(ip+udp,(dst,0))\n";
    // A Python script run in node1's pod: what it printed.
    let in_pod1 = |script: &str, args: &[&str]| -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", p1["namespace"].as_str().unwrap(), "python3", "-c", script])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    in_pod1(raw, &[address_of("node3").as_str(), address_of("node2").as_str(), hex.as_str()]);
    let mut buf = [0u8; 256];
    assert!(on_node2.recv(&mut buf).is_err(), "a pod posed as node3 and reached node2's pod");
    // A pod as itself, with a plain UDP socket (no privilege): masqueraded to node1's address,
    // node2 would take it for node1's forwarder. Neither its packet (an inner source of
    // node1's subnet) nor a probe gets through.
    let inner = inner_udp(p1["address"].as_str().unwrap(), node2_target, 7778, b"from a pod as node1");
    let hex: String = inner.iter().map(|b| format!("{b:02x}")).collect();
    let script = "import socket,sys\n\
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(0.5)\n\
s.sendto(bytes.fromhex(sys.argv[2]),(sys.argv[1],8285))\n\
s.sendto(b'\\0weft-k?'+bytes(8),(sys.argv[1],8285))\n\
try:\n    s.recvfrom(100); print('answered')\nexcept OSError: print('silent')\n";
    assert_eq!(in_pod1(script, &[address_of("node2").as_str(), hex.as_str()]), "silent", "node2 answered a pod");
    assert!(on_node2.recv(&mut buf).is_err(), "a pod's datagram reached node2's pod as node1's");
    // Nor through its own node's forwarder, posing as node3 (raw socket, node3's address as
    // source, to node1's own address: delivered locally, never forwarded).
    let target_listener = target_ns.run(|| UdpSocket::bind(format!("{target}:7779"))).unwrap().unwrap();
    target_listener.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let inner = inner_udp(node3_pod, target, 7779, b"spoofed into its own node");
    let hex: String = inner.iter().map(|b| format!("{b:02x}")).collect();
    in_pod1(raw, &[address_of("node3").as_str(), address_of("node1").as_str(), hex.as_str()]);
    assert!(target_listener.recv(&mut buf).is_err(), "a pod posed as node3 to its own node's forwarder");
    // Nor through a translated port (a Service or NodePort pointed at node2's forwarder).
    let dnat = "add table ip svc { chain pre { type nat hook prerouting priority -100; \
                udp dport 30085 dnat to :8285; }; }";
    let out = Command::new("ip").args(["netns", "exec", &lab.ns("node2"), "nft", dnat]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let inner = inner_udp(p1["address"].as_str().unwrap(), node2_target, 7778, b"through a node port");
    let hex: String = inner.iter().map(|b| format!("{b:02x}")).collect();
    let via_port = script.replace("8285", "30085");
    let answer = in_pod1(&via_port, &[address_of("node2").as_str(), hex.as_str()]);
    assert_eq!(answer, "silent", "a probe through a node port was answered");
    assert!(on_node2.recv(&mut buf).is_err(), "a pod reached node2's pod through a node port");
    let _ = Command::new("ip").args(["netns", "exec", &lab.ns("node2"), "nft", "delete table ip svc"]).output();
    // The same counters in the agent's /metrics, and in `lab show`.
    let (_, metrics) = http_get(&lab, "node1", "/metrics");
    assert!(metrics.contains("weft_udp_forwarder_up 1"), "{metrics}");
    assert!(metrics.contains("weft_udp_kernel_segmentation 1"), "{metrics}");
    let line = metrics.lines().find(|l| l.starts_with("weft_udp_dropped_total{reason=\"unknown_source\"}")).unwrap();
    assert!(!line.ends_with(" 0"), "{line}");
    assert!(lab.show()["nodes"][0]["udp_forwarder"]["counters"]["drops"]["malformed"].as_u64().unwrap() >= 2);
    let text = lab.weft(&["show", "node1"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("udp forwarder pid")
            && text.contains("drops: ")
            && text.contains("unknown_source")
            && text.contains("kernel segmentation through weft-udp-tx"),
        "{text}"
    );
    // The forwarder killed: the agent starts another with the same table; the TUN deleted by
    // hand: made again, and a forwarder on it. Pods talk again either way.
    let peers = lab.forwarder_peers("node1");
    let pid = lab.forwarder("node1")["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    within(Duration::from_secs(5), "a new forwarder with the table", || {
        lab.forwarder("node1")["pid"].as_i64().is_some_and(|p| p as i32 != pid) && lab.forwarder_peers("node1") == peers
    });
    lab.check_ok();
    // Stopped (hung): it holds the TUN queue and the port; the agent ends it and starts another.
    let pid = lab.forwarder("node1")["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGSTOP).unwrap();
    within(Duration::from_secs(10), "a new forwarder instead of the hung one", || {
        lab.forwarder("node1")["pid"].as_i64().is_some_and(|p| p as i32 != pid) && lab.forwarder_peers("node1") == peers
    });
    lab.check_ok();
    let pid = lab.forwarder("node1")["pid"].as_i64().unwrap();
    let out = Command::new("ip").args(["-n", &lab.ns("node1"), "link", "del", "weft-udp"]).output().unwrap();
    assert!(out.status.success());
    within(Duration::from_secs(5), "the TUN and a forwarder back", || {
        lab.forwarder("node1")["pid"].as_i64().is_some_and(|p| p != pid) && lab.forwarder_peers("node1") == peers
    });
    lab.check_ok();
    // The replaced forwarders' TAP came back to the last one (the hung one held it a while).
    within(Duration::from_secs(5), "the sending TAP back on node1", || {
        lab.check_ok();
        lab.forwarder("node1")["kernel_cut"]["device"] == "weft-udp-tx"
    });
}

/// The TUN deleted twice in quick succession while the agent replays many peers (the second
/// delete during the replay of the first): the agent makes it again with its forwarder, every
/// peer in the table; it had kept starting forwarders for a device it never made again, while
/// saying ready.
#[test]
fn udp_tun_deleted_twice_during_a_replay_comes_back() {
    let lab = TestLab::up("udp", 2, 1);
    let store = lab.store();
    let used: Vec<String> =
        lab.show()["nodes"].as_array().unwrap().iter().map(|n| n["subnet"].as_str().unwrap().to_string()).collect();
    let mut added = 0;
    for x in 0..=255u32 {
        let subnet = format!("198.19.{x}.0/24");
        if used.contains(&subnet) || added == 250 {
            continue;
        }
        let mut lease = peer_lease(&subnet, &format!("198.18.1.{}", 1 + added), "0a:00:00:00:00:01");
        lease.attrs.backend_type = "udp".into();
        lease.attrs.backend_data = Value::Null;
        store.put_lease(&lease).unwrap();
        added += 1;
    }
    within(Duration::from_secs(10), "every peer in node1's forwarder", || lab.forwarder_peers("node1").len() == 251);
    for _ in 0..2 {
        let _ = Command::new("ip").args(["-n", &lab.ns("node1"), "link", "del", "weft-udp"]).output();
        std::thread::sleep(Duration::from_millis(100));
    }
    within(Duration::from_secs(15), "the TUN, its forwarder and every peer back", || {
        lab.forwarder_peers("node1").len() == 251
    });
    lab.check_ok();
}

/// A bgp node's speaker status from `lab show --json` (Null when none answers).
fn bgp_of(show: &Value, node: &str) -> Value {
    show["nodes"].as_array().unwrap().iter().find(|n| n["name"] == node).unwrap()["bgp"].clone()
}

/// (address, state) of each neighbour of a bgp node, sorted.
fn sessions(show: &Value, node: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = bgp_of(show, node)["neighbors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| (n["address"].as_str().unwrap().to_string(), n["state"].as_str().unwrap().to_string()))
        .collect();
    out.sort();
    out
}

fn blocks_of(show: &Value, node: &str) -> Vec<String> {
    let n = show["nodes"].as_array().unwrap().iter().find(|n| n["name"] == node).unwrap();
    n["blocks"].as_array().unwrap().iter().map(|b| b.as_str().unwrap().to_string()).collect()
}

impl TestLab {
    /// Routed mode's kernel state on a node: pod routes (201), learned routes (202) and
    /// blackholes (203), as `proto dst via dev`, sorted.
    fn routed_state(&self, node: &str) -> Vec<String> {
        let mut out = Vec::new();
        for proto in ["201", "202", "203"] {
            for r in self.ip(node, &["ip", "route", "show", "proto", proto]).as_array().unwrap() {
                out.push(format!(
                    "{proto} {} {} via {} dev {}",
                    r["type"].as_str().unwrap_or("unicast"),
                    r["dst"].as_str().unwrap(),
                    r["gateway"].as_str().unwrap_or("-"),
                    r["dev"].as_str().unwrap_or("-")
                ));
            }
        }
        out.sort();
        out
    }

    /// The learned routes of a node (proto 202): "block via gateway", sorted.
    fn learned(&self, node: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .ip(node, &["ip", "route", "show", "proto", "202"])
            .as_array()
            .unwrap()
            .iter()
            .map(|r| format!("{} via {}", r["dst"].as_str().unwrap(), r["gateway"].as_str().unwrap_or("-")))
            .collect();
        out.sort();
        out
    }

    fn address(&self, node: &str) -> String {
        let show = self.show();
        show["nodes"].as_array().unwrap().iter().find(|n| n["name"] == node).unwrap()["address"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// What every other node's blocks look like as routes learned from it.
    fn expected_learned(&self, node: &str) -> Vec<String> {
        let show = self.show();
        let mut out: Vec<String> = self
            .nodes()
            .iter()
            .filter(|n| *n != node)
            .flat_map(|n| {
                let address = self.address(n);
                blocks_of(&show, n).into_iter().map(move |b| format!("{b} via {address}"))
            })
            .collect();
        out.sort();
        out
    }
}

/// Routed mode, full mesh: every pod reaches every other with no bridge and no encapsulation;
/// each node has a session to each other node, learns each other node's block via that node's
/// address, blackholes its own, routes its pods as /32s; /metrics shows sessions and blocks. A
/// node that leaves (its agent stopped) has its blocks withdrawn everywhere within seconds, and
/// once its lease is gone the others drop it as a neighbour.
#[test]
fn bgp_mesh_lab_routes_blocks_over_bgp() {
    let lab = TestLab::up("bgp", 3, 2);
    lab.check_ok();
    let show = lab.show();
    let nodes = lab.nodes();
    for node in &nodes {
        let others: Vec<(String, String)> = nodes
            .iter()
            .filter(|n| *n != node)
            .map(|n| (lab.address(n), "Established".to_string()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut want = others.clone();
        want.sort();
        within(Duration::from_secs(10), "every session established", || sessions(&lab.show(), node) == want);
        assert_eq!(lab.learned(node), lab.expected_learned(node), "{node}");
        let state = lab.routed_state(node);
        let own = blocks_of(&show, node);
        assert_eq!(own.len(), 1, "{node}: {own:?}");
        assert!(state.contains(&format!("203 blackhole {} via - dev -", own[0])), "{node}: {state:?}");
        assert_eq!(state.iter().filter(|s| s.starts_with("201 unicast")).count(), 2, "{node}: {state:?}");
        // No bridge and no tunnel device on a routed node.
        let links = lab.ip(node, &["ip", "link", "show"]);
        assert!(!links.as_array().unwrap().iter().any(|l| l["ifname"] == "cni0" || l["ifname"] == "weft.1"));
    }
    // (The speaker's status behind /metrics is read once a second.)
    let established =
        |m: &str| m.lines().filter(|l| l.starts_with("weft_bgp_session_established{") && l.ends_with("} 1")).count();
    within(Duration::from_secs(3), "metrics show both sessions established", || {
        established(&http_get(&lab, "node1", "/metrics").1) == 2
    });
    let (_, metrics) = http_get(&lab, "node1", "/metrics");
    assert!(metrics.contains("weft_blocks 1\n"), "{metrics}");
    assert_eq!(metrics.matches("weft_bgp_session_established{").count(), 2, "{metrics}");

    // node3's agent stops (SIGTERM; the supervisor stopped first, so it stays stopped): a
    // restart as far as its peers know — they keep its block (graceful restart).
    let supervisor = show["supervisor_pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(supervisor), nix::sys::signal::Signal::SIGKILL).unwrap();
    let node3_block = blocks_of(&show, "node3")[0].clone();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(lab.agent_pid("node3")), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    within(Duration::from_secs(5), "node1's session with node3 down", || {
        sessions(&lab.show(), "node1").iter().any(|(a, s)| *a == lab.address("node3") && s != "Established")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(lab.learned("node1").iter().any(|r| r.starts_with(&node3_block)), "kept for node3's restart");
    // node3 leaves the cluster (its leases removed): the others drop it as a neighbour, and its
    // block everywhere, within seconds.
    let store = lab.store();
    for lease in store.list(SystemTime::now()).unwrap() {
        if lease.attrs.public_ip.to_string() == lab.address("node3") {
            store.delete(&lease.subnet).unwrap();
        }
    }
    let took = within(Duration::from_secs(5), "node3's block withdrawn everywhere", || {
        ["node1", "node2"].iter().all(|n| !lab.learned(n).iter().any(|r| r.starts_with(&node3_block)))
    });
    eprintln!("node3's block withdrawn from both peers in {took:?}");
    within(Duration::from_secs(5), "node3 no neighbour of node1", || sessions(&lab.show(), "node1").len() == 1);
}

/// Route reflectors: 10 nodes, the first two reflect; clients peer with the reflectors only,
/// reflectors with every node; every pod still reaches every other.
#[test]
fn bgp_lab_with_two_route_reflectors() {
    let lab = TestLab::up_with(&["--backend", "bgp", "--nodes", "10", "--pods", "1", "--route-reflectors", "2"]);
    for node in lab.nodes() {
        let want = if node == "node1" || node == "node2" { 9 } else { 2 };
        within(Duration::from_secs(20), &format!("{node}: {want} sessions established"), || {
            let s = sessions(&lab.show(), &node);
            s.len() == want && s.iter().all(|(_, state)| state == "Established")
        });
        if want == 2 {
            let peers: Vec<String> = sessions(&lab.show(), &node).into_iter().map(|(a, _)| a).collect();
            assert_eq!(peers, [lab.address("node1"), lab.address("node2")], "{node} peers with the reflectors only");
        }
        within(Duration::from_secs(10), &format!("{node} learns all 9 other blocks"), || {
            lab.learned(&node) == lab.expected_learned(&node)
        });
    }
    lab.check_ok();
}

/// More pods on a node than half a block leaves free: the node claims a second block ahead of
/// demand, announces it, and every peer routes it. On a real etcd, with every node claiming at
/// once: no block is held twice.
#[test]
fn bgp_nodes_claim_and_announce_second_blocks_on_etcd() {
    let lab = TestLab::up_with(&[
        "--backend",
        "bgp",
        "--nodes",
        "3",
        "--pods",
        "10",
        "--block-size",
        "28",
        "--store",
        "etcd",
    ]);
    within(Duration::from_secs(10), "each node holds two blocks", || {
        let show = lab.show();
        lab.nodes().iter().all(|n| blocks_of(&show, n).len() == 2)
    });
    let show = lab.show();
    let mut all: Vec<String> = lab.nodes().iter().flat_map(|n| blocks_of(&show, n)).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 6, "a block held twice: {all:?}");
    for node in lab.nodes() {
        within(Duration::from_secs(10), &format!("{node} learns the other nodes' four blocks"), || {
            let learned = lab.learned(&node);
            learned.len() == 4 && learned == lab.expected_learned(&node)
        });
        let blackholes = lab.routed_state(&node).iter().filter(|s| s.starts_with("203 blackhole")).count();
        assert_eq!(blackholes, 2, "{node}");
    }
    lab.check_ok();
}

#[test]
fn bgp_agent_restart_loses_no_packet() {
    restart_loses_no_packet("bgp", nix::sys::signal::Signal::SIGKILL);
}

/// SIGTERM (an upgrade, `systemctl restart`) is a restart too: its peers keep its routes.
#[test]
fn bgp_agent_sigterm_restart_loses_no_packet() {
    restart_loses_no_packet("bgp", nix::sys::signal::Signal::SIGTERM);
}

/// A BIRD 2 router on the lab's underlay, given to every node as an external peer (`--peer`),
/// learns every node's block via that node.
#[test]
fn bird_on_the_underlay_learns_every_block() {
    let router = "198.18.255.254";
    let lab =
        TestLab::up_with(&["--backend", "bgp", "--nodes", "3", "--pods", "1", "--peer", &format!("{router},65000")]);
    let show = lab.show();
    let switch = show["underlay"]["namespace"].as_str().unwrap().to_string();
    assert_eq!(show["underlay"]["free_address"], router);
    let ok = Command::new("ip").args(["-n", &switch, "addr", "add", &format!("{router}/16"), "dev", "sw0"]).status();
    assert!(ok.unwrap().success());
    let dir = Dir::new("bird");
    // The router also offers what nodes must not take: a default route, and a /32 inside
    // node2's block (it would take that pod's traffic from the other nodes).
    let inside = blocks_of(&show, "node2")[0].parse::<ipnet::Ipv4Net>().unwrap().network();
    let inside = std::net::Ipv4Addr::from(u32::from(inside) + 1);
    let mut conf = format!(
        "router id {router};\nprotocol device {{}}\nprotocol static {{ ipv4; route 0.0.0.0/0 blackhole; route {inside}/32 blackhole; }}\n"
    );
    for node in lab.nodes() {
        conf.push_str(&format!(
            "protocol bgp {node} {{ local {router} as 65000; neighbor {} as 64512; ipv4 {{ import all; export where source = RTS_STATIC; }}; }}\n",
            lab.address(&node)
        ));
    }
    std::fs::write(dir.path().join("bird.conf"), conf).unwrap();
    let socket = dir.path().join("bird.sock");
    let mut bird = Command::new("ip")
        .args(["netns", "exec", &switch, "bird", "-f", "-c"])
        .arg(dir.path().join("bird.conf"))
        .arg("-s")
        .arg(&socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("bird (apt-get install bird2)");
    struct KillOnDrop<'a>(&'a mut std::process::Child);
    impl Drop for KillOnDrop<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _bird = KillOnDrop(&mut bird);
    let birdc = |args: &[&str]| {
        let out = Command::new("birdc").arg("-s").arg(&socket).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let mut want: Vec<String> = lab
        .nodes()
        .iter()
        .flat_map(|n| {
            let address = lab.address(n);
            blocks_of(&show, n).into_iter().map(move |b| format!("{b} via {address}"))
        })
        .collect();
    want.sort();
    let routes = || {
        let text = birdc(&["show", "route", "all"]);
        let mut got = Vec::new();
        let mut dst = String::new();
        for line in text.lines() {
            if let Some(first) = line.split_whitespace().next().filter(|w| w.contains('/')) {
                dst = first.to_string();
            }
            if let Some(rest) = line.trim().strip_prefix("via ") {
                got.push(format!("{dst} via {}", rest.split_whitespace().next().unwrap_or("")));
            }
        }
        got.sort();
        got.dedup();
        got
    };
    let start = Instant::now();
    while routes() != want {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "BIRD learned {:?}, not {want:?}:\n{}",
            routes(),
            birdc(&["show", "protocols"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for node in lab.nodes() {
        let s = sessions(&lab.show(), &node);
        assert!(s.contains(&(router.to_string(), "Established".to_string())), "{node}: {s:?}");
        // The router's offers were received and refused: nodes route blocks only.
        let received: u64 = bgp_of(&lab.show(), &node)["neighbors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["address"] == router)
            .map(|n| n["prefixes_received"].as_u64().unwrap())
            .sum();
        assert_eq!(received, 2, "{node}");
        assert_eq!(lab.learned(&node), lab.expected_learned(&node), "{node}");
    }
}

/// A 50-node full mesh (1225 sessions on two cores, every pair colliding as they start
/// together): every node ends with 49 sessions and 49 learned blocks. Before, a session whose
/// connection broke under a write stayed Established on a dead socket (its peer retrying and
/// refused), and a few pairs in a thousand never met.
#[test]
fn bgp_lab_of_50_nodes_meshes_fully() {
    let lab = TestLab::up_with(&["--backend", "bgp", "--nodes", "50", "--pods", "1"]);
    let show = lab.show();
    for node in lab.nodes() {
        let s = sessions(&show, &node);
        assert_eq!(s.len(), 49, "{node}");
        assert!(s.iter().all(|(_, state)| state == "Established"), "{node}: {s:?}");
        assert_eq!(bgp_of(&show, &node)["installed"], 49, "{node}");
    }
}

impl TestLab {
    /// One more pod on `node` through the lab's CNI chain (the meta plugin), in a namespace
    /// the lab's `down` removes.
    fn add_pod(&self, node: &str, n: usize) {
        let dir = format!("/run/weft-lab/{}", self.name);
        let pod = format!("{}-{node}-pod{n}", self.name);
        assert!(Command::new("ip").args(["netns", "add", &pod]).status().unwrap().success());
        let conf = json!({"cniVersion": "1.0.0", "name": "lab", "type": "weft",
                          "subnetFile": format!("{dir}/{node}/subnet.env"), "dataDir": format!("{dir}/{node}/cni")});
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(node), "env", "CNI_COMMAND=ADD", "CNI_IFNAME=eth0"])
            .arg(format!("CNI_CONTAINERID=extra{n}"))
            .arg(format!("CNI_NETNS=/var/run/netns/{pod}"))
            .arg(format!("CNI_PATH={dir}/bin"))
            .arg(format!("WEFT_CNI_LOCK_DIR={dir}/{node}/cni-locks"))
            .arg(format!("{dir}/bin/weft"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "ADD on {node}: {}", String::from_utf8_lossy(&out.stdout));
    }
}

/// Every agent SIGKILLed at once, then a node claims a new block: it reaches every other node
/// within seconds (restarting speakers do not wait on each other, nor for long on anyone). And a
/// pod route deleted by hand is put back.
#[test]
fn bgp_agents_killed_together_still_spread_a_new_block() {
    let lab = TestLab::up_with(&["--backend", "bgp", "--nodes", "3", "--pods", "1", "--block-size", "28"]);
    let pids: Vec<i32> = lab.nodes().iter().map(|n| lab.agent_pid(n)).collect();
    for pid in &pids {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    }
    within(Duration::from_secs(5), "agents restarted", || {
        lab.nodes().iter().zip(&pids).all(|(n, p)| lab.agent_pid(n) != *p)
    });
    // Nine pods of a /28's fifteen addresses on node1: it claims a second block.
    for n in 100..108 {
        lab.add_pod("node1", n);
    }
    within(Duration::from_secs(5), "node1 holds two blocks", || blocks_of(&lab.show(), "node1").len() == 2);
    let took = within(Duration::from_secs(10), "node1's new block routed by node2 and node3", || {
        ["node2", "node3"].iter().all(|n| lab.learned(n) == lab.expected_learned(n))
    });
    eprintln!("a new block after a restart of every agent: routed everywhere in {took:?}");
    // A pod route deleted by hand comes back (within the 10 s check).
    let pod = lab.show()["pods"][0].clone();
    let (node, address) = (pod["node"].as_str().unwrap().to_string(), pod["address"].as_str().unwrap().to_string());
    let ok =
        Command::new("ip").args(["-n", &lab.ns(&node), "route", "del", &address, "proto", "201"]).status().unwrap();
    assert!(ok.success());
    within(Duration::from_secs(15), "the pod route put back", || {
        lab.routed_state(&node).iter().any(|s| s.starts_with(&format!("201 unicast {address} ")))
    });
    lab.check_ok();
}

/// The node changing under the udp forwarder's kernel-cut sends: reverse-path filtering turned
/// on (strict or loose: the TAP has no address, the kernel would drop what it forwards from
/// there), the TAP deleted by hand, a node whose uplink MTU grew while its pods keep theirs.
/// Bulk TCP keeps going every time (cut in user space meanwhile) and the TAP comes back when it
/// can work again.
#[test]
fn udp_kernel_cut_follows_the_node_changing_under_it() {
    let lab = TestLab::up("udp", 2, 1);
    lab.check_ok();
    let cutting = |node: &str| lab.forwarder(node)["kernel_cut"].clone();
    assert_eq!(cutting("node1")["device"], "weft-udp-tx");
    assert_eq!(cutting("node1")["peers"][&show_underlay_address(&lab, "node2")], true, "{}", cutting("node1"));
    let sh = |node: &str, args: &[&str]| {
        let out = Command::new("ip").args(["netns", "exec", &lab.ns(node)]).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    // Loose reverse-path filtering on, the forwarder running: given up within a second of
    // traffic, every pod pair still talks; off again: the TAP back.
    for mode in ["2", "1"] {
        sh("node1", &["sysctl", "-qw", &format!("net.ipv4.conf.all.rp_filter={mode}")]);
        within(Duration::from_secs(5), "the TAP given up under rp_filter", || {
            let _ = lab.weft(&["check"]);
            cutting("node1")["off"].as_str().is_some_and(|why| why.contains("rp_filter"))
        });
        lab.check_ok();
        // A forwarder started under it does not take the TAP either.
        let pid = lab.forwarder("node1")["pid"].as_i64().unwrap() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
        within(Duration::from_secs(5), "a new forwarder", || {
            lab.forwarder("node1")["pid"].as_i64().is_some_and(|p| p as i32 != pid)
        });
        assert!(cutting("node1")["off"].as_str().unwrap().contains("rp_filter"), "{}", cutting("node1"));
        lab.check_ok();
        sh("node1", &["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"]);
        within(Duration::from_secs(5), "the TAP back once rp_filter is 0", || {
            let _ = lab.weft(&["check"]);
            cutting("node1")["device"] == "weft-udp-tx"
        });
    }
    // The TAP deleted by hand: traffic goes on, the TAP comes back.
    sh("node1", &["ip", "link", "del", "weft-udp-tx"]);
    lab.check_ok();
    within(Duration::from_secs(10), "the TAP made again", || {
        let _ = lab.weft(&["check"]);
        let links = Command::new("ip").args(["-n", &lab.ns("node1"), "link", "show"]).output().unwrap();
        cutting("node1")["device"] == "weft-udp-tx" && String::from_utf8_lossy(&links.stdout).contains("weft-udp-tx")
    });
    lab.check_ok();
    // A host firewall whose FORWARD policy drops (Docker's, ufw's) accepting pod traffic only:
    // what node1 forwards from the TAP would be lost. The probes that go that way are not
    // answered any more: node1 cuts its packets for node2 itself, and takes the kernel's way
    // again once the firewall lets them through.
    let node2_ip = show_underlay_address(&lab, "node2");
    let ruleset = "add table ip hostfw { chain forward { type filter hook forward priority 10; policy drop; \
                   ip saddr 198.19.0.0/16 accept; ip daddr 198.19.0.0/16 accept; }; }";
    sh("node1", &["nft", ruleset]);
    // With no traffic meanwhile, an answer from before the firewall no longer counts: the next
    // flow does not start into the black hole.
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(cutting("node1")["peers"][&node2_ip], false, "a stale answer still counts: {}", cutting("node1"));
    lab.check_ok();
    assert_eq!(cutting("node1")["peers"][&node2_ip], false, "{}", cutting("node1"));
    sh("node1", &["nft", "delete table ip hostfw"]);
    within(Duration::from_secs(15), "node2 taking them again", || {
        let _ = lab.weft(&["check"]);
        cutting("node1")["peers"][&node2_ip] == true
    });
    // node2's uplink MTU grows: its TUN follows (new pods would get 8972), its pod keeps 1472.
    // What comes uncut for that pod is taken as segments that fit the pod's bridge, not the TUN.
    sh("node2", &["ip", "link", "set", "eth0", "mtu", "9000"]);
    within(Duration::from_secs(10), "node2's TUN at 8972", || {
        let link =
            Command::new("ip").args(["-n", &lab.ns("node2"), "-j", "link", "show", "weft-udp"]).output().unwrap();
        String::from_utf8_lossy(&link.stdout).contains("\"mtu\":8972")
    });
    // A forwarder that starts now reads the new MTU at once.
    let pid = lab.forwarder("node2")["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    within(Duration::from_secs(5), "a new forwarder on node2", || {
        lab.forwarder("node2")["pid"].as_i64().is_some_and(|p| p as i32 != pid)
    });
    let whole = lab.forwarder("node2")["counters"]["whole_received"].as_u64().unwrap();
    lab.check_ok();
    assert!(lab.forwarder("node2")["counters"]["whole_received"].as_u64().unwrap() > whole);
}

/// The underlay address of `node` in the lab.
fn show_underlay_address(lab: &TestLab, node: &str) -> String {
    lab.show()["nodes"].as_array().unwrap().iter().find(|n| n["name"] == node).unwrap()["address"]
        .as_str()
        .unwrap()
        .to_string()
}
