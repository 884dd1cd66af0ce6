//! The agent as a process in a node namespace of its own: what it refuses before touching
//! anything, and how it starts over existing state.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A node namespace with an uplink `eth0` (198.18.41.1/24), a store and a net-conf.json.
struct Node {
    ns: Ns,
    dir: Dir,
}

impl Drop for Node {
    /// A udp forwarder the agent started outlives it (and keeps the namespace alive, its TUN
    /// with it): ended here, whatever the test did.
    fn drop(&mut self) {
        let pid_file = weft_udp::forwarder::pid_path(&self.dir.path().join("udp-forwarder.sock"));
        if let Some(pid) = std::fs::read_to_string(pid_file).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("udp-forwarder") {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

impl Node {
    fn new(net_conf: &str) -> Node {
        let ns = Ns::new("n");
        ns.sh(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
        ns.sh(&["ip", "addr", "add", "198.18.41.1/24", "dev", "eth0"]);
        ns.sh(&["ip", "link", "set", "eth0", "up"]);
        let dir = Dir::new("agent");
        std::fs::write(dir.path().join("net-conf.json"), net_conf).unwrap();
        Node { ns, dir }
    }

    fn command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(weft_bin());
        cmd.args(["agent", "--iface", "eth0", "--store"])
            .arg(self.dir.path().join("store"))
            .arg("--net-conf")
            .arg(self.dir.path().join("net-conf.json"))
            .arg("--state-dir")
            .arg(self.dir.path())
            .args(extra)
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, extra: &[&str]) -> std::process::Output {
        let mut cmd = self.command(extra);
        self.ns.handle.run(|| cmd.output()).unwrap().unwrap()
    }

    fn spawn(&self, extra: &[&str]) -> Agent {
        let log = std::fs::File::create(self.dir.path().join("agent.log")).unwrap();
        let mut cmd = self.command(extra);
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        Agent(self.ns.handle.run(|| cmd.spawn()).unwrap().unwrap())
    }

    /// The agent with its health endpoint, once it has written its subnet file.
    fn spawn_ready(&self) -> Agent {
        self.spawn_ready_with(&[])
    }

    /// The same with more arguments.
    fn spawn_ready_with(&self, extra: &[&str]) -> Agent {
        let subnet_file = self.dir.path().join("subnet.env");
        let mut args = vec!["--subnet-file", subnet_file.to_str().unwrap(), "--health", "127.0.0.1:9901"];
        args.extend_from_slice(extra);
        let agent = self.spawn(&args);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !subnet_file.exists() {
            assert!(Instant::now() < deadline, "the agent did not become ready: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn http(&self, path: &str) -> String {
        self.ns
            .handle
            .run(|| {
                // Not listening yet: no answer.
                let Ok(mut conn) = std::net::TcpStream::connect("127.0.0.1:9901") else { return String::new() };
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                write!(conn, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
                let mut text = String::new();
                let _ = conn.read_to_string(&mut text);
                text
            })
            .unwrap()
    }
}

/// The agent process, killed when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_unwritable_subnet_file_is_refused_before_anything_is_leased_or_programmed() {
    let node = Node::new(r#"{"Network": "198.19.0.0/16"}"#);
    let not_a_dir = node.dir.path().join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let subnet_file = not_a_dir.join("subnet.env").display().to_string();
    let out = node.run(&["--subnet-file", &subnet_file]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("subnet file") && err.contains("cannot be written"), "{err}");
    assert!(!node.ns.links().iter().any(|l| l.starts_with("weft.")), "a VTEP was made: {:?}", node.ns.links());
    let leases = std::fs::read_dir(node.dir.path().join("store/subnets")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(leases, 0, "a lease was taken");
}

#[test]
fn a_vtep_replaced_at_start_is_not_reported_as_gone() {
    let node = Node::new(r#"{"Network": "198.19.0.0/16"}"#);
    // A VTEP of the right name with other settings (another port), as an older config left it.
    node.ns.sh(&["ip", "link", "add", "weft.1", "type", "vxlan", "id", "1", "dstport", "4789", "dev", "eth0"]);
    let _agent = node.spawn_ready();
    // A few ticks of the loop.
    std::thread::sleep(Duration::from_millis(300));
    let vxlan = node.ns.ip_json(&["-d", "link", "show", "weft.1"]);
    assert_eq!(vxlan[0]["linkinfo"]["info_data"]["port"], 8472, "not replaced: {vxlan}");
    let metrics = node.http("/metrics");
    assert!(metrics.contains("weft_vtep_recreated_total 0"), "{metrics}");
    assert!(!node.log().contains("is gone"), "{}", node.log());
}

/// `/readyz` follows the dataplane: with the uplink gone the VTEP cannot be made again, and the
/// agent says so (503, the metric) once, not on every tick; probes are answered meanwhile even
/// with an idle connection open.
#[test]
fn readiness_follows_the_dataplane_and_failures_are_logged_once() {
    let node = Node::new(r#"{"Network": "198.19.0.0/16"}"#);
    let _agent = node.spawn_ready();
    assert!(node.http("/readyz").starts_with("HTTP/1.0 200"), "{}", node.http("/readyz"));
    let _idle = node.ns.handle.run(|| std::net::TcpStream::connect("127.0.0.1:9901").unwrap()).unwrap();
    node.ns.sh(&["ip", "link", "del", "eth0"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ready = node.http("/readyz");
        if ready.starts_with("HTTP/1.0 503") {
            assert!(ready.contains("dataplane"), "{ready}");
            break;
        }
        assert!(Instant::now() < deadline, "still ready with the uplink gone: {ready}\n{}", node.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(node.http("/metrics").contains("weft_dataplane_up 0"));
    let failures = node.log().lines().filter(|l| l.contains("(retrying)")).count();
    assert!((1..=3).contains(&failures), "{failures} failure lines in 2 s:\n{}", node.log());
    assert!(!node.log().contains("recovered"), "recovered while still failing:\n{}", node.log());
    // The uplink made again (another index, the same address): the agent rebuilds on it.
    node.ns.sh(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
    node.ns.sh(&["ip", "addr", "add", "198.18.41.1/24", "dev", "eth0"]);
    node.ns.sh(&["ip", "link", "set", "eth0", "up"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !node.http("/readyz").starts_with("HTTP/1.0 200") {
        assert!(Instant::now() < deadline, "not ready again with the uplink back:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(node.log().lines().filter(|l| l.contains("recovered")).count(), 1, "{}", node.log());
}

/// The uplink's MTU changes: the VTEP and the subnet file (what new pods get) follow within a
/// moment, without a restart.
#[test]
fn the_pod_mtu_follows_the_uplink() {
    let node = Node::new(r#"{"Network": "198.19.0.0/16"}"#);
    let _agent = node.spawn_ready();
    let subnet_file = node.dir.path().join("subnet.env");
    assert!(std::fs::read_to_string(&subnet_file).unwrap().contains("FLANNEL_MTU=1450"));
    node.ns.sh(&["ip", "link", "set", "eth0", "mtu", "1400"]);
    let deadline = Instant::now() + Duration::from_secs(3);
    while !std::fs::read_to_string(&subnet_file).unwrap().contains("FLANNEL_MTU=1350") {
        assert!(Instant::now() < deadline, "the subnet file did not follow: {}", node.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(node.ns.ip_json(&["link", "show", "weft.1"])[0]["mtu"], 1350);
}

/// A store that does not answer at start (here: a file where its directory should be): the
/// agent waits, serving a 503; once the store is there it leases, programs and is ready — 200,
/// not "the store does not answer" until the next renewal a day later.
#[test]
fn ready_once_the_store_answers_after_a_start_without_it() {
    let node = Node::new(r#"{"Network": "198.19.0.0/16"}"#);
    std::fs::write(node.dir.path().join("store"), "not a directory").unwrap();
    let subnet_file = node.dir.path().join("subnet.env");
    let _agent = node.spawn(&["--subnet-file", subnet_file.to_str().unwrap(), "--health", "127.0.0.1:9901"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !node.http("/readyz").contains("store does not answer") {
        assert!(Instant::now() < deadline, "{}", node.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::remove_file(node.dir.path().join("store")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !node.http("/readyz").starts_with("HTTP/1.0 200") {
        assert!(Instant::now() < deadline, "not ready with the store back: {}\n{}", node.http("/readyz"), node.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Another value written over this node's own key, valid-looking but with another VTEP MAC (a
/// restored backup): the agent writes its own back, so peers never program the wrong MAC.
#[test]
fn other_data_on_the_own_key_is_taken_back() {
    let node = Node::new(r#"{"Network": "198.19.0.0/16"}"#);
    let _agent = node.spawn_ready();
    let store = weft_lease::file::FileStore::open(node.dir.path().join("store")).unwrap();
    let mine = store.list(std::time::SystemTime::now()).unwrap().pop().unwrap();
    let mut forged = mine.clone();
    forged.attrs.backend_data = serde_json::json!({"VNI": 1, "VtepMAC": "02:66:66:66:66:66"});
    store.put_lease(&forged).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = store.list(std::time::SystemTime::now()).unwrap().pop().unwrap();
        if now.attrs == mine.attrs {
            break;
        }
        assert!(Instant::now() < deadline, "the forged data stayed: {:?}\n{}", now.attrs, node.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Owners on the real kernel: the agent removes its own stale peer routes (IPv4 and IPv6) and
/// leaves every other producer's routes alone, BGP-learned and pod routes included.
#[test]
fn the_agent_removes_only_routes_it_owns() {
    let node = Node::new(r#"{"Network": "198.19.0.0/16"}"#);
    node.ns.sh(&["ip", "route", "add", "198.19.99.0/24", "via", "198.18.41.3", "dev", "eth0", "proto", "200"]);
    node.ns.sh(&["ip", "-6", "addr", "add", "fd00:41::1/64", "dev", "eth0", "nodad"]);
    node.ns.sh(&["ip", "-6", "route", "add", "fd00:99::/64", "via", "fd00:41::3", "dev", "eth0", "proto", "200"]);
    node.ns.sh(&["ip", "route", "add", "198.19.200.0/24", "via", "198.18.41.2", "dev", "eth0", "proto", "202"]);
    node.ns.sh(&["ip", "route", "add", "198.19.77.5/32", "dev", "eth0", "proto", "201"]);
    node.ns.sh(&["ip", "route", "add", "10.9.0.0/16", "via", "198.18.41.2", "dev", "eth0"]);
    let _agent = node.spawn_ready();
    let routes = |family: &str| {
        let out = node.ns.sh(&["ip", family, "route", "show"]);
        out.lines().map(|l| l.split_whitespace().next().unwrap_or_default().to_string()).collect::<Vec<_>>()
    };
    let v4 = routes("-4");
    assert!(!v4.contains(&"198.19.99.0/24".to_string()), "a stale peer route stayed: {v4:?}");
    for kept in ["198.19.200.0/24", "198.19.77.5", "10.9.0.0/16"] {
        assert!(v4.contains(&kept.to_string()), "{kept} was removed: {v4:?}");
    }
    let v6 = routes("-6");
    assert!(!v6.contains(&"fd00:99::/64".to_string()), "a stale IPv6 peer route stayed: {v6:?}");
}

/// A peer whose subnet another producer already routes (a BGP-learned route, a hand-made one):
/// the agent neither takes that route over (a replace takes any route to the destination) nor,
/// when the peer goes, removes it.
#[test]
fn another_producers_route_to_a_peer_subnet_is_left_alone() {
    let node = Node::new(r#"{"Network": "198.19.0.0/16"}"#);
    node.ns.sh(&["ip", "route", "add", "198.19.77.0/24", "via", "198.18.41.3", "dev", "eth0", "proto", "202"]);
    let store = weft_lease::file::FileStore::open(node.dir.path().join("store")).unwrap();
    let peer = |subnet: &str, ip: &str, mac: &str| weft_lease::Lease {
        subnet: subnet.parse().unwrap(),
        attrs: weft_lease::LeaseAttrs {
            public_ip: ip.parse().unwrap(),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: serde_json::json!({"VNI": 1, "VtepMAC": mac}),
        },
        expires: None,
        created: None,
    };
    let taken = peer("198.19.77.0/24", "198.18.41.7", "02:00:00:00:00:77");
    store.put_lease(&taken).unwrap();
    store.put_lease(&peer("198.19.78.0/24", "198.18.41.8", "02:00:00:00:00:78")).unwrap();
    let _agent = node.spawn_ready();
    let route = |dst: &str| node.ns.sh(&["ip", "route", "show", dst]);
    assert!(route("198.19.78.0/24").contains("proto 200"), "the other peer is programmed");
    assert!(route("198.19.77.0/24").contains("via 198.18.41.3 dev eth0 proto 202"), "{}", route("198.19.77.0/24"));
    store.delete(&taken.subnet).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(route("198.19.77.0/24").contains("proto 202"), "removed with the peer: {}", node.log());
    assert_eq!(node.log().matches("belongs to another producer").count(), 1, "{}", node.log());
}

/// A peer route changed by hand in a way the model once ignored (its own MTU) is repaired by
/// the next resync, like any other drift.
#[test]
fn a_peer_route_given_an_mtu_by_hand_is_repaired() {
    let node = Node::new(r#"{"Network": "198.19.0.0/16", "Backend": {"Type": "host-gw"}}"#);
    let store = weft_lease::file::FileStore::open(node.dir.path().join("store")).unwrap();
    store
        .put_lease(&weft_lease::Lease {
            subnet: "198.19.78.0/24".parse().unwrap(),
            attrs: weft_lease::LeaseAttrs {
                public_ip: "198.18.41.8".parse().unwrap(),
                public_ipv6: None,
                backend_type: "host-gw".into(),
                backend_data: serde_json::Value::Null,
            },
            expires: None,
            created: None,
        })
        .unwrap();
    let _agent = node.spawn_ready_with(&["--resync", "1s"]);
    let route = || node.ns.sh(&["ip", "route", "show", "198.19.78.0/24"]);
    assert!(route().contains("via 198.18.41.8 dev eth0 proto 200"), "{}", route());
    node.ns.sh(&[
        "ip",
        "route",
        "replace",
        "198.19.78.0/24",
        "via",
        "198.18.41.8",
        "dev",
        "eth0",
        "proto",
        "200",
        "mtu",
        "1000",
    ]);
    assert!(route().contains("mtu 1000"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while route().contains("mtu") {
        assert!(Instant::now() < deadline, "the hand-set MTU stayed: {}\n{}", route(), node.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node moved from the udp backend to vxlan: the agent started on vxlan removes the TUN the
/// udp one left, and the forwarder that served it ends with it. Its udp route goes too.
#[test]
fn a_node_moved_off_udp_loses_its_tun_and_forwarder() {
    let node = Node::new(r#"{"Network": "198.19.0.0/16", "Backend": {"Type": "udp"}}"#);
    let agent = node.spawn_ready();
    let socket = node.dir.path().join("udp-forwarder.sock");
    let status = |s: &std::path::Path| weft_udp::forwarder::ask(s, &serde_json::json!({"op": "status"}));
    assert!(status(&socket).is_ok(), "no forwarder: {}", node.log());
    assert!(node.ns.sh(&["nft", "list", "table", "ip", "weft-agent"]).contains("chain input"));
    assert!(node.ns.sh(&["ip", "link", "show"]).contains("weft-udp"));
    // Its sending TAP goes with it too.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !node.ns.sh(&["ip", "link", "show"]).contains("weft-udp-tx") {
        assert!(Instant::now() < deadline, "no sending TAP: {:?}", status(&socket));
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(agent);
    std::fs::remove_file(node.dir.path().join("subnet.env")).unwrap();
    std::fs::write(node.dir.path().join("net-conf.json"), r#"{"Network": "198.19.0.0/16"}"#).unwrap();
    let _agent = node.spawn_ready();
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(&socket).is_ok() || node.ns.sh(&["ip", "link", "show"]).contains("weft-udp") {
        assert!(Instant::now() < deadline, "the TUN or its forwarder stayed: {}", node.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(node.ns.sh(&["ip", "link", "show"]).contains("weft.1"));
    assert!(!node.ns.sh(&["ip", "route", "show", "proto", "200"]).contains("weft-udp"));
    // The tunnel port's rules went with it (the input chain only the udp backend has).
    let rules = node.ns.sh(&["nft", "list", "table", "ip", "weft-agent"]);
    assert!(!rules.contains("chain input") && !rules.contains("8285"), "{rules}");
    assert!(node.log().contains("removed weft-udp"), "{}", node.log());
}

/// `KernelSegmentation: false`: the forwarder cuts large packets itself and makes no TAP; the
/// setting turned on and the agent restarted, the running forwarder is told and makes it (no
/// restart of the forwarder, no gap for the pods).
#[test]
fn udp_kernel_segmentation_is_a_setting_the_running_forwarder_follows() {
    let conf = |on: bool| {
        format!(r#"{{"Network": "198.19.0.0/16", "Backend": {{"Type": "udp", "KernelSegmentation": {on}}}}}"#)
    };
    let node = Node::new(&conf(false));
    let agent = node.spawn_ready();
    let socket = node.dir.path().join("udp-forwarder.sock");
    let status = || weft_udp::forwarder::ask(&socket, &serde_json::json!({"op": "status"})).unwrap();
    let first = status();
    assert_eq!(first["kernel_segmentation"], false, "{first}");
    assert!(first["kernel_cut"]["off"].as_str().unwrap().contains("KernelSegmentation: false"), "{first}");
    assert!(!node.ns.sh(&["ip", "link", "show"]).contains("weft-udp-tx"));
    drop(agent);
    std::fs::write(node.dir.path().join("net-conf.json"), conf(true)).unwrap();
    let _agent = node.spawn_ready();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = status();
        if now["kernel_cut"]["device"] == "weft-udp-tx" && node.ns.sh(&["ip", "link", "show"]).contains("weft-udp-tx") {
            assert_eq!(now["pid"], first["pid"], "the same forwarder");
            break;
        }
        assert!(Instant::now() < deadline, "the forwarder did not take the setting: {now}\n{}", node.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // A wrong value is refused, not ignored.
    let wrong = std::fs::read_to_string(node.dir.path().join("net-conf.json")).unwrap().replace("true", "\"yes\"");
    std::fs::write(node.dir.path().join("net-conf.json"), wrong).unwrap();
    let subnet_file = node.dir.path().join("subnet.env");
    let out = node.run(&["--subnet-file", subnet_file.to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("KernelSegmentation"));
}
