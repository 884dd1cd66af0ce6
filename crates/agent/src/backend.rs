//! Desired state per backend, as a pure function of the node's own lease and its peers' leases.
//!
//! - `vxlan`: per peer a permanent neighbour (peer subnet's `.0` → peer VTEP MAC), an FDB entry
//!   (peer VTEP MAC → peer public IP) and an onlink route (peer subnet via `.0` dev VTEP); with
//!   `DirectRouting`, a peer on the same L2 segment gets a plain route via its IP instead.
//! - `host-gw`: per peer a route (peer subnet via peer IP dev uplink); a peer that is not on the
//!   uplink's segment is refused with a clear warning.
//!
//! Peers whose lease is outside the network, overlaps this node's subnet, claims this node's IP
//! or carries no usable backend data are ignored with a warning and never programmed.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use weft_dataplane::route::RTPROT_WEFT;
use weft_dataplane::{parse_mac, RouteSpec};
use weft_lease::Lease;
use weft_netconf::BackendType;

/// What the kernel should hold for the peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub routes: Vec<RouteSpec>,
    /// On the VTEP: `(peer subnet .0, peer VTEP MAC)`.
    pub neighbours: Vec<(IpAddr, [u8; 6])>,
    /// On the VTEP: `(peer VTEP MAC, peer public IP)`.
    pub fdb: Vec<([u8; 6], IpAddr)>,
}

/// The node's side of the computation.
pub struct Context<'a> {
    pub kind: BackendType,
    pub network: Ipv4Net,
    /// The size every node's subnet has (`SubnetLen`).
    pub subnet_len: u8,
    pub own_subnet: Ipv4Net,
    pub own_ip: Ipv4Addr,
    pub uplink: u32,
    /// The uplink's IPv4 networks (a peer inside one of them is on the same L2 segment).
    pub uplink_nets: &'a [Ipv4Net],
    pub vtep: Option<u32>,
    pub direct_routing: bool,
}

impl Context<'_> {
    fn on_link(&self, ip: Ipv4Addr) -> bool {
        self.uplink_nets.iter().any(|n| n.contains(&ip))
    }

    /// Why a peer lease is not programmed, if it is not.
    fn reject(&self, peer: &Lease) -> Option<String> {
        let s = &peer.subnet;
        if !self.network.contains(s) {
            return Some(format!("lease {} is outside the network {}", s, self.network));
        }
        if s.prefix_len() != self.subnet_len {
            return Some(format!("lease {s} is not a /{} subnet", self.subnet_len));
        }
        if s.contains(&self.own_subnet) || self.own_subnet.contains(s) {
            return Some(format!("lease {s} overlaps this node's subnet {}", self.own_subnet));
        }
        if peer.attrs.public_ip == self.own_ip {
            return Some(format!("lease {s} claims this node's address {}", self.own_ip));
        }
        None
    }
}

/// The desired state for `peers` (this node's own lease among them is skipped), and a warning
/// for every peer that is ignored.
pub fn desired(ctx: &Context<'_>, peers: &[Lease]) -> (Desired, Vec<String>) {
    let mut out = Desired::default();
    let mut warnings = Vec::new();
    let mut peers: Vec<&Lease> =
        peers.iter().filter(|p| p.subnet != ctx.own_subnet || p.attrs.public_ip != ctx.own_ip).collect();
    peers.sort_by_key(|p| p.subnet);
    // One VTEP MAC, one node: of leases that share a MAC with other public IPs, the older claim
    // counts (so the FDB entry never alternates between them). One pass: the claim that counts
    // for each MAC.
    let macs: Vec<Option<String>> = peers.iter().map(|p| vtep_mac(p).map(str::to_lowercase)).collect();
    let mut owner: std::collections::HashMap<&str, &Lease> = std::collections::HashMap::new();
    for (peer, mac) in peers.iter().zip(&macs) {
        let Some(mac) = mac else { continue };
        if ctx.reject(peer).is_some() {
            continue;
        }
        let slot = owner.entry(mac.as_str()).or_insert(peer);
        if peer.outranks(slot) {
            *slot = peer;
        }
    }
    let claimed = |peer: &Lease, mac: &Option<String>| -> Option<String> {
        let mac = mac.as_deref()?;
        let o = owner.get(mac).filter(|o| o.attrs.public_ip != peer.attrs.public_ip)?;
        Some(format!("its VtepMAC {mac} belongs to the older lease {} of {}", o.subnet, o.attrs.public_ip))
    };
    for (peer, mac) in peers.iter().copied().zip(&macs) {
        if let Some(why) = ctx.reject(peer) {
            warnings.push(format!("ignoring peer {}: {why}", peer.attrs.public_ip));
            continue;
        }
        if ctx.kind == BackendType::Vxlan {
            if let Some(why) = claimed(peer, mac) {
                warnings.push(format!("ignoring peer {} ({}): {why}", peer.attrs.public_ip, peer.subnet));
                continue;
            }
        }
        let dst = IpNet::V4(peer.subnet);
        let peer_ip = IpAddr::V4(peer.attrs.public_ip);
        let direct = RouteSpec::new(dst).via(peer_ip).dev(ctx.uplink).protocol(RTPROT_WEFT);
        match ctx.kind {
            BackendType::HostGw => {
                if !ctx.on_link(peer.attrs.public_ip) {
                    warnings.push(format!(
                        "ignoring peer {}: host-gw needs every node on one L2 segment, and {} is not on the uplink's",
                        peer.attrs.public_ip, peer.attrs.public_ip
                    ));
                    continue;
                }
                out.routes.push(direct);
            }
            BackendType::Vxlan => {
                if ctx.direct_routing && ctx.on_link(peer.attrs.public_ip) {
                    out.routes.push(direct);
                    continue;
                }
                let Some(vtep) = ctx.vtep else { continue };
                let Some(mac) = peer.vxlan().and_then(|d| parse_mac(&d.vtep_mac)) else {
                    warnings.push(format!(
                        "ignoring peer {}: lease {} has no valid VtepMAC",
                        peer.attrs.public_ip, peer.subnet
                    ));
                    continue;
                };
                let gw = IpAddr::V4(peer.subnet.network());
                out.neighbours.push((gw, mac));
                out.fdb.push((mac, peer_ip));
                out.routes.push(RouteSpec::new(dst).via(gw).dev(vtep).onlink().protocol(RTPROT_WEFT));
            }
        }
    }
    (out, warnings)
}

/// Whether `lease` shares its VTEP MAC with a lease of another node among `others`: then a
/// change of it cannot be applied on its own (which of them counts depends on both).
pub fn shares_vtep_mac(lease: &Lease, others: &[&Lease]) -> bool {
    let Some(mac) = vtep_mac(lease) else { return false };
    others
        .iter()
        .any(|o| o.attrs.public_ip != lease.attrs.public_ip && vtep_mac(o).is_some_and(|m| m.eq_ignore_ascii_case(mac)))
}

/// A lease's `VtepMAC` as written (read in place: this runs over every lease per event).
fn vtep_mac(lease: &Lease) -> Option<&str> {
    lease.attrs.backend_data.get("VtepMAC").and_then(serde_json::Value::as_str)
}

/// The MTU pods get: the uplink's minus the encapsulation overhead.
pub fn pod_mtu(kind: BackendType, uplink_mtu: u32) -> u32 {
    match kind {
        BackendType::Vxlan => uplink_mtu.saturating_sub(50),
        BackendType::HostGw => uplink_mtu,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use weft_lease::LeaseAttrs;

    use super::*;

    fn lease(subnet: &str, ip: &str, mac: &str) -> Lease {
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

    fn ctx<'a>(kind: BackendType, nets: &'a [Ipv4Net], direct: bool) -> Context<'a> {
        Context {
            kind,
            network: "198.19.0.0/16".parse().unwrap(),
            subnet_len: 24,
            own_subnet: "198.19.1.0/24".parse().unwrap(),
            own_ip: "198.18.0.1".parse().unwrap(),
            uplink: 2,
            uplink_nets: nets,
            vtep: Some(9),
            direct_routing: direct,
        }
    }

    #[test]
    fn vxlan_per_peer_neighbour_fdb_onlink_route() {
        let nets = ["198.18.0.0/24".parse().unwrap()];
        let peers = [
            lease("198.19.1.0/24", "198.18.0.1", "0a:00:00:00:00:01"),
            lease("198.19.2.0/24", "198.18.0.2", "0a:00:00:00:00:02"),
        ];
        let (d, warnings) = desired(&ctx(BackendType::Vxlan, &nets, false), &peers);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(d.neighbours, vec![("198.19.2.0".parse().unwrap(), [10, 0, 0, 0, 0, 2])]);
        assert_eq!(d.fdb, vec![([10, 0, 0, 0, 0, 2], "198.18.0.2".parse().unwrap())]);
        assert_eq!(d.routes.len(), 1);
        let r = &d.routes[0];
        assert!(
            r.onlink
                && r.oif == Some(9)
                && r.gateway == Some("198.19.2.0".parse().unwrap())
                && r.protocol == RTPROT_WEFT
        );
        // DirectRouting: a peer on the same segment gets a plain route over the uplink.
        let (d, _) = desired(&ctx(BackendType::Vxlan, &nets, true), &peers);
        assert!(d.neighbours.is_empty() && d.fdb.is_empty());
        assert_eq!(d.routes[0].gateway, Some("198.18.0.2".parse().unwrap()));
        assert_eq!(d.routes[0].oif, Some(2));
    }

    #[test]
    fn host_gw_routes_and_unreachable_peers() {
        let nets = ["198.18.0.0/24".parse().unwrap()];
        let peers = [lease("198.19.2.0/24", "198.18.0.2", "x"), lease("198.19.3.0/24", "198.18.5.3", "x")];
        let (d, warnings) = desired(&ctx(BackendType::HostGw, &nets, false), &peers);
        assert_eq!(d.routes.len(), 1);
        assert_eq!(d.routes[0].gateway, Some("198.18.0.2".parse().unwrap()));
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("198.18.5.3") && warnings[0].contains("L2"), "{warnings:?}");
    }

    #[test]
    fn bad_peers_are_ignored_with_warnings() {
        let nets = ["198.18.0.0/24".parse().unwrap()];
        let peers = [
            lease("10.0.0.0/24", "198.18.0.5", "0a:00:00:00:00:05"),
            lease("198.19.1.0/25", "198.18.0.6", "0a:00:00:00:00:06"),
            lease("198.19.7.0/24", "198.18.0.1", "0a:00:00:00:00:07"),
            lease("198.19.8.0/24", "198.18.0.8", "not-a-mac"),
            // This node's subnet claimed by another node.
            lease("198.19.1.0/24", "198.18.0.9", "0a:00:00:00:00:09"),
        ];
        let (d, warnings) = desired(&ctx(BackendType::Vxlan, &nets, false), &peers);
        assert_eq!(d, Desired::default());
        assert_eq!(warnings.len(), 5, "{warnings:?}");
        for expected in
            ["outside the network", "not a /24", "this node's address", "VtepMAC", "overlaps this node's subnet"]
        {
            assert!(warnings.iter().any(|w| w.contains(expected)), "no warning says {expected:?}: {warnings:?}");
        }
    }

    /// Two leases with one VTEP MAC and different public IPs (one of them stale or forged): the
    /// older claim is programmed, whatever order the leases come in, and the other is reported.
    #[test]
    fn a_vtep_mac_claimed_twice_goes_to_the_older_lease() {
        let nets = ["198.18.0.0/24".parse().unwrap()];
        let mut older = lease("198.19.5.0/24", "198.18.0.5", "0a:00:00:00:00:05");
        older.created = Some(10);
        let mut younger = lease("198.19.3.0/24", "198.18.0.9", "0A:00:00:00:00:05");
        younger.created = Some(20);
        for peers in [[older.clone(), younger.clone()], [younger.clone(), older.clone()]] {
            let (d, warnings) = desired(&ctx(BackendType::Vxlan, &nets, false), &peers);
            assert_eq!(d.fdb, vec![([10, 0, 0, 0, 0, 5], "198.18.0.5".parse().unwrap())]);
            assert_eq!(d.routes.len(), 1);
            assert_eq!(warnings.len(), 1, "{warnings:?}");
            assert!(
                warnings[0].contains("198.18.0.9") && warnings[0].contains("older lease 198.19.5.0/24"),
                "{warnings:?}"
            );
        }
        assert!(shares_vtep_mac(&younger, &[&older]));
        assert!(!shares_vtep_mac(&younger, &[&younger]));
    }

    #[test]
    fn mtu() {
        assert_eq!(pod_mtu(BackendType::Vxlan, 1500), 1450);
        assert_eq!(pod_mtu(BackendType::HostGw, 1500), 1500);
    }
}
