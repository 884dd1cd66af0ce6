//! The `udp` backend's device and forwarder. The TUN device is persistent (it outlives every
//! process), holds the node subnet's `.0/32` and is up; its forwarder (`weft udp-forwarder`) is a
//! process of its own that the agent starts when none answers on the control socket, and that
//! keeps forwarding while the agent is away (docs/adr/0003). Its table entries are the
//! agent's [`Tunnel`](crate::model::Tunnel) objects: read and changed over the control socket.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde_json::{json, Value};
use weft_dataplane::{LinkKind, Netlink};

use crate::{kernel, AgentError, Result};

/// What the device and its forwarder must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunConfig {
    pub name: String,
    pub mtu: u32,
    pub address: Ipv4Net,
    pub subnet: Ipv4Net,
    pub network: Ipv4Net,
    pub port: u16,
    pub socket: PathBuf,
    pub kernel_segmentation: bool,
}

/// Makes sure the TUN device exists, persistent, with the MTU and address, up. Its index and
/// whether it was made now.
pub fn ensure_device(nl: &mut Netlink, cfg: &TunConfig) -> Result<(u32, bool)> {
    let mut created = false;
    let link = match nl.link_by_name(&cfg.name).map_err(kernel("reading the TUN device"))? {
        Some(link) if link.kind == LinkKind::Tun => link,
        existing => {
            if let Some(other) = existing {
                nl.delete_link(other.index).map_err(kernel("replacing a device of another kind"))?;
            }
            let flags = weft_udp::sys::IFF_TUN | weft_udp::sys::IFF_NO_PI | weft_udp::sys::IFF_MULTI_QUEUE;
            let fd = weft_udp::sys::tun_open(&cfg.name, flags)
                .map_err(|e| AgentError::Config(format!("making the TUN device {}: {e}", cfg.name)))?;
            weft_udp::sys::set_persist(fd.as_fd(), true)
                .map_err(|e| AgentError::Config(format!("making {} persistent: {e}", cfg.name)))?;
            drop(fd);
            created = true;
            nl.require_link(&cfg.name).map_err(kernel("reading the TUN device"))?
        }
    };
    // The udp backend carries IPv4 only: no IPv6 chatter (router solicitations, MLD) into the
    // forwarder. A kernel without IPv6 has no such key, which is fine.
    let _ = weft_dataplane::sysctl::set(&format!("net/ipv6/conf/{}/disable_ipv6", cfg.name), "1");
    crate::vtep::settle(nl, &link, cfg.mtu, cfg.address, "the TUN device")?;
    Ok((link.index, created))
}

fn forwarder_error(what: &str, socket: &Path, e: impl std::fmt::Display) -> AgentError {
    AgentError::Config(format!("{what} (forwarder on {}): {e}", socket.display()))
}

/// The forwarder's status, if one answers on `socket`.
pub fn status(socket: &Path) -> Option<Value> {
    weft_udp::forwarder::ask(socket, &json!({"op": "status"})).ok()
}

/// Makes sure a forwarder serves the device (started, detached, when none answers) and
/// checks packets with this node's subnet and network.
pub fn ensure_forwarder(cfg: &TunConfig) -> Result<()> {
    let current = match status(&cfg.socket) {
        Some(s) => s,
        None => {
            end_hung_forwarder(&cfg.socket);
            spawn(cfg)?;
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Some(s) = status(&cfg.socket) {
                    break s;
                }
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(log_path(&cfg.socket)).unwrap_or_default();
                    return Err(forwarder_error("the forwarder did not start", &cfg.socket, log.trim()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let (subnet, network) = (cfg.subnet.to_string(), cfg.network.to_string());
    if current["subnet"] != subnet.as_str()
        || current["network"] != network.as_str()
        || current["kernel_segmentation"] != cfg.kernel_segmentation
    {
        let request = json!({"op": "set", "subnet": subnet, "network": network,
            "kernel_segmentation": cfg.kernel_segmentation});
        weft_udp::forwarder::ask(&cfg.socket, &request)
            .map_err(|e| forwarder_error("setting the node's subnet", &cfg.socket, e))?;
    }
    Ok(())
}

/// A forwarder that still runs but does not answer (stopped, hung) holds the TUN queue and the
/// port a new one needs: it is killed. Recognised by its pid file and its command line (a pid
/// alone may have been reused).
fn end_hung_forwarder(socket: &Path) {
    let pid_file = weft_udp::forwarder::pid_path(socket);
    let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse::<i32>().ok()) else { return };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    if cmdline.contains("udp-forwarder") && cmdline.contains(&*socket.to_string_lossy()) {
        tracing::warn!("the udp forwarder (pid {pid}) does not answer; ending it");
        let _ = weft_udp::sys::kill(pid);
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = std::fs::remove_file(pid_file);
}

fn log_path(socket: &Path) -> PathBuf {
    socket.with_extension("log")
}

/// `weft udp-forwarder ...`, detached from the agent: its own process group, no terminal, its
/// output in a log beside the socket; a thread reaps it should it end while the agent runs.
fn spawn(cfg: &TunConfig) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| AgentError::Config(format!("finding weft's own binary: {e}")))?;
    if let Some(dir) = cfg.socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| forwarder_error("making its directory", &cfg.socket, e))?;
    }
    // Appended to: a start that fails does not wipe what the running one wrote.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(&cfg.socket))
        .map_err(|e| forwarder_error("its log", &cfg.socket, e))?;
    let err = log.try_clone().map_err(|e| forwarder_error("its log", &cfg.socket, e))?;
    let mut child = std::process::Command::new(exe)
        .arg("udp-forwarder")
        .args(["--device", &cfg.name, "--port", &cfg.port.to_string()])
        .args(["--subnet", &cfg.subnet.to_string(), "--network", &cfg.network.to_string()])
        .args(["--kernel-segmentation", &cfg.kernel_segmentation.to_string()])
        .arg("--socket")
        .arg(&cfg.socket)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| forwarder_error("starting it", &cfg.socket, e))?;
    tracing::info!("started the udp forwarder (pid {}) for {}", child.id(), cfg.name);
    let _ = std::thread::Builder::new().name("reap-forwarder".into()).spawn(move || child.wait());
    Ok(())
}

/// The forwarder's entries, as (subnet, public address); none when no forwarder answers (its
/// entries are then all missing: putting one starts it again).
pub fn entries(socket: &Path) -> Vec<(Ipv4Net, Ipv4Addr)> {
    let Some(status) = status(socket) else { return Vec::new() };
    status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["subnet"].as_str()?.parse().ok()?, p["ip"].as_str()?.parse().ok()?)))
        .collect()
}

/// Puts (`Some(ip)`) or removes an entry.
pub fn change(cfg: &TunConfig, subnet: Ipv4Net, ip: Option<Ipv4Addr>) -> Result<()> {
    let request = match ip {
        Some(ip) => json!({"op": "put", "subnet": subnet.to_string(), "ip": ip.to_string()}),
        None => json!({"op": "del", "subnet": subnet.to_string()}),
    };
    match weft_udp::forwarder::ask(&cfg.socket, &request) {
        Ok(_) => Ok(()),
        Err(_) if ip.is_some() => {
            // No forwarder (it died): started again, then told.
            ensure_forwarder(cfg)?;
            weft_udp::forwarder::ask(&cfg.socket, &request)
                .map(drop)
                .map_err(|e| forwarder_error("adding a peer", &cfg.socket, e))
        }
        Err(e) => Err(forwarder_error("removing a peer", &cfg.socket, e)),
    }
}
