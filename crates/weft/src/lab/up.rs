//! `weft lab up`: a lab of the given shape, or the lab of that name repaired.
//!
//! Every way `up` can end leaves a complete lab or nothing: options are checked before anything
//! is made; a failure half-way, SIGINT, SIGTERM or SIGHUP removes what was made (`down`); the
//! state file records the lab as complete only at the end, so a lab whose `up` was killed is
//! recognised as half-built by the next `up` (rebuilt) or `down` (removed).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use serde_json::json;
use weft_netns::NetNs;

use super::build::{self, ETCD_ADDRESS};
use super::{Lab, NodeInfo, Recorded, StoreInfo, UNDERLAY};

/// What `weft lab up` was asked for.
#[derive(clap::Args)]
pub struct UpOptions {
    /// The lab's name: lowercase letters and digits (namespaces `NAME-*`, state in
    /// /run/weft-lab/NAME).
    #[arg(long, default_value = "weft", value_parser = super::validate_name)]
    pub name: String,
    /// How many nodes (1 to 200).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Pods per node.
    #[arg(long, default_value_t = 2)]
    pub pods: usize,
    /// The backend every agent programs (`bgp`: routed mode, pods as /32 routes, nodes
    /// meshed over BGP).
    #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "host-gw", "udp", "bgp"])]
    pub backend: String,
    /// Where leases live: `file` (the embedded store), `etcd` (a real etcd started inside the
    /// lab on its underlay, http://198.18.0.1:2379 in the switch namespace, as a cluster has
    /// it), or `etcd=URL` (an etcd you run on this machine, e.g. etcd=http://127.0.0.1:2379:
    /// the nodes reach it through a relay on the underlay).
    #[arg(long, default_value = "file", value_parser = crate::cli::parse_store)]
    pub store: String,
    /// The agents' lease TTL (short values show renewal at work).
    #[arg(long, default_value = "24h", value_parser = crate::cli::parse_lease_ttl)]
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
    /// bgp: the first N nodes are route reflectors (the others peer with them only, not as a
    /// full mesh).
    #[arg(long, default_value_t = 0)]
    pub route_reflectors: usize,
    /// bgp: the size of the IPAM blocks nodes claim (default 26; a node claims more as its pods
    /// need them).
    #[arg(long)]
    pub block_size: Option<u8>,
    /// bgp: an external BGP peer every node peers with: ADDRESS,AS (repeatable), e.g. a router
    /// you attach to the lab's underlay (`weft lab show --json`'s `underlay`).
    #[arg(long = "peer", value_parser = parse_peer)]
    pub peers: Vec<String>,
    /// When a lab of this name exists with other options: take it down and build it as asked
    /// (without it, `up` says what differs and changes nothing).
    #[arg(long)]
    pub recreate: bool,
}

impl UpOptions {
    fn recorded(&self) -> Recorded {
        Recorded {
            nodes: self.nodes,
            pods: self.pods,
            backend: self.backend.clone(),
            store: self.store.clone(),
            lease_ttl: self.lease_ttl.as_secs().max(1),
            network: self.network.clone(),
            subnet_len: self.subnet_len,
            direct_routing: self.direct_routing,
            route_reflectors: self.route_reflectors,
            block_size: self.block_size,
            peers: self.peers.clone(),
        }
    }
}

/// `--peer ADDRESS,AS`.
fn parse_peer(text: &str) -> std::result::Result<String, String> {
    let (address, asn) = text.split_once(',').ok_or("ADDRESS,AS, e.g. 198.18.255.254,65000")?;
    address.parse::<std::net::IpAddr>().map_err(|_| format!("{address:?} is not an IP address"))?;
    match asn.parse::<u32>() {
        Ok(n) if n > 0 => Ok(text.to_string()),
        _ => Err(format!("{asn:?} is not an AS number (1-4294967295)")),
    }
}

/// The most pods a lab makes in all.
const MAX_PODS: usize = 1000;

/// The signal that interrupted `up`, if one did (0: none).
static INTERRUPTED: std::sync::OnceLock<Arc<AtomicUsize>> = std::sync::OnceLock::new();

fn signal_flag() -> &'static Arc<AtomicUsize> {
    INTERRUPTED.get_or_init(|| Arc::new(AtomicUsize::new(0)))
}

/// An error saying `up` was interrupted.
#[derive(Debug)]
struct Interrupted(i32);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted by signal {}", self.0)
    }
}

impl std::error::Error for Interrupted {}

fn interrupted() -> Result<()> {
    match signal_flag().load(Ordering::SeqCst) {
        0 => Ok(()),
        signal => Err(Interrupted(signal as i32).into()),
    }
}

/// SIGINT, SIGTERM and SIGHUP only set a flag while `up` runs: it stops at the next step and
/// removes what it made.
fn catch_signals() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    for signal in [SIGINT, SIGTERM, SIGHUP] {
        let number = usize::try_from(signal).unwrap_or(1);
        signal_hook::flag::register_usize(signal, signal_flag().clone(), number).context("catching signals")?;
    }
    Ok(())
}

/// Everything about the options that can be checked before anything is made.
fn validate(opts: &UpOptions) -> Result<String> {
    if opts.nodes == 0 || opts.nodes > 200 {
        bail!(
            "--nodes must be between 1 and 200 (the lab gives each node an agent and an address on its /16 underlay)"
        );
    }
    let network: IpNet =
        opts.network.parse().with_context(|| format!("--network {:?} is not a network", opts.network))?;
    let underlay: IpNet = UNDERLAY.parse()?;
    if network.contains(&underlay.network()) || underlay.contains(&network.network()) {
        bail!("--network {} overlaps the lab's underlay {UNDERLAY}; pick another, e.g. 198.19.0.0/16", opts.network);
    }
    let mut conf = json!({"Network": opts.network, "Backend": {"Type": opts.backend}});
    if opts.direct_routing {
        conf["Backend"]["DirectRouting"] = json!(true);
    }
    let bgp = opts.backend == "bgp";
    if !bgp && (opts.route_reflectors > 0 || opts.block_size.is_some() || !opts.peers.is_empty()) {
        bail!("--route-reflectors, --block-size and --peer are options of --backend bgp");
    }
    if bgp {
        if opts.subnet_len.is_some() {
            bail!("--subnet-len is not for --backend bgp: nodes claim blocks of --block-size as they need them");
        }
        if opts.route_reflectors > opts.nodes {
            bail!("--route-reflectors {}: the lab has {} nodes", opts.route_reflectors, opts.nodes);
        }
        if let Some(size) = opts.block_size {
            conf["Backend"]["BlockSize"] = json!(size);
        }
        if opts.route_reflectors > 0 {
            let names: Vec<String> = (1..=opts.route_reflectors).map(|i| format!("node{i}")).collect();
            conf["Backend"]["RouteReflectors"] = json!(names);
        }
        for peer in &opts.peers {
            let address = peer.split_once(',').map_or("", |(a, _)| a);
            let on_underlay = matches!(address.parse::<std::net::IpAddr>(), Ok(a) if UNDERLAY.parse::<IpNet>().is_ok_and(|u| u.contains(&a)));
            let taken = (0..=opts.nodes).any(|i| address == build::node_address(i).to_string());
            if !on_underlay || taken {
                bail!(
                    "--peer {peer}: a peer is a router on the lab's underlay {UNDERLAY} at an address no node has \
                     (e.g. {}, `lab show --json`'s underlay free_address)",
                    super::FREE_ADDRESS
                );
            }
        }
        let peers: Vec<serde_json::Value> = opts
            .peers
            .iter()
            .filter_map(|p| p.split_once(','))
            .map(|(a, n)| json!({"Address": a, "AS": n.parse::<u32>().unwrap_or(0)}))
            .collect();
        if !peers.is_empty() {
            conf["Backend"]["Peers"] = json!(peers);
        }
    }
    if let Some(len) = opts.subnet_len {
        conf["SubnetLen"] = json!(len);
    }
    let parsed = weft_netconf::NetworkConfig::parse(&conf.to_string()).context("the lab's network config")?;
    if parsed.subnets().count() < opts.nodes {
        bail!("{} has room for {} node subnets, not {}", opts.network, parsed.subnets().count(), opts.nodes);
    }
    // host-local hands out a subnet's addresses but its network, gateway and broadcast; a bgp
    // node claims more blocks as its pods need them (all but a block's first address are used).
    let size = |s: ipnet::Ipv4Net| 1usize << (32 - u32::from(s.prefix_len()).min(32));
    let per_node = match bgp {
        true => parsed.subnets().map(|s| size(s) - 1).sum::<usize>() / opts.nodes,
        false => parsed.subnets().next().map_or(0, |s| size(s).saturating_sub(3)),
    };
    if opts.pods > per_node {
        bail!("--pods {}: each node's subnet holds {per_node} pods", opts.pods);
    }
    if opts.nodes * opts.pods > MAX_PODS {
        bail!(
            "{} pods in all: a lab makes at most {MAX_PODS} (each is a namespace with a veth pair)",
            opts.nodes * opts.pods
        );
    }
    Ok(conf.to_string())
}

fn store_info(opts: &UpOptions) -> StoreInfo {
    match opts.store.split_once('=') {
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
            namespace: Some(super::switch_namespace(&opts.name)),
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
    }
}

/// `weft lab up`. `explicit` names the options given on the command line: only those count as
/// differing from an existing lab's.
pub fn up(opts: &UpOptions, explicit: &[String]) -> Result<()> {
    // From here on a signal only sets a flag: before anything is made.
    catch_signals()?;
    let net_conf = validate(opts)?;
    // One `up` or `down` of a lab at a time (held until this process ends).
    let Some(lock) = super::LabLock::take(&opts.name, false)? else {
        bail!("another `weft lab up` or `weft lab down` of lab {} is at work; try again when it is done", opts.name);
    };
    let existing = match Lab::load(&opts.name) {
        Ok(lab) => lab,
        Err(e) => {
            eprintln!("lab {}: its state is unreadable ({e:#}); removing what is left of it", opts.name);
            super::down::remove(&opts.name)?;
            None
        }
    };
    if let Some(lab) = existing {
        if let Some(had) = &lab.options {
            let differences = had.differences(&opts.recorded(), explicit);
            if !differences.is_empty() && !opts.recreate {
                bail!(
                    "lab {} exists with other options: {}; `weft lab up --recreate ...` rebuilds it, `weft lab down` removes it",
                    lab.name,
                    differences.join(", ")
                );
            }
            if !differences.is_empty() {
                eprintln!("lab {}: rebuilding it ({})", lab.name, differences.join(", "));
                super::down::remove(&lab.name)?;
                return build_new(opts, &net_conf, lock);
            }
        }
        let missing: Vec<String> = lab.namespaces().into_iter().filter(|ns| !weft_netns::exists(ns)).collect();
        if !lab.complete || !missing.is_empty() {
            let why = if lab.complete {
                format!("namespaces {} are gone", missing.join(", "))
            } else {
                "its `up` did not finish".into()
            };
            eprintln!("lab {}: {why}; removing it and building it again", lab.name);
            super::down::remove(&lab.name)?;
            return build_new(opts, &net_conf, lock);
        }
        return repair(lab);
    }
    // No state, but maybe what an `up` killed before writing any left (namespaces, processes).
    if super::down::remove(&opts.name)? {
        eprintln!("lab {}: removed what an earlier run left without a state file", opts.name);
    }
    build_new(opts, &net_conf, lock)
}

/// Starts again what died of a complete lab (its etcd, its supervisor, agents the supervisor
/// cannot restart), keeping every address. Processes are recognised by their command line, not
/// by a pid alone (pids are reused).
fn repair(mut lab: Lab) -> Result<()> {
    let mut repaired = Vec::new();
    if lab.store.namespace.is_some() && !lab.etcd_alive() {
        let switch = NetNs::open(weft_netns::named_path(&lab.switch_namespace))?;
        build::start_etcd(&mut lab, &switch)?;
        repaired.push("etcd");
    }
    // A supervisor restarts a dead agent within a second: only agents that stay dead count.
    let dead = |lab: &Lab| lab.nodes.iter().any(|n| !lab.agent_alive(&n.name));
    let agents_down = dead(&lab) && {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        dead(&lab)
    };
    if !lab.supervisor_alive() || agents_down {
        if let Some(pid) = lab.supervisor_pid.filter(|_| lab.supervisor_alive()) {
            super::down::kill(pid);
        }
        // Agents left running without it would be started a second time.
        for node in &lab.nodes {
            if let Some(pid) = lab.agent_pid(&node.name).filter(|_| lab.agent_alive(&node.name)) {
                super::down::kill(pid);
            }
        }
        build::start_supervisor(&mut lab)?;
        repaired.push("the supervisor");
    }
    if repaired.is_empty() {
        outln!(
            "lab {} is already up ({} nodes, {} pods); `weft lab down --name {}` removes it",
            lab.name,
            lab.nodes.len(),
            lab.pods.len(),
            lab.name
        );
        return Ok(());
    }
    if let Err(e) = build::wait_ready(&lab, &interrupted) {
        if let Some(Interrupted(signal)) = e.downcast_ref::<Interrupted>() {
            eprintln!("lab {}: interrupted by signal {signal} while waiting for the repaired lab", lab.name);
            std::process::exit(128 + signal);
        }
        return Err(e);
    }
    outln!("lab {}: started {} again; every address is as it was", lab.name, repaired.join(" and "));
    Ok(())
}

/// Builds the lab from nothing; on any failure or signal, removes what it made (its lock file
/// too).
fn build_new(opts: &UpOptions, net_conf: &str, lock: super::LabLock) -> Result<()> {
    let mut lab = Lab {
        name: opts.name.clone(),
        backend: opts.backend.clone(),
        network: opts.network.clone(),
        switch_namespace: super::switch_namespace(&opts.name),
        store: store_info(opts),
        supervisor_pid: None,
        lease_ttl: opts.lease_ttl.as_secs().max(1),
        nodes: Vec::new(),
        pods: Vec::new(),
        options: Some(opts.recorded()),
        complete: false,
        exe: std::env::current_exe().ok(),
    };
    let outcome = lab.save().and_then(|()| build(&mut lab, opts, net_conf));
    let Err(e) = outcome else { return Ok(()) };
    let cleaned = super::down::remove(&lab.name);
    lock.remove();
    if let Some(Interrupted(signal)) = e.downcast_ref::<Interrupted>() {
        eprintln!("lab {}: interrupted by signal {signal}; removed what was made", lab.name);
        if let Err(c) = cleaned {
            eprintln!("{c:#}");
        }
        std::process::exit(128 + signal);
    }
    match cleaned {
        Ok(_) => Err(e.context(format!("lab {} was not built; nothing of it is left", lab.name))),
        Err(c) => Err(e.context(format!("lab {} was not built, and removing it failed too: {c:#}", lab.name))),
    }
}

fn build(lab: &mut Lab, opts: &UpOptions, net_conf: &str) -> Result<()> {
    interrupted()?;
    let switch = build::make_switch(&lab.switch_namespace)?;
    if lab.store.node_endpoint.is_some() {
        // An etcd of the user's, reachable from here: the supervisor relays the nodes to it.
        weft_lease::etcd::EtcdStore::connect(
            std::slice::from_ref(&lab.store.endpoint),
            weft_lease::etcd::DEFAULT_PREFIX,
        )
        .and_then(|s| s.set_network_config(net_conf))
        .with_context(|| format!("storing the network config in etcd at {}", lab.store.endpoint))?;
        build::switch_address(&switch)?;
    } else if lab.store.kind == "etcd" {
        build::start_etcd(lab, &switch)?;
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
        interrupted()?;
        let name = format!("node{i}");
        let namespace = super::node_namespace(&lab.name, &name);
        let address: Ipv4Addr = build::node_address(i);
        lab.nodes.push(NodeInfo { name: name.clone(), namespace: namespace.clone(), address: address.to_string() });
        lab.save()?;
        build::make_node(&switch, &namespace, &format!("p{i}"), address)?;
        std::fs::create_dir_all(lab.node_dir(&name))?;
    }
    build::underlay_neighbours(lab)?;
    interrupted()?;
    build::start_supervisor(lab)?;
    build::wait_ready(lab, &interrupted)?;
    build::make_pods(lab, opts.pods, &interrupted)?;
    interrupted()?;
    lab.complete = true;
    lab.save()?;
    outln!(
        "lab {} is up: {} {} nodes on the switch {}, {} pods",
        lab.name,
        lab.nodes.len(),
        lab.backend,
        lab.switch_namespace,
        lab.pods.len()
    );
    if lab.pods.len() <= 24 {
        for pod in &lab.pods {
            outln!("  {:<16} {:<8} {}", pod.name, pod.node, pod.address);
        }
    }
    let flag = if lab.name == "weft" { String::new() } else { format!(" --name {}", lab.name) };
    outln!("next: weft lab check{flag}; weft lab show{flag} [NODE]; weft lab down{flag}");
    Ok(())
}
