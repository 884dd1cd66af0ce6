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
    node.handle
        .run(|| {
            let children: Vec<_> = conts
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let mut child = Command::new(dir.join("bridge"))
                        .env_clear()
                        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                        .env("CNI_COMMAND", command)
                        .env("CNI_CONTAINERID", format!("conc{i}"))
                        .env("CNI_NETNS", c.path())
                        .env("CNI_IFNAME", "eth0")
                        .env("CNI_PATH", dir)
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

#[test]
fn hundred_parallel_adds_and_dels() {
    let node = Ns::new("n");
    let conts: Vec<Ns> = (0..N).map(|_| Ns::new("c")).collect();
    let dir = weft_plugin_dir();
    let data = Dir::new("ipam");
    let br = unique("br");
    let conf = json!({
        "cniVersion": "1.0.0", "name": "conc", "type": "bridge", "bridge": br, "isGateway": true, "ipMasq": true,
        "ipam": {"type": "host-local", "dataDir": data.path(), "ranges": [[{"subnet": "198.19.70.0/24"}]]}
    })
    .to_string();

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
