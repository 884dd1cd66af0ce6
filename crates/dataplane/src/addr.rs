//! Interface addresses.

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::error::Result;
use crate::socket::{Mode, Netlink};

/// An address on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub net: IpNet,
}

fn message(index: u32, net: &IpNet) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.index = index;
    msg.header.prefix_len = net.prefix_len();
    match net {
        IpNet::V4(v4) => {
            msg.header.family = AddressFamily::Inet;
            msg.attributes.push(AddressAttribute::Local(IpAddr::V4(v4.addr())));
            msg.attributes.push(AddressAttribute::Address(IpAddr::V4(v4.addr())));
            if v4.prefix_len() < 31 {
                msg.attributes.push(AddressAttribute::Broadcast(v4.broadcast()));
            }
        }
        IpNet::V6(v6) => {
            msg.header.family = AddressFamily::Inet6;
            msg.attributes.push(AddressAttribute::Address(IpAddr::V6(v6.addr())));
        }
    }
    msg
}

impl Netlink {
    /// `ip addr add NET dev INDEX` (IPv6 without duplicate address detection: the address is
    /// usable at once, and the plugins own these addresses).
    pub fn add_address(&mut self, index: u32, net: &IpNet) -> Result<()> {
        let mut msg = message(index, net);
        if net.addr().is_ipv6() {
            msg.header.flags = AddressHeaderFlags::Nodad;
            msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.change(RouteNetlinkMessage::NewAddress(msg), Mode::Create, "add address", net)
    }

    /// `ip addr del NET dev INDEX`.
    pub fn delete_address(&mut self, index: u32, net: &IpNet) -> Result<()> {
        self.change(RouteNetlinkMessage::DelAddress(message(index, net)), Mode::Modify, "delete address", net)
    }

    /// The addresses of `index`, or of every link (`ip addr show`). Link-local IPv6 included.
    pub fn addresses(&mut self, index: Option<u32>) -> Result<Vec<Address>> {
        let msgs = self.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()), "dump addresses")?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => Some(a),
                _ => None,
            })
            .filter(|a| index.is_none_or(|i| a.header.index == i))
            .filter_map(|a| {
                let ip = a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let ip = ip.or_else(|| {
                    a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                })?;
                let net = IpNet::new(ip, a.header.prefix_len).ok()?;
                Some(Address { index: a.header.index, net })
            })
            .collect())
    }
}
