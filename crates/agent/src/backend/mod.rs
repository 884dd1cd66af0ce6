//! The backend contract. A backend is what moves packets between nodes' subnets: it says what
//! goes into the lease's `BackendData`, how many bytes of each packet its encapsulation takes,
//! the device it needs, and the kernel state ([`Desired`]) that reaches a set of peers. Backends
//! are registered by name ([`REGISTRY`]) and read their own `Backend` options from
//! net-conf.json, so a new backend is a new file and a line in the registry.
//!
//! What is common to every backend is here: a peer lease outside the network, of another size,
//! overlapping this node's subnet or claiming this node's address is ignored with a warning and
//! never handed to the backend.
//!
//! When a backend's device disappears, the agent makes it again and replays every peer (the
//! device's neighbours, FDB entries and routes went with it).

pub mod bgp;
mod host_gw;
mod udp;
mod vxlan;

pub use udp::DEVICE as UDP_DEVICE;

use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;
use serde_json::Value;
use weft_lease::Lease;
use weft_netconf::Options;

use crate::model::{Desired, DeviceSpec};
use crate::{AgentError, Result};

/// This node, as backends see it.
#[derive(Debug, Clone)]
pub struct Node<'a> {
    /// The cluster network and the size of every node's subnet (`SubnetLen`).
    pub network: Ipv4Net,
    pub subnet_len: u8,
    /// This node's subnet and public address.
    pub subnet: Ipv4Net,
    pub ip: Ipv4Addr,
    /// The uplink: its name, IPv4 networks (a peer inside one is on the same L2 segment) and MTU.
    pub uplink: &'a str,
    pub uplink_nets: &'a [Ipv4Net],
    pub uplink_mtu: u32,
}

impl Node<'_> {
    /// Whether `ip` is on the uplink's segment.
    pub fn on_link(&self, ip: Ipv4Addr) -> bool {
        self.uplink_nets.iter().any(|n| n.contains(&ip))
    }

    /// Why a peer lease is not programmed by any backend, if it is not.
    fn reject(&self, peer: &Lease) -> Option<String> {
        let s = &peer.subnet;
        if !self.network.contains(s) {
            return Some(format!("lease {} is outside the network {}", s, self.network));
        }
        if s.prefix_len() != self.subnet_len {
            return Some(format!("lease {s} is not a /{} subnet", self.subnet_len));
        }
        if s.contains(&self.subnet) || self.subnet.contains(s) {
            return Some(format!("lease {s} overlaps this node's subnet {}", self.subnet));
        }
        let ip = peer.attrs.public_ip;
        if ip == self.ip {
            return Some(format!("lease {s} claims this node's address {}", self.ip));
        }
        // An address no node can have (the kernel refuses a route via it, and one such lease
        // would hold up every other peer's programming).
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() || ip.is_link_local() {
            return Some(format!("lease {s} has the address {ip}, which no node can have"));
        }
        if self.network.contains(&ip) {
            return Some(format!("lease {s} has the address {ip}, inside the pod network"));
        }
        if let Some(net) =
            self.uplink_nets.iter().find(|n| n.prefix_len() < 31 && (ip == n.network() || ip == n.broadcast()))
        {
            return Some(format!("lease {s} has the address {ip}, the network or broadcast address of {net}"));
        }
        None
    }

    /// This node's own lease (skipped, not warned about).
    fn is_own(&self, lease: &Lease) -> bool {
        lease.subnet == self.subnet && lease.attrs.public_ip == self.ip
    }
}

/// What a backend wants for a set of peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerState {
    pub state: Desired,
    /// The peers it programs (the others were ignored, with a warning).
    pub programmed: Vec<Ipv4Net>,
    /// One line per ignored peer.
    pub warnings: Vec<String>,
}

impl PeerState {
    pub fn ignore(&mut self, warning: String) {
        self.warnings.push(warning);
    }
}

/// A backend (see the module's documentation).
pub trait Backend: Send + std::fmt::Debug {
    /// Its `Type` in net-conf.json and its leases' `BackendType`.
    fn name(&self) -> &'static str;
    /// Bytes of encapsulation per packet: pods get the uplink's MTU minus this.
    fn overhead(&self) -> u32;
    /// What this node publishes in its lease's `BackendData`.
    fn lease_data(&self) -> Value;
    /// The device this backend needs on `node`, made before any peer is programmed.
    fn device(&self, node: &Node<'_>) -> Option<DeviceSpec>;
    /// The kernel state that reaches `peers` (each valid, sorted by subnet, none of them this
    /// node).
    fn program(&self, node: &Node<'_>, peers: &[&Lease]) -> PeerState;
    /// What `lease` claims that no two nodes may share (VXLAN: its VTEP MAC), if anything. A
    /// change of a lease whose claim another node's lease also makes cannot be applied on its
    /// own: which of them counts depends on both, so everything is computed again.
    fn claim(&self, _lease: &Lease) -> Option<String> {
        None
    }
    /// Makes this node a new claim, when its own is made by an older lease of another node
    /// (peers then ignore this node's lease: it would stay unreachable — a node whose address
    /// changed leaves such a lease behind until it expires). VXLAN picks a new VTEP MAC and
    /// keeps it. Whether it did.
    fn renew_claim(&mut self, _setup: &Setup<'_>) -> Result<bool> {
        Ok(false)
    }
    /// Whether a node holds several subnets (routed mode's IPAM blocks): leases with this
    /// node's address are its own, not peers.
    fn holds_several_subnets(&self) -> bool {
        false
    }
    /// Whether a lease of this backend is whole (routed mode: it names its node's AS); one that
    /// is not is neither a peer nor, with this node's address, one of its own subnets.
    fn valid_lease(&self, _lease: &Lease) -> bool {
        true
    }
    /// Routed mode's options, when this is the `bgp` backend.
    fn routed(&self) -> Option<&bgp::BgpOptions> {
        None
    }
}

/// The desired state for `peers` (this node's own lease among them is skipped; invalid ones
/// are ignored with a warning).
pub fn desired(backend: &dyn Backend, node: &Node<'_>, peers: &[&Lease]) -> PeerState {
    let mut warnings = Vec::new();
    let mut valid: Vec<&Lease> = Vec::with_capacity(peers.len());
    let several = backend.holds_several_subnets();
    for peer in peers.iter().copied().filter(|p| !node.is_own(p)) {
        // Routed mode: this node's other blocks.
        if several && peer.attrs.public_ip == node.ip && peer.attrs.backend_type == backend.name() {
            continue;
        }
        // flannel's rule: a node programs the leases of its own backend only.
        let other_type = (peer.attrs.backend_type != backend.name())
            .then(|| format!("lease {} is a {:?} lease, not {}", peer.subnet, peer.attrs.backend_type, backend.name()));
        match other_type.or_else(|| node.reject(peer)) {
            Some(why) => warnings.push(format!("ignoring peer {}: {why}", peer.attrs.public_ip)),
            None => valid.push(peer),
        }
    }
    valid.sort_by_key(|p| p.subnet);
    let mut out = backend.program(node, &valid);
    warnings.append(&mut out.warnings);
    out.warnings = warnings;
    out
}

/// What a backend is built from besides its options.
pub struct Setup<'a> {
    /// Where a backend keeps what must survive restarts (the VTEP MAC).
    pub state_dir: &'a Path,
    /// This node's name (routed mode names nodes: route reflectors, external peers).
    pub node_name: &'a str,
}

/// How a backend is built from its net-conf options (warnings for keys it does not know go into
/// the vector).
pub type Build = fn(Options<'_>, &Setup<'_>, &mut Vec<String>) -> Result<Box<dyn Backend>>;

/// A registered backend: its name and its [`Build`].
pub struct Registration {
    pub name: &'static str,
    pub build: Build,
}

/// Every backend weft has.
pub const REGISTRY: &[Registration] =
    &[vxlan::REGISTRATION, host_gw::REGISTRATION, udp::REGISTRATION, bgp::REGISTRATION];

/// The `Port` option: a UDP port, `default` when not given.
fn port(options: &Options<'_>, default: u64) -> Result<u16> {
    let port = options.number("Port")?.unwrap_or(default);
    Ok(u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| weft_netconf::invalid_option(format!("Port {port} out of range 1-65535")))?)
}

/// Builds the backend net-conf.json's `Backend` section names; the warnings are for its
/// options.
pub fn build(section: &weft_netconf::Backend, setup: &Setup<'_>) -> Result<(Box<dyn Backend>, Vec<String>)> {
    let Some(registration) = REGISTRY.iter().find(|r| r.name == section.kind) else {
        let known: Vec<String> = REGISTRY.iter().map(|r| format!("{:?}", r.name)).collect();
        return Err(AgentError::Config(format!(
            "unknown backend type {:?}; weft supports {}",
            section.kind,
            known.join(", ")
        )));
    };
    let mut warnings = Vec::new();
    let backend = (registration.build)(section.options(), setup, &mut warnings)?;
    Ok((backend, warnings))
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;
    use weft_lease::LeaseAttrs;
    use weft_netconf::NetworkConfig;

    use super::*;

    pub fn lease(subnet: &str, ip: &str, mac: &str) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            attrs: LeaseAttrs {
                public_ip: ip.parse().unwrap(),
                public_ipv6: None,
                backend_type: "vxlan".into(),
                backend_data: json!({"VNI": 1, "VtepMAC": mac}),
            },
            expires: None,
            created: None,
        }
    }

    pub fn node(nets: &[Ipv4Net]) -> Node<'_> {
        Node {
            network: "198.19.0.0/16".parse().unwrap(),
            subnet_len: 24,
            subnet: "198.19.1.0/24".parse().unwrap(),
            ip: "198.18.0.1".parse().unwrap(),
            uplink: "eth0",
            uplink_nets: nets,
            uplink_mtu: 1500,
        }
    }

    /// The backend a net-conf.json names, built in a fresh state directory.
    pub fn backend_of(conf: &str) -> (Box<dyn Backend>, Vec<String>) {
        let network = NetworkConfig::parse(conf).unwrap();
        let dir = tempfile::tempdir().unwrap();
        build(&network.backend, &Setup { state_dir: dir.path(), node_name: "n1" }).unwrap()
    }

    #[test]
    fn bad_peers_are_ignored_with_warnings() {
        let nets = ["198.18.0.0/24".parse().unwrap()];
        let (backend, _) = backend_of(r#"{"Network": "198.19.0.0/16"}"#);
        let peers = [
            lease("10.0.0.0/24", "198.18.0.5", "0a:00:00:00:00:05"),
            lease("198.19.1.0/25", "198.18.0.6", "0a:00:00:00:00:06"),
            lease("198.19.7.0/24", "198.18.0.1", "0a:00:00:00:00:07"),
            lease("198.19.8.0/24", "198.18.0.8", "not-a-mac"),
            // This node's subnet claimed by another node.
            lease("198.19.1.0/24", "198.18.0.9", "0a:00:00:00:00:09"),
            // This node's own lease: skipped without a word.
            lease("198.19.1.0/24", "198.18.0.1", "0a:00:00:00:00:01"),
        ];
        let refs: Vec<&Lease> = peers.iter().collect();
        let out = desired(backend.as_ref(), &node(&nets), &refs);
        assert_eq!(out.state, Desired::default());
        assert!(out.programmed.is_empty());
        assert_eq!(out.warnings.len(), 5, "{:?}", out.warnings);
        for expected in
            ["outside the network", "not a /24", "this node's address", "VtepMAC", "overlaps this node's subnet"]
        {
            assert!(
                out.warnings.iter().any(|w| w.contains(expected)),
                "no warning says {expected:?}: {:?}",
                out.warnings
            );
        }
    }

    #[test]
    fn backends_are_found_by_name_and_read_their_own_options() {
        let (b, warnings) = backend_of(r#"{"Network": "198.19.0.0/16", "Backend": {"Type": "host-gw", "VNI": 3}}"#);
        assert_eq!(b.name(), "host-gw");
        assert_eq!(warnings.len(), 1, "host-gw has no VNI: {warnings:?}");
        let (b, warnings) =
            backend_of(r#"{"Network": "198.19.0.0/16", "Backend": {"vni": 7, "Learning": true, "Vni2": 1}}"#);
        assert_eq!(b.name(), "vxlan");
        assert_eq!(b.lease_data()["VNI"], 7);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        let dir = tempfile::tempdir().unwrap();
        let setup = Setup { state_dir: dir.path(), node_name: "n1" };
        let err = |conf: &str| {
            let network = NetworkConfig::parse(conf).unwrap();
            build(&network.backend, &setup).unwrap_err().to_string()
        };
        let unknown = err(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "ipip"}}"#);
        assert!(unknown.contains("unknown backend type \"ipip\"") && unknown.contains("\"host-gw\""), "{unknown}");
        assert!(err(r#"{"Network": "10.0.0.0/16", "Backend": {"VNI": "7"}}"#).contains("whole number"));
        assert!(err(r#"{"Network": "10.0.0.0/16", "Backend": {"VNI": 16777216}}"#).contains("out of range"));
        assert!(err(r#"{"Network": "10.0.0.0/16", "Backend": {"Port": 0}}"#).contains("out of range"));
        assert!(err(r#"{"Network": "10.0.0.0/16", "Backend": {"DirectRouting": 1}}"#).contains("true or false"));
    }
}
