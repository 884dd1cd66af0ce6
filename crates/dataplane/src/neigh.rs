//! Neighbours (`ip neigh`) and bridge forwarding entries (`bridge fdb`), as the VXLAN backend
//! programs them per peer.

use std::net::IpAddr;

use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::RouteType;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::error::Result;
use crate::format_mac;
use crate::socket::{Mode, Netlink};

/// A neighbour entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub index: u32,
    pub ip: IpAddr,
    pub mac: Vec<u8>,
    pub permanent: bool,
}

/// A forwarding entry of a device (`bridge fdb`): a MAC and, for a VXLAN device, the remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbEntry {
    pub index: u32,
    pub mac: Vec<u8>,
    pub dst: Option<IpAddr>,
    pub permanent: bool,
}

impl FdbEntry {
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }
}

fn neigh_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

fn ip_of(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        NeighbourAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        NeighbourAddress::Other(bytes) => match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}

fn neighbour_message(index: u32, ip: IpAddr, mac: Option<&[u8]>) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.kind = RouteType::Unicast;
    msg.attributes.push(NeighbourAttribute::Destination(neigh_address(ip)));
    if let Some(mac) = mac {
        msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    }
    msg
}

fn fdb_message(index: u32, mac: &[u8], dst: Option<IpAddr>) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    if let Some(dst) = dst {
        msg.attributes.push(NeighbourAttribute::Destination(neigh_address(dst)));
    }
    msg
}

impl Netlink {
    /// `ip neigh replace IP lladdr MAC dev INDEX nud permanent`.
    pub fn replace_neighbour(&mut self, index: u32, ip: IpAddr, mac: &[u8]) -> Result<()> {
        let msg = neighbour_message(index, ip, Some(mac));
        self.change(RouteNetlinkMessage::NewNeighbour(msg), Mode::Replace, "replace neighbour", &ip)
    }

    /// `ip neigh del IP dev INDEX`.
    pub fn delete_neighbour(&mut self, index: u32, ip: IpAddr) -> Result<()> {
        let msg = neighbour_message(index, ip, None);
        self.change(RouteNetlinkMessage::DelNeighbour(msg), Mode::Modify, "delete neighbour", &ip)
    }

    /// `ip neigh show [dev INDEX]` (both families).
    pub fn neighbours(&mut self, index: Option<u32>) -> Result<Vec<Neighbour>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = NeighbourMessage::default();
            req.header.family = family;
            for msg in self.dump(RouteNetlinkMessage::GetNeighbour(req), "dump neighbours")? {
                let RouteNetlinkMessage::NewNeighbour(n) = msg else { continue };
                if index.is_some_and(|i| n.header.ifindex != i) {
                    continue;
                }
                let mut ip = None;
                let mut mac = Vec::new();
                for attr in &n.attributes {
                    match attr {
                        NeighbourAttribute::Destination(a) => ip = ip_of(a),
                        NeighbourAttribute::LinkLayerAddress(m) => mac.clone_from(m),
                        _ => {}
                    }
                }
                if let Some(ip) = ip {
                    let permanent = n.header.state == NeighbourState::Permanent;
                    out.push(Neighbour { index: n.header.ifindex, ip, mac, permanent });
                }
            }
        }
        Ok(out)
    }

    /// `bridge fdb replace MAC dev INDEX [dst IP] self permanent`.
    pub fn replace_fdb(&mut self, index: u32, mac: &[u8], dst: Option<IpAddr>) -> Result<()> {
        let object = format_mac(mac);
        self.change(
            RouteNetlinkMessage::NewNeighbour(fdb_message(index, mac, dst)),
            Mode::Replace,
            "replace fdb",
            &object,
        )
    }

    /// `bridge fdb del MAC dev INDEX [dst IP] self`.
    pub fn delete_fdb(&mut self, index: u32, mac: &[u8], dst: Option<IpAddr>) -> Result<()> {
        let object = format_mac(mac);
        self.change(
            RouteNetlinkMessage::DelNeighbour(fdb_message(index, mac, dst)),
            Mode::Modify,
            "delete fdb",
            &object,
        )
    }

    /// `bridge fdb show dev INDEX`.
    pub fn fdb(&mut self, index: u32) -> Result<Vec<FdbEntry>> {
        let mut req = NeighbourMessage::default();
        req.header.family = AddressFamily::Bridge;
        let mut out = Vec::new();
        for msg in self.dump(RouteNetlinkMessage::GetNeighbour(req), "dump fdb")? {
            let RouteNetlinkMessage::NewNeighbour(n) = msg else { continue };
            if n.header.ifindex != index {
                continue;
            }
            let mut entry =
                FdbEntry { index, mac: Vec::new(), dst: None, permanent: n.header.state == NeighbourState::Permanent };
            for attr in &n.attributes {
                match attr {
                    NeighbourAttribute::LinkLayerAddress(m) => entry.mac.clone_from(m),
                    NeighbourAttribute::Destination(a) => entry.dst = ip_of(a),
                    _ => {}
                }
            }
            out.push(entry);
        }
        Ok(out)
    }
}
