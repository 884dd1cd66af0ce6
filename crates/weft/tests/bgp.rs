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
        let bird_child = Command::new("ip")
            .args(["netns", "exec", &pair.bird.name, "bird", "-f", "-c"])
            .arg(pair.dir.path().join("bird.conf"))
            .arg("-s")
            .arg(pair.dir.path().join("bird.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bird (apt-get install bird2)");
        pair.children.push(bird_child);
        pair
    }

    fn socket(&self) -> String {
        self.dir.path().join("weft-bgp.sock").display().to_string()
    }

    fn weft(&mut self, extra: &[&str]) {
        let log = std::fs::File::create(self.dir.path().join("weft.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.weft.name])
            .arg(weft_bin())
            .args(["bgp", "run", "--local-as", "64512", "--router-id", "198.18.77.1", "--listen", "198.18.77.1"])
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
        let out =
            Command::new(weft_bin()).args(["bgp", "status", "--json", "--socket", &self.socket()]).output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    fn birdc(&self, args: &[&str]) -> String {
        let out = Command::new("birdc").arg("-s").arg(self.dir.path().join("bird.sock")).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn within(&self, what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "not within 20 s: {what}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
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

const BIRD: &str = r#"
router id 198.18.77.2;
protocol device {}
protocol static s1 { ipv4; route 198.19.200.0/24 blackhole; }
protocol bgp weft {
    local 198.18.77.2 as 64513;
    neighbor 198.18.77.1 as 64512;
    ipv4 { import all; export where source = RTS_STATIC; };
}
"#;

#[test]
fn weft_bgp_run_with_bird_learns_installs_and_cleans_up() {
    let mut pair = Pair::new(BIRD);
    pair.weft(&["--neighbor", "198.18.77.2,64513", "--announce", "198.19.100.0/24", "--install"]);
    pair.within("the session with BIRD established", || pair.status()["neighbors"][0]["state"] == "Established");
    let route = |p: &Pair| p.weft.sh(&["ip", "route", "show", "198.19.200.0/24"]);
    pair.within("BIRD's route in the kernel", || route(&pair).contains("via 198.18.77.2"));
    assert!(route(&pair).contains("proto 202"), "{}", route(&pair));
    pair.within("weft's route in BIRD", || {
        let r = pair.birdc(&["show", "route", "for", "198.19.100.1", "all"]);
        r.contains("198.19.100.0/24") && r.contains("BGP.as_path: 64512")
    });
    let status = pair.status();
    assert_eq!(status["neighbors"][0]["prefixes_received"], 1, "{status}");
    assert_eq!(status["neighbors"][0]["prefixes_advertised"], 1, "{status}");
    let table = Command::new(weft_bin()).args(["bgp", "status", "--socket", &pair.socket()]).output().unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("Established"));

    // BIRD withdraws its route: gone from the kernel.
    pair.birdc(&["disable", "s1"]);
    pair.within("the withdrawn route removed", || route(&pair).is_empty());
    pair.birdc(&["enable", "s1"]);
    pair.within("the route back", || route(&pair).contains("proto 202"));

    // weft stopped: what it installed is removed, BIRD sees the session end.
    let weft = pair.children.pop().unwrap();
    Command::new("kill").args(["-TERM", &weft.id().to_string()]).status().unwrap();
    pair.children.push(weft);
    pair.within("installed routes removed on stop", || route(&pair).is_empty());
    pair.within("BIRD sees the session down", || !pair.birdc(&["show", "protocols"]).contains("Established"));
}
