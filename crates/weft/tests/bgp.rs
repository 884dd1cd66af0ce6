//! `weft bgp run` against BIRD 2, each in a namespace the test makes: the session comes up
//! (`weft bgp status`), each side learns the other's prefix, weft installs BIRD's into the
//! kernel as a protocol-202 route and removes it when BIRD withdraws it, and stopping weft
//! removes what it installed.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Two namespaces on one veth: weft's (198.18.77.1) and BIRD's (198.18.77.2).
struct Pair {
    weft: Ns,
    bird: Ns,
    dir: Dir,
    children: Vec<Child>,
}

impl Pair {
    fn new(bird_conf: &str) -> Pair {
        let weft = Ns::new("w");
        let bird = Ns::new("b");
        weft.sh(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &bird.name]);
        weft.sh(&["ip", "addr", "add", "198.18.77.1/24", "dev", "eth0"]);
        weft.sh(&["ip", "link", "set", "eth0", "up"]);
        bird.sh(&["ip", "addr", "add", "198.18.77.2/24", "dev", "eth0"]);
        bird.sh(&["ip", "link", "set", "eth0", "up"]);
        let dir = Dir::new("bgp");
        std::fs::write(dir.path().join("bird.conf"), bird_conf).unwrap();
        let mut pair = Pair { weft, bird, dir, children: Vec::new() };
        pair.start_bird();
        pair
    }

    /// BIRD in its namespace with `bird.conf` (again, after a kill).
    fn start_bird(&mut self) {
        let _ = std::fs::remove_file(self.dir.path().join("bird.sock"));
        let child = Command::new("ip")
            .args(["netns", "exec", &self.bird.name, "bird", "-f", "-c"])
            .arg(self.dir.path().join("bird.conf"))
            .arg("-s")
            .arg(self.dir.path().join("bird.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bird (apt-get install bird2)");
        self.children.push(child);
    }

    fn socket(&self) -> String {
        self.dir.path().join("weft-bgp.sock").display().to_string()
    }

    fn weft(&mut self, extra: &[&str]) {
        let log = std::fs::File::create(self.dir.path().join("weft.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.weft.name])
            .arg(weft_bin())
            .args(["bgp", "run", "--local-as", "64512", "--router-id", "198.18.77.1"])
            .args(if extra.contains(&"--listen") { &[][..] } else { &["--listen", "198.18.77.1"][..] })
            .args(["--socket", &self.socket()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weft.log")).unwrap_or_default()
    }

    fn status(&self) -> serde_json::Value {
        status_at(std::path::Path::new(&self.socket()))
    }

    fn birdc(&self, args: &[&str]) -> String {
        let out = Command::new("birdc").arg("-s").arg(self.dir.path().join("bird.sock")).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn within(&self, what: &str, cond: impl Fn() -> bool) {
        wait_for(20, what, cond, || self.log());
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Processes killed when dropped.
/// `weft bgp status --json` of the speaker on `socket` (Null when none answers).
fn status_at(socket: &std::path::Path) -> serde_json::Value {
    let out = Command::new(weft_bin()).args(["bgp", "status", "--json", "--socket"]).arg(socket).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

struct Kill(Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Two fresh namespaces joined by a veth `eth0` at each end, with these addresses (/24).
fn joined(a_ip: &str, b_ip: &str) -> (Ns, Ns) {
    let (a, b) = (Ns::new("a"), Ns::new("b"));
    a.sh(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b.name]);
    for (ns, ip) in [(&a, a_ip), (&b, b_ip)] {
        ns.sh(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.sh(&["ip", "link", "set", "eth0", "up"]);
        ns.sh(&["ip", "link", "set", "lo", "up"]);
    }
    (a, b)
}

/// `weft bgp run ARGS` in `ns`, its control socket and log `NAME.sock` / `NAME.log` in `dir`.
fn spawn_weft(ns: &Ns, dir: &std::path::Path, name: &str, args: &[&str]) -> Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(weft_bin())
        .args(["bgp", "run", "--socket", &dir.join(format!("{name}.sock")).display().to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

const BIRD: &str = r#"
router id 198.18.77.2;
protocol device {}
protocol static s1 { ipv4; route 198.19.200.0/24 blackhole; route 198.19.201.0/25 blackhole; }
protocol bgp weft {
    local 198.18.77.2 as 64513;
    neighbor 198.18.77.1 as 64512;
    ipv4 { import all; export where source = RTS_STATIC; };
}
"#;

#[test]
fn weft_bgp_run_with_bird_learns_installs_and_cleans_up() {
    let mut pair = Pair::new(BIRD);
    pair.weft(&[
        "--neighbor",
        "198.18.77.2,64513",
        "--announce",
        "198.19.100.0/24",
        "--announce",
        "198.19.101.0/24",
        "--export",
        "198.19.100.0/24",
        "--install",
        "--accept",
        "198.19.200.0/24",
        "--health",
        "198.18.77.1:9179",
    ]);
    pair.within("the session with BIRD established", || pair.status()["neighbors"][0]["state"] == "Established");
    let route = |p: &Pair| p.weft.sh(&["ip", "route", "show", "198.19.200.0/24"]);
    pair.within("BIRD's route in the kernel", || route(&pair).contains("via 198.18.77.2"));
    assert!(route(&pair).contains("proto 202"), "{}", route(&pair));
    // Through a nexthop object of weft's (the kernel checks the gateway once, not per route).
    let nexthops = |p: &Pair| p.weft.sh(&["ip", "nexthop", "show"]);
    assert!(route(&pair).contains("nhid"), "{}", route(&pair));
    assert!(nexthops(&pair).contains("via 198.18.77.2 dev eth0 scope link proto 202"), "{}", nexthops(&pair));
    pair.within("weft's route in BIRD", || {
        let r = pair.birdc(&["show", "route", "for", "198.19.100.1", "all"]);
        r.contains("198.19.100.0/24") && r.contains("BGP.as_path: 64512")
    });
    // 198.19.101.0/24 is outside --export: BIRD is not sent it (advertised: 1).
    assert!(!pair.birdc(&["show", "route", "for", "198.19.101.1"]).contains("198.19.101.0/24"));
    // 198.19.201.0/25 is outside --accept: received, not accepted, not installed.
    let status = pair.status();
    assert_eq!(status["neighbors"][0]["prefixes_received"], 2, "{status}");
    assert_eq!(status["neighbors"][0]["prefixes_accepted"], 1, "{status}");
    assert_eq!(status["neighbors"][0]["prefixes_advertised"], 1, "{status}");
    assert!(pair.weft.sh(&["ip", "route", "show", "198.19.201.0/25"]).is_empty());
    let table = Command::new(weft_bin()).args(["bgp", "status", "--socket", &pair.socket()]).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("Established") && table.contains("accepted"), "{table}");
    // The same on /metrics (--health), and /healthz answers.
    let get = |path: &str| {
        let script = format!(
            "exec 3<>/dev/tcp/198.18.77.1/9179; printf 'GET {path} HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n' >&3; cat <&3"
        );
        pair.weft.try_sh(&["bash", "-c", &script]).1
    };
    assert!(get("/healthz").starts_with("HTTP/1.0 200 OK"), "{}", get("/healthz"));
    let metrics = get("/metrics");
    for line in [
        "weft_bgp_session_established{neighbor=\"198.18.77.2\",as=\"64513\"} 1",
        "weft_bgp_prefixes_received{neighbor=\"198.18.77.2\",as=\"64513\"} 2",
        "weft_bgp_prefixes_accepted{neighbor=\"198.18.77.2\",as=\"64513\"} 1",
        "weft_bgp_prefixes_advertised{neighbor=\"198.18.77.2\",as=\"64513\"} 1",
        "weft_bgp_routes_installed 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} not in\n{metrics}");
    }

    // Behind its back: its nexthop object flushed (the route goes with it) and a route of
    // protocol 202 it never learned: within a reconcile (10 s) both are set right.
    pair.weft.sh(&["ip", "nexthop", "flush"]);
    pair.weft.sh(&["ip", "route", "add", "198.19.202.0/24", "via", "198.18.77.2", "proto", "202"]);
    assert!(route(&pair).is_empty());
    pair.within("the route put back", || route(&pair).contains("proto 202"));
    pair.within("the stray route removed", || pair.weft.sh(&["ip", "route", "show", "198.19.202.0/24"]).is_empty());
    pair.within("status counts it in the kernel", || pair.status()["in_kernel"] == 1);
    // BIRD withdraws its route: gone from the kernel, and its unused nexthop object soon after.
    pair.birdc(&["disable", "s1"]);
    pair.within("the withdrawn route removed", || route(&pair).is_empty());
    pair.within("the unused nexthop object removed", || nexthops(&pair).is_empty());
    pair.birdc(&["enable", "s1"]);
    pair.within("the route back", || route(&pair).contains("proto 202") && !nexthops(&pair).is_empty());

    // weft stopped: what it installed is removed, BIRD sees the session end.
    let weft = pair.children.pop().unwrap();
    Command::new("kill").args(["-TERM", &weft.id().to_string()]).status().unwrap();
    pair.children.push(weft);
    pair.within("installed routes removed on stop", || route(&pair).is_empty());
    pair.within("nexthop objects removed on stop", || nexthops(&pair).is_empty());
    pair.within("/healthz down with the speaker", || !get("/healthz").contains("200 OK"));
    pair.within("BIRD sees the session down", || !pair.birdc(&["show", "protocols"]).contains("Established"));
}

/// A neighbour that sends a malformed UPDATE gets the NOTIFICATION the RFCs name and its
/// session ends; the other sessions, and the routes learned over them, are untouched.
#[test]
fn a_malformed_update_ends_only_its_own_session() {
    use std::io::{Read, Write};
    use weft_bgp::packet::{self, Codec, Message};
    let mut pair = Pair::new(BIRD);
    pair.bird.sh(&["ip", "addr", "add", "198.18.77.3/24", "dev", "eth0"]);
    pair.weft(&["--neighbor", "198.18.77.2,64513", "--neighbor", "198.18.77.3,64514,passive", "--install"]);
    let route = |p: &Pair| p.weft.sh(&["ip", "route", "show", "198.19.200.0/24"]);
    pair.within("BIRD's route in the kernel", || route(&pair).contains("proto 202"));
    let notification = pair
        .bird
        .handle
        .run(|| {
            // From 198.18.77.3 (bound before connecting).
            use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
            let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
            bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::new(198, 18, 77, 3, 0)).unwrap();
            connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::new(198, 18, 77, 1, 179)).unwrap();
            let mut stream = std::net::TcpStream::from(fd);
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            stream.write_all(&raw_open(64514, 90, "198.18.77.3")).unwrap();
            stream.write_all(&packet::to_bytes(&Message::Keepalive, Codec::default())).unwrap();
            // Its OPEN and KEEPALIVE, then an UPDATE with an unrecognized well-known attribute.
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let mut seen = Vec::new();
            while !seen.contains(&Message::Keepalive) {
                let n = stream.read(&mut chunk).unwrap();
                assert!(n > 0, "weft closed the session: {seen:?}");
                buf.extend_from_slice(&chunk[..n]);
                while let Some((m, used)) = packet::decode(&buf, Codec::default()).unwrap() {
                    buf.drain(..used);
                    seen.push(m);
                }
            }
            let mut bad = packet::MARKER.to_vec();
            let body = [0u8, 0, 0, 4, 0x40, 0x63, 1, 0];
            bad.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
            bad.push(2);
            bad.extend_from_slice(&body);
            stream.write_all(&bad).unwrap();
            loop {
                let n = stream.read(&mut chunk).unwrap();
                assert!(n > 0, "closed without a NOTIFICATION");
                buf.extend_from_slice(&chunk[..n]);
                while let Some((m, used)) = packet::decode(&buf, Codec::default()).unwrap() {
                    buf.drain(..used);
                    if let Message::Notification(n) = m {
                        return n;
                    }
                }
            }
        })
        .unwrap();
    assert_eq!((notification.code, notification.subcode), (3, 2), "{notification}");
    std::thread::sleep(Duration::from_millis(300));
    let status = pair.status();
    assert_eq!(status["neighbors"][0]["state"], "Established", "{status}");
    assert!(route(&pair).contains("proto 202"), "BIRD's route went: {}", pair.log());
}

/// GoBGP (Debian's gobgpd 3) in place of BIRD, over iBGP: the session comes up and each side
/// learns the other's prefix; weft installs GoBGP's.
#[test]
fn weft_bgp_run_with_gobgp_over_ibgp() {
    with_gobgp(64512, 78);
}

/// The same over eBGP.
#[test]
fn weft_bgp_run_with_gobgp_over_ebgp() {
    with_gobgp(64513, 81);
}

/// weft (AS 64512, 198.18.NET.1) and GoBGP (AS `gobgp_as`, 198.18.NET.2) in a pair of
/// namespaces: each learns the other's prefix, weft installs GoBGP's.
fn with_gobgp(gobgp_as: u32, net: u8) {
    let (weft_ip, gobgp_ip) = (format!("198.18.{net}.1"), format!("198.18.{net}.2"));
    let (weft, gobgp) = joined(&weft_ip, &gobgp_ip);
    let dir = Dir::new("gobgp");
    let conf = format!(
        r#"
[global.config]
  as = {gobgp_as}
  router-id = "{gobgp_ip}"
  local-address-list = ["{gobgp_ip}"]
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{weft_ip}"
    peer-as = 64512
"#
    );
    std::fs::write(dir.path().join("gobgp.toml"), conf).unwrap();
    let api = format!("unix://{}", dir.path().join("gobgp.sock").display());
    let gobgpd = Command::new("ip")
        .args(["netns", "exec", &gobgp.name, "gobgpd", "-f"])
        .arg(dir.path().join("gobgp.toml"))
        .args(["--api-hosts", &api])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("gobgpd (apt-get install gobgpd)");
    let mut guard = Kill(vec![gobgpd]);
    let args = ["--local-as", "64512", "--router-id", &weft_ip, "--listen", &weft_ip];
    let neighbor = format!("{gobgp_ip},{gobgp_as}");
    let more = ["--neighbor", &neighbor, "--announce", "198.19.101.0/24", "--install"];
    guard.0.push(spawn_weft(&weft, dir.path(), "weft", &[&args[..], &more[..]].concat()));
    let gobgp_cli = |args: &[&str]| {
        let out = Command::new("gobgp").args(["--target", &api]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let log = || std::fs::read_to_string(dir.path().join("weft.log")).unwrap_or_default();
    // GoBGP waits a random 5-10 s before its first connection to a new neighbour; weft
    // connects itself at once, so this is quick either way.
    let within = |what: &str, cond: &dyn Fn() -> bool| wait_for(30, what, cond, log);
    within("GoBGP's API up", &|| !gobgp_cli(&["neighbor"]).is_empty());
    gobgp_cli(&["global", "rib", "add", "198.19.210.0/24", "nexthop", &gobgp_ip, "-a", "ipv4"]);
    within("the session established", &|| gobgp_cli(&["neighbor"]).contains("Establ"));
    within("weft's prefix in GoBGP", &|| gobgp_cli(&["global", "rib", "-a", "ipv4"]).contains("198.19.101.0/24"));
    within("GoBGP's prefix in the kernel", &|| {
        weft.sh(&["ip", "route", "show", "198.19.210.0/24"]).contains(&format!("via {gobgp_ip}"))
    });
    let rib = gobgp_cli(&["global", "rib", "-a", "ipv4", "198.19.101.0/24"]);
    assert!(rib.contains(&weft_ip), "next hop: {rib}");
    // eBGP: weft's AS the path GoBGP holds; iBGP: an empty path and a LOCAL_PREF.
    let ebgp_path = rib.contains(" 64512 ");
    let ibgp = gobgp_as == 64512;
    assert!(ebgp_path != ibgp && rib.contains("LocalPref") == ibgp, "{rib}");
}

/// FRR's bgpd (Debian's frr, run without zebra) over eBGP: the session comes up and each side
/// learns the other's prefix; weft installs FRR's.
#[test]
fn weft_bgp_run_with_frr_over_ebgp() {
    with_frr(64513, 79);
}

/// The same over iBGP.
#[test]
fn weft_bgp_run_with_frr_over_ibgp() {
    with_frr(64512, 82);
}

/// weft (AS 64512, 198.18.NET.1) and FRR's bgpd (AS `frr_as`, 198.18.NET.2).
fn with_frr(frr_as: u32, net: u8) {
    let (weft_ip, frr_ip) = (format!("198.18.{net}.1"), format!("198.18.{net}.2"));
    let (weft, frr) = joined(&weft_ip, &frr_ip);
    let dir = Dir::new("frr");
    let conf = format!(
        "router bgp {frr_as}
 bgp router-id {frr_ip}
 no bgp ebgp-requires-policy
 no bgp network import-check
 neighbor {weft_ip} remote-as 64512
 address-family ipv4 unicast
  network 198.19.220.0/24
 exit-address-family
"
    );
    std::fs::write(dir.path().join("bgpd.conf"), conf).unwrap();
    let bgpd = Command::new("ip")
        .args(["netns", "exec", &frr.name, "/usr/lib/frr/bgpd", "-Z", "-S", "-P", "0", "-f"])
        .arg(dir.path().join("bgpd.conf"))
        .arg("-i")
        .arg(dir.path().join("bgpd.pid"))
        .arg("--vty_socket")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("FRR's bgpd (apt-get install frr)");
    let mut guard = Kill(vec![bgpd]);
    let socket = dir.path().join("weft.sock").display().to_string();
    let args = ["--local-as", "64512", "--router-id", &weft_ip, "--listen", &weft_ip];
    let neighbor = format!("{frr_ip},{frr_as}");
    let more = ["--neighbor", &neighbor, "--announce", "198.19.102.0/24", "--install"];
    guard.0.push(spawn_weft(&weft, dir.path(), "weft", &[&args[..], &more[..]].concat()));
    let vtysh = |command: &str| {
        let out = Command::new("vtysh")
            .arg("--vty_socket")
            .arg(dir.path())
            .args(["-d", "bgpd", "-c", command])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let log = || {
        let log = std::fs::read_to_string(dir.path().join("weft.log")).unwrap_or_default();
        format!("{log}\n{}", vtysh("show bgp summary"))
    };
    let within = |what: &str, cond: &dyn Fn() -> bool| wait_for(30, what, cond, log);
    within("FRR's prefix in the kernel", &|| {
        weft.sh(&["ip", "route", "show", "198.19.220.0/24"]).contains(&format!("via {frr_ip}"))
    });
    // eBGP: weft's AS in the path FRR holds; iBGP: a local path ("Local") from weft.
    let path = if frr_as == 64512 { "Local" } else { "64512" };
    within("weft's prefix in FRR", &|| {
        let r = vtysh("show bgp ipv4 unicast 198.19.102.0/24");
        r.contains(path) && r.contains(&weft_ip)
    });
    assert_eq!(status_at(std::path::Path::new(&socket))["neighbors"][0]["state"], "Established");
}

const BIRD_GR: &str = r#"
router id 198.18.77.2;
protocol device {}
protocol static s1 { ipv4; route 198.19.200.0/24 blackhole; }
protocol kernel { ipv4 { export where source = RTS_BGP; }; }
protocol bgp weft {
    local 198.18.77.2 as 64513;
    neighbor 198.18.77.1 as 64512;
    graceful restart on;
    ipv4 { import all; export where source = RTS_STATIC; };
}
"#;

/// Graceful restart both ways (RFC 4724). weft killed and started again: BIRD keeps weft's
/// route in its kernel all along (weft offers graceful restart; started again after a kill it
/// says it is restarting), and the route weft had installed stays too. BIRD killed and started again: weft keeps BIRD's route
/// installed all along and takes it back when BIRD is done.
#[test]
fn graceful_restart_with_bird_both_ways() {
    let mut pair = Pair::new(BIRD_GR);
    let args =
        ["--neighbor", "198.18.77.2,64513", "--announce", "198.19.100.0/24", "--install", "--restart-time", "30"];
    pair.weft(&args);
    let mine_in_bird = |p: &Pair| p.bird.sh(&["ip", "route", "show", "198.19.100.0/24"]).contains("198.18.77.1");
    let birds_in_weft = |p: &Pair| p.weft.sh(&["ip", "route", "show", "198.19.200.0/24"]).contains("proto 202");
    pair.within("both routes in place", || mine_in_bird(&pair) && birds_in_weft(&pair));

    // weft killed (no Cease, its socket left behind), then started again.
    let weft = pair.children.pop().unwrap();
    Command::new("kill").args(["-KILL", &weft.id().to_string()]).status().unwrap();
    pair.children.push(weft);
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        assert!(mine_in_bird(&pair), "BIRD dropped weft's route while weft was away");
        assert!(birds_in_weft(&pair), "weft's installed route went with it");
    }
    pair.weft(&args);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pair.status()["neighbors"][0]["state"] != "Established" {
        assert!(Instant::now() < deadline, "not established again: {}", pair.log());
        assert!(mine_in_bird(&pair) && birds_in_weft(&pair), "a route dropped during the restart");
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        assert!(mine_in_bird(&pair) && birds_in_weft(&pair), "a route dropped after the restart");
    }
    assert!(pair.log().contains("restarting"), "{}", pair.log());
    // The nexthop object of the first run taken over, not a second one made.
    let nexthops = pair.weft.sh(&["ip", "nexthop", "show"]);
    assert_eq!(nexthops.lines().count(), 1, "{nexthops}");

    // BIRD killed: weft keeps its route installed; BIRD back: still there, taken back.
    let bird = pair.children.remove(0);
    Command::new("kill").args(["-KILL", &bird.id().to_string()]).status().unwrap();
    let mut bird = bird;
    let _ = bird.wait();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        assert!(birds_in_weft(&pair), "weft dropped BIRD's route while BIRD was away");
    }
    pair.start_bird();
    pair.within("the session with BIRD again", || {
        pair.birdc(&["show", "protocols"]).contains("Established") && birds_in_weft(&pair)
    });
}

/// Route reflection (RFC 4456) with BIRD: weft reflects between two BIRD clients — the route
/// one announces reaches the other with ORIGINATOR_ID and CLUSTER_LIST — and BIRD reflects
/// between two weft clients.
#[test]
fn route_reflection_with_bird_both_ways() {
    // A hub namespace and two spokes, each on its own veth and /24.
    let hub = Ns::new("h");
    let spokes = [Ns::new("s"), Ns::new("s")];
    for (i, spoke) in spokes.iter().enumerate() {
        let (h, s) = (format!("198.18.{}.1/24", 80 + i), format!("198.18.{}.2/24", 80 + i));
        let link = format!("to{i}");
        hub.sh(&["ip", "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &spoke.name]);
        hub.sh(&["ip", "addr", "add", &h, "dev", &link]);
        hub.sh(&["ip", "link", "set", &link, "up"]);
        spoke.sh(&["ip", "addr", "add", &s, "dev", "eth0"]);
        spoke.sh(&["ip", "link", "set", "eth0", "up"]);
        spoke.sh(&["ip", "route", "add", "default", "via", &format!("198.18.{}.1", 80 + i)]);
    }
    let dir = Dir::new("rr");
    let mut guard = Kill(Vec::new());
    let bird = |ns: &Ns, name: &str, conf: String| {
        std::fs::write(dir.path().join(format!("{name}.conf")), conf).unwrap();
        Command::new("ip")
            .args(["netns", "exec", &ns.name, "bird", "-f", "-c"])
            .arg(dir.path().join(format!("{name}.conf")))
            .arg("-s")
            .arg(dir.path().join(format!("{name}.sock")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let birdc = |name: &str, args: &[&str]| {
        let out =
            Command::new("birdc").arg("-s").arg(dir.path().join(format!("{name}.sock"))).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let weft = |ns: &Ns, name: &str, args: &[&str]| spawn_weft(ns, dir.path(), name, args);
    let status = |name: &str| status_at(&dir.path().join(format!("{name}.sock")));
    let within = |what: &str, cond: &dyn Fn() -> bool| wait_for(30, what, cond, String::new);
    let client = |i: usize, prefix: &str| {
        format!(
            "router id 198.18.{n}.2;
protocol device {{}}
protocol static {{ ipv4; route {prefix} blackhole; }}
protocol bgp hub {{
    local 198.18.{n}.2 as 64512;
    neighbor 198.18.{n}.1 as 64512;
    ipv4 {{ import all; export where source = RTS_STATIC; }};
}}
",
            n = 80 + i
        )
    };

    // weft reflects for two BIRD clients.
    guard.0.push(bird(&spokes[0], "c0", client(0, "198.19.230.0/24")));
    guard.0.push(bird(&spokes[1], "c1", client(1, "198.19.231.0/24")));
    let rr_args = [
        "--local-as",
        "64512",
        "--router-id",
        "198.18.80.1",
        "--listen",
        "0.0.0.0",
        "--neighbor",
        "198.18.80.2,64512,rr-client",
        "--neighbor",
        "198.18.81.2,64512,rr-client",
    ];
    guard.0.push(weft(&hub, "rr", &rr_args));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = birdc("c1", &["show", "route", "all", "198.19.230.0/24"]);
        if r.contains("BGP.originator_id: 198.18.80.2") && r.contains("BGP.cluster_list: 198.18.80.1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "c1 has not c0's route, reflected: {r}\n{}\n{}\n{}",
            birdc("c1", &["show", "protocols", "all"]),
            status("rr"),
            std::fs::read_to_string(dir.path().join("rr.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    within("c0 has c1's route, reflected", &|| {
        birdc("c0", &["show", "route", "all", "198.19.231.0/24"]).contains("BGP.originator_id: 198.18.81.2")
    });
    let s = status("rr");
    assert!(s["neighbors"].as_array().unwrap().iter().all(|n| n["state"] == "Established"), "{s}");
    for c in guard.0.drain(..) {
        let mut c = c;
        let _ = c.kill();
        let _ = c.wait();
    }

    // BIRD reflects for two weft clients.
    let rr_conf = "router id 198.18.80.1;
protocol device {}
protocol bgp c0 { local 198.18.80.1 as 64512; neighbor 198.18.80.2 as 64512; rr client; rr cluster id 198.18.80.1;
    ipv4 { import all; export all; }; }
protocol bgp c1 { local 198.18.81.1 as 64512; neighbor 198.18.81.2 as 64512; rr client; rr cluster id 198.18.80.1;
    ipv4 { import all; export all; }; }
"
    .to_string();
    guard.0.push(bird(&hub, "birdrr", rr_conf));
    for (i, spoke) in spokes.iter().enumerate() {
        let (rid, peer, prefix) =
            (format!("198.18.{}.2", 80 + i), format!("198.18.{}.1,64512", 80 + i), format!("198.19.{}.0/24", 240 + i));
        let args = [
            "--local-as",
            "64512",
            "--router-id",
            &rid,
            "--listen",
            &rid,
            "--neighbor",
            &peer,
            "--announce",
            &prefix,
            "--install",
        ];
        guard.0.push(weft(spoke, &format!("w{i}"), &args));
    }
    within("each weft client learns the other's prefix through BIRD", &|| {
        status("w0")["neighbors"][0]["prefixes_received"] == 1 && status("w1")["neighbors"][0]["prefixes_received"] == 1
    });
    // (Installing it needs the next hop resolved through another route — the originator is on
    // another segment here — which weft does not do yet: reflection is what this test shows.)
}

const BIRD_V6: &str = r#"
router id 198.18.77.2;
protocol device {}
protocol static s4 { ipv4; route 198.19.200.0/24 blackhole; }
protocol static s6 { ipv6; route fd00:200::/64 blackhole; }
protocol bgp weft {
    local 198.18.77.2 as 64513;
    neighbor 198.18.77.1 as 64512;
    ipv4 { import all; export where source = RTS_STATIC; };
    ipv6 { import all; export where source = RTS_STATIC; next hop address fd00:77::2; };
}
"#;

/// IPv6 over the same session (multiprotocol BGP, RFC 4760) with BIRD: each side learns the
/// other's IPv6 prefix with its IPv6 next hop, and weft installs BIRD's.
#[test]
fn ipv6_prefixes_with_bird() {
    let mut pair = Pair::new(BIRD_V6);
    pair.weft.sh(&["ip", "-6", "addr", "add", "fd00:77::1/64", "dev", "eth0", "nodad"]);
    pair.bird.sh(&["ip", "-6", "addr", "add", "fd00:77::2/64", "dev", "eth0", "nodad"]);
    pair.weft(&[
        "--neighbor",
        "198.18.77.2,64513",
        "--announce",
        "198.19.100.0/24",
        "--announce",
        "fd00:100::/64",
        "--next-hop6",
        "fd00:77::1",
        "--install",
    ]);
    let route6 = |p: &Pair| p.weft.sh(&["ip", "-6", "route", "show", "fd00:200::/64"]);
    pair.within("BIRD's IPv6 route in the kernel", || route6(&pair).contains("via fd00:77::2"));
    assert!(route6(&pair).contains("proto 202"), "{}", route6(&pair));
    pair.within("weft's IPv6 prefix in BIRD", || {
        let r = pair.birdc(&["show", "route", "for", "fd00:100::1", "all"]);
        r.contains("fd00:100::/64") && r.contains("fd00:77::1")
    });
    assert!(pair.weft.sh(&["ip", "route", "show", "198.19.200.0/24"]).contains("proto 202"), "IPv4 alongside");
}

const BIRD_V6_TRANSPORT: &str = r#"
router id 198.18.77.2;
protocol device {}
protocol static s4 { ipv4; route 198.19.200.0/24 blackhole; }
protocol static s6 { ipv6; route fd00:200::/64 blackhole; }
protocol bgp weft6 {
    local fd00:77::2 as 64513;
    neighbor fd00:77::1 as 64512;
    ipv6 { import all; export where source = RTS_STATIC; };
}
protocol bgp weft4 {
    local 198.18.77.2 as 64513;
    neighbor 198.18.77.1 as 64512;
    ipv4 { import all; export where source = RTS_STATIC; };
}
"#;

/// Sessions over IPv6 transport: weft listens on every address (`--listen ::`, one socket for
/// both families) and BIRD has two sessions with it, one over IPv6 (weft connects) and one over
/// IPv4 (BIRD connects: it arrives on the IPv6 socket as a v4-mapped address and must still be
/// known as its neighbour). Each carries its family's prefixes both ways.
#[test]
fn sessions_over_ipv6_transport_with_bird() {
    let mut pair = Pair::new(BIRD_V6_TRANSPORT);
    pair.weft.sh(&["ip", "-6", "addr", "add", "fd00:77::1/64", "dev", "eth0", "nodad"]);
    pair.bird.sh(&["ip", "-6", "addr", "add", "fd00:77::2/64", "dev", "eth0", "nodad"]);
    pair.weft(&[
        "--listen",
        "::",
        "--neighbor",
        "fd00:77::2,64513",
        "--neighbor",
        "198.18.77.2,64513,passive",
        "--announce",
        "198.19.100.0/24",
        "--announce",
        "fd00:100::/64",
        "--next-hop6",
        "fd00:77::1",
        "--install",
    ]);
    pair.within("both sessions established", || {
        let s = pair.status();
        s["neighbors"].as_array().is_some_and(|n| n.len() == 2 && n.iter().all(|n| n["state"] == "Established"))
    });
    let status = pair.status();
    assert_eq!(status["neighbors"][0]["address"], "fd00:77::2", "{status}");
    let route6 = |p: &Pair| p.weft.sh(&["ip", "-6", "route", "show", "fd00:200::/64"]);
    pair.within("BIRD's IPv6 route in the kernel", || route6(&pair).contains("via fd00:77::2"));
    pair.within("BIRD's IPv4 route in the kernel", || {
        pair.weft.sh(&["ip", "route", "show", "198.19.200.0/24"]).contains("via 198.18.77.2")
    });
    pair.within("weft's prefixes in BIRD", || {
        let r6 = pair.birdc(&["show", "route", "for", "fd00:100::1", "all"]);
        let r4 = pair.birdc(&["show", "route", "for", "198.19.100.1", "all"]);
        r6.contains("fd00:77::1") && r6.contains("weft6") && r4.contains("198.18.77.1") && r4.contains("weft4")
    });
}

/// A raw neighbour's OPEN (hold time 30 s, 4-octet AS) as bytes.
fn raw_open(asn: u32, hold_time: u16, router_id: &str) -> Vec<u8> {
    use weft_bgp::packet::{self, Codec, Message, Open};
    let capabilities = vec![packet::Capability::FourOctetAs(asn)];
    let open = Open { asn, hold_time, router_id: router_id.parse().unwrap(), capabilities };
    packet::to_bytes(&Message::Open(open), Codec::default())
}

/// Polls `cond` every 50 ms for `secs` seconds; the failure says what and `detail()`.
fn wait_for(secs: u64, what: &str, cond: impl Fn() -> bool, detail: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "not within {secs} s: {what}\n{}", detail());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads BGP messages from `stream` until `until` says stop; every message read, in order.
fn read_until(
    stream: &mut std::net::TcpStream,
    until: impl Fn(&weft_bgp::packet::Message) -> bool,
) -> Vec<weft_bgp::packet::Message> {
    use std::io::Read;
    use weft_bgp::packet::{self, Codec};
    let (mut buf, mut chunk, mut seen) = (Vec::new(), [0u8; 4096], Vec::new());
    loop {
        let n = stream.read(&mut chunk).unwrap_or(0);
        assert!(n > 0, "closed after {seen:?} ({:?} -> {:?})", stream.local_addr(), stream.peer_addr());
        buf.extend_from_slice(&chunk[..n]);
        while let Some((m, used)) = packet::decode(&buf, Codec::default()).unwrap() {
            buf.drain(..used);
            let done = until(&m);
            seen.push(m);
            if done {
                return seen;
            }
        }
    }
}

/// A connection collision (RFC 4271 §6.8) played by a raw peer: weft connects to it, and
/// before answering the peer connects to weft too, with an OPEN whose BGP identifier is
/// `peer_id`. weft sends its OPEN on the second connection as well, then keeps the connection
/// opened by the speaker with the higher identifier, closes the other with a Cease
/// (subcode 7), and the session comes up on the one kept.
fn collision(net: u8, peer_id: &str) {
    use std::io::Write;
    use weft_bgp::packet::{self, Codec, Message};
    let (weft_ip, peer_ip) = (format!("198.18.{net}.1"), format!("198.18.{net}.2"));
    let (weft, peer) = joined(&weft_ip, &peer_ip);
    let dir = Dir::new("collision");
    let listener = peer.handle.run(|| std::net::TcpListener::bind((peer_ip.as_str(), 179)).unwrap()).unwrap();
    let args = ["--local-as", "64512", "--router-id", &weft_ip, "--listen", &weft_ip, "--hold-time", "30"];
    let neighbor = format!("{peer_ip},64513");
    let _weft = Kill(vec![spawn_weft(&weft, dir.path(), "weft", &[&args[..], &["--neighbor", &neighbor]].concat())]);
    let (mut first, _) = listener.accept().unwrap();
    first.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    read_until(&mut first, |m| matches!(m, Message::Open(_)));
    let mut second = peer
        .handle
        .run(|| {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match std::net::TcpStream::connect((weft_ip.as_str(), 179)) {
                    Ok(s) => return s,
                    Err(e) => assert!(Instant::now() < deadline, "{e}"),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .unwrap();
    second.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let open = raw_open(64513, 30, peer_id);
    second.write_all(&open).unwrap();
    let weft_id: std::net::Ipv4Addr = weft_ip.parse().unwrap();
    let peer_id: std::net::Ipv4Addr = peer_id.parse().unwrap();
    // The connection the higher identifier opened stays: the second (the peer's) or the first.
    // On the second, weft's OPEN comes first either way (and, when it is given up, the Cease
    // right after it: read in one go, so nothing read is lost between two reads).
    let peer_wins = peer_id > weft_id;
    let seen = read_until(&mut second, |m| {
        matches!(m, Message::Notification(_)) || peer_wins && matches!(m, Message::Open(_))
    });
    assert!(matches!(seen[0], Message::Open(_)), "weft's OPEN first on the second connection: {seen:?}");
    let (mut kept, seen) = if peer_wins {
        (second, read_until(&mut first, |m| matches!(m, Message::Notification(_))))
    } else {
        (first, seen)
    };
    let Some(Message::Notification(n)) = seen.last() else { unreachable!() };
    assert_eq!((n.code, n.subcode), (6, 7), "Cease, connection collision resolution: {seen:?}");
    if peer_id < weft_id {
        kept.write_all(&open).unwrap();
    }
    kept.write_all(&packet::to_bytes(&Message::Keepalive, Codec::default())).unwrap();
    let seen = read_until(&mut kept, |m| matches!(m, Message::Keepalive));
    assert!(!seen.iter().any(|m| matches!(m, Message::Notification(_))), "{seen:?}");
    let status = || status_at(&dir.path().join("weft.sock"));
    let established = || status()["neighbors"][0]["state"] == "Established";
    wait_for(10, "established on the kept connection", established, || {
        let log = std::fs::read_to_string(dir.path().join("weft.log")).unwrap_or_default();
        format!("{}\n{log}", status())
    });
}

#[test]
fn a_collision_keeps_the_connection_of_the_higher_identifier_the_peers() {
    collision(83, "198.18.83.9");
}

#[test]
fn a_collision_keeps_the_connection_of_the_higher_identifier_weft_s() {
    collision(84, "198.18.0.9");
}

/// Two weft speakers that each connect to the other at the same moment (a mesh starting up):
/// whatever the collision, one session comes up, once, on each side.
#[test]
fn two_wefts_connecting_to_each_other_at_once() {
    let (a, b) = joined("198.18.85.1", "198.18.85.2");
    let dir = Dir::new("mesh");
    let speaker = |ns: &Ns, me: &str, other: &str, name: &str| {
        let args = ["--local-as", "64512", "--router-id", me, "--listen", me, "--announce"];
        let prefix = format!("198.19.{}.0/24", if name == "a" { 1 } else { 2 });
        let neighbor = format!("{other},64512");
        spawn_weft(ns, dir.path(), name, &[&args[..], &[&prefix, "--neighbor", &neighbor]].concat())
    };
    let _guard =
        Kill(vec![speaker(&a, "198.18.85.1", "198.18.85.2", "a"), speaker(&b, "198.18.85.2", "198.18.85.1", "b")]);
    let log = |name: &str| std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap_or_default();
    let status = |name: &str| status_at(&dir.path().join(format!("{name}.sock")));
    let both_up = || ["a", "b"].iter().all(|n| status(n)["neighbors"][0]["prefixes_accepted"] == 1);
    wait_for(20, "a session with each other's prefix", both_up, || format!("{}\n{}", log("a"), log("b")));
    std::thread::sleep(Duration::from_millis(500));
    for name in ["a", "b"] {
        let log = log(name);
        assert_eq!(log.matches("established").count(), 1, "{log}");
        assert!(!log.contains(" down"), "{log}");
    }
}

/// The descriptors `pid` holds.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Connections that never say anything do not pile up (each one given up is closed, whether
/// or not the neighbour closes its end), and running out of descriptors does not stop the
/// speaker from accepting connections once they are free again: the neighbour still gets its
/// session.
#[test]
fn idle_connections_and_descriptor_exhaustion_leave_the_listener_working() {
    let (weft, peer) = joined("198.18.86.1", "198.18.86.2");
    let dir = Dir::new("fds");
    let args = ["--local-as", "64512", "--router-id", "198.18.86.1", "--listen", "198.18.86.1"];
    let more = ["--neighbor", "198.18.86.2,64513,passive", "--announce", "198.19.86.0/24"];
    let child = spawn_weft(&weft, dir.path(), "weft", &[&args[..], &more[..]].concat());
    // `ip netns exec` execs weft: the child's pid is weft's.
    let pid = child.id();
    let _guard = Kill(vec![child]);
    std::thread::sleep(Duration::from_millis(300));
    let before = descriptors(pid);
    let connect = || peer.handle.run(|| std::net::TcpStream::connect("198.18.86.1:179")).unwrap();
    let mut idle: Vec<std::net::TcpStream> = (0..50).filter_map(|_| connect().ok()).collect();
    assert_eq!(idle.len(), 50);
    std::thread::sleep(Duration::from_millis(500));
    let during = descriptors(pid);
    assert!(during <= before + 4, "50 idle connections held {during} descriptors (from {before})");
    idle.clear();
    // Out of descriptors: connections beyond the limit fail; once they are gone, a neighbour
    // connects again and its session comes up.
    let limit = before + 4;
    let ok = Command::new("prlimit").args(["--pid", &pid.to_string(), &format!("--nofile={limit}:")]).status();
    assert!(ok.unwrap().success());
    let flood: Vec<_> = (0..20).filter_map(|_| connect().ok()).collect();
    std::thread::sleep(Duration::from_millis(300));
    drop(flood);
    std::thread::sleep(Duration::from_millis(500));
    let ok = Command::new("prlimit").args(["--pid", &pid.to_string(), "--nofile=1024:"]).status();
    assert!(ok.unwrap().success());
    use std::io::Write;
    use weft_bgp::packet::{self, Codec, Message};
    let mut session = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while session.is_none() {
        assert!(Instant::now() < deadline, "the listener no longer accepts");
        session = connect().ok();
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut session = session.unwrap();
    session.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    session.write_all(&raw_open(64513, 30, "198.18.86.2")).unwrap();
    session.write_all(&packet::to_bytes(&Message::Keepalive, Codec::default())).unwrap();
    let seen = read_until(&mut session, |m| matches!(m, Message::Update(_)));
    assert!(matches!(seen.last(), Some(Message::Update(_))), "weft's prefix announced: {seen:?}");
}

/// Operators' mistakes and signals: a second speaker on the same control socket, or a second
/// one installing routes in the same namespace, is refused (it took the first one's socket and
/// routes); a speaker killed whose socket was then cleaned away still knows, started again, that
/// the routes of protocol 202 in the kernel are its own leftovers (kept for the restart time,
/// then removed if no neighbour sends them again); SIGHUP stops it cleanly.
#[test]
fn second_speakers_leftovers_and_hang_up() {
    let mut pair = Pair::new(BIRD);
    let args = ["--neighbor", "198.18.77.2,64513", "--install", "--restart-time", "2"];
    pair.weft(&args);
    let route = |p: &Pair| p.weft.sh(&["ip", "route", "show", "198.19.200.0/24"]);
    pair.within("BIRD's route in the kernel", || route(&pair).contains("proto 202"));
    // (Bounded: a second speaker that is not refused would run on.)
    let second = |extra: &[&str]| {
        Command::new("timeout")
            .args(["5", "ip", "netns", "exec", &pair.weft.name])
            .arg(weft_bin())
            .args(["bgp", "run", "--local-as", "64512", "--router-id", "198.18.77.1", "--listen", "127.0.0.1:1179"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = second(&["--socket", &pair.socket()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already answers"), "{out:?}");
    let other = pair.dir.path().join("other.sock").display().to_string();
    let out = second(&["--socket", &other, "--install"]);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("installs routes in this network namespace"),
        "{out:?}"
    );
    assert!(route(&pair).contains("proto 202"), "the first speaker's route stays");
    assert_eq!(pair.status()["neighbors"][0]["state"], "Established");

    // Killed; its socket cleaned away; BIRD withdraws meanwhile; started again: the leftover
    // goes after the restart time.
    let weft = pair.children.pop().unwrap();
    Command::new("kill").args(["-KILL", &weft.id().to_string()]).status().unwrap();
    pair.children.push(weft);
    std::thread::sleep(Duration::from_millis(200));
    std::fs::remove_file(pair.socket()).unwrap();
    pair.birdc(&["disable", "s1"]);
    pair.weft(&args);
    pair.within("the leftover route removed", || route(&pair).is_empty());
    assert!(pair.log().contains("restarting: 2 routes"), "{}", pair.log());

    // SIGHUP: a clean stop.
    pair.birdc(&["enable", "s1"]);
    pair.within("the route back", || route(&pair).contains("proto 202"));
    let weft = pair.children.pop().unwrap();
    Command::new("kill").args(["-HUP", &weft.id().to_string()]).status().unwrap();
    pair.children.push(weft);
    pair.within("routes removed on SIGHUP", || route(&pair).is_empty());
    pair.within("the socket removed", || !std::path::Path::new(&pair.socket()).exists());
    assert!(pair.log().contains("stopped"), "{}", pair.log());
}

/// A neighbour that came from a `--neighbor-range` is listed while its session is up, and
/// forgotten when it is over (a range many addresses pass through does not keep each).
#[test]
fn range_neighbours_are_forgotten_when_their_session_is_over() {
    use std::io::Write;
    use weft_bgp::packet::{self, Codec, Message};
    let (weft, peer) = joined("198.18.87.1", "198.18.87.2");
    let dir = Dir::new("range");
    let args = ["--local-as", "64512", "--router-id", "198.18.87.1", "--listen", "198.18.87.1"];
    let more = ["--neighbor-range", "198.18.87.0/24,64513", "--restart-time", "1"];
    let _guard = Kill(vec![spawn_weft(&weft, dir.path(), "weft", &[&args[..], &more[..]].concat())]);
    let status = || status_at(&dir.path().join("weft.sock"));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut session = loop {
        if let Ok(s) = peer.handle.run(|| std::net::TcpStream::connect("198.18.87.1:179")).unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "weft does not listen");
        std::thread::sleep(Duration::from_millis(50));
    };
    session.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    session.write_all(&raw_open(64513, 30, "198.18.87.2")).unwrap();
    session.write_all(&packet::to_bytes(&Message::Keepalive, Codec::default())).unwrap();
    read_until(&mut session, |m| matches!(m, Message::Keepalive));
    wait_for(5, "established", || status()["neighbors"][0]["state"] == "Established", || status().to_string());
    drop(session);
    wait_for(
        5,
        "the range neighbour forgotten",
        || status()["neighbors"].as_array().is_some_and(|n| n.is_empty()),
        || status().to_string(),
    );
}
