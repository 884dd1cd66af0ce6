//! Routed mode's moving parts beside the core (the `bgp` backend):
//! - the BGP speaker, embedded on a thread of its own: its neighbours come from the peers'
//!   leases (mesh, route reflectors, external peers: [`bgp::neighbours`]) and it announces
//!   this node's blocks; learned blocks go into the kernel as weft's BGP routes (protocol 202)
//!   via the peer node's address;
//! - a blackhole route per own block (protocol 203): a packet for a free address of an own
//!   block is dropped here instead of following a default route away; and every 10 s, the host
//!   route of each routed pod put back if someone deleted it (a pod is a permanent neighbour on
//!   a veth with the routed plugin's MAC);
//! - the block keeper, a thread with its own store handle: it counts the reservations in the
//!   pods' IPAM directory, claims a block while fewer than half a block of addresses are free
//!   (so a pod's ADD finds an address without waiting for the store), and gives back a block
//!   (never the lease's own) once it has been empty for `BlockReleaseSeconds`: first it leaves
//!   the subnet file (no new pod is put there), and a few seconds later, still empty, it goes.
//!
//! The agent stopped (SIGTERM, a kill, a crash) leaves the kernel as it is: its sessions close
//! without a NOTIFICATION, so its peers keep this node's routes for the graceful-restart time
//! (RFC 4724) while it comes back; restarted, the speaker takes its routes in the kernel as its
//! own and advertises again within seconds (it waits for no restarting peer's End-of-RIB, and
//! for the others at most 5 s). A node leaves the cluster when its leases go: its peers then
//! drop it as a neighbour and its blocks at once.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ipnet::{IpNet, Ipv4Net};
use weft_bgp::daemon::{DaemonConfig, Handle, NeighborSpec};
use weft_bgp::rib::Policy;
use weft_dataplane::route::{RTPROT_WEFT_BLACKHOLE, RTPROT_WEFT_POD};
use weft_dataplane::{Netlink, RouteSpec};
use weft_lease::{Lease, LeaseAttrs, LeaseStore};
use weft_netconf::NetworkConfig;

use crate::backend::bgp::{self, BgpOptions};
use crate::bgp_sink::KernelSink;
use crate::core::{BlockState, Core};
use crate::{kernel, AgentError, Result};

/// How long a block leaves the subnet file before it is given back (an ADD that read the file
/// just before is done by then).
const RETIRE_GRACE: Duration = Duration::from_secs(5);
/// How often the kernel's blackholes are compared with the blocks.
const CHECK_EVERY: Duration = Duration::from_secs(10);
/// How often the block keeper reads the store, and the pods' reservations.
const LOOK_EVERY: Duration = Duration::from_secs(1);
const POLL_PODS_EVERY: Duration = Duration::from_millis(100);
/// How often the speaker's status is read for the health endpoint.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// The graceful-restart time offered to peers.
const RESTART_TIME: u16 = 120;
/// After a restart, how long the speaker waits at most for its neighbours' End-of-RIB before it
/// advertises.
const SELECTION_DEFERRAL: Duration = Duration::from_secs(5);

/// The speaker's control socket, beside the subnet file (`/run/weft/bgp.sock` by default, where
/// `weft bgp status` asks).
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("bgp.sock")
}

/// What routed mode runs beside the core.
pub struct Routing {
    speaker: Handle,
    options: BgpOptions,
    /// This node's address.
    ip: Ipv4Addr,
    configured: Option<(Vec<NeighborSpec>, Vec<IpNet>)>,
    nl: Netlink,
    blackholes: Option<BTreeSet<Ipv4Net>>,
    next_check: Instant,
    next_status: Instant,
    /// A status asked for and not answered yet (the loop never waits for the speaker).
    asked: Option<weft_bgp::daemon::StatusAnswer>,
    keeper: Arc<Mutex<BlockState>>,
    /// The speaker's last status (JSON), for the health endpoint.
    pub last_status: Option<serde_json::Value>,
}

/// What starting routed mode needs.
pub struct Start<'a> {
    pub options: &'a BgpOptions,
    pub network: &'a NetworkConfig,
    pub ip: Ipv4Addr,
    /// The subnet file (the control socket goes beside it).
    pub subnet_file: &'a Path,
    pub ipam_dir: &'a Path,
    pub attrs: &'a LeaseAttrs,
    /// A store handle of the block keeper's own.
    pub store: Box<dyn LeaseStore>,
}

impl Routing {
    pub fn start(start: Start<'_>) -> Result<Routing> {
        bgp::check_peers(start.options, start.network.network)?;
        let sink = KernelSink::new().map_err(kernel("opening netlink for BGP routes"))?;
        let net = IpNet::V4(start.network.network);
        let config = DaemonConfig {
            local_as: start.options.asn,
            router_id: start.ip,
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 179),
            next_hop: IpAddr::V4(start.ip),
            next_hop_v6: None,
            neighbors: Vec::new(),
            ranges: Vec::new(),
            announce: Vec::new(),
            // Only pod blocks are taken and passed on: nothing outside the pod network, nothing
            // longer than a block (an external router's /32 inside another node's block would
            // take that pod's traffic away).
            policy: Policy {
                accept: vec![(net, start.network.subnet_len)],
                max_prefix: None,
                export: vec![(net, start.network.subnet_len)],
            },
            hold_time: 90,
            connect_retry: Duration::from_secs(2),
            restart_time: RESTART_TIME,
            // A node restarted advertises its blocks (a new one among them) within seconds,
            // even while a neighbour that is down keeps it from hearing every End-of-RIB.
            selection_deferral: Some(SELECTION_DEFERRAL),
            socket: socket_path(start.subnet_file.parent().unwrap_or(Path::new("/"))),
        };
        let speaker = weft_bgp::daemon::spawn(config, Box::new(sink))
            .map_err(|e| AgentError::Config(format!("starting the BGP speaker: {e}")))?;
        let keeper = Arc::new(Mutex::new(BlockState::default()));
        // (Blocks claimed beyond the node's lease say so: the store marks them.)
        let k = Keeper {
            store: start.store,
            network: start.network.clone(),
            attrs: start.attrs.clone(),
            ipam_dir: start.ipam_dir.to_path_buf(),
            release_after: start.options.release_after,
            state: keeper.clone(),
            empty_since: HashMap::new(),
            retiring_since: HashMap::new(),
            said: None,
            said_lost: BTreeSet::new(),
            subnet_file: start.subnet_file.to_path_buf(),
            unlisted_since: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("blocks".into())
            .spawn(move || k.run())
            .map_err(|e| AgentError::Config(format!("starting the block keeper: {e}")))?;
        let now = Instant::now();
        Ok(Routing {
            ip: start.ip,
            speaker,
            options: start.options.clone(),
            configured: None,
            nl: Netlink::new().map_err(kernel("opening netlink"))?,
            blackholes: None,
            next_check: now,
            next_status: now,
            asked: None,
            keeper,
            last_status: None,
        })
    }

    /// One turn: the keeper's news to the core; the speaker's neighbours and prefixes, and the
    /// blackholes, made what the core's leases say.
    pub fn turn(&mut self, core: &mut Core, now: Instant) {
        let state = self.keeper.lock().unwrap_or_else(|e| e.into_inner()).clone();
        core.set_blocks(state);
        if !core.status().started {
            return;
        }
        // Nodes from their leases (with a TTL); blocks outlive a node that is gone for good, and
        // must not keep it a neighbour.
        let mut nodes: Vec<bgp::PeerNode> =
            core.programmed_leases().filter(|l| !l.is_block()).filter_map(|l| bgp::peer_of(l)).collect();
        nodes.sort();
        nodes.dedup_by(|a, b| a.address == b.address);
        let neighbors: Vec<NeighborSpec> = bgp::neighbours(&self.options, IpAddr::V4(self.ip), &nodes)
            .into_iter()
            .map(|n| NeighborSpec {
                address: n.address,
                asn: n.asn,
                passive: false,
                rr_client: n.rr_client,
                originated_only: n.external,
            })
            .collect();
        let blocks = core.own_blocks();
        let announce: Vec<IpNet> = blocks.iter().map(|b| IpNet::V4(*b)).collect();
        let wanted = (neighbors, announce);
        if self.configured.as_ref() != Some(&wanted) {
            self.speaker.configure(wanted.0.clone(), wanted.1.clone());
            self.configured = Some(wanted);
        }
        let blocks: BTreeSet<Ipv4Net> = blocks.into_iter().collect();
        if now >= self.next_check {
            match restore_pod_routes(&mut self.nl) {
                Ok(0) => {}
                Ok(n) => tracing::warn!("pod routes: {n} missing (deleted by hand?) put back"),
                Err(e) => tracing::warn!("checking pod routes: {e}"),
            }
        }
        if self.blackholes.as_ref() != Some(&blocks) || now >= self.next_check {
            match reconcile_blackholes(&mut self.nl, &blocks) {
                Ok(changed) => {
                    if changed > 0 && self.blackholes.as_ref() == Some(&blocks) {
                        tracing::warn!("blackholes: the kernel differed from this node's blocks ({changed} put right)");
                    }
                    self.blackholes = Some(blocks);
                }
                Err(e) => tracing::warn!("blackholes for this node's blocks: {e}"),
            }
            self.next_check = now + CHECK_EVERY;
        }
        // The speaker's status, asked once a second and taken when it is there: the loop does
        // not wait behind a burst of route installs.
        match self.asked.take().map(weft_bgp::daemon::StatusAnswer::take) {
            Some(Ok(text)) => self.last_status = text.and_then(|s| serde_json::from_str(&s).ok()),
            Some(Err(waiting)) => self.asked = Some(waiting),
            None => {}
        }
        if now >= self.next_status && self.asked.is_none() {
            self.asked = self.speaker.ask_status();
            self.next_status = now + STATUS_EVERY;
        }
    }
}

/// Makes the blackholes of weft (protocol 203) exactly `blocks`; how many were added or removed.
fn reconcile_blackholes(nl: &mut Netlink, blocks: &BTreeSet<Ipv4Net>) -> weft_dataplane::Result<usize> {
    let spec = |b: Ipv4Net| RouteSpec::new(IpNet::V4(b)).blackhole().protocol(RTPROT_WEFT_BLACKHOLE);
    let held: BTreeSet<IpNet> =
        nl.blackholes()?.into_iter().filter(|r| r.protocol == RTPROT_WEFT_BLACKHOLE).map(|r| r.dst).collect();
    let mut changed = 0;
    for stray in held.iter().filter(|d| !matches!(d, IpNet::V4(b) if blocks.contains(b))) {
        weft_dataplane::error::ignore_not_found(
            nl.delete_route(&RouteSpec::new(*stray).blackhole().protocol(RTPROT_WEFT_BLACKHOLE)),
        )?;
        changed += 1;
    }
    for block in blocks.iter().filter(|b| !held.contains(&IpNet::V4(**b))) {
        nl.replace_route(&spec(*block))?;
        changed += 1;
    }
    Ok(changed)
}

/// The host end of every routed pod's veth has this MAC (the `routed` plugin's).
const POD_VETH_MAC: [u8; 6] = [0xee; 6];

/// Puts back the host route of every routed pod that lost it (the plugin made it; someone
/// deleted it): a pod is a permanent neighbour on a veth with [`POD_VETH_MAC`], and its route is
/// a host prefix through that veth (protocol 201). Nothing is removed. How many were put back.
fn restore_pod_routes(nl: &mut Netlink) -> weft_dataplane::Result<usize> {
    let routes = nl.routes()?;
    let mut restored = 0;
    // (A veth going away meanwhile — a pod's DEL — fails its own steps only.)
    for link in nl.links()?.into_iter().filter(|l| l.mac.as_slice() == POD_VETH_MAC) {
        let Ok(neighbours) = nl.neighbours(Some(link.index)) else { continue };
        for n in neighbours.into_iter().filter(|n| n.permanent) {
            let dst = IpNet::from(n.ip);
            if routes.iter().any(|r| r.dst == dst) {
                continue;
            }
            let route = RouteSpec::new(dst).dev(link.index).link_scope().protocol(RTPROT_WEFT_POD);
            if nl.add_route(&route).is_ok() {
                restored += 1;
            }
        }
    }
    Ok(restored)
}

/// The pods' reservations per address: every file named by an IPv4 address in the IPAM
/// directory's network directories (host-local's layout).
pub fn reservations(ipam_dir: &Path) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let Ok(networks) = std::fs::read_dir(ipam_dir) else { return out };
    for network in networks.flatten() {
        let Ok(files) = std::fs::read_dir(network.path()) else { continue };
        out.extend(files.flatten().filter_map(|f| f.file_name().to_str()?.parse::<Ipv4Addr>().ok()));
    }
    out
}

/// Addresses pods can get in a block (its first is the IPAM's gateway, never given out).
pub fn capacity(block: &Ipv4Net) -> usize {
    (1usize << (32 - block.prefix_len())).saturating_sub(1)
}

/// What the keeper decides for one look at the blocks.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub claim: bool,
    /// Blocks to take out of the subnet file (empty long enough).
    pub retire: Vec<Ipv4Net>,
    /// Blocks to give back (out of the file long enough, still empty).
    pub release: Vec<Ipv4Net>,
    /// Retiring blocks that got a pod after all: back into the file.
    pub keep: Vec<Ipv4Net>,
}

/// The keeper's rule, as a pure function of the blocks (`fixed`: those never released, the
/// lease's own), the reservations, and since when blocks are empty or retiring.
pub fn decide(
    blocks: &[Ipv4Net],
    fixed: &BTreeSet<Ipv4Net>,
    used: &HashMap<Ipv4Net, usize>,
    empty_since: &HashMap<Ipv4Net, Instant>,
    retiring_since: &HashMap<Ipv4Net, Instant>,
    release_after: Duration,
    now: Instant,
) -> Decision {
    let mut d = Decision::default();
    let Some(first) = blocks.first() else { return d };
    let low = (capacity(first) / 2).max(1);
    let free_in = |b: &Ipv4Net| capacity(b).saturating_sub(used.get(b).copied().unwrap_or(0));
    let mut free: usize = blocks.iter().filter(|b| !retiring_since.contains_key(b)).map(free_in).sum();
    // Short of addresses: a block on its way out stays rather than another being claimed.
    let short = free < low;
    if short {
        free += blocks.iter().filter(|b| retiring_since.contains_key(b)).map(free_in).sum::<usize>();
    }
    d.claim = free < low;
    for block in blocks {
        let in_use = used.get(block).copied().unwrap_or(0) > 0;
        match retiring_since.get(block) {
            Some(_) if in_use || short => d.keep.push(*block),
            Some(since) if now.duration_since(*since) >= RETIRE_GRACE => d.release.push(*block),
            Some(_) => {}
            None if in_use || short || fixed.contains(block) => {}
            None => {
                let empty_long = empty_since.get(block).is_some_and(|t| now.duration_since(*t) >= release_after);
                if empty_long && free >= low + capacity(block) {
                    d.retire.push(*block);
                    free -= capacity(block);
                }
            }
        }
    }
    d
}

/// The block keeper's thread (see the module's documentation).
struct Keeper {
    store: Box<dyn LeaseStore>,
    network: NetworkConfig,
    attrs: LeaseAttrs,
    ipam_dir: PathBuf,
    release_after: Duration,
    state: Arc<Mutex<BlockState>>,
    empty_since: HashMap<Ipv4Net, Instant>,
    retiring_since: HashMap<Ipv4Net, Instant>,
    said: Option<String>,
    /// Lost blocks another node holds (said once each).
    said_lost: BTreeSet<Ipv4Net>,
    /// The subnet file, and since when retiring blocks are no longer in it.
    subnet_file: PathBuf,
    unlisted_since: HashMap<Ipv4Net, Instant>,
}

impl Keeper {
    fn run(mut self) {
        let mut pods = usize::MAX;
        let mut looked = Instant::now();
        loop {
            // The pods' reservations (a directory listing) are looked at ten times a second and
            // the store read when they change (at least once a second), so a burst of pods gets
            // its next block at once.
            let pod_ips = reservations(&self.ipam_dir);
            let now_pods = pod_ips.len();
            if now_pods == pods && looked.elapsed() < LOOK_EVERY {
                std::thread::sleep(POLL_PODS_EVERY);
                continue;
            }
            pods = now_pods;
            looked = Instant::now();
            if let Err(e) = self.look(pod_ips) {
                let line = e.to_string();
                if self.said.as_ref() != Some(&line) {
                    tracing::warn!("block keeper: {line} (trying again)");
                    self.said = Some(line);
                }
            } else {
                self.said = None;
            }
            std::thread::sleep(POLL_PODS_EVERY);
        }
    }

    fn own(&self, lease: &Lease) -> bool {
        lease.attrs.public_ip == self.attrs.public_ip
            && lease.attrs.backend_type == self.attrs.backend_type
            && self.network.is_leasable(&lease.subnet)
            && bgp::peer_of(lease).is_some()
    }

    /// One look at the blocks, given the pods' reservations just read.
    fn look(&mut self, pod_ips: Vec<Ipv4Addr>) -> Result<()> {
        let now = Instant::now();
        let leases: Vec<Lease> = self.store.list(SystemTime::now())?.into_iter().filter(|l| self.own(l)).collect();
        let mut blocks: Vec<Ipv4Net> = leases.iter().map(|l| l.subnet).collect();
        blocks.sort();
        // The node's lease is never given back; the others are blocks claimed for more pods.
        let fixed: BTreeSet<Ipv4Net> = leases.iter().filter(|l| !l.is_block()).map(|l| l.subnet).collect();
        let mut used: HashMap<Ipv4Net, usize> = HashMap::new();
        let mut lost = BTreeSet::new();
        for ip in pod_ips {
            match blocks.iter().find(|b| b.contains(&ip)) {
                Some(b) => *used.entry(*b).or_default() += 1,
                // A pod in no block of this node's: the store lost the block (restored from an
                // old backup, wiped, an entry deleted by hand).
                None => lost.extend(Ipv4Net::new(ip, self.network.subnet_len).ok().map(|n| n.trunc())),
            }
        }
        for block in lost.into_iter().filter(|b| self.network.is_leasable(b)) {
            if self.store.take_back_block(&self.attrs, block, SystemTime::now())? {
                tracing::warn!("took block {block} back: its pods have addresses there, and the store had lost it");
                continue;
            }
            // Taken meanwhile: by this node (its lease renewed), or by another.
            let holder = self.store.list(SystemTime::now())?.into_iter().find(|l| l.subnet == block);
            if holder.is_some_and(|l| l.attrs.public_ip != self.attrs.public_ip) && self.said_lost.insert(block) {
                tracing::error!(
                    "block {block} holds pods of this node but another node holds it now: their addresses may be taken twice"
                );
            }
        }
        self.empty_since.retain(|b, _| blocks.contains(b) && !used.contains_key(b));
        self.retiring_since.retain(|b, _| blocks.contains(b));
        for b in blocks.iter().filter(|b| !used.contains_key(b)) {
            self.empty_since.entry(*b).or_insert(now);
        }
        if blocks.is_empty() {
            return Ok(()); // the lease is not in the store yet
        }
        let d = decide(&blocks, &fixed, &used, &self.empty_since, &self.retiring_since, self.release_after, now);
        for b in d.keep {
            tracing::info!("block {b} has a pod again; it stays");
            self.retiring_since.remove(&b);
        }
        for b in d.retire {
            tracing::info!(
                "block {b} has been empty for {} s; no new pods there, released soon",
                self.release_after.as_secs()
            );
            self.retiring_since.insert(b, now);
        }
        // A block goes once the subnet file has said so long enough (the core writes it; a
        // failing dataplane may hold the write up) and it is still empty (a pod may have got
        // an address from the file as it was).
        let listed = weft_netconf::SubnetEnv::read(&self.subnet_file)
            .ok()
            .and_then(|e| e.routed)
            .map(|r| r.blocks)
            .unwrap_or_default();
        self.unlisted_since.retain(|b, _| !listed.contains(b) && self.retiring_since.contains_key(b));
        for b in self.retiring_since.keys().filter(|b| !listed.contains(b)) {
            self.unlisted_since.entry(*b).or_insert(now);
        }
        for b in d.release {
            let unlisted_long = self.unlisted_since.get(&b).is_some_and(|t| now.duration_since(*t) >= RETIRE_GRACE);
            if !unlisted_long {
                continue;
            }
            let lease = leases.iter().find(|l| l.subnet == b).cloned();
            let still_empty = !reservations(&self.ipam_dir).iter().any(|ip| b.contains(ip));
            if let (Some(lease), true) = (lease, still_empty) {
                if self.store.release_block(&lease)? {
                    tracing::info!("released block {b}");
                }
            }
            self.retiring_since.remove(&b);
            self.unlisted_since.remove(&b);
        }
        let mut exhausted = false;
        if d.claim {
            match self.store.claim_block(&self.network, &self.attrs, SystemTime::now(), &mut random_index)? {
                Some(lease) => {
                    tracing::info!("claimed block {} (fewer than half a block of addresses free)", lease.subnet)
                }
                None => {
                    exhausted = true;
                    if !self.state.lock().unwrap_or_else(|e| e.into_inner()).exhausted {
                        tracing::warn!("the network {} has no free block left for this node", self.network.network);
                    }
                }
            }
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state = BlockState { exhausted, retiring: self.retiring_since.keys().copied().collect() };
        Ok(())
    }
}

fn random_index(n: usize) -> usize {
    let b: [u8; 8] = {
        let mut buf = [0u8; 8];
        let _ = rustix::rand::getrandom(&mut buf[..], rustix::rand::GetRandomFlags::empty());
        buf
    };
    (u64::from_le_bytes(b) % n.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn a_block_is_claimed_ahead_of_demand() {
        let blocks = [net("198.19.0.0/28")];
        let fixed: BTreeSet<Ipv4Net> = blocks.iter().copied().collect();
        let now = Instant::now();
        let none = HashMap::new();
        let used = |n: usize| HashMap::from([(blocks[0], n)]);
        let d = |u: &HashMap<Ipv4Net, usize>| decide(&blocks, &fixed, u, &none, &none, Duration::from_secs(300), now);
        // 15 addresses a /28; fewer than 7 free: one more block.
        assert!(!d(&used(8)).claim);
        assert!(d(&used(9)).claim);
        assert!(d(&used(15)).claim);
        assert_eq!(capacity(&net("198.19.0.0/26")), 63);
    }

    #[test]
    fn an_empty_block_retires_then_goes_unless_a_pod_came() {
        let (a, b) = (net("198.19.0.0/28"), net("198.19.0.16/28"));
        let blocks = [a, b];
        let fixed = BTreeSet::from([a]);
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(301);
        let empty = HashMap::from([(b, t0), (a, t0)]);
        let used = HashMap::new();
        let none = HashMap::new();
        let after = Duration::from_secs(300);
        // Not empty long enough; then it retires (never the lease's own block).
        assert_eq!(decide(&blocks, &fixed, &used, &empty, &none, after, t0).retire, Vec::<Ipv4Net>::new());
        assert_eq!(decide(&blocks, &fixed, &used, &empty, &none, after, later).retire, [b]);
        // Retiring: released after the grace, kept when a pod got an address there meanwhile.
        let retiring = HashMap::from([(b, later)]);
        assert!(decide(&blocks, &fixed, &used, &empty, &retiring, after, later).release.is_empty());
        let done = later + RETIRE_GRACE;
        assert_eq!(decide(&blocks, &fixed, &used, &empty, &retiring, after, done).release, [b]);
        let busy = HashMap::from([(b, 1)]);
        assert_eq!(decide(&blocks, &fixed, &busy, &empty, &retiring, after, done).keep, [b]);
        // Short of addresses while a block is on its way out: it stays, nothing is claimed.
        let busy_a = HashMap::from([(a, 10)]);
        let d = decide(&blocks, &fixed, &busy_a, &empty, &retiring, after, done);
        assert_eq!((d.keep.as_slice(), d.release.is_empty(), d.claim), (&[b][..], true, false));
        // A block is not given back when the node would then be short of addresses.
        let full_a = HashMap::from([(a, 12)]);
        assert!(decide(&blocks, &fixed, &full_a, &HashMap::from([(b, t0)]), &none, after, later).retire.is_empty());
    }
}
