//! The agent's loop: acquire the lease, set up the backend and rules, write the subnet file,
//! then follow the store (a watch polled every 50 ms), renew the lease, check the VTEP on every
//! tick and resync everything periodically. The dataplane is never flushed, on start or stop.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ipnet::{IpNet, Ipv4Net};
use serde_json::json;
use weft_dataplane::monitor::LinkMonitor;
use weft_dataplane::{Link, Netlink};
use weft_lease::etcd::EtcdStore;
use weft_lease::file::FileStore;
use weft_lease::{Lease, LeaseAttrs, LeaseError, LeaseEvent, LeaseStore, LeaseWatcher};
use weft_netconf::{BackendType, NetworkConfig, SubnetEnv};

use crate::backend::{self, Context};
use crate::http::{self, Status};
use crate::renewer::{Renewer, Report};
use crate::{firewall, kernel, reconcile, renewer, vtep, AgentError, Result};

/// How the agent is run (`weft agent --help`).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub store: StoreConfig,
    pub net_conf: Option<PathBuf>,
    pub iface: Option<String>,
    pub public_ip: Option<Ipv4Addr>,
    pub subnet_file: PathBuf,
    pub state_dir: PathBuf,
    pub ip_masq: bool,
    pub lease_ttl: Duration,
    pub resync: Duration,
    pub health: Option<SocketAddr>,
}

/// Where leases live.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// The embedded file store (one machine).
    File(PathBuf),
    /// etcd v3, flannel's key layout under `prefix`.
    Etcd { endpoints: Vec<String>, prefix: String },
}

impl StoreConfig {
    pub fn open(&self) -> Result<Box<dyn LeaseStore>> {
        Ok(match self {
            StoreConfig::File(dir) => Box::new(FileStore::open(dir)?),
            StoreConfig::Etcd { endpoints, prefix } => Box::new(EtcdStore::connect(endpoints, prefix)?),
        })
    }
}

/// The uplink: the interface peers are reached through.
struct Uplink {
    link: Link,
    ip: Ipv4Addr,
    nets: Vec<Ipv4Net>,
}

fn find_uplink(nl: &mut Netlink, cfg: &AgentConfig) -> Result<Uplink> {
    let links = nl.links().map_err(kernel("listing links"))?;
    let addrs = nl.addresses(None).map_err(kernel("listing addresses"))?;
    let v4 = |index: u32| -> Vec<Ipv4Net> {
        addrs
            .iter()
            .filter(|a| a.index == index)
            .filter_map(|a| match a.net {
                IpNet::V4(n) => Some(n),
                IpNet::V6(_) => None,
            })
            .collect()
    };
    let link = match (&cfg.iface, cfg.public_ip) {
        (Some(name), _) => links
            .into_iter()
            .find(|l| &l.name == name)
            .ok_or_else(|| AgentError::Config(format!("interface {name} not found")))?,
        (None, Some(ip)) => links
            .into_iter()
            .find(|l| v4(l.index).iter().any(|n| n.addr() == ip))
            .ok_or_else(|| AgentError::Config(format!("no interface has the address {ip}; pass --iface")))?,
        (None, None) => {
            let default = nl
                .routes()
                .map_err(kernel("listing routes"))?
                .into_iter()
                .find(|r| r.dst.prefix_len() == 0 && r.dst.addr().is_ipv4());
            let index = default
                .and_then(|r| r.oif)
                .ok_or_else(|| AgentError::Config("no default route to find the uplink by; pass --iface".into()))?;
            links
                .into_iter()
                .find(|l| l.index == index)
                .ok_or_else(|| AgentError::Config("default route interface vanished".into()))?
        }
    };
    let nets = v4(link.index);
    let ip = match cfg.public_ip {
        Some(ip) => ip,
        None => nets
            .first()
            .map(|n| n.addr())
            .ok_or_else(|| AgentError::Config(format!("{} has no IPv4 address", link.name)))?,
    };
    Ok(Uplink { link, ip, nets: nets.iter().map(|n| n.trunc()).collect() })
}

fn load_network(cfg: &AgentConfig, store: &dyn LeaseStore) -> Result<NetworkConfig> {
    let text = match &cfg.net_conf {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|e| AgentError::Config(format!("reading {}: {e}", path.display())))?
        }
        None => store.network_config()?.ok_or_else(|| {
            AgentError::Config(format!("no network config: pass --net-conf or store one in the {}", store.describe()))
        })?,
    };
    let network = NetworkConfig::parse(&text)?;
    for warning in &network.warnings {
        tracing::warn!("{warning}");
    }
    Ok(network)
}

fn random_index(n: usize) -> usize {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos() as usize);
    (nanos ^ std::process::id() as usize) % n.max(1)
}

/// Six random bytes for a new VTEP MAC. No randomness, no MAC: a fixed fallback would give every
/// node the same one.
fn random_mac() -> Result<[u8; 6]> {
    let mut b = [0u8; 6];
    match rustix::rand::getrandom(&mut b[..], rustix::rand::GetRandomFlags::empty()) {
        Ok(6) => Ok(b),
        Ok(n) => Err(AgentError::Config(format!("the kernel gave {n} of 6 random bytes for the VTEP MAC"))),
        Err(e) => Err(AgentError::Config(format!("no random bytes for the VTEP MAC: {e}"))),
    }
}

/// Fails unless the subnet file can be written where asked: checked before anything is leased
/// or programmed.
fn check_subnet_file(path: &std::path::Path) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let fail =
        |e: std::io::Error| AgentError::Config(format!("the subnet file {} cannot be written: {e}", path.display()));
    std::fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(format!(".weft-probe.{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(fail)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The running agent's state.
struct Node {
    cfg: AgentConfig,
    network: NetworkConfig,
    nl: Netlink,
    /// The netlink watch on links.
    monitor: LinkMonitor,
    uplink: Uplink,
    vtep_mac: Option<[u8; 6]>,
    vtep: Option<u32>,
    lease: Lease,
    /// The peers programmed in the kernel, as last applied.
    programmed: HashMap<Ipv4Net, Lease>,
    /// The warnings about ignored peers already logged.
    warned: std::collections::HashSet<String>,
    /// The watch last showed this node's lease missing (the renewer was told).
    missing: bool,
    status: Arc<Mutex<Status>>,
}

impl Node {
    /// The reported status (a poisoned lock still holds usable counters).
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn attrs(&self) -> LeaseAttrs {
        let data = match (self.network.backend.kind, self.vtep_mac) {
            (BackendType::Vxlan, Some(mac)) => {
                json!({"VNI": self.network.backend.vni, "VtepMAC": weft_dataplane::format_mac(&mac)})
            }
            _ => json!(null),
        };
        LeaseAttrs {
            public_ip: self.uplink.ip,
            public_ipv6: None,
            backend_type: self.network.backend.kind.as_str().into(),
            backend_data: data,
        }
    }

    /// Finds the uplink again (by the same `--iface`, address or default route): one deleted and
    /// made again has another index, and everything built on it follows.
    fn refresh_uplink(&mut self) {
        let Ok(found) = find_uplink(&mut self.nl, &self.cfg) else { return };
        if found.link.index == self.uplink.link.index {
            return;
        }
        if found.ip != self.uplink.ip {
            tracing::warn!(
                "the uplink {} is back with another address, {} (the lease says {}); restart the agent to publish it",
                found.link.name,
                found.ip,
                self.uplink.ip
            );
            return;
        }
        tracing::info!("the uplink {} is back (index {}); rebuilding on it", found.link.name, found.link.index);
        self.monitor.follow_mtu(found.link.index);
        self.uplink = found;
    }

    fn pod_mtu(&self) -> u32 {
        backend::pod_mtu(self.network.backend.kind, self.uplink.link.mtu)
    }

    fn ensure_vtep(&mut self) -> Result<bool> {
        let Some(mac) = self.vtep_mac else { return Ok(false) };
        let cfg = vtep::VtepConfig {
            vni: self.network.backend.vni,
            port: self.network.backend.port,
            local: self.uplink.ip,
            uplink: self.uplink.link.index,
            mtu: self.pod_mtu(),
            subnet: self.lease.subnet,
            state_dir: &self.cfg.state_dir,
        };
        let (index, created) = vtep::ensure(&mut self.nl, &cfg, mac)?;
        self.vtep = Some(index);
        if created {
            // Replacing a VTEP with other settings deletes it: this agent's own deletion is not
            // news for the link watch.
            let _ = self.monitor.deleted();
        }
        Ok(created)
    }

    fn context(&self) -> Context<'_> {
        Context {
            kind: self.network.backend.kind,
            network: self.network.network,
            subnet_len: self.network.subnet_len,
            own_subnet: self.lease.subnet,
            own_ip: self.uplink.ip,
            uplink: self.uplink.link.index,
            uplink_nets: &self.uplink.nets,
            vtep: self.vtep,
            direct_routing: self.network.backend.direct_routing,
        }
    }

    fn record(&self, started: Instant, ok: bool, leases: usize) {
        let mut s = self.status();
        s.reconciles += 1;
        s.reconcile_seconds_sum += started.elapsed().as_secs_f64();
        s.peers = self.programmed.len();
        s.leases = leases;
        if !ok {
            s.reconcile_errors += 1;
        }
    }

    /// Everything: the kernel is made to hold exactly the desired state for `peers`.
    fn reconcile(&mut self, peers: &[Lease]) -> Result<usize> {
        let started = Instant::now();
        let (desired, warnings) = backend::desired(&self.context(), peers);
        // Each ignored peer is reported once, not on every resync; again if it comes back.
        for w in warnings.iter().filter(|w| !self.warned.contains(*w)) {
            tracing::warn!("{w}");
        }
        self.warned = warnings.into_iter().collect();
        let outcome = reconcile::apply(&mut self.nl, &desired, self.vtep);
        // Only the peers that are programmed (not this node, not rejected leases).
        let routed: std::collections::HashSet<ipnet::IpNet> = desired.routes.iter().map(|r| r.dst).collect();
        self.programmed =
            peers.iter().filter(|p| routed.contains(&IpNet::V4(p.subnet))).map(|p| (p.subnet, p.clone())).collect();
        self.record(started, outcome.is_ok(), peers.len());
        outcome.map(|_| desired.routes.len())
    }

    /// Just the peers that changed, without listing the kernel's objects.
    fn apply_events(&mut self, events: &[LeaseEvent], leases: usize) -> Result<()> {
        let started = Instant::now();
        let mut outcome = Ok(());
        for event in events {
            let (subnet, new) = match event {
                LeaseEvent::Added(l) => (l.subnet, Some(l.clone())),
                LeaseEvent::Removed(l) => (l.subnet, None),
            };
            let old = self.programmed.get(&subnet).cloned();
            let ctx = self.context();
            let (old_d, _) = backend::desired(&ctx, old.as_slice());
            let (new_d, warnings) = backend::desired(&ctx, new.as_slice());
            for w in warnings {
                if self.warned.insert(w.clone()) {
                    tracing::warn!("{w}");
                }
            }
            if let Err(e) = reconcile::apply_peer(&mut self.nl, &old_d, &new_d, self.vtep) {
                outcome = Err(e);
                break;
            }
            match new.filter(|_| !new_d.routes.is_empty()) {
                Some(l) => self.programmed.insert(subnet, l),
                None => self.programmed.remove(&subnet),
            };
        }
        self.record(started, outcome.is_ok(), leases);
        outcome
    }

    fn write_subnet_file(&self) -> Result<()> {
        let first = Ipv4Addr::from(u32::from(self.lease.subnet.network()) + 1);
        let env = SubnetEnv {
            network: IpNet::V4(self.network.network),
            subnet: IpNet::new(IpAddr::V4(first), self.lease.subnet.prefix_len())
                .map_err(|e| AgentError::Config(e.to_string()))?,
            mtu: self.pod_mtu(),
            ipmasq: self.cfg.ip_masq,
            ipv6_network: None,
            ipv6_subnet: None,
        };
        if SubnetEnv::read(&self.cfg.subnet_file).ok().as_ref() != Some(&env) {
            env.write(&self.cfg.subnet_file)?;
        }
        Ok(())
    }

    /// Takes in what the renewer did. Returns whether every peer must be replayed (the lease
    /// changed hands).
    fn apply_report(&mut self, report: Report) -> Result<bool> {
        match report {
            Report::Held { lease, reacquired: false } => {
                self.lease = lease;
                self.status().store_up = true;
                Ok(false)
            }
            Report::Held { lease, reacquired: true } => {
                let before = self.lease.subnet;
                self.lease = lease;
                let mut s = self.status();
                s.lease_reacquired += 1;
                s.store_up = true;
                s.lease = Some(self.lease.subnet.to_string());
                drop(s);
                if self.lease.subnet == before {
                    tracing::warn!("lease {before} was lost; acquired it again");
                } else {
                    tracing::warn!("lease {before} was lost; now leasing {}", self.lease.subnet);
                    self.ensure_vtep()?;
                    self.write_subnet_file()?;
                }
                Ok(true)
            }
            Report::Failed(e) => Err(AgentError::Lease(LeaseError::Store(format!("keeping the lease: {e}")))),
        }
    }
}

/// What start-up needs from the store, read with retries.
struct Started {
    store: Box<dyn LeaseStore>,
    network: NetworkConfig,
}

/// Opens the store and reads the network config, trying again (with a backoff, one log line
/// per change of state) while the store does not answer: an agent whose store is down at start
/// stays up, serves its health endpoint and leaves the kernel as it is. A bad config is fatal.
fn start_store(cfg: &AgentConfig, status: &Arc<Mutex<Status>>) -> Result<Started> {
    let mut backoff = Duration::from_secs(1);
    let mut said: Option<String> = None;
    loop {
        let attempt = cfg
            .store
            .open()
            .and_then(|store| load_network(cfg, store.as_ref()).map(|network| Started { store, network }));
        match attempt {
            Ok(started) => {
                if said.is_some() {
                    tracing::info!("the store answers again");
                }
                return Ok(started);
            }
            Err(AgentError::Lease(e)) => {
                let line = e.to_string();
                if said.as_ref() != Some(&line) {
                    tracing::warn!("the store does not answer ({line}); trying again");
                    said = Some(line);
                }
                {
                    let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
                    s.store_up = false;
                    s.store_errors += 1;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(renewer::MAX_BACKOFF);
            }
            Err(other) => return Err(other),
        }
    }
}

/// The first lease, tried again like [`start_store`] while the store fails.
fn first_lease(node: &Node, store: &dyn LeaseStore, previous: Option<Ipv4Net>) -> Result<Lease> {
    let mut backoff = Duration::from_secs(1);
    let mut said: Option<String> = None;
    loop {
        let attrs = node.attrs();
        match store.acquire(
            &node.network,
            &attrs,
            previous,
            Some(node.cfg.lease_ttl),
            SystemTime::now(),
            &mut random_index,
        ) {
            Ok(lease) => return Ok(lease),
            Err(LeaseError::Exhausted(e)) => return Err(AgentError::Lease(LeaseError::Exhausted(e))),
            Err(e) => {
                let line = e.to_string();
                if said.as_ref() != Some(&line) {
                    tracing::warn!("acquiring a lease failed ({line}); trying again");
                    said = Some(line);
                }
                {
                    let mut s = node.status();
                    s.store_up = false;
                    s.store_errors += 1;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(renewer::MAX_BACKOFF);
            }
        }
    }
}

/// Runs the agent until the process is stopped. Start-up errors are returned; errors in the
/// loop are logged and retried.
pub fn run(cfg: AgentConfig) -> Result<()> {
    check_subnet_file(&cfg.subnet_file)?;
    let status = Arc::new(Mutex::new(Status::default()));
    // Served before the store is reached: probes are answered (not ready) while it is down.
    if let Some(addr) = cfg.health {
        let bound = http::serve(addr, status.clone())
            .map_err(|e| AgentError::Config(format!("health listener on {addr}: {e}")))?;
        tracing::info!("health and metrics on http://{bound}");
    }
    let Started { store, network } = start_store(&cfg, &status)?;
    let mut nl = Netlink::new().map_err(kernel("opening netlink"))?;
    let uplink = find_uplink(&mut nl, &cfg)?;
    if let Some(clash) = uplink.nets.iter().find(|n| n.contains(&network.network) || network.network.contains(*n)) {
        return Err(AgentError::Config(format!(
            "the pod network {} overlaps the node network {clash} of {}: pick a Network that does not",
            network.network, uplink.link.name
        )));
    }
    let vtep_mac = match network.backend.kind {
        BackendType::Vxlan => Some(vtep::stable_mac(&cfg.state_dir, random_mac()?)?),
        BackendType::HostGw => None,
    };
    let previous = SubnetEnv::read(&cfg.subnet_file).ok().and_then(|e| match e.subnet.trunc() {
        IpNet::V4(n) if e.network == IpNet::V4(network.network) => Some(n),
        _ => None,
    });
    let placeholder = Lease {
        subnet: network.subnets().next().ok_or_else(|| AgentError::Config("the network has no subnets".into()))?,
        attrs: LeaseAttrs {
            public_ip: uplink.ip,
            public_ipv6: None,
            backend_type: String::new(),
            backend_data: json!(null),
        },
        expires: None,
        created: None,
    };
    let mut monitor = LinkMonitor::new().map_err(kernel("watching links"))?;
    monitor.follow_mtu(uplink.link.index);
    let mut node = Node {
        cfg,
        network,
        nl,
        monitor,
        uplink,
        vtep_mac,
        vtep: None,
        lease: placeholder,
        programmed: HashMap::new(),
        warned: Default::default(),
        missing: false,
        status,
    };
    node.lease = first_lease(&node, store.as_ref(), previous)?;
    node.status().store_up = true;
    tracing::info!(
        "{} leased {} ({} backend, uplink {}, {})",
        node.uplink.ip,
        node.lease.subnet,
        node.network.backend.kind.as_str(),
        node.uplink.link.name,
        store.describe()
    );
    node.status().lease = Some(node.lease.subnet.to_string());
    node.ensure_vtep()?;
    firewall::apply(&node.network.network, node.cfg.ip_masq)?;
    let mut watcher = store.watch()?;
    let renewer =
        Renewer::start(store, node.network.clone(), node.attrs(), node.lease.clone(), node.cfg.lease_ttl, random_index)
            .map_err(|e| AgentError::Config(format!("starting the renewer: {e}")))?;

    let mut last_resync = Instant::now();
    let mut failing: Option<String> = None;
    let mut first = true;
    loop {
        // Wakes at once when the store changes, else every 50 ms for the VTEP check and timers
        // (the first tick runs at once: a store that lists synchronously is synced already).
        if !std::mem::take(&mut first) {
            watcher.wait(Duration::from_millis(if node.status().started { 50 } else { 10 }));
        }
        let outcome = tick(&mut node, &mut watcher, &renewer, &mut last_resync);
        // One line per change of state, not one per failed tick: a failure when it is new,
        // "recovered" once the dataplane and the store are both well again (a tick between two
        // retries that has nothing to do is no recovery).
        match &outcome {
            Err(e) => {
                let line = e.to_string();
                if failing.as_ref() != Some(&line) {
                    tracing::warn!("{line} (retrying)");
                    failing = Some(line);
                }
            }
            Ok(()) => {
                let well = node.status().readiness().is_ok();
                if well && failing.take().is_some() {
                    tracing::info!("recovered");
                }
            }
        }
        let mut s = node.status();
        match outcome {
            Ok(()) => {}
            Err(e) => match e {
                AgentError::Lease(_) => {
                    s.store_up = false;
                    s.store_errors += 1;
                }
                _ => {
                    s.dataplane_up = false;
                    s.reconcile_errors += 1;
                }
            },
        }
    }
}

/// How often a dataplane that could not be programmed is tried again.
const RETRY: Duration = Duration::from_secs(1);

fn tick(
    node: &mut Node,
    watcher: &mut Box<dyn LeaseWatcher>,
    renewer: &Renewer,
    last_resync: &mut Instant,
) -> Result<()> {
    let now = SystemTime::now();
    let seen = Instant::now();
    let events = watcher.poll(now)?;
    // Until the watch has listed every lease once, what it knows is partial: nothing is
    // programmed or removed on its word (a restart must not drop peers it has not heard of yet).
    if !watcher.synced() {
        return Ok(());
    }
    let mut replay = !node.status().started;
    // The VTEP deleted by hand (or by another program): the link watch tells; recreate it and
    // replay every peer. (When notifications were lost, look.)
    let deleted = node.monitor.deleted();
    // The uplink's MTU changed: pods made from now on, the VTEP and the subnet file follow it.
    let mtu = match &deleted {
        Some(_) => node.monitor.take_mtu(),
        None => node.nl.link_by_index(node.uplink.link.index).map_err(kernel("reading the uplink"))?.map(|l| l.mtu),
    };
    if let Some(mtu) = mtu.filter(|m| *m != node.uplink.link.mtu) {
        tracing::info!(
            "the uplink's MTU is now {mtu} (was {}); pods get {} from now on",
            node.uplink.link.mtu,
            backend::pod_mtu(node.network.backend.kind, mtu)
        );
        node.uplink.link.mtu = mtu;
        node.ensure_vtep()?;
        if node.status().started {
            node.write_subnet_file()?;
        }
    }
    if node.vtep_mac.is_some() {
        let name = vtep::name(node.network.backend.vni);
        let gone = match &deleted {
            Some(deleted) => deleted.contains(&name),
            None => node.nl.link_by_name(&name).map_err(kernel("reading the VTEP"))?.is_none(),
        };
        if gone {
            tracing::warn!("{name} is gone; recreating it and replaying every peer");
            node.ensure_vtep()?;
            node.status().vtep_recreated += 1;
            replay = true;
        }
    }
    // Checked every tick: a lookup, not a copy of every lease. The renewer is told once when
    // the lease goes missing (deleted, expired, overwritten by someone else).
    // Present means as this node wrote it: the same address and backend data (a restored backup
    // or another writer may have put other data, a stale VTEP MAC, on this node's key).
    let present = watcher.lease(&node.lease.subnet).is_some_and(|l| l.attrs == node.lease.attrs);
    if !present && !node.missing {
        renewer.lost();
    }
    node.missing = !present;
    // What the renewer did; a store failure is reported after the peers are applied, so peer
    // events keep flowing while this node's own lease is in trouble.
    let mut store_error = None;
    for report in renewer.reports() {
        match node.apply_report(report) {
            Ok(changed) => replay |= changed,
            Err(e @ AgentError::Lease(_)) => store_error = Some(e),
            Err(e) => return Err(e),
        }
    }
    // The dataplane could not be programmed last time: try everything again now.
    let retry = !node.status().dataplane_up && last_resync.elapsed() >= RETRY;
    if retry || last_resync.elapsed() >= node.cfg.resync {
        *last_resync = Instant::now();
        if retry {
            node.refresh_uplink();
        }
        if node.ensure_vtep()? {
            tracing::warn!("VTEP recreated at resync");
        }
        firewall::apply(&node.network.network, node.cfg.ip_masq)?;
        node.write_subnet_file()?;
        replay = true;
    }
    // A change to a lease whose VTEP MAC another node's lease also claims: which of them counts
    // depends on both, so everything is computed again.
    if !replay {
        let known: Vec<&Lease> = watcher.known().values().collect();
        let leases = events.iter().map(|e| match e {
            LeaseEvent::Added(l) | LeaseEvent::Removed(l) => l,
        });
        replay = leases.into_iter().any(|l| backend::shares_vtep_mac(l, &known));
    }
    if replay {
        let peers: Vec<Lease> = watcher.leases();
        node.reconcile(&peers)?;
        node.status().dataplane_up = true;
        if !node.status().started {
            node.write_subnet_file()?;
            node.status().started = true;
            tracing::info!("ready; subnet file {}", node.cfg.subnet_file.display());
        }
    } else if !events.is_empty() {
        node.apply_events(&events, watcher.count())?;
    }
    if !events.is_empty() {
        node.status().last_event_to_kernel_seconds = seen.elapsed().as_secs_f64();
    }
    node.status().damaged_leases = watcher.damaged();
    if let Some(e) = store_error {
        return Err(e);
    }
    Ok(())
}
