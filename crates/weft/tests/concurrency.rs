//! 100 ADDs from separate processes at once get 100 distinct addresses; 100 DELs at once leave
//! no reservation, veth or rule behind.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use serde_json::json;

const N: usize = 100;

fn run_all(node: &Ns, dir: &std::path::Path, command: &str, conts: &[Ns], conf: &str) -> Vec<Outcome> {
    let calls: Vec<(&str, String, &Ns)> =
        conts.iter().enumerate().map(|(i, c)| (command, format!("conc{i}"), c)).collect();
    run_at_once(node, dir, &calls, conf)
}

/// Starts every `(command, containerID, container)` call of bridge at once and waits for all.
fn run_at_once(node: &Ns, dir: &std::path::Path, calls: &[(&str, String, &Ns)], conf: &str) -> Vec<Outcome> {
    node.handle
        .run(|| {
            let children: Vec<_> = calls
                .iter()
                .map(|(command, id, c)| {
                    let mut child = Command::new(dir.join("bridge"))
                        .env_clear()
                        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                        .env("CNI_COMMAND", command)
                        .env("CNI_CONTAINERID", id)
                        .env("CNI_NETNS", c.path())
                        .env("CNI_IFNAME", "eth0")
                        .env("CNI_PATH", dir)
                        .env(LOCK_DIR_ENV, lock_dir_of(dir))
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .expect("spawn");
                    child.stdin.take().unwrap().write_all(conf.as_bytes()).unwrap();
                    child
                })
                .collect();
            children
                .into_iter()
                .map(|c| {
                    let out = c.wait_with_output().unwrap();
                    Outcome {
                        code: out.status.code().unwrap_or(-1),
                        stdout: String::from_utf8_lossy(&out.stdout).into(),
                        stderr: String::from_utf8_lossy(&out.stderr).into(),
                    }
                })
                .collect()
        })
        .unwrap()
}

/// A node with N containers, weft's plugins, an IPAM directory and a bridge name.
struct Fixture {
    node: Ns,
    conts: Vec<Ns>,
    dir: Dir,
    data: Dir,
    br: String,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            node: Ns::new("n"),
            conts: (0..N).map(|_| Ns::new("c")).collect(),
            dir: weft_plugin_dir(),
            data: Dir::new("ipam"),
            br: unique("br"),
        }
    }

    /// A bridge config of network `name` in `subnet`, with `ipMasq` as given.
    fn conf(&self, name: &str, subnet: &str, masq: bool) -> String {
        json!({
            "cniVersion": "1.0.0", "name": name, "type": "bridge", "bridge": self.br, "isGateway": true,
            "ipMasq": masq,
            "ipam": {"type": "host-local", "dataDir": self.data.path(), "ranges": [[{"subnet": subnet}]]}
        })
        .to_string()
    }
}

#[test]
fn hundred_parallel_adds_and_dels() {
    let f = Fixture::new();
    let conf = f.conf("conc", "198.19.70.0/24", true);
    let Fixture { node, conts, dir, data, br } = f;

    let outs = run_all(&node, dir.path(), "ADD", &conts, &conf);
    let mut addrs: Vec<String> =
        outs.iter().map(|o| o.ok().json()["ips"][0]["address"].as_str().unwrap().to_string()).collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), N, "addresses were handed out twice");
    assert_eq!(reservations(data.path(), "conc").len(), N);
    let ports = node.ip_json(&["link", "show", "master", &br]).as_array().unwrap().len();
    assert_eq!(ports, N);
    assert_eq!(node.nft().matches("masq conc/").count(), N);

    let outs = run_all(&node, dir.path(), "DEL", &conts, &conf);
    for o in &outs {
        o.ok();
    }
    assert!(reservations(data.path(), "conc").is_empty());
    eventually("every retired veth deleted", || {
        node.ip_json(&["link", "show", "master", &br]).as_array().unwrap().is_empty()
    });
    assert_reaped(&node);
    assert_eq!(node.nft().matches("masq conc/").count(), 0, "{}", node.nft());
}

/// An ADD and a DEL of the same attachment at once, 100 times over: they take turns, so an
/// attachment that ends up with an interface holds its address in the store, one that ends up
/// without holds none, and no address is ever in two places.
#[test]
fn hundred_concurrent_add_del_pairs_of_the_same_attachments() {
    let f = Fixture::new();
    let conf = f.conf("pairs", "198.19.71.0/24", false);
    let Fixture { node, conts, dir, data, .. } = f;
    // Interleaved, so each pair's two processes start next to each other.
    let calls: Vec<(&str, String, &Ns)> = conts
        .iter()
        .enumerate()
        .flat_map(|(i, c)| [("ADD", format!("pair{i}"), c), ("DEL", format!("pair{i}"), c)])
        .collect();
    for o in run_at_once(&node, dir.path(), &calls, &conf) {
        o.ok();
    }

    let mut in_containers = Vec::new();
    for (i, c) in conts.iter().enumerate() {
        let id = format!("pair{i}");
        let has_eth0 = c.links().contains(&"eth0".to_string());
        let held: Vec<String> = reservations(data.path(), "pairs")
            .into_iter()
            .filter(|ip| {
                std::fs::read_to_string(data.path().join("pairs").join(ip)).unwrap() == format!("{id}\r\neth0")
            })
            .collect();
        if has_eth0 {
            let addrs = c.addrs("eth0");
            assert_eq!(addrs.len(), 1, "{id}: {addrs:?}");
            let addr = addrs[0].split('/').next().unwrap().to_string();
            assert_eq!(held, std::slice::from_ref(&addr), "{id} uses {addr} but holds {held:?}");
            in_containers.push(addr);
        } else {
            assert!(held.is_empty(), "{id} has no interface but holds {held:?}");
        }
    }
    let total = in_containers.len();
    in_containers.sort();
    in_containers.dedup();
    assert_eq!(in_containers.len(), total, "an address is used twice");
    assert_eq!(reservations(data.path(), "pairs").len(), total);

    run_all_named(&node, dir.path(), "DEL", "pair", &conts, &conf);
    assert!(reservations(data.path(), "pairs").is_empty());
    assert_reaped(&node);
}

fn run_all_named(node: &Ns, dir: &std::path::Path, command: &str, prefix: &str, conts: &[Ns], conf: &str) {
    let calls: Vec<(&str, String, &Ns)> =
        conts.iter().enumerate().map(|(i, c)| (command, format!("{prefix}{i}"), c)).collect();
    for o in run_at_once(node, dir, &calls, conf) {
        o.ok();
    }
}
