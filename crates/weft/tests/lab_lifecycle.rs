//! The lab in anyone's hands: names refused before anything is made; every way `up` can end —
//! refused, failed half-way, interrupted by a signal, killed — leaves a complete lab or nothing;
//! `down` removes everything from any state; `up` on an existing lab refuses other options or
//! repairs what died, keeping every address; `show --json` and `check` say what a user needs;
//! and a 100-node lab comes up, checks clean and goes down without touching the machine's
//! neighbour table.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn weft(args: &[&str]) -> Output {
    Command::new(weft_bin()).args(args).stdin(Stdio::null()).output().unwrap()
}

/// Kills `pid` and waits until it is gone (or a zombie nobody reaps yet).
fn kill_and_wait(pid: i32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')) {
            return;
        }
        assert!(Instant::now() < deadline, "{pid} did not die");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A lab name of this test; the lab is taken down when dropped.
struct Name(String);

impl Name {
    fn new() -> Name {
        require_root();
        Name(unique("lab"))
    }

    fn lab(&self, args: &[&str]) -> Output {
        let mut argv = vec!["lab"];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["--name", &self.0]);
        weft(&argv)
    }

    fn up_ok(&self, args: &[&str]) {
        let mut argv = vec!["up"];
        argv.extend_from_slice(args);
        let out = self.lab(&argv);
        assert!(out.status.success(), "lab up failed: {}", text(&out));
    }

    fn show(&self) -> Value {
        let out = self.lab(&["show", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Whatever of the lab exists: namespaces, its state directory, its processes.
    fn leftovers(&self) -> Vec<String> {
        let prefix = format!("{}-", self.0);
        let mut out: Vec<String> = std::fs::read_dir("/run/netns")
            .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .map(|n| format!("namespace {n}"))
            .collect();
        let dir = format!("/run/weft-lab/{}", self.0);
        for path in [dir.clone(), format!("/run/weft-lab/.{}.lock", self.0)] {
            if std::path::Path::new(&path).exists() {
                out.push(path);
            }
        }
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else { continue };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&format!("{dir}/")) || cmd.contains(&format!("supervise --name {}", self.0)) {
                // A process that just exited but is not reaped yet does not count.
                let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
                if !stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')) {
                    out.push(format!("process {cmd}"));
                }
            }
        }
        out
    }

    fn assert_gone(&self, when: &str) {
        let left = self.leftovers();
        assert!(left.is_empty(), "{when}: left behind: {left:?}");
    }
}

impl Drop for Name {
    fn drop(&mut self) {
        let _ = self.lab(&["down"]);
    }
}

#[test]
fn names_are_refused_before_anything_is_made() {
    require_root();
    let before: Vec<String> = std::fs::read_dir("/run/weft-lab")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    let long = "a".repeat(90);
    for bad in ["", "a b", "a.b", "a/b", "../x", "Lab", "-x", "a-b", "1lab", long.as_str()] {
        let arg = format!("--name={bad}");
        for command in [vec!["lab", "up", arg.as_str()], vec!["lab", "down", arg.as_str()]] {
            let out = weft(&command);
            assert_eq!(out.status.code(), Some(2), "{command:?}: {}", text(&out));
            assert!(text(&out).contains("is not a lab name"), "{command:?}: {}", text(&out));
        }
    }
    let after: Vec<String> = std::fs::read_dir("/run/weft-lab")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    assert!(after.iter().all(|n| before.contains(n) || n.trim_start_matches('.').starts_with("wt")), "{after:?}");
    assert!(!std::path::Path::new("/run/weft-lab/a").exists() && !std::path::Path::new("/run/weft-lab/a b").exists());
}

#[test]
fn refused_and_failed_ups_leave_nothing() {
    let name = Name::new();
    for (args, says) in [
        (vec!["--pods", "300"], "holds 253 pods"),
        (vec!["--network", "198.18.0.0/15"], "overlaps the lab's underlay"),
        (vec!["--nodes", "0"], "between 1 and 200"),
        (vec!["--nodes", "201"], "between 1 and 200"),
        (vec!["--nodes", "40", "--pods", "30"], "at most 1000"),
        (vec!["--backend", "bgp", "--block-size", "31"], "BlockSize 31"),
        (vec!["--backend", "bgp", "--route-reflectors", "4"], "the lab has 3 nodes"),
        (vec!["--backend", "vxlan", "--block-size", "26"], "options of --backend bgp"),
        (vec!["--backend", "bgp", "--subnet-len", "24"], "not for --backend bgp"),
        // A peer must be a router on the underlay, not a node, loopback or a pod address.
        (vec!["--backend", "bgp", "--peer", "198.18.0.2,64512"], "at an address no node has"),
        (vec!["--backend", "bgp", "--peer", "127.0.0.1,65000"], "at an address no node has"),
        (vec!["--backend", "bgp", "--peer", "198.19.0.5,65000"], "at an address no node has"),
    ] {
        let started = Instant::now();
        let mut argv = vec!["up"];
        argv.extend_from_slice(&args);
        let out = name.lab(&argv);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(says), "{args:?}: {}", text(&out));
        assert!(started.elapsed() < Duration::from_secs(2), "{args:?} refused only after {:?}", started.elapsed());
        name.assert_gone(&format!("refused {args:?}"));
    }
    // Half-way: the switch is made, then the store cannot be reached (nothing listens there).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = name.lab(&["up", "--nodes", "3", "--store", &format!("etcd=http://127.0.0.1:{port}")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("nothing of it is left"), "{}", text(&out));
    name.assert_gone("up failed after making the switch");
}

/// Sends `signal` to `up` after each delay: `up` ends with the lab complete (and working) or
/// with nothing of it left, and says so with its exit status.
#[test]
fn an_interrupted_up_leaves_a_complete_lab_or_nothing() {
    use nix::sys::signal::Signal::{SIGHUP, SIGINT, SIGTERM};
    let mut interrupted = 0;
    for (signal, delay_ms) in
        [(SIGTERM, 5), (SIGINT, 30), (SIGTERM, 60), (SIGHUP, 100), (SIGINT, 150), (SIGTERM, 200), (SIGINT, 300)]
    {
        let name = Name::new();
        let child = Command::new(weft_bin())
            .args(["lab", "up", "--name", &name.0, "--nodes", "3", "--pods", "2"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
        let out = child.wait_with_output().unwrap();
        let when = format!("{signal} after {delay_ms} ms");
        use std::os::unix::process::ExitStatusExt;
        if out.status.signal() == Some(signal as i32) {
            // Before `up` listened for signals: it had made nothing yet.
            name.assert_gone(&when);
        } else if out.status.success() {
            let show = name.show();
            assert_eq!(show["complete"], true, "{when}");
            let check = name.lab(&["check"]);
            assert!(check.status.success(), "{when}: {}", text(&check));
        } else {
            interrupted += 1;
            assert_eq!(out.status.code(), Some(128 + signal as i32), "{when}: {}", text(&out));
            assert!(text(&out).contains("removed what was made"), "{when}: {}", text(&out));
            name.assert_gone(&when);
        }
    }
    assert!(interrupted >= 3, "only {interrupted} of the signals arrived while up was at work");
}

/// `up` killed with SIGKILL at several moments: `down` removes everything; `up` again builds a
/// complete lab.
#[test]
fn down_and_up_after_a_killed_up() {
    for (delay_ms, then_up) in [(30, false), (200, true), (500, false), (900, true)] {
        let name = Name::new();
        let mut child = Command::new(weft_bin())
            .args(["lab", "up", "--name", &name.0, "--nodes", "3", "--pods", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        if then_up {
            name.up_ok(&["--nodes", "3", "--pods", "1"]);
            assert_eq!(name.show()["complete"], true);
            let check = name.lab(&["check"]);
            assert!(check.status.success(), "killed after {delay_ms} ms, up again: {}", text(&check));
        }
        let out = name.lab(&["down"]);
        assert!(out.status.success(), "{}", text(&out));
        name.assert_gone(&format!("up killed after {delay_ms} ms, then down"));
    }
}

/// `down` from broken states: a damaged or missing state file, a node namespace deleted under
/// its running agent.
#[test]
fn down_from_broken_states() {
    for breakage in ["garbage state", "no state", "namespace gone"] {
        let name = Name::new();
        name.up_ok(&["--nodes", "2", "--pods", "1"]);
        let state = format!("/run/weft-lab/{}/lab.json", name.0);
        let supervisor = name.show()["supervisor_pid"].as_u64().unwrap();
        match breakage {
            "garbage state" => std::fs::write(&state, "{not json").unwrap(),
            "no state" => std::fs::remove_file(&state).unwrap(),
            _ => weft_netns::delete_named(&format!("{}-node1", name.0)).unwrap(),
        }
        if breakage == "garbage state" {
            // The supervisor keeps supervising what it knew (it used to exit without a word).
            std::thread::sleep(Duration::from_millis(500));
            let stat = std::fs::read_to_string(format!("/proc/{supervisor}/stat")).unwrap_or_default();
            assert!(
                stat.rsplit_once(')').is_some_and(|(_, r)| !r.trim_start().starts_with('Z')),
                "the supervisor exited"
            );
        }
        let out = name.lab(&["down"]);
        assert!(out.status.success(), "{breakage}: {}", text(&out));
        name.assert_gone(breakage);
    }
    // A damaged state file does not stop `up` either: what is left is removed, the lab built.
    let name = Name::new();
    name.up_ok(&["--nodes", "2", "--pods", "1"]);
    std::fs::write(format!("/run/weft-lab/{}/lab.json", name.0), "[]").unwrap();
    name.up_ok(&["--nodes", "2", "--pods", "1"]);
    let check = name.lab(&["check"]);
    assert!(check.status.success(), "{}", text(&check));
}

#[test]
fn up_again_refuses_other_options_and_repairs_what_died() {
    let name = Name::new();
    name.up_ok(&["--nodes", "2", "--pods", "2", "--lease-ttl", "1h"]);
    let before = name.show();
    // Other options: refused, nothing changed.
    let out = name.lab(&["up", "--nodes", "3", "--backend", "host-gw"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("--nodes is 2, asked 3") && said.contains("--backend is vxlan, asked host-gw"), "{said}");
    assert_eq!(name.show()["supervisor_pid"], before["supervisor_pid"]);
    // The same options (or none): already up.
    let out = name.lab(&["up", "--nodes", "2"]);
    assert!(out.status.success() && text(&out).contains("already up"), "{}", text(&out));
    // A killed supervisor is started again; every address stays.
    kill_and_wait(before["supervisor_pid"].as_u64().unwrap() as i32);
    let out = name.lab(&["up"]);
    assert!(out.status.success() && text(&out).contains("started the supervisor again"), "{}", text(&out));
    let after = name.show();
    assert_ne!(after["supervisor_pid"], before["supervisor_pid"]);
    assert_eq!(after["pods"], before["pods"]);
    assert_eq!(after["nodes"].as_array().unwrap().len(), 2);
    let check = name.lab(&["check"]);
    assert!(check.status.success(), "{}", text(&check));
    // --recreate applies the new options.
    name.up_ok(&["--nodes", "3", "--pods", "1", "--recreate"]);
    let show = name.show();
    assert_eq!((show["nodes"].as_array().unwrap().len(), show["pods"].as_array().unwrap().len()), (3, 3));
}

#[test]
fn a_killed_etcd_is_started_again_with_every_lease() {
    let name = Name::new();
    name.up_ok(&["--nodes", "2", "--pods", "1", "--store", "etcd"]);
    let before = name.show();
    kill_and_wait(before["store"]["pid"].as_u64().unwrap() as i32);
    let out = name.lab(&["up"]);
    assert!(out.status.success() && text(&out).contains("started etcd again"), "{}", text(&out));
    let after = name.show();
    assert_ne!(after["store"]["pid"], before["store"]["pid"]);
    let subnets =
        |v: &Value| -> Vec<Value> { v["nodes"].as_array().unwrap().iter().map(|n| n["subnet"].clone()).collect() };
    assert_eq!(subnets(&after), subnets(&before));
    assert_eq!(after["pods"], before["pods"]);
    let check = name.lab(&["check"]);
    assert!(check.status.success(), "{}", text(&check));
}

#[test]
fn show_json_and_check_say_what_a_user_needs() {
    let name = Name::new();
    name.up_ok(&["--nodes", "3", "--pods", "2"]);
    let show = name.show();
    assert_eq!(show["network"], "198.19.0.0/16");
    assert_eq!(show["backend"], "vxlan");
    assert_eq!(show["lease_ttl"], 86400);
    assert!(show["supervisor_pid"].as_u64().is_some(), "{show}");
    assert_eq!(show["underlay"]["namespace"], format!("{}-sw", name.0));
    assert_eq!(show["underlay"]["bridge"], "sw0");
    assert_eq!(show["underlay"]["network"], "198.18.0.0/16");
    let free = show["underlay"]["free_address"].as_str().unwrap().to_string();
    let node = &show["nodes"][1];
    assert_eq!(node["health_address"], "127.0.0.1:9901");
    assert!(show["nodes"].as_array().unwrap().iter().all(|n| n["address"] != free.as_str()));
    // One node only.
    let out = name.lab(&["show", "--json", "node2"]);
    let one: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(one["name"], "node2");
    assert_eq!(one["pods"].as_array().unwrap().len(), 2);
    assert!(one.get("nodes").is_none());
    // A sample of pairs, then one pod cut off: check names exactly the pairs that fail.
    let out = name.lab(&["check", "--pairs", "7"]);
    assert!(
        out.status.success() && text(&out).contains("all 7 pod pairs connected (a sample of 30)"),
        "{}",
        text(&out)
    );
    let pod_ns = format!("{}-node2-pod1", name.0);
    let status = Command::new("ip").args(["-n", &pod_ns, "link", "set", "eth0", "down"]).status().unwrap();
    assert!(status.success());
    let out = name.lab(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    let said = text(&out);
    assert!(said.contains("10 of 30 pod pairs failed"), "{said}");
    let failed: Vec<&str> = said.lines().filter(|l| l.contains(" -> ")).collect();
    assert_eq!(failed.len(), 10, "{said}");
    assert!(failed.iter().all(|l| l.contains("node2-pod1")), "{said}");
}

fn table_fulls() -> u64 {
    // One line per CPU after the header; the last column, in hex.
    std::fs::read_to_string("/proc/net/stat/arp_cache")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().last()?, 16).ok())
        .sum()
}

/// 100 nodes with a pod each: up, a full check clean the first time, down; the machine's
/// neighbour table never overflows and the lab adds about one entry per node that the kernel
/// counts against its limit.
#[test]
fn a_hundred_node_lab() {
    let name = Name::new();
    let fulls = table_fulls();
    let started = Instant::now();
    name.up_ok(&["--nodes", "100", "--pods", "1"]);
    let up = started.elapsed();
    let started = Instant::now();
    let check = name.lab(&["check"]);
    assert!(check.status.success(), "first check: {}", text(&check));
    assert!(text(&check).contains("all 9900 pod pairs connected"), "{}", text(&check));
    let checked = started.elapsed();
    let mut counted = 0;
    for ns in std::fs::read_dir("/run/netns").unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()) {
        if !ns.starts_with(&format!("{}-", name.0)) {
            continue;
        }
        let out = Command::new("ip").args(["-n", &ns, "neigh", "show", "nud", "all"]).output().unwrap();
        counted += String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.contains("PERMANENT")).count();
    }
    assert!(counted <= 150, "{counted} neighbour entries the kernel counts against its limit");
    assert_eq!(table_fulls(), fulls, "the neighbour table overflowed");
    let started = Instant::now();
    let out = name.lab(&["down"]);
    assert!(out.status.success(), "{}", text(&out));
    name.assert_gone("down");
    eprintln!(
        "100 nodes: up {up:.1?}, check of 9900 pairs {checked:.1?}, down {:.1?}, {counted} counted neighbour entries",
        started.elapsed()
    );
}

/// Found by an adversarial test: two `up`s of one lab at once (one is refused, the other builds
/// it); a binary replaced in place under a running lab (agents restart with the new one); a pid
/// file naming someone else's process (repair leaves it alive); a state file deleted by hand
/// (`up` rebuilds in one go); `check --pairs 0` (refused).
#[test]
fn operators_worst_day_on_the_lab() {
    let name = Name::new();
    let bin = Dir::new("bin");
    let exe = bin.path().join("weft");
    std::fs::copy(weft_bin(), &exe).unwrap();
    let up = |extra: &[&str]| {
        Command::new(&exe)
            .args(["lab", "up", "--name", &name.0, "--nodes", "2", "--pods", "1"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (up(&[]), up(&[]));
    let outs = [first.wait_with_output().unwrap(), second.wait_with_output().unwrap()];
    let ok = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(ok, 1, "{}\n{}", text(&outs[0]), text(&outs[1]));
    assert!(outs.iter().any(|o| text(o).contains("is at work")), "{}\n{}", text(&outs[0]), text(&outs[1]));
    let check = name.lab(&["check"]);
    assert!(check.status.success(), "{}", text(&check));

    // The binary replaced in place, then an agent dies: the supervisor starts the new binary.
    let staged = bin.path().join("weft.new");
    std::fs::copy(weft_bin(), &staged).unwrap();
    std::fs::rename(&staged, &exe).unwrap();
    let show = name.show();
    let old = show["nodes"][0]["agent_pid"].as_i64().unwrap() as i32;
    kill_and_wait(old);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = name.show()["nodes"][0]["agent_pid"].as_i64().unwrap() as i32;
        if now != old && std::fs::read_to_string(format!("/proc/{now}/stat")).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "node1's agent was not restarted after the binary was replaced");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A pid file naming another process: `up` repairs the lab and leaves that process alone.
    let mut bystander = Command::new("sleep").arg("60").spawn().unwrap();
    kill_and_wait(name.show()["supervisor_pid"].as_i64().unwrap() as i32);
    kill_and_wait(name.show()["nodes"][0]["agent_pid"].as_i64().unwrap() as i32);
    std::fs::write(format!("/run/weft-lab/{}/node1/agent.pid", name.0), bystander.id().to_string()).unwrap();
    let out = name.lab(&["up"]);
    assert!(out.status.success() && text(&out).contains("started the supervisor again"), "{}", text(&out));
    assert!(bystander.try_wait().unwrap().is_none(), "repair killed a process that is not the lab's");
    let _ = bystander.kill();
    let _ = bystander.wait();
    let check = name.lab(&["check"]);
    assert!(check.status.success(), "{}", text(&check));

    // No sampling of zero pairs.
    let out = name.lab(&["check", "--pairs", "0"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    // The state file deleted by hand: one `up` rebuilds the lab.
    std::fs::remove_file(format!("/run/weft-lab/{}/lab.json", name.0)).unwrap();
    name.up_ok(&["--nodes", "2", "--pods", "1"]);
    let check = name.lab(&["check"]);
    assert!(check.status.success(), "{}", text(&check));
}
