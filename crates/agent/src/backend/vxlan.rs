//! `vxlan`: one VXLAN device (`weft.<VNI>`, no learning) and, per peer, a permanent neighbour
//! (peer subnet's `.0` → peer VTEP MAC), an FDB entry (peer VTEP MAC → peer public IP) and an
//! onlink route (peer subnet via `.0` on the device). With `DirectRouting`, a peer on the same
//! L2 segment gets a plain route via its IP over the uplink instead. 50 bytes of overhead.
//!
//! One VTEP MAC, one node: of leases that claim one MAC with different public IPs (a stale or
//! forged lease), the older claim counts, so the FDB entry never alternates between them.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};
use serde_json::{json, Value};
use weft_dataplane::{format_mac, parse_mac};
use weft_lease::Lease;
use weft_netconf::{invalid_option, Options};

use super::{Backend, Node, PeerState, Registration, Setup};
use crate::model::{DeviceSpec, Fdb, Neighbour, Route};
use crate::{vtep, Result};

pub const REGISTRATION: Registration = Registration { name: "vxlan", build };

const KEYS: &[&str] = &["VNI", "Port", "DirectRouting"];
/// flannel's settings weft does not implement.
const FLANNEL_ONLY: &[&str] = &["GBP", "Learning", "MTU", "MacPrefix"];

#[derive(Debug)]
pub struct Vxlan {
    /// Routed mode's fallback: peers on the uplink's segment are not this backend's.
    pub(super) off_link_only: bool,
    vni: u32,
    port: u16,
    direct_routing: bool,
    mac: [u8; 6],
}

fn build(options: Options<'_>, setup: &Setup<'_>, warnings: &mut Vec<String>) -> Result<Box<dyn Backend>> {
    options.unknown(KEYS, FLANNEL_ONLY, "Backend (vxlan)", warnings);
    Ok(Box::new(Vxlan::from_options(&options, setup)?))
}

impl Vxlan {
    /// The device and claim from `VNI` and `Port` (and `DirectRouting`), the MAC kept in the
    /// state directory.
    pub(super) fn from_options(options: &Options<'_>, setup: &Setup<'_>) -> Result<Vxlan> {
        let vni = options.number("VNI")?.unwrap_or(1);
        if vni == 0 || vni >= 1 << 24 {
            return Err(invalid_option(format!("VNI {vni} out of range 1-16777215")).into());
        }
        let port = super::port(options, 8472)?;
        let direct_routing = options.boolean("DirectRouting")?.unwrap_or(false);
        let mac = vtep::stable_mac(setup.state_dir, vtep::random_mac)?;
        Ok(Vxlan { off_link_only: false, vni: vni as u32, port, direct_routing, mac })
    }
}

/// A lease's `VtepMAC` as written (read in place: this runs over every lease per event).
fn vtep_mac(lease: &Lease) -> Option<&str> {
    lease.attrs.backend_data.get("VtepMAC").and_then(Value::as_str)
}

impl Vxlan {
    fn name(&self) -> String {
        vtep::name(self.vni)
    }
}

impl Backend for Vxlan {
    fn name(&self) -> &'static str {
        "vxlan"
    }

    fn overhead(&self) -> u32 {
        50
    }

    fn lease_data(&self) -> Value {
        json!({"VNI": self.vni, "VtepMAC": format_mac(&self.mac)})
    }

    fn device(&self, node: &Node<'_>) -> Option<DeviceSpec> {
        Some(DeviceSpec::Vxlan {
            name: Vxlan::name(self),
            vni: self.vni,
            port: self.port,
            local: node.ip,
            uplink: node.uplink.to_string(),
            mtu: node.uplink_mtu.saturating_sub(self.overhead()),
            mac: self.mac,
            address: Ipv4Net::new(node.subnet.network(), 32).expect("a /32"),
        })
    }

    fn program(&self, node: &Node<'_>, peers: &[&Lease]) -> PeerState {
        let mut out = PeerState::default();
        // The claim that counts for each MAC (one pass).
        let macs: Vec<Option<String>> = peers.iter().map(|p| vtep_mac(p).map(str::to_lowercase)).collect();
        let mut owner: HashMap<&str, &Lease> = HashMap::new();
        for (peer, mac) in peers.iter().zip(&macs) {
            let Some(mac) = mac else { continue };
            let slot = owner.entry(mac.as_str()).or_insert(peer);
            if peer.outranks(slot) {
                *slot = peer;
            }
        }
        let dev = Vxlan::name(self);
        for (peer, mac) in peers.iter().copied().zip(&macs) {
            let dst = IpNet::V4(peer.subnet);
            let peer_ip = IpAddr::V4(peer.attrs.public_ip);
            if self.off_link_only && node.on_link(peer.attrs.public_ip) {
                continue;
            }
            if self.direct_routing && node.on_link(peer.attrs.public_ip) {
                out.state.routes.push(Route {
                    dst,
                    via: Some(peer_ip),
                    dev: node.uplink.to_string(),
                    onlink: false,
                    mtu: None,
                });
                out.programmed.push(peer.subnet);
                continue;
            }
            if let Some(o) =
                mac.as_deref().and_then(|m| owner.get(m)).filter(|o| o.attrs.public_ip != peer.attrs.public_ip)
            {
                out.ignore(format!(
                    "ignoring peer {} ({}): its VtepMAC {} belongs to the older lease {} of {}",
                    peer.attrs.public_ip,
                    peer.subnet,
                    mac.as_deref().unwrap_or_default(),
                    o.subnet,
                    o.attrs.public_ip
                ));
                continue;
            }
            // A unicast MAC that is not this node's own (the kernel refuses the others, and one
            // such lease would hold up every other peer's programming).
            let Some(mac) = vtep_mac(peer).and_then(parse_mac).filter(|m| m[0] & 1 == 0 && *m != [0; 6]) else {
                out.ignore(format!(
                    "ignoring peer {}: lease {} has no valid VtepMAC",
                    peer.attrs.public_ip, peer.subnet
                ));
                continue;
            };
            if mac == self.mac {
                out.ignore(format!(
                    "ignoring peer {}: lease {} has this node's own VtepMAC",
                    peer.attrs.public_ip, peer.subnet
                ));
                continue;
            }
            let gw = IpAddr::V4(peer.subnet.network());
            out.state.neighbours.push(Neighbour { dev: dev.clone(), ip: gw, mac });
            out.state.fdb.push(Fdb { dev: dev.clone(), mac, dst: peer_ip });
            out.state.routes.push(Route { dst, via: Some(gw), dev: dev.clone(), onlink: true, mtu: None });
            out.programmed.push(peer.subnet);
        }
        out
    }

    /// A VTEP MAC (in any case) belongs to one node.
    fn claim(&self, lease: &Lease) -> Option<String> {
        vtep_mac(lease).map(str::to_lowercase)
    }

    fn renew_claim(&mut self, setup: &Setup<'_>) -> Result<bool> {
        self.mac = vtep::new_mac(setup.state_dir, vtep::random_mac)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::desired;
    use super::super::tests::{backend_of, lease, node};
    use super::*;

    #[test]
    fn per_peer_neighbour_fdb_onlink_route_and_direct_routing() {
        let nets = ["198.18.0.0/24".parse().unwrap()];
        let (b, _) = backend_of(r#"{"Network": "198.19.0.0/16"}"#);
        let peers = [
            lease("198.19.1.0/24", "198.18.0.1", "0a:00:00:00:00:01"),
            lease("198.19.2.0/24", "198.18.0.2", "0a:00:00:00:00:02"),
        ];
        let refs: Vec<&Lease> = peers.iter().collect();
        let out = desired(b.as_ref(), &node(&nets), &refs);
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        let gw: IpAddr = "198.19.2.0".parse().unwrap();
        let mac = [10, 0, 0, 0, 0, 2];
        assert_eq!(out.state.neighbours, vec![Neighbour { dev: "weft.1".into(), ip: gw, mac }]);
        assert_eq!(out.state.fdb, vec![Fdb { dev: "weft.1".into(), mac, dst: "198.18.0.2".parse().unwrap() }]);
        assert_eq!(
            out.state.routes,
            vec![Route {
                dst: "198.19.2.0/24".parse().unwrap(),
                via: Some(gw),
                dev: "weft.1".into(),
                onlink: true,
                mtu: None
            }]
        );
        assert_eq!(out.programmed, vec!["198.19.2.0/24".parse::<Ipv4Net>().unwrap()]);
        let Some(DeviceSpec::Vxlan { mtu, address, .. }) = b.device(&node(&nets)) else { panic!() };
        assert_eq!((mtu, address.to_string().as_str()), (1450, "198.19.1.0/32"));

        let (b, _) = backend_of(r#"{"Network": "198.19.0.0/16", "Backend": {"DirectRouting": true}}"#);
        let out = desired(b.as_ref(), &node(&nets), &refs);
        assert!(out.state.neighbours.is_empty() && out.state.fdb.is_empty());
        assert_eq!(out.state.routes[0].via, Some("198.18.0.2".parse().unwrap()));
        assert_eq!(out.state.routes[0].dev, "eth0");
    }

    /// Two leases with one VTEP MAC and different public IPs (one of them stale or forged): the
    /// older claim is programmed, whatever order the leases come in, and the other is reported.
    #[test]
    fn a_vtep_mac_claimed_twice_goes_to_the_older_lease() {
        let nets = ["198.18.0.0/24".parse().unwrap()];
        let (b, _) = backend_of(r#"{"Network": "198.19.0.0/16"}"#);
        let mut older = lease("198.19.5.0/24", "198.18.0.5", "0a:00:00:00:00:05");
        older.created = Some(10);
        let mut younger = lease("198.19.3.0/24", "198.18.0.9", "0A:00:00:00:00:05");
        younger.created = Some(20);
        for peers in [[&older, &younger], [&younger, &older]] {
            let out = desired(b.as_ref(), &node(&nets), &peers);
            assert_eq!(out.state.fdb.len(), 1);
            assert_eq!(out.state.fdb[0].dst, "198.18.0.5".parse::<IpAddr>().unwrap());
            assert_eq!(out.state.routes.len(), 1);
            assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
            assert!(
                out.warnings[0].contains("198.18.0.9") && out.warnings[0].contains("older lease 198.19.5.0/24"),
                "{:?}",
                out.warnings
            );
        }
        assert_eq!(b.claim(&younger), b.claim(&older));
    }
}
