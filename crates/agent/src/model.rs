//! The kernel state the agent wants, as plain values: routes, permanent neighbours and FDB
//! entries ([`State`]), the device a backend needs ([`DeviceSpec`]), who owns what ([`Owner`]),
//! and the pure plan ([`plan`], [`plan_change`]) that turns (current, desired) into the
//! operations ([`Op`]) an executor carries out. IPv4 and IPv6 go through the same types.
//!
//! Desired state names devices (`weft.1`, `eth0`); the executor resolves names to indexes just
//! before planning, so a device made again under the same name is found again.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use weft_dataplane::route::{
    RTPROT_WEFT_BGP, RTPROT_WEFT_BLACKHOLE, RTPROT_WEFT_PEERS, RTPROT_WEFT_POD, RT_TABLE_MAIN,
};

/// A producer of kernel state. Its routes carry its own protocol number in its table, and the
/// permanent neighbours and remote FDB entries of the devices it names are its own: a
/// reconcile lists and removes only its owner's objects, so producers never delete each
/// other's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub name: &'static str,
    pub protocol: u8,
    pub table: u8,
}

/// The routes to peers' subnets (the agent's backends).
pub const PEER_ROUTES: Owner = Owner { name: "peer routes", protocol: RTPROT_WEFT_PEERS, table: RT_TABLE_MAIN };
/// Host routes to pods on this node (routed mode).
pub const POD_ROUTES: Owner = Owner { name: "pod routes", protocol: RTPROT_WEFT_POD, table: RT_TABLE_MAIN };
/// Routes learned over BGP.
pub const BGP_ROUTES: Owner = Owner { name: "BGP routes", protocol: RTPROT_WEFT_BGP, table: RT_TABLE_MAIN };
/// Blackholes for this node's own blocks (routed mode).
pub const BLACKHOLES: Owner = Owner { name: "blackholes", protocol: RTPROT_WEFT_BLACKHOLE, table: RT_TABLE_MAIN };

/// Every owner: their protocol numbers never collide (a test checks).
pub const OWNERS: [Owner; 4] = [PEER_ROUTES, POD_ROUTES, BGP_ROUTES, BLACKHOLES];

/// A route: to `dst` via `via` on device `dev` (a name in desired state, an index once resolved).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route<D> {
    pub dst: IpNet,
    pub via: Option<IpAddr>,
    pub dev: D,
    pub onlink: bool,
    /// The route's own MTU (weft's routes have none: one set by hand is drift, repaired).
    pub mtu: Option<u32>,
}

/// A permanent neighbour: `ip` is at `mac` on `dev`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Neighbour<D> {
    pub dev: D,
    pub ip: IpAddr,
    pub mac: [u8; 6],
}

/// A remote FDB entry: frames for `mac` on `dev` go to `dst`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fdb<D> {
    pub dev: D,
    pub mac: [u8; 6],
    pub dst: IpAddr,
}

/// An entry of a userspace forwarder's table (the `udp` backend): packets for `subnet` go
/// to `ip`, and datagrams from `ip` may carry packets from `subnet`, on the TUN `dev`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tunnel<D> {
    pub dev: D,
    pub subnet: Ipv4Net,
    pub ip: Ipv4Addr,
}

/// Routes, neighbours, FDB entries and forwarder entries: what an owner wants, or what the
/// kernel (and the forwarder) holds of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State<D> {
    pub routes: Vec<Route<D>>,
    pub neighbours: Vec<Neighbour<D>>,
    pub fdb: Vec<Fdb<D>>,
    pub tunnel: Vec<Tunnel<D>>,
}

impl<D> Default for State<D> {
    fn default() -> Self {
        State { routes: Vec::new(), neighbours: Vec::new(), fdb: Vec::new(), tunnel: Vec::new() }
    }
}

/// Desired state: devices by name.
pub type Desired = State<String>;
/// Resolved or current state: devices by index.
pub type Resolved = State<u32>;

impl<D: Clone> State<D> {
    /// The same state with every device mapped by `f` (names to indexes); the first failure
    /// is returned.
    pub fn resolve<E, T>(&self, mut f: impl FnMut(&D) -> Result<T, E>) -> Result<State<T>, E> {
        Ok(State {
            routes: self
                .routes
                .iter()
                .map(|r| Ok(Route { dst: r.dst, via: r.via, dev: f(&r.dev)?, onlink: r.onlink, mtu: r.mtu }))
                .collect::<Result<_, E>>()?,
            neighbours: self
                .neighbours
                .iter()
                .map(|n| Ok(Neighbour { dev: f(&n.dev)?, ip: n.ip, mac: n.mac }))
                .collect::<Result<_, E>>()?,
            fdb: self
                .fdb
                .iter()
                .map(|e| Ok(Fdb { dev: f(&e.dev)?, mac: e.mac, dst: e.dst }))
                .collect::<Result<_, E>>()?,
            tunnel: self
                .tunnel
                .iter()
                .map(|t| Ok(Tunnel { dev: f(&t.dev)?, subnet: t.subnet, ip: t.ip }))
                .collect::<Result<_, E>>()?,
        })
    }

    /// Everything of `other` added to this.
    pub fn extend(&mut self, other: State<D>) {
        self.routes.extend(other.routes);
        self.neighbours.extend(other.neighbours);
        self.fdb.extend(other.fdb);
        self.tunnel.extend(other.tunnel);
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many objects.
    pub fn len(&self) -> usize {
        self.routes.len() + self.neighbours.len() + self.fdb.len() + self.tunnel.len()
    }
}

/// One change to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    DelRoute(Route<u32>),
    DelFdb(Fdb<u32>),
    DelNeighbour(Neighbour<u32>),
    /// Added or replaced.
    PutNeighbour(Neighbour<u32>),
    PutFdb(Fdb<u32>),
    PutRoute(Route<u32>),
    /// A forwarder entry added or replaced (the subnet's address may change).
    PutTunnel(Tunnel<u32>),
    DelTunnel(Tunnel<u32>),
}

impl Op {
    pub fn is_removal(&self) -> bool {
        matches!(self, Op::DelRoute(_) | Op::DelFdb(_) | Op::DelNeighbour(_) | Op::DelTunnel(_))
    }
}

/// The operations that make `current` (what the kernel holds of an owner) into `desired`:
/// nothing when they agree. Stale objects go first (route, FDB, neighbour), then new ones in
/// flannel's order (neighbour, FDB, route: the route last, so the kernel never ARPs for the
/// gateway). A route merely different from the desired one to the same destination is
/// replaced, never removed first (no moment without a route).
pub fn plan(current: &Resolved, desired: &Resolved) -> Vec<Op> {
    let mut ops = Vec::new();
    for stale in current.routes.iter().filter(|r| !desired.routes.contains(r)) {
        if !desired.routes.iter().any(|d| d.dst == stale.dst) {
            ops.push(Op::DelRoute(stale.clone()));
        }
    }
    for stale in current.fdb.iter().filter(|e| !desired.fdb.contains(e)) {
        ops.push(Op::DelFdb(stale.clone()));
    }
    for stale in
        current.neighbours.iter().filter(|n| !desired.neighbours.iter().any(|d| d.dev == n.dev && d.ip == n.ip))
    {
        ops.push(Op::DelNeighbour(stale.clone()));
    }
    for stale in
        current.tunnel.iter().filter(|t| !desired.tunnel.iter().any(|d| d.dev == t.dev && d.subnet == t.subnet))
    {
        ops.push(Op::DelTunnel(stale.clone()));
    }
    ops.extend(desired.neighbours.iter().filter(|n| !current.neighbours.contains(n)).cloned().map(Op::PutNeighbour));
    ops.extend(desired.fdb.iter().filter(|e| !current.fdb.contains(e)).cloned().map(Op::PutFdb));
    ops.extend(desired.tunnel.iter().filter(|t| !current.tunnel.contains(t)).cloned().map(Op::PutTunnel));
    ops.extend(desired.routes.iter().filter(|r| !current.routes.contains(r)).cloned().map(Op::PutRoute));
    ops
}

/// The operations for a change of some peers, without listing the kernel: what `old` (their
/// state as programmed) has that `new` does not is removed, and every object of `new` is put
/// (replace is idempotent) but a route `old` had already, in the same order as [`plan`].
pub fn plan_change(old: &Resolved, new: &Resolved) -> Vec<Op> {
    let mut ops = Vec::new();
    for r in old.routes.iter().filter(|r| !new.routes.iter().any(|n| n.dst == r.dst)) {
        ops.push(Op::DelRoute(r.clone()));
    }
    for e in old.fdb.iter().filter(|e| !new.fdb.contains(e)) {
        ops.push(Op::DelFdb(e.clone()));
    }
    for n in old.neighbours.iter().filter(|n| !new.neighbours.iter().any(|m| m.dev == n.dev && m.ip == n.ip)) {
        ops.push(Op::DelNeighbour(n.clone()));
    }
    for t in old.tunnel.iter().filter(|t| !new.tunnel.iter().any(|n| n.dev == t.dev && n.subnet == t.subnet)) {
        ops.push(Op::DelTunnel(t.clone()));
    }
    ops.extend(new.neighbours.iter().cloned().map(Op::PutNeighbour));
    ops.extend(new.fdb.iter().cloned().map(Op::PutFdb));
    ops.extend(new.tunnel.iter().cloned().map(Op::PutTunnel));
    ops.extend(new.routes.iter().filter(|r| !old.routes.contains(r)).cloned().map(Op::PutRoute));
    ops
}

/// A device a backend needs, as it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A VXLAN device without learning, `local` on `uplink`, with a fixed MAC and the node
    /// subnet's `.0/32`.
    Vxlan {
        name: String,
        vni: u32,
        port: u16,
        local: Ipv4Addr,
        uplink: String,
        mtu: u32,
        mac: [u8; 6],
        address: Ipv4Net,
    },
    /// A persistent TUN device with the node subnet's `.0/32`, and the userspace forwarder
    /// that serves it (`udp` backend), answering on `socket`.
    Tun {
        name: String,
        mtu: u32,
        address: Ipv4Net,
        /// This node's subnet and the cluster network, as the forwarder checks packets.
        subnet: Ipv4Net,
        network: Ipv4Net,
        port: u16,
        socket: std::path::PathBuf,
        /// Large TCP packets handed to the kernel to cut (through the forwarder's TAP).
        kernel_segmentation: bool,
    },
}

impl DeviceSpec {
    pub fn name(&self) -> &str {
        match self {
            DeviceSpec::Vxlan { name, .. } | DeviceSpec::Tun { name, .. } => name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str, via: &str, dev: u32) -> Route<u32> {
        Route { dst: dst.parse().unwrap(), via: Some(via.parse().unwrap()), dev, onlink: true, mtu: None }
    }

    fn neigh(ip: &str, last: u8) -> Neighbour<u32> {
        Neighbour { dev: 9, ip: ip.parse().unwrap(), mac: [2, 0, 0, 0, 0, last] }
    }

    fn tunnel(subnet: &str, ip: &str) -> Tunnel<u32> {
        Tunnel { dev: 9, subnet: subnet.parse().unwrap(), ip: ip.parse().unwrap() }
    }

    fn fdb(last: u8, dst: &str) -> Fdb<u32> {
        Fdb { dev: 9, mac: [2, 0, 0, 0, 0, last], dst: dst.parse().unwrap() }
    }

    #[test]
    fn nothing_when_the_kernel_agrees() {
        let s = State {
            routes: vec![route("198.19.2.0/24", "198.19.2.0", 9)],
            neighbours: vec![neigh("198.19.2.0", 2)],
            fdb: vec![fdb(2, "198.18.0.2")],
            tunnel: vec![tunnel("198.19.2.0/24", "198.18.0.2")],
        };
        assert!(plan(&s, &s).is_empty());
    }

    #[test]
    fn stale_first_then_neighbour_fdb_route_and_replace_without_removing() {
        let current = State {
            routes: vec![route("198.19.2.0/24", "198.19.2.0", 9), route("198.19.3.0/24", "198.19.3.0", 9)],
            neighbours: vec![neigh("198.19.3.0", 3)],
            fdb: vec![fdb(3, "198.18.0.3")],
            tunnel: vec![tunnel("198.19.3.0/24", "198.18.0.3"), tunnel("198.19.2.0/24", "198.18.0.2")],
        };
        let desired = State {
            // 198.19.2.0/24 moves to another gateway: replaced, not removed and added.
            routes: vec![route("198.19.2.0/24", "198.18.0.2", 2), route("fd00:1::/64", "fd00::2", 9)],
            neighbours: vec![neigh("fd00::2", 4)],
            fdb: vec![fdb(4, "fd00::2")],
            // ... and in the forwarder, a put (its address changed), not a removal first.
            tunnel: vec![tunnel("198.19.2.0/24", "198.18.0.22")],
        };
        let ops = plan(&current, &desired);
        assert_eq!(
            ops,
            vec![
                Op::DelRoute(route("198.19.3.0/24", "198.19.3.0", 9)),
                Op::DelFdb(fdb(3, "198.18.0.3")),
                Op::DelNeighbour(neigh("198.19.3.0", 3)),
                Op::DelTunnel(tunnel("198.19.3.0/24", "198.18.0.3")),
                Op::PutNeighbour(neigh("fd00::2", 4)),
                Op::PutFdb(fdb(4, "fd00::2")),
                Op::PutTunnel(tunnel("198.19.2.0/24", "198.18.0.22")),
                Op::PutRoute(route("198.19.2.0/24", "198.18.0.2", 2)),
                Op::PutRoute(route("fd00:1::/64", "fd00::2", 9)),
            ]
        );
        // A changed MAC for the same neighbour is a put (replace), not a removal.
        let moved = State { neighbours: vec![neigh("198.19.3.0", 7)], ..Default::default() };
        let ops = plan(&State { neighbours: vec![neigh("198.19.3.0", 3)], ..Default::default() }, &moved);
        assert_eq!(ops, vec![Op::PutNeighbour(neigh("198.19.3.0", 7))]);
    }

    #[test]
    fn a_change_removes_what_the_old_state_had_and_puts_the_new() {
        let old = State {
            routes: vec![route("198.19.2.0/24", "198.19.2.0", 9)],
            neighbours: vec![neigh("198.19.2.0", 2)],
            fdb: vec![fdb(2, "198.18.0.2")],
            tunnel: vec![],
        };
        let new = State {
            routes: vec![route("198.19.2.0/24", "198.19.2.0", 9)],
            neighbours: vec![neigh("198.19.2.0", 5)],
            fdb: vec![fdb(5, "198.18.0.2")],
            tunnel: vec![],
        };
        let ops = plan_change(&old, &new);
        assert_eq!(ops[0], Op::DelFdb(fdb(2, "198.18.0.2")));
        assert_eq!(ops.iter().filter(|o| o.is_removal()).count(), 1, "{ops:?}");
        assert_eq!(ops.len(), 3, "the unchanged route is not put again: {ops:?}");
        assert_eq!(plan_change(&old, &State::default()).len(), 3);
        // A peer gone from the forwarder: its entry removed.
        let old = State { tunnel: vec![tunnel("198.19.2.0/24", "198.18.0.2")], ..Default::default() };
        assert_eq!(plan_change(&old, &State::default()), vec![Op::DelTunnel(tunnel("198.19.2.0/24", "198.18.0.2"))]);
    }

    #[test]
    fn owners_never_share_a_protocol() {
        for (i, a) in OWNERS.iter().enumerate() {
            for b in &OWNERS[i + 1..] {
                assert!((a.protocol, a.table) != (b.protocol, b.table), "{} and {}", a.name, b.name);
            }
        }
    }
}
