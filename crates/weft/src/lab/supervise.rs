//! The lab's supervisor (`weft lab supervise`, started by `up`): runs one `weft agent` per node
//! inside the node's namespace and starts it again within a second when it dies, as systemd or a
//! DaemonSet would.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use weft_netns::NetNs;

use super::Lab;

/// Where each node's agent serves /healthz, /readyz and /metrics (inside the node's namespace).
pub const HEALTH_ADDRESS: &str = "127.0.0.1:9901";

fn start(lab: &Lab, node: &super::NodeInfo) -> Result<Child> {
    let ns = NetNs::open(weft_netns::named_path(&node.namespace))?;
    let dir = lab.node_dir(&node.name);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("agent.log"))?;
    let exe = lab.exe()?;
    let child = ns.run(|| {
        let mut cmd = Command::new(&exe);
        cmd.arg("agent");
        match lab.store.kind.as_str() {
            "etcd" => cmd.args(["--etcd-endpoints", lab.store.node_endpoint.as_ref().unwrap_or(&lab.store.endpoint)]),
            _ => cmd.arg("--store").arg(&lab.store.endpoint),
        };
        cmd.args(["--iface", "eth0", "--ip-masq", "--resync", "2s", "--health", HEALTH_ADDRESS])
            .arg("--lease-ttl")
            .arg(format!("{}s", lab.lease_ttl))
            .arg("--subnet-file")
            .arg(dir.join("subnet.env"))
            .arg("--state-dir")
            .arg(&dir)
            .args(["--node-name", &node.name])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
    })??;
    std::fs::write(dir.join("agent.pid"), child.id().to_string())?;
    Ok(child)
}

/// Relays connections made to `listen` in the switch namespace to `target` in this one (an
/// etcd on this machine's loopback, which the nodes cannot reach otherwise).
fn relay(lab: &Lab, target: &str) -> Result<()> {
    let switch = NetNs::open(weft_netns::named_path(&lab.switch_namespace))?;
    let listen: std::net::SocketAddr = format!("{}:2379", super::build::ETCD_ADDRESS).parse()?;
    let listener = switch.run(|| std::net::TcpListener::bind(listen))?.context("relay listener")?;
    let target = target.trim_start_matches("http://").trim_end_matches('/').to_string();
    std::thread::spawn(move || {
        for inbound in listener.incoming().flatten() {
            let target = target.clone();
            std::thread::spawn(move || {
                let Ok(outbound) = std::net::TcpStream::connect(&target) else { return };
                let (Ok(mut in_r), Ok(mut out_w)) = (inbound.try_clone(), outbound.try_clone()) else { return };
                let (mut in_w, mut out_r) = (inbound, outbound);
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut in_r, &mut out_w);
                    let _ = out_w.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut out_r, &mut in_w);
                let _ = in_w.shutdown(std::net::Shutdown::Write);
                let _ = up.join();
            });
        }
    });
    Ok(())
}

pub fn supervise(name: &str) -> Result<()> {
    let lab = Lab::load(name)?.with_context(|| format!("no lab named {name}"))?;
    if lab.store.node_endpoint.is_some() {
        relay(&lab, &lab.store.endpoint)?;
    }
    let mut children: Vec<Option<Child>> = lab.nodes.iter().map(|_| None).collect();
    // Per node: the last failure to start its agent (said once) and when to try again.
    let mut failing: Vec<Option<(String, std::time::Instant)>> = lab.nodes.iter().map(|_| None).collect();
    let mut damaged_state = false;
    loop {
        for ((node, slot), failed) in lab.nodes.iter().zip(children.iter_mut()).zip(failing.iter_mut()) {
            let running = match slot {
                Some(child) => matches!(child.try_wait(), Ok(None)),
                None => false,
            };
            if running || failed.as_ref().is_some_and(|(_, retry)| std::time::Instant::now() < *retry) {
                continue;
            }
            if slot.take().is_some() {
                eprintln!("lab supervisor: the agent of {} exited; starting it again", node.name);
            }
            match start(&lab, node) {
                Ok(child) => {
                    if failed.take().is_some() {
                        eprintln!("lab supervisor: the agent of {} runs again", node.name);
                    }
                    *slot = Some(child);
                }
                Err(e) => {
                    let said = format!("{e:#}");
                    if failed.as_ref().is_none_or(|(before, _)| *before != said) {
                        eprintln!(
                            "lab supervisor: starting the agent of {}: {said} (trying again every second)",
                            node.name
                        );
                    }
                    *failed = Some((said, std::time::Instant::now() + Duration::from_secs(1)));
                }
            }
        }
        match Lab::load(name) {
            Ok(Some(_)) => damaged_state = false,
            Ok(None) => return Ok(()), // the lab was taken down
            // Damaged by hand: the lab is still there; keep its agents running.
            Err(e) => {
                if !std::mem::replace(&mut damaged_state, true) {
                    eprintln!("lab supervisor: the lab's state is unreadable ({e:#}); supervising as it was");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
