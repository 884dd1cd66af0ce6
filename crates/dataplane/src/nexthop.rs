//! Nexthop objects (`ip nexthop`, Linux 5.3 and later): a gateway and device the kernel checks
//! once, which routes then name by id (`ip route add PREFIX nhid ID`) instead of each route
//! carrying a gateway the kernel looks up again. A BGP table of many routes through few next hops
//! goes into the kernel faster this way. netlink-packet-route does not model these messages;
//! they are small and encoded here.

use std::net::IpAddr;

use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::error::{DataplaneError, Result};
use crate::route::RouteSpec;
use crate::socket::{Mode, Netlink};
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP};

const RTM_NEWNEXTHOP: u16 = 104;
const RTM_DELNEXTHOP: u16 = 105;
const RTM_GETNEXTHOP: u16 = 106;
const NHA_ID: u16 = 1;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// The netlink header and `struct nhmsg` before a nexthop's attributes.
const HEADER: usize = 16 + 8;

/// A nexthop object: a gateway on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nexthop {
    pub id: u32,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    /// Who made it, as for routes (`ip nexthop ... proto N`).
    pub protocol: u8,
}

fn attribute(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    buf.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// `struct nhmsg`: family, scope, protocol, reserved, flags.
fn nhmsg(family: u8, protocol: u8) -> Vec<u8> {
    vec![family, 0, protocol, 0, 0, 0, 0, 0]
}

/// Decodes one nexthop message (header included); None for anything else.
fn decode(message: &[u8]) -> Option<Nexthop> {
    if message.len() < HEADER || u16::from_ne_bytes([message[4], message[5]]) != RTM_NEWNEXTHOP {
        return None;
    }
    let family = message[16];
    let mut nh = Nexthop { id: 0, gateway: None, oif: None, protocol: message[18] };
    let mut rest = &message[HEADER..];
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            break;
        }
        let value = &rest[4..len];
        let u32_value = || value.get(..4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        match kind {
            NHA_ID => nh.id = u32_value()?,
            NHA_OIF => nh.oif = u32_value(),
            NHA_GATEWAY => {
                nh.gateway = match (family, value.len()) {
                    (AF_INET, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(value).ok()?)),
                    (AF_INET6, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(value).ok()?)),
                    _ => None,
                }
            }
            _ => {}
        }
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    Some(nh)
}

impl Netlink {
    /// `ip nexthop add id ID via GATEWAY dev OIF proto PROTOCOL`; fails with EEXIST when the id
    /// is taken. A gateway must be directly reachable on `oif`.
    pub fn add_nexthop(&mut self, nh: &Nexthop) -> Result<()> {
        let family = match nh.gateway {
            Some(IpAddr::V4(_)) => AF_INET,
            Some(IpAddr::V6(_)) => AF_INET6,
            None => AF_UNSPEC,
        };
        let mut body = nhmsg(family, nh.protocol);
        attribute(&mut body, NHA_ID, &nh.id.to_ne_bytes());
        if let Some(oif) = nh.oif {
            attribute(&mut body, NHA_OIF, &oif.to_ne_bytes());
        }
        if let Some(gw) = nh.gateway {
            attribute(&mut body, NHA_GATEWAY, &octets(gw));
        }
        let flags = NLM_F_ACK | Mode::Create.flags();
        self.request_raw(RTM_NEWNEXTHOP, flags, &body, "add nexthop", &nh.id, |_| Ok(None::<()>)).map(drop)
    }

    /// `ip nexthop del id ID`: the routes that use it go with it.
    pub fn delete_nexthop(&mut self, id: u32) -> Result<()> {
        let mut body = nhmsg(AF_UNSPEC, 0);
        attribute(&mut body, NHA_ID, &id.to_ne_bytes());
        self.request_raw(RTM_DELNEXTHOP, NLM_F_ACK, &body, "delete nexthop", &id, |_| Ok(None::<()>)).map(drop)
    }

    /// Every nexthop object (`ip nexthop show`).
    pub fn nexthops(&mut self) -> Result<Vec<Nexthop>> {
        let body = nhmsg(AF_UNSPEC, 0);
        self.request_raw(RTM_GETNEXTHOP, NLM_F_DUMP, &body, "dump nexthops", &"", |m| Ok(decode(m)))
    }

    /// Where the kernel sends a packet for `dst` (`ip route get DST`): the route it takes.
    pub fn route_get(&mut self, dst: IpAddr) -> Result<RouteSpec> {
        let mut req = RouteMessage::default();
        let (family, len, addr) = match dst {
            IpAddr::V4(v4) => (AddressFamily::Inet, 32, RouteAddress::Inet(v4)),
            IpAddr::V6(v6) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(v6)),
        };
        req.header.address_family = family;
        req.header.destination_prefix_length = len;
        req.attributes.push(RouteAttribute::Destination(addr));
        let replies = self.request(RouteNetlinkMessage::GetRoute(req), 0, "get route", &dst)?;
        replies
            .iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => RouteSpec::from_message(r),
                _ => None,
            })
            .ok_or_else(|| DataplaneError::Protocol(format!("no route to {dst} in the kernel's answer")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_decodes_a_nexthop() {
        let mut message = vec![0u8; 16];
        message[4..6].copy_from_slice(&RTM_NEWNEXTHOP.to_ne_bytes());
        message.extend(nhmsg(AF_INET, 202));
        attribute(&mut message, NHA_ID, &7u32.to_ne_bytes());
        attribute(&mut message, NHA_OIF, &3u32.to_ne_bytes());
        attribute(&mut message, NHA_GATEWAY, &[198, 18, 0, 2]);
        let nh = decode(&message).unwrap();
        assert_eq!(nh, Nexthop { id: 7, gateway: Some("198.18.0.2".parse().unwrap()), oif: Some(3), protocol: 202 });
        // A truncated attribute ends the walk without a panic; a message of another type is none.
        assert!(decode(&message[..message.len() - 3]).is_some());
        message[4] = 0;
        assert!(decode(&message).is_none());
    }
}
