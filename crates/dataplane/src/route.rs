//! Routes. Routes weft owns carry a dedicated protocol number so reconcilers list and change only
//! their own.

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteMetric, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::error::Result;
use crate::socket::{Mode, Netlink};

/// The `proto` number of the agent's routes to peers' subnets (`ip route ... proto 0xc8`).
pub const RTPROT_WEFT: u8 = 200;
/// Each producer of routes has its own protocol number, so a reconciler lists and removes only
/// its own (`/etc/iproute2/rt_protos.d` may name them): peer routes...
pub const RTPROT_WEFT_PEERS: u8 = RTPROT_WEFT;
/// ... host routes to this node's pods (routed mode) ...
pub const RTPROT_WEFT_POD: u8 = 201;
/// ... routes learned over BGP ...
pub const RTPROT_WEFT_BGP: u8 = 202;
/// ... and blackholes for this node's own address blocks.
pub const RTPROT_WEFT_BLACKHOLE: u8 = 203;
/// `RTPROT_BOOT`, what `ip route add` uses; the reference plugins' routes carry it.
pub const RTPROT_BOOT: u8 = 3;
pub const RT_TABLE_MAIN: u8 = 254;

/// A route to add, delete, or as dumped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub onlink: bool,
    /// `scope link` when true (a route to a directly attached destination), else universe.
    pub link_scope: bool,
    pub protocol: u8,
    pub table: u8,
    pub metric: Option<u32>,
    /// The route's own MTU (`ip route ... mtu N`), if it has one.
    pub mtu: Option<u32>,
    /// The nexthop object it goes through (`ip route ... nhid N`), instead of a gateway.
    pub nexthop: Option<u32>,
    /// `ip route add blackhole ...`: packets to it are dropped here.
    pub blackhole: bool,
}

impl RouteSpec {
    /// A route to `dst` with defaults: main table, protocol boot, universe scope.
    pub fn new(dst: IpNet) -> RouteSpec {
        RouteSpec {
            dst: dst.trunc(),
            gateway: None,
            oif: None,
            onlink: false,
            link_scope: false,
            protocol: RTPROT_BOOT,
            table: RT_TABLE_MAIN,
            metric: None,
            mtu: None,
            nexthop: None,
            blackhole: false,
        }
    }

    /// A blackhole route (no gateway, no device).
    pub fn blackhole(mut self) -> Self {
        self.blackhole = true;
        self
    }

    pub fn via(mut self, gateway: IpAddr) -> Self {
        self.gateway = Some(gateway);
        self
    }

    pub fn dev(mut self, oif: u32) -> Self {
        self.oif = Some(oif);
        self
    }

    /// A route with no gateway on `oif`: `scope link`.
    pub fn link_scope(mut self) -> Self {
        self.link_scope = true;
        self
    }

    pub fn onlink(mut self) -> Self {
        self.onlink = true;
        self
    }

    /// Through nexthop object `id` (see [`crate::nexthop`]).
    pub fn nexthop(mut self, id: u32) -> Self {
        self.nexthop = Some(id);
        self
    }

    pub fn protocol(mut self, protocol: u8) -> Self {
        self.protocol = protocol;
        self
    }

    fn message(&self) -> RouteMessage {
        let family = if self.dst.addr().is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        msg.header.destination_prefix_length = self.dst.prefix_len();
        msg.header.table = self.table;
        msg.header.protocol = RouteProtocol::from(self.protocol);
        msg.header.scope = if self.link_scope { RouteScope::Link } else { RouteScope::Universe };
        msg.header.kind = if self.blackhole { RouteType::BlackHole } else { RouteType::Unicast };
        if self.onlink {
            msg.header.flags = RouteFlags::Onlink;
        }
        msg.attributes.push(RouteAttribute::Destination(route_address(self.dst.addr())));
        if let Some(gw) = self.gateway {
            msg.attributes.push(RouteAttribute::Gateway(route_address(gw)));
        }
        if let Some(oif) = self.oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        if let Some(metric) = self.metric {
            msg.attributes.push(RouteAttribute::Priority(metric));
        }
        if let Some(mtu) = self.mtu {
            msg.attributes.push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
        }
        if let Some(id) = self.nexthop {
            msg.attributes.push(RouteAttribute::NhId(id));
        }
        msg
    }

    pub(crate) fn from_message(msg: &RouteMessage) -> Option<RouteSpec> {
        let mut dst = None;
        let mut spec = RouteSpec {
            dst: IpNet::new(unspecified(msg.header.address_family)?, 0).ok()?,
            gateway: None,
            oif: None,
            onlink: msg.header.flags.contains(RouteFlags::Onlink),
            link_scope: msg.header.scope == RouteScope::Link,
            protocol: u8::from(msg.header.protocol),
            table: msg.header.table,
            metric: None,
            mtu: None,
            nexthop: None,
            blackhole: msg.header.kind == RouteType::BlackHole,
        };
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(a) => dst = address_of(a),
                RouteAttribute::Gateway(a) => spec.gateway = address_of(a),
                RouteAttribute::Oif(i) => spec.oif = Some(*i),
                RouteAttribute::Priority(p) => spec.metric = Some(*p),
                RouteAttribute::NhId(id) => spec.nexthop = Some(*id),
                RouteAttribute::Metrics(metrics) => {
                    spec.mtu = metrics.iter().find_map(|m| match m {
                        RouteMetric::Mtu(mtu) => Some(*mtu),
                        _ => None,
                    })
                }
                RouteAttribute::Table(t) => spec.table = u8::try_from(*t).unwrap_or(u8::MAX),
                _ => {}
            }
        }
        if let Some(dst) = dst {
            spec.dst = IpNet::new(dst, msg.header.destination_prefix_length).ok()?;
        }
        Some(spec)
    }
}

fn unspecified(family: AddressFamily) -> Option<IpAddr> {
    match family {
        AddressFamily::Inet => Some(IpAddr::from([0u8; 4])),
        AddressFamily::Inet6 => Some(IpAddr::from([0u16; 8])),
        _ => None,
    }
}

fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(v4) => RouteAddress::Inet(v4),
        IpAddr::V6(v6) => RouteAddress::Inet6(v6),
    }
}

fn address_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

impl Netlink {
    /// `ip route add ...`.
    pub fn add_route(&mut self, route: &RouteSpec) -> Result<()> {
        self.change(RouteNetlinkMessage::NewRoute(route.message()), Mode::Create, "add route", &route.dst)
    }

    /// `ip route replace ...`.
    pub fn replace_route(&mut self, route: &RouteSpec) -> Result<()> {
        self.change(RouteNetlinkMessage::NewRoute(route.message()), Mode::Replace, "replace route", &route.dst)
    }

    /// Puts `route` as its protocol's own: added, or replacing a route to the same destination
    /// (table, metric) only when that one has the same protocol — a plain replace takes any
    /// route to the destination, and another producer's (a BGP-learned or a hand-made one) is
    /// not this one's to take. `Ok(None)` when `route` is in place, `Ok(Some(protocol))` when
    /// another protocol holds the destination (nothing done).
    pub fn put_owned_route(&mut self, route: &RouteSpec) -> Result<Option<u8>> {
        match self.add_route(route) {
            Err(e) if e.is_exists() => {
                let held = self.holder(route)?;
                match held {
                    Some(protocol) if protocol != route.protocol => Ok(Some(protocol)),
                    _ => self.replace_route(route).map(|()| None),
                }
            }
            other => other.map(|()| None),
        }
    }

    /// The protocol of the route to `route`'s destination in its table (and metric), if there is
    /// one. Asked of the kernel for that destination alone (`ip route get fibmatch`), and only
    /// when its answer is another route (a longer prefix, another table) from a dump: a dump
    /// per call would make replacing n routes cost n dumps of a large table.
    fn holder(&mut self, route: &RouteSpec) -> Result<Option<u8>> {
        // No metric given means the kernel's default: 0 for IPv4, 1024 for IPv6.
        let default = if route.dst.addr().is_ipv4() { 0 } else { 1024 };
        let same = |x: &RouteSpec| {
            x.dst == route.dst
                && x.table == route.table
                && x.metric.unwrap_or(default) == route.metric.unwrap_or(default)
        };
        let mut req = RouteMessage::default();
        let (family, len) =
            if route.dst.addr().is_ipv4() { (AddressFamily::Inet, 32) } else { (AddressFamily::Inet6, 128) };
        req.header.address_family = family;
        req.header.destination_prefix_length = len;
        req.header.flags = RouteFlags::FibMatch;
        req.attributes.push(RouteAttribute::Destination(route_address(route.dst.network())));
        let matched =
            self.request(RouteNetlinkMessage::GetRoute(req), 0, "get route", &route.dst).ok().and_then(|replies| {
                replies.iter().find_map(|m| match m {
                    RouteNetlinkMessage::NewRoute(r) => RouteSpec::from_message(r),
                    _ => None,
                })
            });
        if let Some(found) = matched.filter(same) {
            return Ok(Some(found.protocol));
        }
        Ok(self.routes()?.into_iter().find(same).map(|x| x.protocol))
    }

    /// `ip route del ...`.
    pub fn delete_route(&mut self, route: &RouteSpec) -> Result<()> {
        self.change(RouteNetlinkMessage::DelRoute(route.message()), Mode::Modify, "delete route", &route.dst)
    }

    /// The unicast routes of the main table, both families (`ip route show; ip -6 route show`).
    pub fn routes(&mut self) -> Result<Vec<RouteSpec>> {
        self.routes_of(RouteType::Unicast)
    }

    /// The blackhole routes of the main table, both families.
    pub fn blackholes(&mut self) -> Result<Vec<RouteSpec>> {
        self.routes_of(RouteType::BlackHole)
    }

    fn routes_of(&mut self, kind: RouteType) -> Result<Vec<RouteSpec>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = RouteMessage::default();
            req.header.address_family = family;
            for msg in self.dump(RouteNetlinkMessage::GetRoute(req), "dump routes")? {
                if let RouteNetlinkMessage::NewRoute(r) = msg {
                    if r.header.kind == kind && r.header.table == RT_TABLE_MAIN {
                        out.extend(RouteSpec::from_message(&r));
                    }
                }
            }
        }
        Ok(out)
    }
}
