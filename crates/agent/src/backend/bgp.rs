//! `bgp`: routed mode, Calico's shape. No device and no encapsulation: each node's subnets are
//! IPAM blocks (leases of `BlockSize`, the first one its lease, more claimed as its pods need
//! them), its pods are /32 routes to their own veths (the `routed` plugin), and nodes learn each
//! other's blocks over BGP from the speaker the agent embeds (see [`crate::routed`]). Nothing
//! is programmed per peer lease here: the peers' leases say who the BGP neighbours are.
//!
//! Options (`Backend` in net-conf.json): `AS` (64512), `BlockSize` (26, read with the network),
//! `NodeToNodeMesh` (true), `RouteReflectors` (node names: those reflect, the others peer only
//! with them), `Peers` (`[{"Address", "AS", "Nodes"?}]`: external neighbours such as a
//! top-of-rack router, on every node or the named ones), `BlockReleaseSeconds` (300: how long a
//! block other than the first stays empty before it is given back), `CrossSubnet` (false: a
//! peer off the uplink's subnet is ignored; true: such peers are reached through VXLAN —
//! `weft.<VNI>`, `VNI` and `Port` as the vxlan backend's — from their leases in the store, the
//! way Calico's CrossSubnet mode does with IPIP; pods then get the uplink's MTU less 50).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde_json::{json, Value};
use weft_lease::Lease;
use weft_netconf::{invalid_option, Options};

use super::vxlan::Vxlan;
use super::{Backend, Node, PeerState, Registration, Setup};
use crate::model::DeviceSpec;
use crate::Result;

pub const REGISTRATION: Registration = Registration { name: weft_netconf::BGP, build };

/// Calico's default AS.
pub const DEFAULT_AS: u32 = 64512;

/// An external neighbour (`Peers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalPeer {
    pub address: IpAddr,
    pub asn: u32,
    /// The nodes that peer with it (all when empty).
    pub nodes: Vec<String>,
}

/// What the routed mode is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpOptions {
    pub asn: u32,
    pub mesh: bool,
    pub route_reflectors: Vec<String>,
    pub peers: Vec<ExternalPeer>,
    pub release_after: Duration,
    /// This node's name (`--node-name`), as `RouteReflectors` and `Peers` name nodes.
    pub node: String,
}

impl BgpOptions {
    /// Whether this node reflects routes.
    pub fn is_reflector(&self) -> bool {
        self.route_reflectors.contains(&self.node)
    }
}

#[derive(Debug)]
pub struct Bgp {
    pub options: BgpOptions,
    /// CrossSubnet: the VXLAN fallback for peers off the uplink's subnet.
    cross: Option<Vxlan>,
}

fn asn(value: &Value, what: &str) -> Result<u32> {
    match value.as_u64() {
        Some(n) if (1..=u64::from(u32::MAX)).contains(&n) => Ok(n as u32),
        _ => Err(invalid_option(format!("{what} must be an AS number (1-4294967295), not {value}")).into()),
    }
}

fn names(value: Option<&Value>, what: &str) -> Result<Vec<String>> {
    let Some(value) = value else { return Ok(Vec::new()) };
    let list = value.as_array().ok_or_else(|| invalid_option(format!("{what} must be a list of node names")))?;
    list.iter()
        .map(|v| {
            v.as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| invalid_option(format!("{what}: {v} is not a node name")).into())
        })
        .collect()
}

fn build(options: Options<'_>, setup: &Setup<'_>, warnings: &mut Vec<String>) -> Result<Box<dyn Backend>> {
    options.unknown(
        &[
            "AS",
            "BlockSize",
            "NodeToNodeMesh",
            "RouteReflectors",
            "Peers",
            "BlockReleaseSeconds",
            "CrossSubnet",
            "VNI",
            "Port",
        ],
        &[],
        "Backend (bgp)",
        warnings,
    );
    let local = match options.get("AS") {
        Some(v) => asn(v, "AS")?,
        None => DEFAULT_AS,
    };
    let mut peers = Vec::new();
    if let Some(list) = options.get("Peers") {
        let list = list.as_array().ok_or_else(|| invalid_option("Peers must be a list of {\"Address\", \"AS\"}"))?;
        for p in list {
            let address = p
                .get("Address")
                .and_then(Value::as_str)
                .and_then(|a| a.parse::<IpAddr>().ok())
                .ok_or_else(|| invalid_option(format!("Peers: {p} has no Address (an IP address)")))?;
            let unusable = match address {
                IpAddr::V4(a) => {
                    a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast() || a.is_link_local()
                }
                IpAddr::V6(a) => a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_unicast_link_local(),
            };
            if unusable {
                return Err(invalid_option(format!("Peers: {address} cannot be a BGP neighbour")).into());
            }
            if address.is_ipv6() {
                return Err(invalid_option(format!(
                    "Peers: {address}: routed mode peers over IPv4 (its speaker listens on 0.0.0.0:179)"
                ))
                .into());
            }
            let asn = asn(p.get("AS").unwrap_or(&Value::Null), "Peers: AS")?;
            peers.push(ExternalPeer { address, asn, nodes: names(p.get("Nodes"), "Peers: Nodes")? });
        }
    }
    let route_reflectors = names(options.get("RouteReflectors"), "RouteReflectors")?;
    let release = options.number("BlockReleaseSeconds")?.unwrap_or(300);
    let cross = match options.boolean("CrossSubnet")?.unwrap_or(false) {
        true => {
            let mut vxlan = Vxlan::from_options(&options, setup)?;
            vxlan.off_link_only = true;
            Some(vxlan)
        }
        false => None,
    };
    Ok(Box::new(Bgp {
        cross,
        options: BgpOptions {
            asn: local,
            mesh: options.boolean("NodeToNodeMesh")?.unwrap_or(true),
            route_reflectors,
            peers,
            release_after: Duration::from_secs(release),
            node: setup.node_name.to_string(),
        },
    }))
}

impl Backend for Bgp {
    fn name(&self) -> &'static str {
        weft_netconf::BGP
    }

    fn overhead(&self) -> u32 {
        self.cross.as_ref().map_or(0, Backend::overhead)
    }

    /// The node's AS and name, which its peers need to meet it (and its VTEP with CrossSubnet).
    fn lease_data(&self) -> Value {
        let mut data = json!({"AS": self.options.asn, "Node": self.options.node});
        if let (Some(cross), Some(map)) = (&self.cross, data.as_object_mut()) {
            if let Value::Object(vtep) = cross.lease_data() {
                map.extend(vtep);
            }
        }
        data
    }

    fn device(&self, node: &Node<'_>) -> Option<DeviceSpec> {
        self.cross.as_ref().and_then(|c| c.device(node))
    }

    /// Peers on the uplink's subnet are reached over BGP (nothing here); the others through
    /// the VXLAN fallback with CrossSubnet, or not at all.
    fn program(&self, node: &Node<'_>, peers: &[&Lease]) -> PeerState {
        let mut out = PeerState::default();
        let mut off_link = Vec::new();
        for peer in peers.iter().copied() {
            if peer_of(peer).is_none() {
                out.ignore(format!(
                    "ignoring lease {} of {}: no AS in its BackendData",
                    peer.subnet, peer.attrs.public_ip
                ));
            } else if node.on_link(peer.attrs.public_ip) {
                out.programmed.push(peer.subnet);
            } else if self.cross.is_some() {
                off_link.push(peer);
            } else {
                out.ignore(format!(
                    "ignoring peer {} ({}): it is not on the uplink's subnet (set CrossSubnet to reach it through VXLAN)",
                    peer.attrs.public_ip, peer.subnet
                ));
            }
        }
        if let Some(cross) = &self.cross {
            let mut tunnelled = cross.program(node, &off_link);
            // A node's blocks share its VTEP: one FDB entry for it.
            tunnelled.state.fdb.sort();
            tunnelled.state.fdb.dedup();
            out.state = tunnelled.state;
            out.programmed.extend(tunnelled.programmed);
            out.warnings.extend(tunnelled.warnings);
        }
        out
    }

    fn claim(&self, lease: &Lease) -> Option<String> {
        self.cross.as_ref().and_then(|c| c.claim(lease))
    }

    fn renew_claim(&mut self, setup: &Setup<'_>) -> Result<bool> {
        match &mut self.cross {
            Some(c) => c.renew_claim(setup),
            None => Ok(false),
        }
    }

    fn holds_several_subnets(&self) -> bool {
        true
    }

    fn valid_lease(&self, lease: &Lease) -> bool {
        peer_of(lease).is_some()
    }

    fn routed(&self) -> Option<&BgpOptions> {
        Some(&self.options)
    }
}

/// External peers must be routers, not pods: one inside the pod network is refused.
pub fn check_peers(options: &BgpOptions, network: ipnet::Ipv4Net) -> Result<()> {
    match options.peers.iter().find(|p| matches!(p.address, IpAddr::V4(a) if network.contains(&a))) {
        Some(p) => Err(crate::AgentError::Config(format!(
            "Peers: {} is inside the pod network {network}, not a router's address",
            p.address
        ))),
        None => Ok(()),
    }
}

/// A node as its lease shows it: address, AS, name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerNode {
    pub address: Ipv4Addr,
    pub asn: u32,
    pub name: String,
}

/// The node a peer's lease is of, if its BackendData says its AS.
pub fn peer_of(lease: &Lease) -> Option<PeerNode> {
    let data = &lease.attrs.backend_data;
    let asn = data.get("AS").and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok()).filter(|n| *n != 0)?;
    let name = data.get("Node").and_then(Value::as_str).unwrap_or_default().to_string();
    Some(PeerNode { address: lease.attrs.public_ip, asn, name })
}

/// A BGP neighbour this node should have.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Neighbour {
    pub address: IpAddr,
    pub asn: u32,
    /// This node reflects routes to it (it is a route reflector, the neighbour a client).
    pub rr_client: bool,
    /// An external peer (`Peers`): it hears this node's own blocks only, so that it reaches
    /// each block through the node that holds it.
    pub external: bool,
}

/// The neighbours of this node (its address `me`) given the other nodes (one entry per node):
/// with no route reflectors, every node when the mesh is on; with reflectors, a reflector peers
/// with every node (the others as its clients) and a client only with the reflectors; and the
/// external peers meant for this node (not itself; a node named as one is a node).
pub fn neighbours(options: &BgpOptions, me: IpAddr, nodes: &[PeerNode]) -> Vec<Neighbour> {
    let reflector = |name: &str| options.route_reflectors.iter().any(|r| r == name);
    let mut out: Vec<Neighbour> = Vec::new();
    for node in nodes {
        let wanted = if options.route_reflectors.is_empty() {
            options.mesh
        } else {
            options.is_reflector() || reflector(&node.name)
        };
        if wanted {
            let rr_client = options.is_reflector() && !reflector(&node.name) && node.asn == options.asn;
            out.push(Neighbour { address: IpAddr::V4(node.address), asn: node.asn, rr_client, external: false });
        }
    }
    for peer in &options.peers {
        if (peer.nodes.is_empty() || peer.nodes.contains(&options.node))
            && peer.address != me
            && !out.iter().any(|n| n.address == peer.address)
        {
            out.push(Neighbour { address: peer.address, asn: peer.asn, rr_client: false, external: true });
        }
    }
    out.sort();
    out.dedup_by(|a, b| a.address == b.address);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(node: &str, rrs: &[&str]) -> BgpOptions {
        BgpOptions {
            asn: DEFAULT_AS,
            mesh: true,
            route_reflectors: rrs.iter().map(|s| s.to_string()).collect(),
            peers: vec![ExternalPeer { address: "198.18.0.254".parse().unwrap(), asn: 65000, nodes: Vec::new() }],
            release_after: Duration::from_secs(300),
            node: node.into(),
        }
    }

    /// This node's own address (what `neighbours` leaves out of the external peers).
    const ME: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 200));

    fn nodes(n: u8) -> Vec<PeerNode> {
        (1..=n)
            .map(|i| PeerNode { address: Ipv4Addr::new(198, 18, 0, i), asn: DEFAULT_AS, name: format!("n{i}") })
            .collect()
    }

    fn addresses(list: &[Neighbour]) -> Vec<String> {
        list.iter().map(|n| format!("{}{}", n.address, if n.rr_client { " client" } else { "" })).collect()
    }

    fn bgp_lease(subnet: &str, ip: &str, mac: &str) -> Lease {
        let mut l = super::super::tests::lease(subnet, ip, mac);
        l.attrs.backend_type = "bgp".into();
        l.attrs.backend_data = json!({"AS": 64512, "Node": ip, "VNI": 1, "VtepMAC": mac});
        l
    }

    /// The desired state: nothing for peers on the uplink's subnet (BGP routes them); with
    /// CrossSubnet, VXLAN for the others, one route per block and one FDB entry per node;
    /// without it they are ignored; this node's own other blocks are neither.
    #[test]
    fn cross_subnet_peers_go_through_vxlan_and_the_others_through_bgp() {
        use super::super::tests::{backend_of, node};
        let nets = ["198.18.0.0/24".parse().unwrap()];
        let peers = [
            bgp_lease("198.19.0.64/26", "198.18.0.2", "0a:00:00:00:00:02"),
            bgp_lease("198.19.0.128/26", "198.18.5.3", "0a:00:00:00:00:03"),
            bgp_lease("198.19.0.192/26", "198.18.5.3", "0a:00:00:00:00:03"),
            // This node's own second block (node() is 198.18.0.1).
            bgp_lease("198.19.1.64/26", "198.18.0.1", "0a:00:00:00:00:01"),
        ];
        let refs: Vec<&Lease> = peers.iter().collect();
        let conf = r#"{"Network": "198.19.0.0/16", "Backend": {"Type": "bgp", "CrossSubnet": true}}"#;
        let (b, warnings) = backend_of(conf);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(b.overhead(), 50);
        assert!(b.lease_data()["VtepMAC"].is_string() && b.lease_data()["AS"] == 64512);
        let mut me = node(&nets);
        me.subnet = "198.19.1.0/26".parse().unwrap();
        me.subnet_len = 26;
        let out = super::super::desired(b.as_ref(), &me, &refs);
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        let routes: Vec<String> =
            out.state.routes.iter().map(|r| format!("{} via {:?} dev {}", r.dst, r.via, r.dev)).collect();
        assert_eq!(
            routes,
            ["198.19.0.128/26 via Some(198.19.0.128) dev weft.1", "198.19.0.192/26 via Some(198.19.0.192) dev weft.1"]
        );
        assert_eq!(out.state.fdb.len(), 1, "one VTEP, one FDB entry");
        assert_eq!(out.programmed.len(), 3);
        let Some(DeviceSpec::Vxlan { address, .. }) = b.device(&me) else { panic!("no VTEP") };
        assert_eq!(address.to_string(), "198.19.1.0/32", "the first block's .0, never a pod's");

        let (plain, _) = backend_of(r#"{"Network": "198.19.0.0/16", "Backend": {"Type": "bgp"}}"#);
        assert_eq!((plain.overhead(), plain.device(&me).is_none()), (0, true));
        let out = super::super::desired(plain.as_ref(), &me, &refs);
        assert!(out.state.routes.is_empty());
        assert_eq!(out.programmed, ["198.19.0.64/26".parse::<ipnet::Ipv4Net>().unwrap()]);
        assert_eq!(out.warnings.len(), 2, "{:?}", out.warnings);
        assert!(out.warnings[0].contains("set CrossSubnet"));
    }

    #[test]
    fn peers_that_cannot_be_routers_are_refused() {
        use weft_netconf::NetworkConfig;
        let dir = tempfile::tempdir().unwrap();
        let setup = Setup { state_dir: dir.path(), node_name: "n1" };
        let build_with = |peers: &str| {
            let conf = format!(r#"{{"Network": "198.19.0.0/16", "Backend": {{"Type": "bgp", "Peers": {peers}}}}}"#);
            let network = NetworkConfig::parse(&conf).unwrap();
            super::super::build(&network.backend, &setup).map(|(b, _)| b.routed().cloned())
        };
        for bad in ["127.0.0.1", "0.0.0.0", "224.0.0.5", "169.254.1.1", "::1", "fe80::1"] {
            let err = build_with(&format!(r#"[{{"Address": "{bad}", "AS": 65000}}]"#)).unwrap_err().to_string();
            assert!(err.contains("cannot be a BGP neighbour"), "{bad}: {err}");
        }
        assert!(build_with(r#"[{"Address": "198.18.0.9"}]"#).unwrap_err().to_string().contains("AS number"));
        let v6 = build_with(r#"[{"Address": "2001:db8::1", "AS": 65000}]"#).unwrap_err().to_string();
        assert!(v6.contains("over IPv4"), "{v6}");
        let inside = build_with(r#"[{"Address": "198.19.0.5", "AS": 65000}]"#).unwrap().unwrap();
        let net = "198.19.0.0/16".parse().unwrap();
        assert!(check_peers(&inside, net).unwrap_err().to_string().contains("inside the pod network"));
        let router = build_with(r#"[{"Address": "198.18.255.254", "AS": 65000, "Nodes": ["n1"]}]"#).unwrap().unwrap();
        assert!(check_peers(&router, net).is_ok());
        assert_eq!(router.peers[0].nodes, ["n1"]);
    }

    #[test]
    fn a_mesh_peers_with_every_node_and_the_external_peers() {
        let others: Vec<PeerNode> = nodes(3).into_iter().filter(|n| n.name != "n1").collect();
        let got = neighbours(&options("n1", &[]), ME, &others);
        assert_eq!(addresses(&got), ["198.18.0.2", "198.18.0.3", "198.18.0.254"]);
        let mut no_mesh = options("n1", &[]);
        no_mesh.mesh = false;
        assert_eq!(addresses(&neighbours(&no_mesh, ME, &others)), ["198.18.0.254"]);
    }

    #[test]
    fn reflectors_peer_with_all_and_clients_with_the_reflectors_only() {
        let all = nodes(5);
        let others = |me: &str| all.iter().filter(|n| n.name != me).cloned().collect::<Vec<_>>();
        let rr = options("n1", &["n1", "n2"]);
        assert_eq!(
            addresses(&neighbours(&rr, ME, &others("n1"))),
            ["198.18.0.2", "198.18.0.3 client", "198.18.0.4 client", "198.18.0.5 client", "198.18.0.254"]
        );
        let client = options("n4", &["n1", "n2"]);
        assert_eq!(addresses(&neighbours(&client, ME, &others("n4"))), ["198.18.0.1", "198.18.0.2", "198.18.0.254"]);
        // An external peer meant for other nodes only.
        let mut only = options("n4", &["n1", "n2"]);
        only.peers[0].nodes = vec!["n1".into()];
        assert_eq!(addresses(&neighbours(&only, ME, &others("n4"))), ["198.18.0.1", "198.18.0.2"]);
        // An external peer with this node's own address is left out.
        let mut itself = options("n4", &[]);
        itself.peers[0].address = ME;
        assert!(!addresses(&neighbours(&itself, ME, &[])).contains(&ME.to_string()));
    }
}
