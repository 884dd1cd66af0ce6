//! `udp` (flannel's TUN mode): a TUN device (`weft-udp`, the node subnet's `.0/32`, the cluster
//! network routed through it) and a userspace forwarder that puts each packet, whole, into a
//! UDP datagram to the node holding its destination (port 8285 by default), and admits only
//! datagrams from current peers, for this node. Per peer, an entry of the forwarder's table.
//! 28 bytes of overhead; the lease carries no BackendData, as flannel's.

use std::path::PathBuf;

use ipnet::{IpNet, Ipv4Net};
use serde_json::Value;
use weft_lease::Lease;
use weft_netconf::Options;

use super::{Backend, Node, PeerState, Registration, Setup};
use crate::model::{DeviceSpec, Route, Tunnel};
use crate::Result;

pub const REGISTRATION: Registration = Registration { name: "udp", build };

/// The TUN device's name.
pub const DEVICE: &str = "weft-udp";

#[derive(Debug)]
pub struct Udp {
    port: u16,
    /// `KernelSegmentation` (default true): large TCP packets go to the kernel (or the NIC) to
    /// be cut into datagrams where they leave the node, not cut by the forwarder.
    kernel_segmentation: bool,
    /// The forwarder's control socket.
    socket: PathBuf,
}

fn build(options: Options<'_>, setup: &Setup<'_>, warnings: &mut Vec<String>) -> Result<Box<dyn Backend>> {
    options.unknown(&["Port", "KernelSegmentation"], &[], "Backend (udp)", warnings);
    let port = super::port(&options, 8285)?;
    let kernel_segmentation = options.boolean("KernelSegmentation")?.unwrap_or(true);
    Ok(Box::new(Udp { port, kernel_segmentation, socket: setup.state_dir.join("udp-forwarder.sock") }))
}

impl Backend for Udp {
    fn name(&self) -> &'static str {
        "udp"
    }

    fn overhead(&self) -> u32 {
        28
    }

    fn lease_data(&self) -> Value {
        Value::Null
    }

    fn device(&self, node: &Node<'_>) -> Option<DeviceSpec> {
        Some(DeviceSpec::Tun {
            name: DEVICE.to_string(),
            mtu: node.uplink_mtu.saturating_sub(self.overhead()),
            address: Ipv4Net::new(node.subnet.network(), 32).unwrap_or(node.subnet),
            subnet: node.subnet,
            network: node.network,
            port: self.port,
            socket: self.socket.clone(),
            kernel_segmentation: self.kernel_segmentation,
        })
    }

    fn program(&self, node: &Node<'_>, peers: &[&Lease]) -> PeerState {
        let mut out = PeerState::default();
        // The whole cluster network goes to the TUN (this node's subnet, on its bridge, is more
        // specific and stays there).
        out.state.routes.push(Route {
            dst: IpNet::V4(node.network),
            via: None,
            dev: DEVICE.to_string(),
            onlink: false,
            mtu: None,
        });
        for peer in peers {
            out.state.tunnel.push(Tunnel { dev: DEVICE.to_string(), subnet: peer.subnet, ip: peer.attrs.public_ip });
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
    fn a_route_to_the_network_and_an_entry_per_peer() {
        let nets = ["198.18.0.0/24".parse().unwrap()];
        let (b, warnings) =
            backend_of(r#"{"Network": "198.19.0.0/16", "Backend": {"Type": "udp", "Port": 9000, "VNI": 1}}"#);
        assert_eq!(warnings.len(), 1, "udp has no VNI: {warnings:?}");
        let mut peers = [lease("198.19.2.0/24", "198.18.0.2", "x"), lease("198.19.3.0/24", "198.18.5.3", "x")];
        peers.iter_mut().for_each(|p| {
            p.attrs.backend_type = "udp".into();
            p.attrs.backend_data = Value::Null;
        });
        let refs: Vec<&Lease> = peers.iter().collect();
        let out = desired(b.as_ref(), &node(&nets), &refs);
        assert!(out.warnings.is_empty(), "any routable peer will do: {:?}", out.warnings);
        assert_eq!(out.state.routes.len(), 1);
        assert_eq!(out.state.routes[0].dst, "198.19.0.0/16".parse::<IpNet>().unwrap());
        assert_eq!(out.state.routes[0].dev, DEVICE);
        let entries: Vec<(String, String)> =
            out.state.tunnel.iter().map(|t| (t.subnet.to_string(), t.ip.to_string())).collect();
        assert_eq!(
            entries,
            [("198.19.2.0/24".into(), "198.18.0.2".into()), ("198.19.3.0/24".into(), "198.18.5.3".into())]
        );
        assert_eq!((b.overhead(), b.lease_data()), (28, Value::Null));
        let Some(DeviceSpec::Tun { mtu, address, port, .. }) = b.device(&node(&nets)) else { panic!() };
        assert_eq!((mtu, address.to_string(), port), (1472, "198.19.1.0/32".to_string(), 9000));
        // No peers: the route all the same.
        assert_eq!(desired(b.as_ref(), &node(&nets), &[]).state.routes.len(), 1);
        // A vxlan lease is not a udp peer.
        let vx = lease("198.19.4.0/24", "198.18.0.4", "0a:00:00:00:00:04");
        assert_eq!(desired(b.as_ref(), &node(&nets), &[&vx]).warnings.len(), 1);
    }
}
