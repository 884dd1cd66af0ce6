//! Kill points: a plugin SIGKILLed at the entry of each of its state-changing system calls of an
//! ADD and of a DEL (strace's fault injection), then what a runtime does next — the ADD retried
//! (it may fail), DEL, ADD, DEL; or the DEL retried, ADD, DEL — and nothing may be left: no
//! reservation, no index entry, no veth that is not retired, no container link, no rule, no
//! saved config. For bridge + host-local with ipMasq, ptp + host-local with
//! ipMasq, and the `weft` meta plugin.
//!
//! The kill points are found by tracing one clean call: every `write`, `link`, `unlink`,
//! `rename`, `mkdir`, xattr change, `ftruncate`, `clone`, every `openat` that can create or
//! write, and every netlink request that is not a GET. Then one run per point injects SIGKILL
//! at the K-th call of that system call.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use serde_json::{json, Value};

/// The system calls traced for kill points.
const TRACED: &str = "openat,creat,write,writev,pwrite64,link,linkat,symlinkat,unlink,unlinkat,rename,renameat,\
renameat2,mkdir,mkdirat,setxattr,fsetxattr,lsetxattr,removexattr,fremovexattr,ftruncate,sendto,sendmsg,bind,\
clone,clone3,vfork";

fn verbose() -> bool {
    std::env::var_os("WEFT_KILLPOINTS_VERBOSE").is_some()
}

fn strace_available() -> bool {
    Command::new("strace").arg("-V").stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Whether a netlink request (a line of strace's log) only reads: `RTM_GET*`, also when strace
/// cannot name the type (a socket in another namespace: `0x12 /* NLMSG_??? */`).
fn is_netlink_get(line: &str) -> bool {
    let Some(rest) = line.split("nlmsg_type=").nth(1) else { return false };
    let token = rest.split([',', ' ']).next().unwrap_or("");
    if token.starts_with("RTM_GET") {
        return true;
    }
    let n = token.strip_prefix("0x").and_then(|h| u16::from_str_radix(h, 16).ok());
    n.is_some_and(|n| n >= 16 && n % 4 == 2)
}

/// Whether one traced call (a line of strace's log) changes state.
fn changes_state(line: &str) -> bool {
    let name = line.split('(').next().unwrap_or("");
    match name {
        "openat" => ["O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC"].iter().any(|f| line.contains(f)),
        "sendto" | "sendmsg" => !is_netlink_get(line),
        _ => true,
    }
}

/// One plugin under test: its name, config and where it keeps state.
struct Subject {
    plugin: &'static str,
    network: &'static str,
    conf: Value,
    ipam_dir: PathBuf,
    saved_dir: Option<PathBuf>,
}

type Make = Box<dyn Fn(&Path, &str) -> Subject>;

/// What follows a killed call: (harness, container, containerID, the killed call's config,
/// whether the killed call changes state, a description of the kill).
type Then<'a> = &'a dyn Fn(&Harness, &Ns, &str, &str, bool, &str);

struct Harness {
    node: Ns,
    bin: Dir,
    state: Dir,
    subject: Subject,
    make: Make,
    tag: String,
    points: usize,
}

impl Harness {
    fn new(make: impl Fn(&Path, &str) -> Subject + 'static) -> Harness {
        let node = Ns::new("n");
        let bin = weft_plugin_dir();
        let state = Dir::new("kill");
        let subject = make(state.path(), &unique("br"));
        Harness { node, bin, state, subject, make: Box::new(make), tag: unique("k"), points: 0 }
    }

    /// A node as new: fresh state directories and a bridge that does not exist yet.
    fn fresh(&mut self) {
        self.state = Dir::new("kill");
        self.subject = (self.make)(self.state.path(), &unique("br"));
    }

    /// Runs the plugin in the node, optionally under strace with `strace_args`.
    fn run(&self, cont: &Ns, id: &str, command: &str, stdin: &str, strace_args: &[String]) -> Outcome {
        let binary = self.bin.path().join(self.subject.plugin);
        let path = self.bin.path().display().to_string();
        let netns = cont.path();
        let locks = lock_dir_of(self.bin.path());
        let out = self
            .node
            .handle
            .run(|| {
                let mut cmd = if strace_args.is_empty() {
                    Command::new(&binary)
                } else {
                    let mut c = Command::new("strace");
                    c.args(strace_args).arg("--").arg(&binary);
                    c
                };
                let mut child = cmd
                    .env_clear()
                    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                    .env("CNI_COMMAND", command)
                    .env("CNI_CONTAINERID", id)
                    .env("CNI_NETNS", &netns)
                    .env("CNI_IFNAME", "eth0")
                    .env("CNI_PATH", &path)
                    .env(LOCK_DIR_ENV, &locks)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
                child.wait_with_output().unwrap()
            })
            .unwrap();
        Outcome {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        }
    }

    fn conf_with(&self, prev: Option<&Value>) -> String {
        let mut conf = self.subject.conf.clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        conf.to_string()
    }

    /// Runs `command` killed at the entry of the K-th `syscall`: the call it was killed in, or
    /// `None` when the command made fewer than K such calls (it ran to its end).
    fn run_killed(&self, cont: &Ns, id: &str, command: &str, stdin: &str, syscall: &str, k: usize) -> Option<String> {
        let log = self.state.path().join("kill.log");
        let args: Vec<String> = [
            "-qq".to_string(),
            "-o".to_string(),
            log.display().to_string(),
            "-e".to_string(),
            format!("trace={syscall}"),
            "-e".to_string(),
            format!("inject={syscall}:signal=KILL:when={k}"),
        ]
        .to_vec();
        self.run(cont, id, command, stdin, &args);
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let killed = lines.iter().position(|l| l.contains("killed by SIGKILL"))?;
        Some(lines[..killed].iter().rev().find(|l| l.starts_with(syscall)).unwrap_or(&"").to_string())
    }

    /// Nothing of attachment `id` is left, and no veth of the node is live.
    fn assert_clean(&self, cont: &Ns, id: &str, when: &str) {
        let ipam = &self.subject.ipam_dir;
        let left = reservations(ipam, self.subject.network);
        assert!(left.is_empty(), "{when}: reservations left: {left:?}");
        let index: Vec<String> = std::fs::read_dir(ipam.join(self.subject.network).join(".weft-index"))
            .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        assert!(index.is_empty(), "{when}: index entries left: {index:?}");
        for link in self.node.ip_json(&["link", "show", "type", "veth"]).as_array().unwrap() {
            let up = link["flags"].as_array().unwrap().iter().any(|f| f == "UP");
            assert!(link["group"] == retired_group().as_str() && !up, "{when}: a live veth on the node: {link}");
        }
        for link in cont.ip_json(&["link", "show"]).as_array().unwrap() {
            let name = link["ifname"].as_str().unwrap();
            let up = link["flags"].as_array().unwrap().iter().any(|f| f == "UP");
            assert!(name == "lo" || (name.starts_with("wdel") && !up), "{when}: container link left: {link}");
        }
        let rules = self.node.try_sh(&["nft", "-j", "list", "table", "inet", "weft-cni"]).1;
        assert!(!rules.contains(id), "{when}: rules of {id} left: {rules}");
        if let Some(saved) = &self.subject.saved_dir {
            let files: Vec<String> = std::fs::read_dir(saved)
                .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
                .unwrap_or_default();
            assert!(files.is_empty(), "{when}: saved configs left: {files:?}");
        }
    }

    fn add(&self, cont: &Ns, id: &str) -> Value {
        self.run(cont, id, "ADD", &self.conf_with(None), &[]).ok().json()
    }

    fn del(&self, cont: &Ns, id: &str, prev: Option<&Value>) {
        self.run(cont, id, "DEL", &self.conf_with(prev), &[]).ok();
    }

    /// Kills `command` at the entry of each of its state-changing system calls in turn: for every
    /// traced system call, the 1st, 2nd, ... call until the command makes no more of them. Each
    /// run starts from what `prepare` makes (the container and the attachment's config) and is
    /// followed by `then`, with the config the killed call had, whether the call changes
    /// state and its description.
    fn sweep(&mut self, command: &str, cold: bool, prepare: &dyn Fn(&Harness, &Ns, &str) -> String, then: Then<'_>) {
        let mut n = 0;
        for syscall in TRACED.split(',') {
            for k in 1.. {
                if cold {
                    self.fresh();
                }
                let cont = Ns::new("c");
                n += 1;
                let id = format!("{}{n}", self.tag);
                let stdin = prepare(self, &cont, &id);
                let killed = self.run_killed(&cont, &id, command, &stdin, syscall, k);
                let state_changing = killed.as_deref().is_some_and(changes_state);
                let when =
                    format!("{command} killed at {syscall} #{k}: {}", killed.as_deref().unwrap_or("(ran through)"));
                if verbose() && state_changing {
                    eprintln!("{when}");
                }
                then(self, &cont, &id, &stdin, state_changing, &when);
                if killed.is_none() {
                    break;
                }
                self.points += usize::from(state_changing);
            }
        }
    }

    /// Every ADD kill point, each followed by ADD (may fail; if it succeeds its addresses are
    /// all the attachment holds), DEL, ADD, DEL. `cold`: every ADD is the node's first (no
    /// bridge, no store yet); else the node has served attachments before.
    fn adds(&mut self, cold: bool) {
        let before = self.points;
        self.sweep("ADD", cold, &|h, _, _| h.conf_with(None), &|h, cont, id, conf, full, when| {
            let mut prev = None;
            if full {
                let retried = h.run(cont, id, "ADD", conf, &[]);
                prev = (retried.code == 0).then(|| retried.json());
            }
            if let Some(result) = &prev {
                let mut got: Vec<String> = result["ips"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|ip| ip["address"].as_str().unwrap().split('/').next().unwrap().to_string())
                    .collect();
                got.sort();
                let held = reservations(&h.subject.ipam_dir, h.subject.network);
                assert_eq!(held, got, "{when}: the retried ADD's addresses are not all that is held");
            }
            h.del(cont, id, prev.as_ref());
            h.assert_clean(cont, id, &format!("{when}, then ADD, DEL"));
            if full {
                let result = h.add(cont, id);
                h.del(cont, id, Some(&result));
                h.assert_clean(cont, id, &format!("{when}, then ADD, DEL, ADD, DEL"));
            }
        });
        assert!(self.points - before > 10, "too few ADD kill points: {}", self.points - before);
    }

    /// Every DEL kill point (after a good ADD), each followed by DEL, ADD, DEL.
    fn dels(&mut self) {
        let before = self.points;
        let prepare = |h: &Harness, cont: &Ns, id: &str| {
            let result = h.add(cont, id);
            h.conf_with(Some(&result))
        };
        self.sweep("DEL", false, &prepare, &|h, cont, id, conf, full, when| {
            // The runtime retries with the same config (prevResult included).
            h.run(cont, id, "DEL", conf, &[]).ok();
            h.assert_clean(cont, id, &format!("{when}, then DEL"));
            if full {
                let result = h.add(cont, id);
                h.del(cont, id, Some(&result));
                h.assert_clean(cont, id, &format!("{when}, then DEL, ADD, DEL"));
            }
        });
        assert!(self.points - before > 3, "too few DEL kill points: {}", self.points - before);
    }

    fn finish(self, what: &str) {
        assert_reaped(&self.node);
        eprintln!("{what}: {} kill points, nothing left", self.points);
    }
}

fn host_local(dir: &Path, subnet: &str) -> Value {
    json!({"type": "host-local", "dataDir": dir.join("ipam"), "ranges": [[{"subnet": subnet}]]})
}

#[test]
fn bridge_with_host_local_and_masquerade() {
    if !strace_available() {
        panic!("strace is needed (apt-get install strace)");
    }
    let mut h = Harness::new(|dir, bridge| Subject {
        plugin: "bridge",
        network: "killbr",
        conf: json!({"cniVersion": "1.0.0", "name": "killbr", "type": "bridge", "bridge": bridge,
            "isGateway": true, "ipMasq": true, "ipam": host_local(dir, "198.19.80.0/24")}),
        ipam_dir: dir.join("ipam"),
        saved_dir: None,
    });
    h.adds(true);
    h.adds(false);
    h.dels();
    h.finish("bridge + host-local");
}

#[test]
fn ptp_with_host_local_and_masquerade() {
    let mut h = Harness::new(|dir, _| Subject {
        plugin: "ptp",
        network: "killptp",
        conf: json!({"cniVersion": "1.0.0", "name": "killptp", "type": "ptp", "ipMasq": true,
            "ipam": host_local(dir, "198.19.81.0/24")}),
        ipam_dir: dir.join("ipam"),
        saved_dir: None,
    });
    h.adds(true);
    h.adds(false);
    h.dels();
    h.finish("ptp + host-local");
}

#[test]
fn the_meta_plugin() {
    let mut h = Harness::new(|dir, bridge| {
        let subnet_file = dir.join("subnet.env");
        std::fs::write(
            &subnet_file,
            "FLANNEL_NETWORK=198.19.0.0/16\nFLANNEL_SUBNET=198.19.82.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
        )
        .unwrap();
        Subject {
            plugin: "weft",
            network: "killmeta",
            conf: json!({"cniVersion": "1.0.0", "name": "killmeta", "type": "weft",
                "subnetFile": subnet_file, "dataDir": dir.join("saved"),
                "ipam": {"dataDir": dir.join("ipam")}, "delegate": {"bridge": bridge}}),
            ipam_dir: dir.join("ipam"),
            saved_dir: Some(dir.join("saved")),
        }
    });
    h.adds(true);
    h.adds(false);
    h.dels();
    h.finish("weft meta plugin");
}
