//! Fakes for the agent's loop: a kernel, a lease store with its watch, a renewer and a link
//! monitor, all in memory, and a harness that turns the real loop with an injected clock.

#![allow(dead_code, clippy::unwrap_used)]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ipnet::Ipv4Net;
use serde_json::json;
use weft_agent::agent::{Keeper, Links, Loop};
use weft_agent::backend::{self, Setup};
use weft_agent::core::{Core, Event, Settings, Uplink};
use weft_agent::exec::{Kernel, LinkInfo};
use weft_agent::http::Status;
use weft_agent::model::{DeviceSpec, Fdb, Neighbour, Op, Owner, Resolved, Route, Tunnel};
use weft_agent::renewer::Report;
use weft_agent::{AgentError, Result};
use weft_lease::{Lease, LeaseAttrs, LeaseEvent, LeaseWatcher};
use weft_netconf::{NetworkConfig, SubnetEnv};

/// What the fake kernel holds.
#[derive(Default)]
pub struct KernelState {
    pub links: BTreeMap<String, LinkInfo>,
    pub devices: HashMap<String, DeviceSpec>,
    next_index: u32,
    /// Routes with their protocol.
    pub routes: Vec<(u8, Route<u32>)>,
    pub neighbours: Vec<Neighbour<u32>>,
    pub fdb: Vec<Fdb<u32>>,
    pub tunnel: Vec<Tunnel<u32>>,
    pub firewall: Option<(Ipv4Net, bool)>,
    pub subnet_file: Option<SubnetEnv>,
    /// Every change, in order ("ensure weft.1", "put route 198.19.2.0/24", "del fdb ...").
    pub journal: Vec<String>,
    /// A change whose journal line contains this fails.
    pub fail: Option<String>,
    /// Link deletions the monitor has not reported yet.
    pub deleted: Vec<String>,
    pub mtu_changes: Vec<u32>,
}

impl KernelState {
    pub fn add_link(&mut self, name: &str, mtu: u32) -> u32 {
        self.next_index += 1;
        let index = self.next_index;
        self.links.insert(name.to_string(), LinkInfo { index, mtu });
        index
    }

    /// Deletes a link and everything on it, as the kernel does.
    pub fn delete_link(&mut self, name: &str) {
        let Some(link) = self.links.remove(name) else { return };
        self.devices.remove(name);
        self.routes.retain(|(_, r)| r.dev != link.index);
        self.neighbours.retain(|n| n.dev != link.index);
        self.fdb.retain(|e| e.dev != link.index);
        self.deleted.push(name.to_string());
    }

    pub fn set_mtu(&mut self, name: &str, mtu: u32) {
        self.links.get_mut(name).unwrap().mtu = mtu;
        self.mtu_changes.push(mtu);
    }

    fn change(&mut self, line: String) -> Result<()> {
        if self.fail.as_ref().is_some_and(|f| line.contains(f.as_str())) {
            return Err(AgentError::Config(format!("injected failure: {line}")));
        }
        self.journal.push(line);
        Ok(())
    }

    /// The routes of one owner's protocol, by destination.
    pub fn routes_of(&self, protocol: u8) -> Vec<String> {
        let mut out: Vec<String> =
            self.routes.iter().filter(|(p, _)| *p == protocol).map(|(_, r)| r.dst.to_string()).collect();
        out.sort();
        out
    }

    /// The removals in the journal.
    pub fn removals(&self) -> Vec<&String> {
        self.journal.iter().filter(|l| l.starts_with("del ")).collect()
    }
}

pub struct FakeKernel(pub Rc<RefCell<KernelState>>);

fn mtu_of(spec: &DeviceSpec) -> u32 {
    match spec {
        DeviceSpec::Vxlan { mtu, .. } | DeviceSpec::Tun { mtu, .. } => *mtu,
    }
}

/// The spec with its MTU left out (an MTU alone is set in place).
fn without_mtu(spec: &DeviceSpec) -> DeviceSpec {
    let mut spec = spec.clone();
    match &mut spec {
        DeviceSpec::Vxlan { mtu, .. } | DeviceSpec::Tun { mtu, .. } => *mtu = 0,
    }
    spec
}

impl Kernel for FakeKernel {
    fn link(&mut self, name: &str) -> Result<Option<LinkInfo>> {
        Ok(self.0.borrow().links.get(name).copied())
    }

    fn ensure_device(&mut self, spec: &DeviceSpec) -> Result<bool> {
        let mut k = self.0.borrow_mut();
        let (name, mtu) = (&spec.name().to_string(), &mtu_of(spec));
        if let DeviceSpec::Vxlan { uplink, .. } = spec {
            if !k.links.contains_key(uplink) {
                return Err(AgentError::Config(format!("the uplink {uplink} is missing")));
            }
        }
        if k.devices.get(name) == Some(spec) && k.links.contains_key(name) {
            return Ok(false);
        }
        // The same but for the MTU: set in place, as the real one does.
        if let Some(old) = k.devices.get(name).cloned().filter(|_| k.links.contains_key(name)) {
            if without_mtu(&old) == without_mtu(spec) {
                k.change(format!("set mtu {name} {mtu}"))?;
                k.devices.insert(name.clone(), spec.clone());
                k.links.get_mut(name).unwrap().mtu = *mtu;
                return Ok(false);
            }
        }
        k.change(format!("ensure {name}"))?;
        if k.links.contains_key(name) {
            k.delete_link(name);
        }
        k.add_link(name, *mtu);
        k.devices.insert(name.clone(), spec.clone());
        Ok(true)
    }

    fn remove_stale_devices(&mut self, keep: Option<&str>) -> Result<Vec<String>> {
        let mut k = self.0.borrow_mut();
        let stale: Vec<String> = k
            .links
            .keys()
            .filter(|n| weft_agent::exec::is_backend_device(n) && Some(n.as_str()) != keep)
            .cloned()
            .collect();
        for name in &stale {
            k.change(format!("remove {name}"))?;
            k.delete_link(name);
        }
        Ok(stale)
    }

    fn read(&mut self, owner: &Owner, devices: &[u32]) -> Result<Resolved> {
        let k = self.0.borrow();
        Ok(Resolved {
            routes: k.routes.iter().filter(|(p, _)| *p == owner.protocol).map(|(_, r)| r.clone()).collect(),
            neighbours: k.neighbours.iter().filter(|n| devices.contains(&n.dev)).cloned().collect(),
            fdb: k.fdb.iter().filter(|e| devices.contains(&e.dev)).cloned().collect(),
            tunnel: k.tunnel.iter().filter(|t| devices.contains(&t.dev)).cloned().collect(),
        })
    }

    fn apply(&mut self, owner: &Owner, op: &Op) -> Result<bool> {
        let mut k = self.0.borrow_mut();
        let dev_exists = |k: &KernelState, dev: u32| k.links.values().any(|l| l.index == dev);
        match op {
            Op::DelRoute(r) => {
                k.change(format!("del route {}", r.dst))?;
                k.routes.retain(|(p, x)| !(*p == owner.protocol && x.dst == r.dst));
            }
            Op::DelFdb(e) => {
                k.change(format!("del fdb {}", e.dst))?;
                k.fdb.retain(|x| x != e);
            }
            Op::DelTunnel(t) => {
                k.change(format!("del tunnel {}", t.subnet))?;
                k.tunnel.retain(|x| !(x.dev == t.dev && x.subnet == t.subnet));
            }
            Op::PutTunnel(t) => {
                k.change(format!("put tunnel {} {}", t.subnet, t.ip))?;
                k.tunnel.retain(|x| !(x.dev == t.dev && x.subnet == t.subnet));
                k.tunnel.push(t.clone());
            }
            Op::DelNeighbour(n) => {
                k.change(format!("del neighbour {}", n.ip))?;
                k.neighbours.retain(|x| !(x.dev == n.dev && x.ip == n.ip));
            }
            Op::PutNeighbour(n) => {
                k.change(format!("put neighbour {}", n.ip))?;
                if !dev_exists(&k, n.dev) {
                    return Err(AgentError::Config("no such device".into()));
                }
                k.neighbours.retain(|x| !(x.dev == n.dev && x.ip == n.ip));
                k.neighbours.push(n.clone());
            }
            Op::PutFdb(e) => {
                k.change(format!("put fdb {}", e.dst))?;
                k.fdb.retain(|x| !(x.dev == e.dev && x.mac == e.mac));
                k.fdb.push(e.clone());
            }
            Op::PutRoute(r) => {
                // As the real one: added, or replacing a route to the destination that is this
                // owner's; another producer's is left alone.
                if k.routes.iter().any(|(p, x)| x.dst == r.dst && *p != owner.protocol) {
                    return Ok(false);
                }
                k.change(format!("put route {}", r.dst))?;
                k.routes.retain(|(_, x)| x.dst != r.dst);
                k.routes.push((owner.protocol, r.clone()));
            }
        }
        Ok(true)
    }

    fn firewall(&mut self, network: &Ipv4Net, masquerade: bool, _tunnel_port: Option<u16>) -> Result<()> {
        let mut k = self.0.borrow_mut();
        k.change("firewall".into())?;
        k.firewall = Some((*network, masquerade));
        Ok(())
    }

    fn write_subnet_file(&mut self, env: &SubnetEnv) -> Result<()> {
        let mut k = self.0.borrow_mut();
        if k.subnet_file.as_ref() != Some(env) {
            k.change("subnet file".into())?;
            k.subnet_file = Some(env.clone());
        }
        Ok(())
    }
}

/// Reports what the fake kernel's links did.
pub struct FakeLinks(pub Rc<RefCell<KernelState>>);

impl Links for FakeLinks {
    fn events(&mut self, _kernel: &mut dyn Kernel, _device: Option<&str>, _uplink: &str) -> Vec<Event> {
        let mut k = self.0.borrow_mut();
        let mut events = Vec::new();
        let deleted = std::mem::take(&mut k.deleted);
        if !deleted.is_empty() {
            events.push(Event::LinksDeleted(deleted));
        }
        events.extend(k.mtu_changes.drain(..).next_back().map(Event::UplinkMtu));
        events
    }

    fn forget_deletions(&mut self) {
        self.0.borrow_mut().deleted.clear();
    }
}

/// The store's truth and what its watch may see.
#[derive(Default)]
pub struct StoreState {
    pub leases: BTreeMap<Ipv4Net, Lease>,
    /// Until the first listing is complete: the leases the watch has seen so far (`None`: the
    /// listing is complete).
    pub partial: Option<Vec<Ipv4Net>>,
    /// Polls fail with this.
    pub fail: Option<String>,
}

/// Shared with the watch (which must be `Send`).
#[derive(Default)]
pub struct Shared<T>(Arc<Mutex<T>>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<T> Shared<T> {
    pub fn borrow(&self) -> std::sync::MutexGuard<'_, T> {
        self.0.lock().unwrap()
    }

    pub fn borrow_mut(&self) -> std::sync::MutexGuard<'_, T> {
        self.0.lock().unwrap()
    }
}

/// A watch on the fake store: reports the difference between the truth and what it knew.
pub struct FakeWatcher {
    store: Shared<StoreState>,
    known: HashMap<Ipv4Net, Lease>,
    synced: bool,
}

impl LeaseWatcher for FakeWatcher {
    fn poll(&mut self, _now: SystemTime) -> weft_lease::Result<Vec<LeaseEvent>> {
        let s = self.store.borrow();
        if let Some(e) = &s.fail {
            return Err(weft_lease::LeaseError::Store(e.clone()));
        }
        let visible: BTreeMap<Ipv4Net, Lease> = match &s.partial {
            Some(seen) => s.leases.iter().filter(|(k, _)| seen.contains(k)).map(|(k, v)| (*k, v.clone())).collect(),
            None => s.leases.clone(),
        };
        self.synced |= s.partial.is_none();
        let mut events = Vec::new();
        let gone: Vec<Ipv4Net> = self.known.keys().filter(|k| !visible.contains_key(k)).copied().collect();
        for subnet in gone {
            // Before the listing is complete, nothing is known to be gone.
            if self.synced {
                events.push(LeaseEvent::Removed(self.known.remove(&subnet).unwrap()));
            }
        }
        for (subnet, lease) in visible {
            if self.known.get(&subnet) != Some(&lease) {
                events.push(LeaseEvent::Added(lease.clone()));
                self.known.insert(subnet, lease);
            }
        }
        Ok(events)
    }

    fn leases(&self) -> Vec<Lease> {
        self.known.values().cloned().collect()
    }

    fn lease(&self, subnet: &Ipv4Net) -> Option<Lease> {
        self.known.get(subnet).cloned()
    }

    fn count(&self) -> usize {
        self.known.len()
    }

    fn synced(&self) -> bool {
        self.synced
    }
}

/// The renewer: records what it is told, reports what the test scripts.
#[derive(Default)]
pub struct KeeperState {
    pub lost: usize,
    pub reports: Vec<Report>,
    pub published: Vec<LeaseAttrs>,
}

pub struct FakeKeeper(pub Rc<RefCell<KeeperState>>);

impl Keeper for FakeKeeper {
    fn lost(&self) {
        self.0.borrow_mut().lost += 1;
    }

    fn reports(&self) -> Vec<Report> {
        std::mem::take(&mut self.0.borrow_mut().reports)
    }

    fn publish(&self, attrs: LeaseAttrs) {
        self.0.borrow_mut().published.push(attrs);
    }
}

pub const UPLINK: &str = "eth0";
pub const OWN_IP: &str = "198.18.0.1";
pub const OWN_SUBNET: &str = "198.19.1.0/24";

pub fn mac(i: u8) -> String {
    format!("0a:00:00:00:00:{i:02x}")
}

/// A vxlan lease of node `i`: subnet 198.19.i.0/24 at 198.18.0.i.
pub fn peer(i: u8) -> Lease {
    Lease {
        subnet: format!("198.19.{i}.0/24").parse().unwrap(),
        attrs: LeaseAttrs {
            public_ip: format!("198.18.0.{i}").parse().unwrap(),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: json!({"VNI": 1, "VtepMAC": mac(i)}),
        },
        expires: None,
        created: Some(i as i64),
    }
}

pub struct Harness {
    pub agent: Loop,
    pub kernel: Rc<RefCell<KernelState>>,
    pub store: Shared<StoreState>,
    pub keeper: Rc<RefCell<KeeperState>>,
    pub own: Lease,
    t0: Instant,
    pub now: Duration,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// A node 198.18.0.1 holding 198.19.1.0/24 under `conf`, on a kernel with only its uplink;
    /// the store holds its lease and `peers`.
    pub fn new(conf: &str, peers: &[Lease]) -> Harness {
        Harness::on(conf, peers, Rc::new(RefCell::new(KernelState::default())))
    }

    /// The same on an existing kernel (a restart).
    pub fn on(conf: &str, peers: &[Lease], kernel: Rc<RefCell<KernelState>>) -> Harness {
        let network = NetworkConfig::parse(conf).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vtep-mac"), mac(1)).unwrap();
        let (backend, _) = backend::build(&network.backend, &Setup { state_dir: dir.path(), node_name: "n1" }).unwrap();
        if !kernel.borrow().links.contains_key(UPLINK) {
            kernel.borrow_mut().add_link(UPLINK, 1500);
        }
        let own = Lease {
            subnet: OWN_SUBNET.parse().unwrap(),
            attrs: LeaseAttrs {
                public_ip: OWN_IP.parse().unwrap(),
                public_ipv6: None,
                backend_type: backend.name().into(),
                backend_data: backend.lease_data(),
            },
            expires: None,
            created: Some(1),
        };
        let store = Shared::<StoreState>::default();
        store.borrow_mut().leases = peers.iter().chain([&own]).map(|l| (l.subnet, l.clone())).collect();
        let keeper = Rc::new(RefCell::new(KeeperState::default()));
        let settings = Settings {
            network: network.network,
            subnet_len: network.subnet_len,
            ip_masq: true,
            resync: Duration::from_secs(60),
            ipam_dir: dir.path().join("ipam"),
        };
        let uplink = Uplink {
            name: UPLINK.into(),
            ip: OWN_IP.parse().unwrap(),
            nets: vec!["198.18.0.0/24".parse().unwrap()],
            mtu: kernel.borrow().links[UPLINK].mtu,
        };
        let agent = Loop {
            core: Core::new(settings, backend, uplink, own.clone()),
            kernel: Box::new(FakeKernel(kernel.clone())),
            watcher: Box::new(FakeWatcher { store: store.clone(), known: HashMap::new(), synced: false }),
            keeper: Box::new(FakeKeeper(keeper.clone())),
            links: Box::new(FakeLinks(kernel.clone())),
            status: Arc::new(Mutex::new(Status::default())),
            state_dir: dir.path().to_path_buf(),
            node_name: "n1".into(),
            routing: None,
        };
        Harness { agent, kernel, store, keeper, own, t0: Instant::now(), now: Duration::ZERO, _dir: dir }
    }

    /// One turn of the loop, 50 ms after the last.
    pub fn turn(&mut self) {
        self.now += Duration::from_millis(50);
        self.agent.turn(self.t0 + self.now, SystemTime::now());
    }

    /// Turns for `d` of the injected clock.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.turn();
        }
    }

    pub fn status(&self) -> Status {
        self.agent.status.lock().unwrap().clone()
    }

    pub fn ready(&self) -> bool {
        self.status().readiness().is_ok()
    }

    /// The peer subnets with a route (any owner), sorted.
    pub fn routes(&self) -> Vec<String> {
        self.kernel.borrow().routes_of(weft_agent::model::PEER_ROUTES.protocol)
    }

    /// Whether the kernel holds the whole vxlan state for peer `i`.
    pub fn reaches(&self, i: u8) -> bool {
        let k = self.kernel.borrow();
        let gw: IpAddr = format!("198.19.{i}.0").parse().unwrap();
        let ip: IpAddr = format!("198.18.0.{i}").parse().unwrap();
        k.routes.iter().any(|(_, r)| r.dst.to_string() == format!("198.19.{i}.0/24"))
            && k.neighbours.iter().any(|n| n.ip == gw)
            && k.fdb.iter().any(|e| e.dst == ip)
    }

    pub fn put(&self, lease: Lease) {
        self.store.borrow_mut().leases.insert(lease.subnet, lease);
    }

    pub fn remove(&self, subnet: Ipv4Net) {
        self.store.borrow_mut().leases.remove(&subnet);
    }
}

/// The lines logged while `f` runs (messages only).
pub fn logged(f: impl FnOnce()) -> Vec<String> {
    use tracing_core::field::{Field, Visit};
    use tracing_core::span::{Attributes, Id, Record};
    use tracing_core::{Event, Metadata, Subscriber};

    struct Capture(Arc<Mutex<Vec<String>>>);
    struct Message(String);
    impl Visit for Message {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.0 = format!("{value:?}");
            }
        }
    }
    impl Subscriber for Capture {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let mut m = Message(String::new());
            event.record(&mut m);
            self.0.lock().unwrap().push(format!("{} {}", event.metadata().level(), m.0));
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
    let lines = Arc::new(Mutex::new(Vec::new()));
    tracing::subscriber::with_default(Capture(lines.clone()), f);
    let out = lines.lock().unwrap().clone();
    out
}
