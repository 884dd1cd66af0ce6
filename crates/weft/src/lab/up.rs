//! `weft lab up` and `weft lab down`.

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use serde_json::json;
use weft_cni::runner::{ConfList, Runner, RuntimeConf};
use weft_dataplane::link::VethSpec;
use weft_dataplane::Netlink;
use weft_netns::NetNs;

use super::{alive, Lab, NodeInfo, PodInfo, StoreInfo};

/// What `weft lab up` was asked for.
#[derive(clap::Args)]
pub struct UpOptions {
    /// The lab's name (namespaces `NAME-*`, state in /run/weft-lab/NAME).
    #[arg(long, default_value = "weft")]
    pub name: String,
    /// How many nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Pods per node.
    #[arg(long, default_value_t = 2)]
    pub pods: usize,
    /// The backend every agent programs.
    #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "host-gw"])]
    pub backend: String,
    /// Where leases live: `file` (the embedded store), `etcd` (a real etcd started inside the
    /// lab on its underlay, http://198.18.0.1:2379 in the switch namespace, as a cluster has
    /// it), or `etcd=URL` (an etcd you run on this machine, e.g. etcd=http://127.0.0.1:2379:
    /// the nodes reach it through a relay on the underlay).
    #[arg(long, default_value = "file", value_parser = crate::cli::parse_store)]
    pub store: String,
    /// The agents' lease TTL (short values show renewal at work).
    #[arg(long, default_value = "24h", value_parser = crate::cli::parse_duration)]
    pub lease_ttl: Duration,
    /// The pod network.
    #[arg(long, default_value = "198.19.0.0/16")]
    pub network: String,
    /// The size of each node's subnet (default as flannel: 24 for networks of /22 or larger).
    #[arg(long)]
    pub subnet_len: Option<u8>,
    /// VXLAN with DirectRouting: peers on the same L2 segment (all lab nodes are) get a plain
    /// route via their address instead of the overlay.
    #[arg(long)]
    pub direct_routing: bool,
}

fn ns_path(name: &str) -> String {
    weft_netns::named_path(name).display().to_string()
}

fn kernel(what: &str) -> impl FnOnce(weft_dataplane::DataplaneError) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("{what}: {e}")
}

/// The switch: a bridge in its own namespace.
fn make_switch(name: &str) -> Result<NetNs> {
    let ns = weft_netns::create_named(name).with_context(|| format!("creating namespace {name} (are you root?)"))?;
    let mut nl = Netlink::in_netns(&ns).map_err(kernel("netlink"))?;
    nl.create_bridge("sw0", None, None).map_err(kernel("creating the switch"))?;
    for name in ["lo", "sw0"] {
        let link = nl.require_link(name).map_err(kernel("switch"))?;
        nl.set_up(link.index, true).map_err(kernel("switch up"))?;
    }
    Ok(ns)
}

/// The etcd a lab with `--store etcd` runs, on the switch (the underlay).
pub const ETCD_ADDRESS: &str = "198.18.0.1";

/// Starts etcd in the switch namespace, listening on the underlay, and waits until it answers.
fn start_etcd(lab: &mut Lab, switch: &NetNs) -> Result<()> {
    let mut nl = Netlink::in_netns(switch).map_err(kernel("netlink"))?;
    let sw = nl.require_link("sw0").map_err(kernel("switch"))?;
    let address: IpNet = format!("{ETCD_ADDRESS}/16").parse()?;
    nl.add_address(sw.index, &address).map_err(kernel("the switch's address"))?;
    let dir = lab.dir().join("etcd");
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::File::create(dir.join("etcd.log"))?;
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

/// A node: its namespace, `eth0` plugged into the switch with `address`.
fn make_node(switch: &NetNs, ns_name: &str, port: &str, address: IpNet) -> Result<NetNs> {
    let node = weft_netns::create_named(ns_name).with_context(|| format!("creating namespace {ns_name}"))?;
    let mut snl = Netlink::in_netns(switch).map_err(kernel("netlink"))?;
    let sw = snl.require_link("sw0").map_err(kernel("switch"))?;
    let spec = VethSpec {
        name: port,
        peer_name: "eth0",
        peer_netns: Some(&node),
        mtu: None,
        mac: None,
        peer_mac: None,
        master: Some(sw.index),
        up: true,
        queues: None,
    };
    snl.create_veth(&spec).map_err(kernel("wiring the node"))?;
    let mut nl = Netlink::in_netns(&node).map_err(kernel("netlink"))?;
    for name in ["lo", "eth0"] {
        let link = nl.require_link(name).map_err(kernel("node link"))?;
        nl.set_up(link.index, true).map_err(kernel("node link up"))?;
        if name == "eth0" {
            nl.add_address(link.index, &address).map_err(kernel("node address"))?;
        }
    }
    Ok(node)
}

fn plugin_dir(lab: &Lab) -> Result<std::path::PathBuf> {
    let dir = lab.dir().join("bin");
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?;
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

/// Waits until every agent is ready (its subnet file written) and every node routes to every
/// other node's pods (one weft route per peer), so that the lab works when `up` returns: an
/// agent is ready once its own lease is programmed, but learns of the nodes that start after it
/// through the store a moment later.
fn wait_ready(lab: &Lab) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let log = |node: &NodeInfo| std::fs::read_to_string(lab.node_dir(&node.name).join("agent.log")).unwrap_or_default();
    for node in &lab.nodes {
        let file = lab.node_dir(&node.name).join("subnet.env");
        while !file.exists() {
            if Instant::now() > deadline {
                bail!("the agent of {} did not become ready within 20 s; its log:\n{}", node.name, log(node));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let peers = lab.nodes.len() - 1;
    for node in &lab.nodes {
        let ns = NetNs::open(weft_netns::named_path(&node.namespace))?;
        let mut nl = Netlink::in_netns(&ns)?;
        loop {
            let routes = nl.routes()?.into_iter().filter(|r| r.protocol == weft_dataplane::route::RTPROT_WEFT).count();
            if routes >= peers {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} routes to {routes} of its {peers} peers after 20 s; its agent's log:\n{}",
                    node.name,
                    log(node)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

pub fn up(opts: &UpOptions) -> Result<()> {
    if let Some(existing) = Lab::load(&opts.name)? {
        if existing.supervisor_pid.is_some_and(alive) && existing.nodes.iter().all(|n| weft_netns::exists(&n.namespace))
        {
            outln!(
                "lab {} is already up ({} nodes, {} pods); `weft lab down --name {}` removes it",
                existing.name,
                existing.nodes.len(),
                existing.pods.len(),
                existing.name
            );
            return Ok(());
        }
        eprintln!("lab {}: removing what is left of an earlier run", opts.name);
        down(&opts.name)?;
    }
    if opts.nodes == 0 || opts.nodes > 200 {
        bail!("--nodes must be between 1 and 200");
    }
    let mut conf = json!({"Network": opts.network, "Backend": {"Type": opts.backend}});
    if opts.direct_routing {
        conf["Backend"]["DirectRouting"] = json!(true);
    }
    if let Some(len) = opts.subnet_len {
        conf["SubnetLen"] = json!(len);
    }
    let network = weft_netconf::NetworkConfig::parse(&conf.to_string()).context("the lab's network config")?;
    if network.subnets().count() < opts.nodes {
        bail!("{} has room for {} node subnets, not {}", opts.network, network.subnets().count(), opts.nodes);
    }

    let store = match opts.store.split_once('=') {
        Some((_, url)) => StoreInfo {
            kind: "etcd".into(),
            endpoint: url.to_string(),
            namespace: None,
            pid: None,
            node_endpoint: Some(format!("http://{ETCD_ADDRESS}:2379")),
        },
        None if opts.store == "etcd" => StoreInfo {
            kind: "etcd".into(),
            endpoint: format!("http://{ETCD_ADDRESS}:2379"),
            namespace: Some(format!("{}-sw", opts.name)),
            pid: None,
            node_endpoint: None,
        },
        None => StoreInfo {
            kind: "file".into(),
            endpoint: Lab::state_dir(&opts.name).join("store").display().to_string(),
            namespace: None,
            pid: None,
            node_endpoint: None,
        },
    };
    let mut lab = Lab {
        name: opts.name.clone(),
        backend: opts.backend.clone(),
        network: opts.network.clone(),
        switch_namespace: format!("{}-sw", opts.name),
        store,
        supervisor_pid: None,
        lease_ttl: opts.lease_ttl.as_secs().max(1),
        nodes: Vec::new(),
        pods: Vec::new(),
    };
    lab.save()?;
    let outcome = build(&mut lab, opts, &conf.to_string());
    if outcome.is_err() {
        let _ = down(&lab.name);
    }
    outcome
}

fn build(lab: &mut Lab, opts: &UpOptions, net_conf: &str) -> Result<()> {
    let switch = make_switch(&lab.switch_namespace)?;
    if lab.store.node_endpoint.is_some() {
        // An etcd of the user's, reachable from here: the supervisor relays the nodes to it.
        weft_lease::etcd::EtcdStore::connect(
            std::slice::from_ref(&lab.store.endpoint),
            weft_lease::etcd::DEFAULT_PREFIX,
        )
        .and_then(|s| s.set_network_config(net_conf))
        .with_context(|| format!("storing the network config in etcd at {}", lab.store.endpoint))?;
        let mut nl = Netlink::in_netns(&switch).map_err(kernel("netlink"))?;
        let sw = nl.require_link("sw0").map_err(kernel("switch"))?;
        nl.add_address(sw.index, &format!("{ETCD_ADDRESS}/16").parse()?).map_err(kernel("the switch's address"))?;
    } else if lab.store.kind == "etcd" {
        start_etcd(lab, &switch)?;
        let endpoint = lab.store.endpoint.clone();
        let text = net_conf.to_string();
        // The store is reachable on the underlay only: talk to it from the switch namespace.
        switch
            .run(move || {
                let store = weft_lease::etcd::EtcdStore::connect(&[endpoint], weft_lease::etcd::DEFAULT_PREFIX)?;
                store.set_network_config(&text)
            })?
            .context("storing the network config in etcd")?;
    } else {
        weft_lease::file::FileStore::open(&lab.store.endpoint)?.set_network_config(net_conf)?;
    }
    for i in 1..=opts.nodes {
        let name = format!("node{i}");
        let namespace = format!("{}-{name}", lab.name);
        let address = Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250) as u8 + 1);
        make_node(&switch, &namespace, &format!("p{i}"), IpNet::new(IpAddr::V4(address), 16)?)?;
        std::fs::create_dir_all(lab.node_dir(&name))?;
        lab.nodes.push(NodeInfo { name, namespace, address: address.to_string() });
        lab.save()?;
    }
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(lab.dir().join("supervisor.log"))?;
    let child = Command::new(exe)
        .args(["lab", "supervise", "--name", &lab.name])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the lab supervisor")?;
    lab.supervisor_pid = Some(child.id());
    lab.save()?;
    wait_ready(lab)?;

    let bin = plugin_dir(lab)?;
    for node in lab.nodes.clone() {
        let node_ns = NetNs::open(ns_path(&node.namespace))?;
        let runner = Runner::new(vec![bin.clone()], lab.node_dir(&node.name).join("cache"));
        let list = conflist(lab, &node.name)?;
        for j in 1..=opts.pods {
            let name = format!("{}-pod{j}", node.name);
            let namespace = format!("{}-{name}", lab.name);
            weft_netns::create_named(&namespace)?;
            let rt = RuntimeConf {
                container_id: name.clone(),
                netns: ns_path(&namespace),
                ifname: "eth0".into(),
                ..Default::default()
            };
            let result =
                node_ns.run(|| runner.add(&list, &rt))?.map_err(|e| anyhow::anyhow!("creating pod {name}: {e}"))?;
            let address = result.ips.first().map(|ip| ip.address.addr().to_string()).unwrap_or_default();
            lab.pods.push(PodInfo { name, node: node.name.clone(), namespace, address });
            lab.save()?;
        }
    }
    outln!(
        "lab {} is up: {} {} nodes on the switch {}, {} pods",
        lab.name,
        lab.nodes.len(),
        lab.backend,
        lab.switch_namespace,
        lab.pods.len()
    );
    for pod in &lab.pods {
        outln!("  {:<16} {:<8} {}", pod.name, pod.node, pod.address);
    }
    let flag = if lab.name == "weft" { String::new() } else { format!(" --name {}", lab.name) };
    outln!("next: weft lab check{flag}; weft lab show{flag} [NODE]; weft lab down{flag}");
    Ok(())
}

fn kill(pid: u32, signal: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// Removes every namespace, process and file of the lab; a lab that is not there is fine.
pub fn down(name: &str) -> Result<()> {
    let Some(lab) = Lab::load(name)? else {
        outln!("no lab named {name}");
        return Ok(());
    };
    if let Some(pid) = lab.supervisor_pid {
        kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    for node in &lab.nodes {
        if let Some(pid) = lab.agent_pid(&node.name) {
            kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
    if let Some(pid) = lab.store.pid {
        kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    let mut errors = Vec::new();
    let namespaces = lab
        .pods
        .iter()
        .map(|p| &p.namespace)
        .chain(lab.nodes.iter().map(|n| &n.namespace))
        .chain([&lab.switch_namespace]);
    for ns in namespaces {
        if let Err(e) = weft_netns::delete_named(ns) {
            errors.push(e.to_string());
        }
    }
    remove_dir(&lab.dir(), &mut errors);
    if !errors.is_empty() {
        bail!("lab {name}: {}", errors.join("; "));
    }
    outln!("lab {name} is down");
    Ok(())
}

fn remove_dir(dir: &Path, errors: &mut Vec<String>) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            errors.push(format!("removing {}: {e}", dir.display()));
        }
    }
}
