//! `host-gw`: per peer a route to its subnet via its public IP over the uplink; no device, no
//! overhead. Every node must be on one L2 segment: a peer that is not on the uplink's is ignored
//! with a warning.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;
use weft_lease::Lease;
use weft_netconf::Options;

use super::{Backend, Node, PeerState, Registration, Setup};
use crate::model::{DeviceSpec, Route};
use crate::Result;

pub const REGISTRATION: Registration = Registration { name: "host-gw", build };

#[derive(Debug)]
pub struct HostGw;

fn build(options: Options<'_>, _setup: &Setup<'_>, warnings: &mut Vec<String>) -> Result<Box<dyn Backend>> {
    options.unknown(&[], &[], "Backend (host-gw)", warnings);
    Ok(Box::new(HostGw))
}

impl Backend for HostGw {
    fn name(&self) -> &'static str {
        "host-gw"
    }

    fn overhead(&self) -> u32 {
        0
    }

    fn lease_data(&self) -> Value {
        Value::Null
    }

    fn device(&self, _node: &Node<'_>) -> Option<DeviceSpec> {
        None
    }

    fn program(&self, node: &Node<'_>, peers: &[&Lease]) -> PeerState {
        let mut out = PeerState::default();
        for peer in peers {
            let ip = peer.attrs.public_ip;
            if !node.on_link(ip) {
                out.ignore(format!(
                    "ignoring peer {ip}: host-gw needs every node on one L2 segment, and {ip} is not on the uplink's"
                ));
                continue;
            }
            out.state.routes.push(Route {
                dst: IpNet::V4(peer.subnet),
                via: Some(IpAddr::V4(ip)),
                dev: node.uplink.to_string(),
                onlink: false,
                mtu: None,
            });
            out.programmed.push(peer.subnet);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::desired;
    use super::super::tests::{backend_of, lease, node};
    use super::*;

    #[test]
    fn routes_via_peers_and_unreachable_peers_ignored() {
        let nets = ["198.18.0.0/24".parse().unwrap()];
        let (b, _) = backend_of(r#"{"Network": "198.19.0.0/16", "Backend": {"Type": "host-gw"}}"#);
        let mut peers = [lease("198.19.2.0/24", "198.18.0.2", "x"), lease("198.19.3.0/24", "198.18.5.3", "x")];
        peers.iter_mut().for_each(|p| p.attrs.backend_type = "host-gw".into());
        let refs: Vec<&Lease> = peers.iter().collect();
        let out = desired(b.as_ref(), &node(&nets), &refs);
        assert_eq!(out.state.routes.len(), 1);
        assert_eq!(out.state.routes[0].via, Some("198.18.0.2".parse().unwrap()));
        assert_eq!(out.state.routes[0].dev, "eth0");
        assert_eq!(out.warnings.len(), 1);
        assert!(out.warnings[0].contains("198.18.5.3") && out.warnings[0].contains("L2"), "{:?}", out.warnings);
        assert_eq!((b.overhead(), b.device(&node(&nets))), (0, None));
    }
}
