//! The agent's decisions, with no I/O: [`Core::decide`] takes one [`Event`] (lease changes,
//! link changes, the renewer's reports, a timer tick, the outcome of actions it asked for) and
//! returns the [`Action`]s to carry out. Time comes in as an argument, so tests run the agent's
//! whole life — start-up, restarts over existing kernel state, store outages, a lost lease, a
//! deleted VTEP, an uplink MTU change — in milliseconds, without root.
//!
//! The rules it keeps:
//! - nothing about peers is programmed or removed before the watch has listed every lease once
//!   (a restart must not drop peers it has not heard of yet); the device and the rules are made
//!   at once;
//! - the first complete programming (device, rules, every peer) comes before the subnet file,
//!   and the node is ready only then;
//! - a change of some leases is applied on its own ([`Action::Change`], without listing the
//!   kernel); anything that may have lost kernel state (a device made again, the lease changing
//!   hands, a failure, the periodic resync) replays everything ([`Action::Reconcile`]);
//! - a failure is retried every [`RETRY`] with everything; it is logged once, and "recovered"
//!   once the node is well again;
//! - peer changes keep flowing while the node's own lease is in trouble.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use weft_lease::{Lease, LeaseEvent};
use weft_netconf::SubnetEnv;

use crate::backend::{self, Backend, Node};
use crate::http::Status;
use crate::model::{Desired, DeviceSpec, Owner, PEER_ROUTES};
use crate::renewer::Report;

/// How often a dataplane that could not be programmed is tried again.
pub const RETRY: Duration = Duration::from_secs(1);

/// What the agent is told.
#[derive(Debug)]
pub enum Event {
    /// The loop's turn: whatever the events before asked for is decided now.
    Tick,
    /// The watch was polled: the changes since the last poll, whether it has listed every lease
    /// once, and how many store entries it could not read.
    Leases { changes: Vec<LeaseEvent>, synced: bool, damaged: usize },
    /// Polling the watch failed.
    StoreFailed(String),
    /// Links were deleted (by name).
    LinksDeleted(Vec<String>),
    /// The uplink's MTU is now this.
    UplinkMtu(u32),
    /// What the renewer did.
    Renewer(Report),
    /// How the last actions went: whether the device was (re)made and what changed, or the error.
    Executed(Result<Done, String>),
}

/// What the executor reports of a batch of actions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Done {
    pub device_created: bool,
    pub added: usize,
    pub removed: usize,
}

/// What the agent asks for. Kernel actions are carried out in order; the first failure stops
/// the rest and comes back as [`Event::Executed`].
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Make the backend's device as specified (if it differs, it is made again).
    EnsureDevice(DeviceSpec),
    /// Remove the devices other backends (or another VNI) left behind: weft's device names
    /// (`weft.<VNI>`, `weft-udp`) but `keep`.
    RemoveStaleDevices { keep: Option<String> },
    /// Keep the masquerade and forward rules.
    Firewall { network: Ipv4Net, masquerade: bool, tunnel_port: Option<u16> },
    /// Make the kernel hold exactly `desired` of `owner`: its routes, and the permanent
    /// neighbours and remote FDB entries of `devices`.
    Reconcile { owner: Owner, desired: Desired, devices: Vec<String> },
    /// Some peers changed: remove what `old` has that `new` does not, put `new`.
    Change { owner: Owner, old: Desired, new: Desired },
    /// Write the subnet file (when it differs).
    WriteSubnetFile(SubnetEnv),
    /// Tell the renewer that the watch shows the node's lease missing or someone else's.
    LeaseLost,
    /// This node's claim (its VTEP MAC) is made by an older lease of another node: make a new
    /// one ([`Core::renew_claim`]) and publish it.
    RenewClaim,
}

impl Action {
    /// Carried out by the kernel executor (the rest by the loop).
    pub fn is_kernel(&self) -> bool {
        !matches!(self, Action::LeaseLost | Action::RenewClaim)
    }
}

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct Settings {
    pub network: Ipv4Net,
    pub subnet_len: u8,
    pub ip_masq: bool,
    pub resync: Duration,
    /// Routed mode: where pods' address reservations are kept (the subnet file says so).
    pub ipam_dir: std::path::PathBuf,
}

/// Routed mode: what the block keeper says of this node's blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockState {
    /// The network has no free block left for this node.
    pub exhausted: bool,
    /// Blocks about to be given back: no new pod gets an address in them.
    pub retiring: BTreeSet<Ipv4Net>,
}

/// The interface peers are reached through.
#[derive(Debug, Clone)]
pub struct Uplink {
    pub name: String,
    pub ip: Ipv4Addr,
    pub nets: Vec<Ipv4Net>,
    pub mtu: u32,
}

/// What the actions in flight are for.
#[derive(Debug)]
enum Batch {
    /// The device and the rules, before the first listing.
    Prepare,
    /// Everything; `peers` are what it programs; `resync` when it was the periodic one.
    Full { peers: Vec<Arc<Lease>>, resync: bool },
    /// Some peers: their new lease (`None`: removed) and whether it is programmed.
    Change { peers: Vec<(Ipv4Net, Option<Arc<Lease>>, bool)> },
}

/// The agent's state (see the module's documentation).
pub struct Core {
    settings: Settings,
    backend: Box<dyn Backend>,
    uplink: Uplink,
    lease: Lease,
    /// Every lease as the watch reported them.
    leases: HashMap<Ipv4Net, Arc<Lease>>,
    synced: bool,
    /// The peers programmed, as last applied (sharing the leases).
    programmed: HashMap<Ipv4Net, Arc<Lease>>,
    /// Which subnets' leases make each claim no two nodes may share (see [`Backend::claim`]).
    claimants: HashMap<String, BTreeSet<Ipv4Net>>,
    /// Subnets whose lease changed since they were last applied.
    dirty: BTreeSet<Ipv4Net>,
    /// Everything is applied again at the next tick.
    replay: bool,
    prepared: bool,
    next_resync: Option<Instant>,
    retry_at: Option<Instant>,
    in_flight: Option<Batch>,
    /// The watch last showed the node's lease missing (the renewer was told).
    missing: bool,
    /// The device was reported deleted (its recreation is no surprise).
    device_lost: bool,
    /// A new claim was asked for and is not in the store yet.
    renewing_claim: bool,
    warned: HashSet<String>,
    /// What is failing, by source (the watch, the lease, the dataplane): each logged when it
    /// starts or changes, not on every retry, and without resetting the others.
    failing: std::collections::BTreeMap<&'static str, String>,
    was_failing: bool,
    store_polls_ok: bool,
    renewer_ok: bool,
    status: Status,
    /// Routed mode: the block keeper's last word, and whether the subnet file must say
    /// something new about the blocks.
    blocks: BlockState,
    blocks_dirty: bool,
}

impl Core {
    /// The agent of a node that holds `lease`.
    pub fn new(settings: Settings, backend: Box<dyn Backend>, uplink: Uplink, lease: Lease) -> Core {
        let status = Status { lease: Some(lease.subnet.to_string()), ..Status::default() };
        Core {
            settings,
            backend,
            uplink,
            lease,
            leases: HashMap::new(),
            synced: false,
            programmed: HashMap::new(),
            claimants: HashMap::new(),
            dirty: BTreeSet::new(),
            replay: true,
            prepared: false,
            next_resync: None,
            retry_at: None,
            in_flight: None,
            missing: false,
            device_lost: false,
            renewing_claim: false,
            warned: HashSet::new(),
            failing: Default::default(),
            was_failing: false,
            store_polls_ok: true,
            renewer_ok: true,
            status,
            blocks: BlockState::default(),
            blocks_dirty: false,
        }
    }

    /// What the health endpoint reports.
    pub fn status(&self) -> &Status {
        &self.status
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The peers programmed now, by subnet.
    pub fn programmed(&self) -> impl Iterator<Item = &Ipv4Net> {
        self.programmed.keys()
    }

    /// The peers' leases programmed now.
    pub fn programmed_leases(&self) -> impl Iterator<Item = &Arc<Lease>> {
        self.programmed.values()
    }

    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// Routed mode: every block this node holds, its lease's first, then the others the watch
    /// shows with this node's address, in order.
    pub fn own_blocks(&self) -> Vec<Ipv4Net> {
        let mut blocks = vec![self.lease.subnet];
        if self.backend.holds_several_subnets() {
            let mut more: Vec<Ipv4Net> = self
                .leases
                .values()
                .filter(|l| self.is_own_block(l) && l.subnet != self.lease.subnet)
                .map(|l| l.subnet)
                .collect();
            more.sort();
            blocks.extend(more);
        }
        blocks
    }

    fn is_own_block(&self, lease: &Lease) -> bool {
        lease.attrs.public_ip == self.uplink.ip
            && lease.attrs.backend_type == self.backend.name()
            && self.backend.valid_lease(lease)
            && lease.subnet.prefix_len() == self.settings.subnet_len
            && self.settings.network.contains(&lease.subnet)
    }

    /// Routed mode: the block keeper's news (the subnet file is written again if it changes).
    pub fn set_blocks(&mut self, state: BlockState) {
        if state != self.blocks {
            self.blocks = state;
            self.blocks_dirty = true;
        }
    }

    /// The name of the backend's device, if it has one.
    pub fn device_name(&self) -> Option<String> {
        self.backend.device(&self.node()).map(|d| d.name().to_string())
    }

    pub fn uplink(&self) -> &Uplink {
        &self.uplink
    }

    fn node(&self) -> Node<'_> {
        Node {
            network: self.settings.network,
            subnet_len: self.settings.subnet_len,
            subnet: self.lease.subnet,
            ip: self.uplink.ip,
            uplink: &self.uplink.name,
            uplink_nets: &self.uplink.nets,
            uplink_mtu: self.uplink.mtu,
        }
    }

    /// The MTU pods get.
    pub fn pod_mtu(&self) -> u32 {
        self.uplink.mtu.saturating_sub(self.backend.overhead())
    }

    fn subnet_env(&self) -> SubnetEnv {
        let first = Ipv4Addr::from(u32::from(self.lease.subnet.network()) + 1);
        SubnetEnv {
            network: IpNet::V4(self.settings.network),
            subnet: IpNet::new(IpAddr::V4(first), self.lease.subnet.prefix_len()).expect("a subnet's prefix"),
            mtu: self.pod_mtu(),
            ipmasq: self.settings.ip_masq,
            ipv6_network: None,
            ipv6_subnet: None,
            routed: self.backend.routed().map(|_| weft_netconf::Routed {
                blocks: self.own_blocks().into_iter().filter(|b| !self.blocks.retiring.contains(b)).collect(),
                ipam_dir: self.settings.ipam_dir.clone(),
                exhausted: self.blocks.exhausted,
            }),
        }
    }

    /// One event in, the actions it calls for out.
    pub fn decide(&mut self, now: Instant, event: Event) -> Vec<Action> {
        match event {
            Event::Tick => return self.tick(now),
            Event::Leases { changes, synced, damaged } => {
                self.store_polls_ok = true;
                self.failing.remove(WATCH);
                self.status.damaged_leases = damaged;
                for change in changes {
                    self.take_change(change);
                }
                if synced && !self.synced {
                    tracing::debug!("the watch listed {} leases", self.leases.len());
                }
                self.synced |= synced;
                self.status.leases = self.leases.len();
            }
            Event::StoreFailed(e) => {
                self.store_polls_ok = false;
                self.status.store_errors += 1;
                self.fail(WATCH, format!("watching the store: {e}"));
            }
            Event::LinksDeleted(names) => {
                if let Some(device) = self.device_name().filter(|d| names.contains(d)) {
                    tracing::warn!("{device} is gone; recreating it and replaying every peer");
                    self.status.vtep_recreated += 1;
                    self.device_lost = true;
                    self.replay = true;
                }
                if names.contains(&self.uplink.name) {
                    tracing::warn!("the uplink {} is gone; waiting for it to come back", self.uplink.name);
                    self.replay = true;
                }
            }
            Event::UplinkMtu(mtu) if mtu != self.uplink.mtu => {
                let pods = mtu.saturating_sub(self.backend.overhead());
                tracing::info!("the uplink's MTU is now {mtu} (was {}); pods get {pods} from now on", self.uplink.mtu);
                self.uplink.mtu = mtu;
                self.replay = true;
            }
            Event::UplinkMtu(_) => {}
            Event::Renewer(report) => self.take_report(report),
            Event::Executed(outcome) => self.take_outcome(now, outcome),
        }
        Vec::new()
    }

    fn take_change(&mut self, change: LeaseEvent) {
        let (subnet, new) = match change {
            LeaseEvent::Added(l) => (l.subnet, Some(Arc::new(l))),
            LeaseEvent::Removed(l) => (l.subnet, None),
        };
        let old = match &new {
            Some(l) => self.leases.insert(subnet, l.clone()),
            None => self.leases.remove(&subnet),
        };
        // Routed mode: one of this node's blocks came or went.
        if self.backend.holds_several_subnets()
            && [&old, &new].into_iter().flatten().any(|l| l.attrs.public_ip == self.uplink.ip)
        {
            self.blocks_dirty = true;
        }
        // What the old and the new lease claim that no two nodes may share (one VTEP MAC):
        // when another node's lease claims it too, which of them counts depends on both, so
        // everything is computed again. (Not looked at when everything is applied again anyway.)
        let old_claim = old.as_ref().and_then(|l| self.backend.claim(l));
        let new_claim = new.as_ref().and_then(|l| self.backend.claim(l));
        if old_claim != new_claim {
            if let Some(c) = &old_claim {
                if let Some(set) = self.claimants.get_mut(c) {
                    set.remove(&subnet);
                    if set.is_empty() {
                        self.claimants.remove(c);
                    }
                }
            }
            if let Some(c) = &new_claim {
                self.claimants.entry(c.clone()).or_default().insert(subnet);
            }
        }
        if !self.replay && self.status.started {
            let ip = |l: &Option<Arc<Lease>>| l.as_ref().map(|l| l.attrs.public_ip);
            let shared = |claim: &Option<String>, me: Option<Ipv4Addr>| {
                claim.as_ref().and_then(|c| self.claimants.get(c)).is_some_and(|set| {
                    set.iter().any(|s| *s != subnet && self.leases.get(s).map(|l| l.attrs.public_ip) != me)
                })
            };
            if shared(&old_claim, ip(&old)) || shared(&new_claim, ip(&new)) {
                self.replay = true;
            }
        }
        self.dirty.insert(subnet);
    }

    fn take_report(&mut self, report: Report) {
        match report {
            Report::Held { lease, reacquired } => {
                self.renewer_ok = true;
                self.failing.remove(LEASE);
                if reacquired {
                    self.status.lease_reacquired += 1;
                    if lease.subnet == self.lease.subnet {
                        tracing::warn!("lease {} was lost; acquired it again", lease.subnet);
                    } else {
                        tracing::warn!("lease {} was lost; now leasing {}", self.lease.subnet, lease.subnet);
                    }
                    self.status.lease = Some(lease.subnet.to_string());
                    self.replay = true;
                }
                self.lease = lease;
            }
            Report::Failed(e) => {
                self.renewer_ok = false;
                self.status.store_errors += 1;
                self.fail(LEASE, format!("keeping the lease: {e}"));
            }
        }
    }

    fn tick(&mut self, now: Instant) -> Vec<Action> {
        self.status.store_up = self.store_polls_ok && self.renewer_ok;
        let mut actions = Vec::new();
        if !self.synced {
            // What the watch knows is partial: the device and the rules, nothing about peers.
            if !self.prepared {
                self.prepared = true;
                actions.extend(self.prepare());
                self.in_flight = Some(Batch::Prepare);
            }
            return actions;
        }
        // The node's own lease as the watch shows it: present only with this node's data (a
        // restored backup or another writer may have put a stale VTEP MAC over it). The renewer
        // is told once when it goes missing.
        let present = self.leases.get(&self.lease.subnet).is_some_and(|l| l.attrs == self.lease.attrs);
        // (While a new claim is being published the watch shows the old one: no loss.)
        if !present && !self.missing && !self.renewing_claim {
            actions.push(Action::LeaseLost);
        }
        self.missing = !present;
        if present {
            self.renewing_claim = false;
        }
        if self.status.started && !self.renewing_claim {
            if let Some(older) = self.claimed_by_another() {
                tracing::warn!(
                    "this node's {} claim is made by the older lease {} of {} (peers ignore this node while it \
                     stays so); making a new one",
                    self.backend.name(),
                    older.subnet,
                    older.attrs.public_ip
                );
                self.renewing_claim = true;
                actions.push(Action::RenewClaim);
            }
        }

        // After a failure, everything is tried again once the retry is due (changes meanwhile
        // are part of it).
        if self.retry_at.is_some_and(|t| now < t) {
            return actions;
        }
        // Lease changes before a due resync, so the resync reports only what the kernel itself
        // lost, not the peers that came and went.
        let resync = self.next_resync.is_some_and(|t| now >= t);
        if self.replay || !self.status.dataplane_up || !self.status.started {
            actions.extend(self.full(false));
        } else if !self.dirty.is_empty() || self.blocks_dirty {
            actions.extend(self.change());
        } else if resync {
            actions.extend(self.full(true));
        } else {
            self.well_again();
        }
        actions
    }

    /// An older lease of another node that makes this node's claim, if there is one.
    fn claimed_by_another(&self) -> Option<Arc<Lease>> {
        let own = self.leases.get(&self.lease.subnet)?;
        let claim = self.backend.claim(own)?;
        let subnets = self.claimants.get(&claim)?;
        subnets
            .iter()
            .filter(|s| **s != own.subnet)
            .filter_map(|s| self.leases.get(s))
            .find(|o| o.attrs.public_ip != self.uplink.ip && o.outranks(own))
            .cloned()
    }

    /// Carries out [`Action::RenewClaim`]: the backend makes a new claim (it may keep it in
    /// `setup`'s state directory); the attributes to publish are returned, and everything is
    /// applied again (the device changes).
    pub fn renew_claim(&mut self, setup: &backend::Setup<'_>) -> crate::Result<Option<weft_lease::LeaseAttrs>> {
        if !self.backend.renew_claim(setup)? {
            return Ok(None);
        }
        self.lease.attrs.backend_data = self.backend.lease_data();
        self.replay = true;
        // The device is made again with the new claim: expected, not a surprise to warn about.
        self.device_lost = true;
        Ok(Some(self.lease.attrs.clone()))
    }

    fn prepare(&mut self) -> Vec<Action> {
        let device = self.backend.device(&self.node());
        // A userspace forwarder's counters are part of the agent's metrics.
        self.status.forwarder = match &device {
            Some(DeviceSpec::Tun { socket, .. }) => Some(socket.clone()),
            _ => None,
        };
        let keep = device.as_ref().map(|d| d.name().to_string());
        let tunnel_port = device.as_ref().map(|d| match d {
            DeviceSpec::Tun { port, .. } => Some(*port),
            DeviceSpec::Vxlan { .. } => None,
        });
        let mut actions = vec![Action::RemoveStaleDevices { keep }];
        actions.extend(device.into_iter().map(Action::EnsureDevice));
        actions.push(Action::Firewall {
            network: self.settings.network,
            masquerade: self.settings.ip_masq,
            tunnel_port: tunnel_port.flatten(),
        });
        actions
    }

    /// Everything: the device, the rules, every peer, the subnet file.
    fn full(&mut self, resync: bool) -> Vec<Action> {
        self.prepared = true;
        self.replay = false;
        self.dirty.clear();
        self.blocks_dirty = false;
        let mut leases: Vec<&Arc<Lease>> = self.leases.values().collect();
        leases.sort_by_key(|l| l.subnet);
        let refs: Vec<&Lease> = leases.iter().map(|l| l.as_ref()).collect();
        let node = self.node();
        let out = backend::desired(self.backend.as_ref(), &node, &refs);
        let devices: Vec<String> = self.backend.device(&node).map(|d| d.name().to_string()).into_iter().collect();
        // Each ignored peer is reported once, not on every resync; again if it comes back.
        for w in out.warnings.iter().filter(|w| !self.warned.contains(*w)) {
            tracing::warn!("{w}");
        }
        self.warned = out.warnings.into_iter().collect();
        let programmed: HashSet<Ipv4Net> = out.programmed.into_iter().collect();
        let peers = leases.into_iter().filter(|l| programmed.contains(&l.subnet)).cloned().collect();
        let mut actions = self.prepare();
        actions.push(Action::Reconcile { owner: PEER_ROUTES, desired: out.state, devices });
        actions.push(Action::WriteSubnetFile(self.subnet_env()));
        self.in_flight = Some(Batch::Full { peers, resync });
        actions
    }

    /// Just the peers whose leases changed, from what was programmed for them to what they are.
    fn change(&mut self) -> Vec<Action> {
        let subnets = std::mem::take(&mut self.dirty);
        let node = self.node();
        let old: Vec<&Lease> = subnets.iter().filter_map(|s| self.programmed.get(s)).map(|l| l.as_ref()).collect();
        let new: Vec<&Lease> = subnets.iter().filter_map(|s| self.leases.get(s)).map(|l| l.as_ref()).collect();
        let before = backend::desired(self.backend.as_ref(), &node, &old);
        let after = backend::desired(self.backend.as_ref(), &node, &new);
        for w in after.warnings {
            if self.warned.insert(w.clone()) {
                tracing::warn!("{w}");
            }
        }
        let programmed: HashSet<Ipv4Net> = after.programmed.into_iter().collect();
        let peers = subnets.iter().map(|s| (*s, self.leases.get(s).cloned(), programmed.contains(s))).collect();
        self.in_flight = Some(Batch::Change { peers });
        let mut actions = vec![Action::Change { owner: PEER_ROUTES, old: before.state, new: after.state }];
        if std::mem::take(&mut self.blocks_dirty) {
            actions.push(Action::WriteSubnetFile(self.subnet_env()));
        }
        actions
    }

    fn take_outcome(&mut self, now: Instant, outcome: Result<Done, String>) {
        let Some(batch) = self.in_flight.take() else { return };
        let done = match outcome {
            Ok(done) => done,
            Err(e) => {
                self.status.dataplane_up = false;
                self.status.reconcile_errors += 1;
                if !matches!(batch, Batch::Prepare) {
                    self.status.reconciles += 1;
                }
                self.retry_at = Some(now + RETRY);
                self.replay = true;
                self.fail(DATAPLANE, e);
                return;
            }
        };
        match batch {
            Batch::Prepare => {
                if done.device_created {
                    tracing::info!("made the {} device", self.backend.name());
                }
                return;
            }
            Batch::Full { peers, resync } => {
                if done.device_created && self.status.started && !self.device_lost {
                    tracing::warn!(
                        "the {} device was missing or had other settings; made it again",
                        self.backend.name()
                    );
                }
                let before: HashSet<Ipv4Net> = self.programmed.keys().copied().collect();
                self.programmed = peers.into_iter().map(|l| (l.subnet, l)).collect();
                let added = self.programmed.keys().filter(|s| !before.contains(s)).count();
                let removed = before.iter().filter(|s| !self.programmed.contains_key(s)).count();
                if resync && (done.added > 0 || done.removed > 0) {
                    tracing::warn!(
                        "resync: the kernel differed from the desired state ({} objects put, {} removed)",
                        done.added,
                        done.removed
                    );
                } else if added + removed > 0 {
                    tracing::info!("{} peers programmed ({added} added, {removed} removed)", self.programmed.len());
                }
                self.device_lost = false;
                self.next_resync = Some(now + self.settings.resync);
                if !self.status.started {
                    self.status.started = true;
                    tracing::info!("ready: {} peers, pod MTU {}", self.programmed.len(), self.pod_mtu());
                }
            }
            Batch::Change { peers } => {
                for (subnet, lease, programmed) in peers {
                    let was = self.programmed.remove(&subnet);
                    match (lease.filter(|_| programmed), was) {
                        (Some(l), None) => {
                            tracing::info!("peer {subnet} added (via {})", l.attrs.public_ip);
                            self.programmed.insert(subnet, l);
                        }
                        (Some(l), Some(_)) => {
                            tracing::info!("peer {subnet} changed (via {})", l.attrs.public_ip);
                            self.programmed.insert(subnet, l);
                        }
                        (None, Some(old)) => tracing::info!("peer {subnet} removed (was via {})", old.attrs.public_ip),
                        (None, None) => {}
                    }
                }
            }
        }
        self.status.reconciles += 1;
        self.status.peers = self.programmed.len();
        self.status.dataplane_up = true;
        self.retry_at = None;
        self.failing.remove(DATAPLANE);
        self.well_again();
    }

    /// A failure of `source`, logged when it is new for that source (not once per retry).
    fn fail(&mut self, source: &'static str, line: String) {
        if self.failing.get(source) != Some(&line) {
            tracing::warn!("{line} (retrying)");
            self.failing.insert(source, line);
            self.was_failing = true;
        }
    }

    /// "recovered" once the dataplane and the store are all well again (a turn between two
    /// retries with nothing to do is no recovery).
    fn well_again(&mut self) {
        self.status.store_up = self.store_polls_ok && self.renewer_ok;
        if self.was_failing && self.failing.is_empty() && self.status.readiness().is_ok() {
            self.was_failing = false;
            tracing::info!("recovered");
        }
    }
}

/// The sources of failures.
const WATCH: &str = "watch";
const LEASE: &str = "lease";
const DATAPLANE: &str = "dataplane";
