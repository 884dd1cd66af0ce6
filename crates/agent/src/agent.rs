//! The agent: start-up (the store, the uplink, the backend, the first lease), then one event
//! loop. Each turn gathers what happened — lease changes from the watch, link changes from the
//! link monitor, the renewer's reports — hands each to the [`Core`] as an event, carries out
//! the actions it returns through a [`Kernel`] and feeds the outcome back. The watch wakes the
//! loop at once on a change; otherwise it turns every 50 ms. The dataplane is never flushed, on
//! start or stop.
//!
//! Every part the loop talks to is an interface ([`Kernel`], [`LeaseWatcher`], [`Keeper`],
//! [`Links`]) so tests drive the same loop with fakes.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ipnet::{IpNet, Ipv4Net};
use weft_dataplane::monitor::LinkMonitor;
use weft_dataplane::Netlink;
use weft_lease::etcd::EtcdStore;
use weft_lease::file::FileStore;
use weft_lease::{LeaseAttrs, LeaseError, LeaseStore, LeaseWatcher};
use weft_netconf::{NetworkConfig, SubnetEnv};

use crate::backend::{self, Backend, Setup};
use crate::core::{Action, Core, Event, Settings, Uplink};
use crate::exec::{self, Kernel, NetlinkKernel};
use crate::http::{self, Status};
use crate::renewer::{Renewer, Report};
use crate::{kernel, renewer, AgentError, Result};

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
    /// This node's name (routed mode: `RouteReflectors` and `Peers` name nodes); the host name
    /// when not given.
    pub node_name: Option<String>,
}

impl AgentConfig {
    /// The node's name: given, or the host name.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
        })
    }

    /// Where routed mode's pods keep their address reservations.
    pub fn ipam_dir(&self) -> PathBuf {
        self.state_dir.join("ipam")
    }
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
    Ok(Uplink { name: link.name, ip, nets: nets.iter().map(|n| n.trunc()).collect(), mtu: link.mtu })
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

/// Keeps the node's lease (the [`Renewer`] thread; a fake in tests).
pub trait Keeper {
    /// The watch shows the lease missing or someone else's.
    fn lost(&self);
    /// What happened since the last call.
    fn reports(&self) -> Vec<Report>;
    /// Write `attrs` over the lease from now on.
    fn publish(&self, attrs: LeaseAttrs);
}

impl Keeper for Renewer {
    fn lost(&self) {
        Renewer::lost(self)
    }

    fn reports(&self) -> Vec<Report> {
        Renewer::reports(self)
    }

    fn publish(&self, attrs: LeaseAttrs) {
        Renewer::publish(self, attrs)
    }
}

/// Tells the loop about links (the netlink link monitor; a fake in tests).
pub trait Links {
    /// The link events since the last call: `device` and the uplink deleted, the uplink's MTU.
    fn events(&mut self, kernel: &mut dyn Kernel, device: Option<&str>, uplink: &str) -> Vec<Event>;
    /// Deletions not reported yet are forgotten (the executor replaced the device itself).
    fn forget_deletions(&mut self);
}

impl Links for LinkMonitor {
    fn events(&mut self, kernel: &mut dyn Kernel, device: Option<&str>, uplink: &str) -> Vec<Event> {
        let mut events = Vec::new();
        match self.deleted() {
            Some(names) => {
                if !names.is_empty() {
                    events.push(Event::LinksDeleted(names));
                }
                events.extend(self.take_mtu().map(Event::UplinkMtu));
            }
            // Notifications were lost: look.
            None => {
                let mut gone = Vec::new();
                for name in device.into_iter().chain([uplink]) {
                    match kernel.link(name) {
                        Ok(None) => gone.push(name.to_string()),
                        Ok(Some(link)) if name == uplink => events.push(Event::UplinkMtu(link.mtu)),
                        _ => {}
                    }
                }
                if !gone.is_empty() {
                    events.push(Event::LinksDeleted(gone));
                }
            }
        }
        events
    }

    fn forget_deletions(&mut self) {
        let _ = self.deleted();
    }
}

/// The event loop: the core and everything it talks to.
pub struct Loop {
    pub core: Core,
    pub kernel: Box<dyn Kernel>,
    pub watcher: Box<dyn LeaseWatcher>,
    pub keeper: Box<dyn Keeper>,
    pub links: Box<dyn Links>,
    pub status: Arc<Mutex<Status>>,
    /// Where the backend keeps what must survive restarts.
    pub state_dir: PathBuf,
    /// This node's name.
    pub node_name: String,
    /// Routed mode's speaker, blackholes and block keeper.
    pub routing: Option<crate::routed::Routing>,
}

impl Loop {
    /// One turn at `now` (`wall`: the time leases expire by).
    pub fn turn(&mut self, now: Instant, wall: SystemTime) {
        let seen = Instant::now();
        let mut events = Vec::new();
        let mut changed = false;
        match self.watcher.poll(wall) {
            Ok(changes) => {
                changed = !changes.is_empty();
                events.push(Event::Leases { changes, synced: self.watcher.synced(), damaged: self.watcher.damaged() });
            }
            Err(LeaseError::Store(e)) => events.push(Event::StoreFailed(e)),
            Err(e) => events.push(Event::StoreFailed(e.to_string())),
        }
        let device = self.core.device_name();
        let uplink = self.core.uplink().name.clone();
        let links = self.links.events(self.kernel.as_mut(), device.as_deref(), &uplink);
        if links.iter().any(|e| matches!(e, Event::LinksDeleted(_))) {
            self.kernel.forget_links();
        }
        events.extend(links);
        events.extend(self.keeper.reports().into_iter().map(Event::Renewer));
        events.push(Event::Tick);
        let mut reconcile_seconds = 0.0;
        for event in events {
            let actions = self.core.decide(now, event);
            reconcile_seconds += self.carry_out(now, actions);
        }
        if let Some(routing) = &mut self.routing {
            routing.turn(&mut self.core, now);
        }
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let sum = status.reconcile_seconds_sum + reconcile_seconds;
        let last = if changed { seen.elapsed().as_secs_f64() } else { status.last_event_to_kernel_seconds };
        *status = self.core.status().clone();
        status.reconcile_seconds_sum = sum;
        status.last_event_to_kernel_seconds = last;
        if let Some(routing) = &self.routing {
            status.blocks = self.core.own_blocks().len();
            status.bgp = routing.last_status.clone();
        }
    }

    /// Carries out `actions`; the outcome goes back to the core. Returns the seconds spent.
    fn carry_out(&mut self, now: Instant, actions: Vec<Action>) -> f64 {
        if actions.iter().any(|a| matches!(a, Action::LeaseLost)) {
            self.keeper.lost();
        }
        if actions.iter().any(|a| matches!(a, Action::RenewClaim)) {
            match self.core.renew_claim(&Setup { state_dir: &self.state_dir, node_name: &self.node_name }) {
                Ok(Some(attrs)) => self.keeper.publish(attrs),
                Ok(None) => {}
                Err(e) => tracing::warn!("making a new claim: {e}"),
            }
        }
        if !actions.iter().any(Action::is_kernel) {
            return 0.0;
        }
        let started = Instant::now();
        let outcome = exec::execute(self.kernel.as_mut(), &actions);
        match &outcome {
            // Replacing a device with other settings deletes it: this agent's own deletion is
            // not news.
            Ok(done) if done.device_created => self.links.forget_deletions(),
            Ok(_) => {}
            // A remembered link index may be what failed.
            Err(_) => self.kernel.forget_links(),
        }
        let spent = started.elapsed().as_secs_f64();
        let more = self.core.decide(now, Event::Executed(outcome.map_err(|e| e.to_string())));
        debug_assert!(more.is_empty(), "an outcome asks for nothing: {more:?}");
        spent
    }

    /// Waits for the store to change, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) {
        self.watcher.wait(timeout);
    }
}

/// What start-up needs from the store, read with retries.
struct Started {
    store: Box<dyn LeaseStore>,
    network: NetworkConfig,
}

/// Runs `attempt` until it succeeds or fails for good. While the store does not answer (a
/// lease error other than an exhausted network) it is tried again with a backoff of up to
/// [`renewer::MAX_BACKOFF`], logged once per distinct failure and counted in `status`: an agent
/// whose store is down at start stays up, serves its health endpoint and leaves the kernel as it
/// is.
fn until_the_store_answers<T>(
    what: &str,
    status: &Arc<Mutex<Status>>,
    mut attempt: impl FnMut() -> Result<T>,
) -> Result<T> {
    let mut backoff = Duration::from_secs(1);
    let mut said: Option<String> = None;
    loop {
        match attempt() {
            Err(AgentError::Lease(e)) if !matches!(e, LeaseError::Exhausted(_)) => {
                let line = e.to_string();
                if said.as_ref() != Some(&line) {
                    tracing::warn!("{what}: the store does not answer ({line}); trying again");
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
            outcome => {
                if outcome.is_ok() && said.is_some() {
                    tracing::info!("{what}: the store answers again");
                }
                return outcome;
            }
        }
    }
}

/// Opens the store and reads the network config (a bad config is fatal).
fn start_store(cfg: &AgentConfig, status: &Arc<Mutex<Status>>) -> Result<Started> {
    until_the_store_answers("reading the network config", status, || {
        let store = cfg.store.open()?;
        let network = load_network(cfg, store.as_ref())?;
        Ok(Started { store, network })
    })
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
            network.network, uplink.name
        )));
    }
    let node_name = cfg.node_name();
    let (backend, warnings): (Box<dyn Backend>, _) =
        backend::build(&network.backend, &Setup { state_dir: &cfg.state_dir, node_name: &node_name })?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let previous = SubnetEnv::read(&cfg.subnet_file).ok().and_then(|e| match e.subnet.trunc() {
        IpNet::V4(n) if e.network == IpNet::V4(network.network) => Some(n),
        _ => None,
    });
    let attrs = LeaseAttrs {
        public_ip: uplink.ip,
        public_ipv6: None,
        backend_type: backend.name().into(),
        backend_data: backend.lease_data(),
    };
    let lease = until_the_store_answers("acquiring a lease", &status, || {
        Ok(store.acquire(&network, &attrs, previous, Some(cfg.lease_ttl), SystemTime::now(), &mut random_index)?)
    })?;
    tracing::info!(
        "{} leased {} ({} backend, uplink {}, {})",
        uplink.ip,
        lease.subnet,
        backend.name(),
        uplink.name,
        store.describe()
    );
    let mut monitor = LinkMonitor::new().map_err(kernel("watching links"))?;
    monitor.follow_mtu(&uplink.name);
    let watcher = store.watch()?;
    // Routed mode: the speaker, the blackholes and the block keeper (with a store of its own).
    let routing = match backend.routed() {
        Some(options) => {
            let keeper_store =
                until_the_store_answers("opening the store for the block keeper", &status, || cfg.store.open())?;
            Some(crate::routed::Routing::start(crate::routed::Start {
                options,
                network: &network,
                ip: uplink.ip,
                subnet_file: &cfg.subnet_file,
                ipam_dir: &cfg.ipam_dir(),
                attrs: &attrs,
                store: keeper_store,
            })?)
        }
        None => None,
    };
    let keeper = Renewer::start(store, network.clone(), attrs, lease.clone(), cfg.lease_ttl, random_index)
        .map_err(|e| AgentError::Config(format!("starting the renewer: {e}")))?;
    let settings = Settings {
        network: network.network,
        subnet_len: network.subnet_len,
        ip_masq: cfg.ip_masq,
        resync: cfg.resync,
        ipam_dir: cfg.ipam_dir(),
    };
    let mut agent = Loop {
        core: Core::new(settings, backend, uplink, lease),
        kernel: Box::new(NetlinkKernel::new(nl, cfg.subnet_file.clone())),
        watcher,
        keeper: Box::new(keeper),
        links: Box::new(monitor),
        status,
        state_dir: cfg.state_dir.clone(),
        node_name,
        routing,
    };
    // The first turn at once (a store that lists synchronously is synced already); then on
    // every change, or every 50 ms for the timers (10 ms until ready).
    loop {
        agent.turn(Instant::now(), SystemTime::now());
        agent.wait(Duration::from_millis(if agent.core.status().started { 50 } else { 10 }));
    }
}
