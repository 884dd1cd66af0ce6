//! Making a lab's parts: the switch, etcd, nodes, pods, the supervisor; and waiting for it to be
//! ready.
//!
//! A lab keeps off the machine's neighbour table. The kernel's ARP and ND tables are shared by
//! every namespace on the machine, with one limit (`gc_thresh3`, 1024 entries by default), so a
//! big lab that let its nodes learn each other's addresses would starve the host's own ARP. The
//! lab knows every address and MAC it made, so it writes them down instead: permanent entries
//! (which the kernel does not count against the limit) on each node for every other node and the
//! switch, on each pod for its gateway and its node's other pods, and on each node's bridge for
//! its pods. IPv6 is off in lab namespaces (the lab is IPv4; no ND, no MLD or router
//! solicitations).

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use serde_json::json;
use weft_cni::runner::{ConfList, Runner, RuntimeConf};
use weft_cni::CniResult;
use weft_dataplane::link::VethSpec;
use weft_dataplane::{parse_mac, sysctl, Netlink};
use weft_netns::NetNs;

use super::{Lab, NodeInfo, PodInfo};

/// The etcd a lab with `--store etcd` runs, on the switch (the underlay).
pub const ETCD_ADDRESS: &str = "198.18.0.1";

pub fn ns_path(name: &str) -> String {
    weft_netns::named_path(name).display().to_string()
}

pub fn kernel(what: &str) -> impl FnOnce(weft_dataplane::DataplaneError) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("{what}: {e}")
}

/// The underlay address of node `i` (1-based): 198.18.0.2, 198.18.0.3, ...
pub fn node_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250) as u8 + 1)
}

/// The MAC the lab gives an underlay address: locally administered, from the address.
pub fn underlay_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x77, 0x66, 0x74, o[2], o[3]]
}

/// A new namespace of the lab, IPv6 off, loopback up.
fn make_namespace(name: &str) -> Result<NetNs> {
    let ns = weft_netns::create_named(name).with_context(|| format!("creating namespace {name} (are you root?)"))?;
    ns.run(|| -> Result<()> {
        for key in ["net/ipv6/conf/all/disable_ipv6", "net/ipv6/conf/default/disable_ipv6"] {
            sysctl::set(key, "1").map_err(|e| anyhow::anyhow!("{key} in {name}: {e}"))?;
        }
        Ok(())
    })??;
    let mut nl = Netlink::in_netns(&ns).map_err(kernel("netlink"))?;
    let lo = nl.require_link("lo").map_err(kernel("loopback"))?;
    nl.set_up(lo.index, true).map_err(kernel("loopback up"))?;
    Ok(ns)
}

/// The switch: a bridge in its own namespace.
pub fn make_switch(name: &str) -> Result<NetNs> {
    let ns = make_namespace(name)?;
    let mut nl = Netlink::in_netns(&ns).map_err(kernel("netlink"))?;
    let mac = underlay_mac(ETCD_ADDRESS.parse()?);
    nl.create_bridge("sw0", None, Some(mac)).map_err(kernel("creating the switch"))?;
    let sw = nl.require_link("sw0").map_err(kernel("switch"))?;
    nl.set_up(sw.index, true).map_err(kernel("switch up"))?;
    Ok(ns)
}

/// Gives the switch the address the nodes reach the store at (a no-op when it has it).
pub fn switch_address(switch: &NetNs) -> Result<()> {
    let mut nl = Netlink::in_netns(switch).map_err(kernel("netlink"))?;
    let sw = nl.require_link("sw0").map_err(kernel("switch"))?;
    match nl.add_address(sw.index, &format!("{ETCD_ADDRESS}/16").parse()?) {
        Err(e) if e.is_exists() => Ok(()),
        other => other.map_err(kernel("the switch's address")),
    }
}

/// Starts etcd in the switch namespace, listening on the underlay, and waits until it answers.
/// Its data stays in the lab's directory, so an etcd started again has every lease.
pub fn start_etcd(lab: &mut Lab, switch: &NetNs) -> Result<()> {
    switch_address(switch)?;
    let dir = lab.dir().join("etcd");
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("etcd.log"))?;
    let (client, peer) = (format!("http://{ETCD_ADDRESS}:2379"), format!("http://{ETCD_ADDRESS}:2380"));
    let child = switch
        .run(|| {
            Command::new("etcd")
                .args(["--name", "lab", "--data-dir"])
                .arg(dir.join("data"))
                .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("lab={peer}")])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0)
                .spawn()
        })?
        .context("starting etcd (apt-get install etcd-server)")?;
    lab.store.pid = Some(child.id());
    lab.save()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let target: std::net::SocketAddr = format!("{ETCD_ADDRESS}:2379").parse()?;
    while switch.run(|| std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200)))?.is_err() {
        if Instant::now() > deadline {
            bail!("etcd did not start within 15 s; see {}", lab.dir().join("etcd/etcd.log").display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A node: its namespace, `eth0` plugged into the switch with `address` and its MAC.
pub fn make_node(switch: &NetNs, ns_name: &str, port: &str, address: Ipv4Addr) -> Result<NetNs> {
    let node = make_namespace(ns_name)?;
    let mut snl = Netlink::in_netns(switch).map_err(kernel("netlink"))?;
    let sw = snl.require_link("sw0").map_err(kernel("switch"))?;
    let spec = VethSpec {
        name: port,
        peer_name: "eth0",
        peer_netns: Some(&node),
        mtu: None,
        mac: None,
        peer_mac: Some(underlay_mac(address)),
        master: Some(sw.index),
        up: true,
        queues: Some(1),
    };
    snl.create_veth(&spec).map_err(kernel("wiring the node"))?;
    let mut nl = Netlink::in_netns(&node).map_err(kernel("netlink"))?;
    let eth0 = nl.require_link("eth0").map_err(kernel("node link"))?;
    nl.set_up(eth0.index, true).map_err(kernel("node link up"))?;
    nl.add_address(eth0.index, &IpNet::new(IpAddr::V4(address), 16)?).map_err(kernel("node address"))?;
    Ok(node)
}

/// Permanent underlay neighbours: on every node for every other node and the switch's address,
/// and on the switch for every node.
pub fn underlay_neighbours(lab: &Lab) -> Result<()> {
    let addresses: Vec<Ipv4Addr> = lab.nodes.iter().map(|n| n.address.parse()).collect::<Result<_, _>>()?;
    let switch_ip: Ipv4Addr = ETCD_ADDRESS.parse()?;
    for node in &lab.nodes {
        let ns = NetNs::open(weft_netns::named_path(&node.namespace))?;
        let mut nl = Netlink::in_netns(&ns).map_err(kernel("netlink"))?;
        let eth0 = nl.require_link("eth0").map_err(kernel("node link"))?;
        for ip in addresses.iter().chain([&switch_ip]).filter(|ip| ip.to_string() != node.address) {
            nl.replace_neighbour(eth0.index, IpAddr::V4(*ip), &underlay_mac(*ip))
                .map_err(kernel("an underlay neighbour"))?;
        }
    }
    let switch = NetNs::open(weft_netns::named_path(&lab.switch_namespace))?;
    let mut nl = Netlink::in_netns(&switch).map_err(kernel("netlink"))?;
    let sw = nl.require_link("sw0").map_err(kernel("switch"))?;
    for ip in &addresses {
        nl.replace_neighbour(sw.index, IpAddr::V4(*ip), &underlay_mac(*ip)).map_err(kernel("a switch neighbour"))?;
    }
    Ok(())
}

pub fn plugin_dir(lab: &Lab) -> Result<std::path::PathBuf> {
    let dir = lab.dir().join("bin");
    std::fs::create_dir_all(&dir)?;
    let exe = lab.exe()?;
    for name in weft_plugins::PLUGIN_NAMES {
        let link = dir.join(name);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(&exe, &link)?;
        }
    }
    Ok(dir)
}

/// The conflist every lab pod gets: the meta plugin, then loopback.
pub fn conflist(lab: &Lab, node: &str) -> Result<ConfList> {
    let dir = lab.node_dir(node);
    let list = json!({
        "cniVersion": "1.0.0", "name": "lab",
        "plugins": [
            {"type": "weft", "subnetFile": dir.join("subnet.env"), "dataDir": dir.join("cni"),
             "ipam": {"dataDir": dir.join("ipam")},
             "delegate": {"bridge": "cni0", "isDefaultGateway": true, "hairpinMode": true}},
            {"type": "loopback"}
        ]
    });
    Ok(ConfList::from_bytes(list.to_string().as_bytes())?)
}

/// Starts the supervisor (it runs the agents), detached from this process.
pub fn start_supervisor(lab: &mut Lab) -> Result<()> {
    let exe = lab.exe()?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(lab.dir().join("supervisor.log"))?;
    let child = Command::new(exe)
        .args(["lab", "supervise", "--name", &lab.name])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the lab supervisor")?;
    lab.supervisor_pid = Some(child.id());
    lab.save()
}

/// A pod's interface as its ADD reported it: (address, MAC, gateway, the bridge's MAC).
struct PodLink {
    address: Ipv4Addr,
    mac: Vec<u8>,
    gateway: Ipv4Addr,
    bridge_mac: Vec<u8>,
}

fn pod_link(result: &CniResult) -> Result<PodLink> {
    let ip = result.ips.first().context("the pod got no address")?;
    let IpAddr::V4(address) = ip.address.addr() else { bail!("the pod's address is not IPv4") };
    let Some(IpAddr::V4(gateway)) = ip.gateway else { bail!("the pod got no IPv4 gateway") };
    let mac_of = |sandbox: bool| {
        result
            .interfaces
            .iter()
            .find(|i| i.sandbox.is_empty() != sandbox && (sandbox || i.name == "cni0"))
            .and_then(|i| parse_mac(&i.mac))
            .map(|m| m.to_vec())
    };
    Ok(PodLink {
        address,
        mac: mac_of(true).context("no pod MAC in the result")?,
        gateway,
        bridge_mac: mac_of(false).context("no bridge MAC in the result")?,
    })
}

/// Permanent neighbours for a node's pods: each pod knows its gateway and the other pods of its
/// node; the node's bridge knows every pod.
fn pod_neighbours(node: &NetNs, pods: &[(NetNs, PodLink)]) -> Result<()> {
    let mut nl = Netlink::in_netns(node).map_err(kernel("netlink"))?;
    let cni0 = nl.require_link("cni0").map_err(kernel("the node's bridge"))?;
    for (_, link) in pods {
        nl.replace_neighbour(cni0.index, IpAddr::V4(link.address), &link.mac).map_err(kernel("a pod neighbour"))?;
    }
    for (ns, link) in pods {
        let mut pnl = Netlink::in_netns(ns).map_err(kernel("netlink"))?;
        let eth0 = pnl.require_link("eth0").map_err(kernel("the pod's interface"))?;
        pnl.replace_neighbour(eth0.index, IpAddr::V4(link.gateway), &link.bridge_mac)
            .map_err(kernel("the pod's gateway neighbour"))?;
        for (_, other) in pods.iter().filter(|(_, o)| o.address != link.address) {
            pnl.replace_neighbour(eth0.index, IpAddr::V4(other.address), &other.mac)
                .map_err(kernel("a neighbour pod"))?;
        }
    }
    Ok(())
}

/// `pods` pods on every node, through the real CNI chain; `interrupted` is asked between pods.
pub fn make_pods(lab: &mut Lab, pods: usize, interrupted: &dyn Fn() -> Result<()>) -> Result<()> {
    let bin = plugin_dir(lab)?;
    for node in lab.nodes.clone() {
        let node_ns = NetNs::open(ns_path(&node.namespace))?;
        let mut runner = Runner::new(vec![bin.clone()], lab.node_dir(&node.name).join("cache"));
        // The plugins' lock files live with the lab's state (removed by `down`).
        let locks = lab.node_dir(&node.name).join("cni-locks").display().to_string();
        runner.env.push((weft_plugins::attachment_lock::LOCK_DIR_ENV.to_string(), locks));
        let list = conflist(lab, &node.name)?;
        let mut links = Vec::new();
        for j in 1..=pods {
            interrupted()?;
            let name = format!("{}-pod{j}", node.name);
            let namespace = format!("{}-{name}", lab.name);
            lab.pods.push(PodInfo {
                name: name.clone(),
                node: node.name.clone(),
                namespace: namespace.clone(),
                address: String::new(),
            });
            lab.save()?;
            let pod_ns = make_namespace(&namespace)?;
            let rt = RuntimeConf {
                container_id: name.clone(),
                netns: ns_path(&namespace),
                ifname: "eth0".into(),
                ..Default::default()
            };
            let result =
                node_ns.run(|| runner.add(&list, &rt))?.map_err(|e| anyhow::anyhow!("creating pod {name}: {e}"))?;
            // Routed pods know their gateway and the node knows them already (the plugin puts
            // neighbour entries both ways); a bridge's pods are told here.
            let address = match lab.backend.as_str() {
                "bgp" => match result.ips.first().map(|ip| ip.address.addr()) {
                    Some(IpAddr::V4(a)) => a,
                    _ => bail!("pod {name} got no IPv4 address"),
                },
                _ => {
                    let link = pod_link(&result).with_context(|| format!("pod {name}"))?;
                    let address = link.address;
                    links.push((pod_ns, link));
                    address
                }
            };
            if let Some(pod) = lab.pods.last_mut() {
                pod.address = address.to_string();
            }
            lab.save()?;
        }
        if !links.is_empty() {
            pod_neighbours(&node_ns, &links)?;
        }
    }
    Ok(())
}

/// Waits until every agent is ready (its subnet file written) and every node routes to every
/// other node's pods (one weft route per peer), so that the lab works when `up` returns: an
/// agent is ready once its own lease is programmed, but learns of the nodes that start after it
/// through the store a moment later. `interrupted` is asked while waiting.
pub fn wait_ready(lab: &Lab, interrupted: &dyn Fn() -> Result<()>) -> Result<()> {
    let limit = Duration::from_secs(20) + Duration::from_millis(300) * lab.nodes.len() as u32;
    let deadline = Instant::now() + limit;
    let log = |node: &NodeInfo| std::fs::read_to_string(lab.node_dir(&node.name).join("agent.log")).unwrap_or_default();
    for node in &lab.nodes {
        let file = lab.node_dir(&node.name).join("subnet.env");
        while !file.exists() {
            interrupted()?;
            if Instant::now() > deadline {
                bail!("the agent of {} did not become ready within {limit:?}; its log:\n{}", node.name, log(node));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let peers = lab.nodes.len() - 1;
    for node in &lab.nodes {
        let ns = NetNs::open(weft_netns::named_path(&node.namespace))?;
        let mut nl = Netlink::in_netns(&ns)?;
        loop {
            interrupted()?;
            let routes = lab.peers_programmed(node, &mut nl)?;
            if routes >= peers {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} routes to {routes} of its {peers} peers after {limit:?}; its agent's log:\n{}",
                    node.name,
                    log(node)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}
