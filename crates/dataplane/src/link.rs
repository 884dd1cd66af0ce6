//! Links: bridges, veth pairs, VXLAN devices, their state and bridge-port settings.

use std::os::fd::AsRawFd;

use std::net::Ipv4Addr;

use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, InfoVxlan, LinkAttribute, LinkExtentMask,
    LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::RouteNetlinkMessage;
use weft_netns::NetNs;

use crate::error::{DataplaneError, Result};
use crate::format_mac;
use crate::socket::{Mode, Netlink};

/// What kind of link a dump reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    Veth,
    Vxlan,
    Tun,
    Other(String),
    /// No `IFLA_INFO_KIND` (physical devices, loopback).
    None,
}

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub up: bool,
    pub promisc: bool,
    pub kind: LinkKind,
    /// The bridge (or other controller) this link is a port of.
    pub master: Option<u32>,
    /// For a veth: the peer's index (in the peer's namespace).
    pub peer_index: Option<u32>,
    /// For a veth whose peer is in another namespace: that namespace's id as this namespace
    /// knows it (`link-netnsid`); `None` when the peer is in this namespace.
    pub peer_netnsid: Option<i32>,
    /// The link's group (`ip link set group`); 0 is the default.
    pub group: u32,
    /// For a bridge port: whether hairpin mode is on.
    pub hairpin: Option<bool>,
    /// For a VXLAN device: its settings.
    pub vxlan: Option<VxlanInfo>,
}

/// What a VXLAN device is set to, as dumped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanInfo {
    pub vni: u32,
    pub port: u16,
    pub local: Option<Ipv4Addr>,
    pub learning: bool,
    pub underlay: Option<u32>,
}

/// A VXLAN device to create (`ip link add NAME type vxlan id VNI local IP dev UPLINK dstport
/// PORT nolearning`).
pub struct VxlanSpec<'a> {
    pub name: &'a str,
    pub vni: u32,
    pub port: u16,
    pub local: Ipv4Addr,
    pub underlay: u32,
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
}

impl Link {
    /// The MAC as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }
}

/// The attributes of a netlink attribute stream: `(type, value)`, nesting and byte-order flags
/// cleared from the type. Stops at the first malformed attribute.
fn attributes(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if bytes.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([bytes[0], bytes[1]]));
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & 0x3fff;
        if len < 4 || len > bytes.len() {
            return None;
        }
        let value = &bytes[4..len];
        bytes = &bytes[len.next_multiple_of(4).min(bytes.len())..];
        Some((kind, value))
    })
}

fn u32_of(value: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(value.get(..4)?.try_into().ok()?))
}

fn string_of(value: &[u8]) -> String {
    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

const RTM_NEWLINK: u16 = 16;
const IFINFO_OFFSET: usize = 16;
const ATTRS_OFFSET: usize = IFINFO_OFFSET + 16;
const IFF_UP: u32 = 0x1;
const IFF_PROMISC: u32 = 0x100;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINK: u16 = 5;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_GROUP: u16 = 27;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_INFO_SLAVE_DATA: u16 = 5;
const IFLA_BRPORT_MODE: u16 = 4;
const IFLA_VXLAN_ID: u16 = 1;
const IFLA_VXLAN_LINK: u16 = 3;
const IFLA_VXLAN_LOCAL: u16 = 4;
const IFLA_VXLAN_LEARNING: u16 = 7;
const IFLA_VXLAN_PORT: u16 = 15;

impl Link {
    /// A link from a whole `RTM_NEWLINK` message (header included), reading only the attributes
    /// a [`Link`] holds: a link reply is 1.5 KiB of mostly per-family settings, and decoding all
    /// of it costs more than the round trip. `None` for other message types.
    pub(crate) fn parse(message: &[u8]) -> Result<Option<Link>> {
        if message.len() < ATTRS_OFFSET || u16::from_ne_bytes([message[4], message[5]]) != RTM_NEWLINK {
            return Ok(None);
        }
        let info = &message[IFINFO_OFFSET..ATTRS_OFFSET];
        let flags = u32_of(&info[8..12]).unwrap_or(0);
        let mut link = Link {
            index: u32_of(&info[4..8]).unwrap_or(0),
            name: String::new(),
            mac: Vec::new(),
            mtu: 0,
            up: flags & IFF_UP != 0,
            promisc: flags & IFF_PROMISC != 0,
            kind: LinkKind::None,
            master: None,
            peer_index: None,
            peer_netnsid: None,
            group: 0,
            hairpin: None,
            vxlan: None,
        };
        for (kind, value) in attributes(&message[ATTRS_OFFSET..]) {
            match kind {
                IFLA_ADDRESS => link.mac = value.to_vec(),
                IFLA_IFNAME => link.name = string_of(value),
                IFLA_MTU => link.mtu = u32_of(value).unwrap_or(0),
                IFLA_LINK => link.peer_index = u32_of(value),
                IFLA_LINK_NETNSID => link.peer_netnsid = u32_of(value).map(|v| v as i32),
                IFLA_MASTER => link.master = u32_of(value),
                IFLA_GROUP => link.group = u32_of(value).unwrap_or(0),
                IFLA_LINKINFO => link.parse_link_info(value),
                _ => {}
            }
        }
        if link.name.is_empty() {
            return Err(DataplaneError::Protocol(format!("link {} reported without a name", link.index)));
        }
        Ok(Some(link))
    }

    fn parse_link_info(&mut self, value: &[u8]) {
        let mut data = None;
        for (kind, v) in attributes(value) {
            match kind {
                IFLA_INFO_KIND => {
                    self.kind = match string_of(v).as_str() {
                        "bridge" => LinkKind::Bridge,
                        "veth" => LinkKind::Veth,
                        "vxlan" => LinkKind::Vxlan,
                        "tun" => LinkKind::Tun,
                        other => LinkKind::Other(other.to_string()),
                    }
                }
                IFLA_INFO_DATA => data = Some(v),
                IFLA_INFO_SLAVE_DATA => {
                    self.hairpin = attributes(v)
                        .find(|(k, _)| *k == IFLA_BRPORT_MODE)
                        .and_then(|(_, m)| m.first())
                        .map(|m| *m != 0);
                }
                _ => {}
            }
        }
        // The kind comes first in practice, but the data is only read once it is known.
        if let (LinkKind::Vxlan, Some(data)) = (&self.kind, data) {
            let mut info = VxlanInfo::default();
            for (kind, v) in attributes(data) {
                match kind {
                    IFLA_VXLAN_ID => info.vni = u32_of(v).unwrap_or(0),
                    IFLA_VXLAN_LINK => info.underlay = u32_of(v),
                    IFLA_VXLAN_LOCAL => info.local = v.get(..4).map(|b| Ipv4Addr::new(b[0], b[1], b[2], b[3])),
                    IFLA_VXLAN_LEARNING => info.learning = v.first().is_some_and(|l| *l != 0),
                    IFLA_VXLAN_PORT => info.port = v.get(..2).map_or(0, |p| u16::from_be_bytes([p[0], p[1]])),
                    _ => {}
                }
            }
            self.vxlan = Some(info);
        }
    }
}

/// A veth pair to create: `name` here, `peer_name` in `peer_netns` (or here when `None`).
pub struct VethSpec<'a> {
    pub name: &'a str,
    pub peer_name: &'a str,
    pub peer_netns: Option<&'a NetNs>,
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
    pub peer_mac: Option<[u8; 6]>,
    /// The bridge this end joins at creation (`master BRIDGE`).
    pub master: Option<u32>,
    /// This end comes up at creation (the peer stays down).
    pub up: bool,
    /// The number of rx and tx queues of each end (`numtxqueues N numrxqueues N`). Unset, the
    /// kernel registers one of each per possible CPU and then removes all but one.
    pub queues: Option<u32>,
}

/// The attributes every new link may carry: name, MTU, MAC.
fn new_link_attributes(name: &str, mtu: Option<u32>, mac: Option<[u8; 6]>) -> Vec<LinkAttribute> {
    let mut attrs = vec![LinkAttribute::IfName(name.to_string())];
    attrs.extend(mtu.map(LinkAttribute::Mtu));
    attrs.extend(mac.map(|m| LinkAttribute::Address(m.to_vec())));
    attrs
}

/// Asks the kernel to leave the (large, unused) statistics out of a link reply.
fn skip_stats() -> LinkAttribute {
    LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats])
}

fn by_index(index: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg
}

impl Netlink {
    /// Every link (`ip link show`).
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(skip_stats());
        self.request_with(
            RouteNetlinkMessage::GetLink(msg),
            netlink_packet_core::NLM_F_DUMP,
            "dump links",
            &"",
            Link::parse,
        )
    }

    /// The link named `name` (`ip link show NAME`).
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.get_link(msg, &name)
    }

    /// The link with `index`.
    pub fn link_by_index(&mut self, index: u32) -> Result<Option<Link>> {
        self.get_link(by_index(index), &index)
    }

    /// One link, read the light way; `None` when there is none.
    fn get_link(&mut self, mut msg: LinkMessage, object: &dyn std::fmt::Display) -> Result<Option<Link>> {
        msg.attributes.push(skip_stats());
        match self.request_with(RouteNetlinkMessage::GetLink(msg), 0, "get link", object, Link::parse) {
            Ok(mut links) => Ok(links.pop()),
            Err(e) if e.is_not_found() || e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Like [`Netlink::link_by_name`], but a missing link is an error.
    pub fn require_link(&mut self, name: &str) -> Result<Link> {
        self.link_by_name(name)?.ok_or_else(|| DataplaneError::LinkNotFound(name.to_string()))
    }

    /// The id this namespace knows `netns` by (`ip netns list-id`; -1 when it has none): what a
    /// link's `peer_netnsid` is compared with.
    pub fn netnsid_of(&mut self, netns: &NetNs) -> Result<i32> {
        use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
        let mut msg = NsidMessage::default();
        msg.attributes.push(NsidAttribute::Fd(netns.as_raw_fd() as u32));
        let replies = self.request_with(RouteNetlinkMessage::GetNsId(msg), 0, "get netns id", &"", |bytes| {
            let msg = netlink_packet_core::NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                .map_err(|e| DataplaneError::Protocol(format!("decoding a netns id: {e}")))?;
            Ok(match msg.payload {
                netlink_packet_core::NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => {
                    m.attributes.iter().find_map(|a| match a {
                        NsidAttribute::Id(id) => Some(*id),
                        _ => None,
                    })
                }
                _ => None,
            })
        })?;
        replies.first().copied().ok_or_else(|| DataplaneError::Protocol("no netns id in the reply".into()))
    }

    /// `ip link add NAME [mtu MTU] [address MAC] type bridge`. A bridge given its MAC keeps it;
    /// one without takes the lowest MAC of its ports, and changes it as ports come and go.
    pub fn create_bridge(&mut self, name: &str, mtu: Option<u32>, mac: Option<[u8; 6]>) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.attributes = new_link_attributes(name, mtu, mac);
        msg.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]));
        self.change(RouteNetlinkMessage::NewLink(msg), Mode::Create, "create bridge", &name)
    }

    /// `ip link add NAME [mtu M] [address MAC] [master BR] [up] type veth peer name PEER [netns NS] [address MAC]`.
    /// Returns the new link as the kernel echoed it (kernels from 6.3 do; `None` before): its
    /// index, MAC and, in `peer_index`, the peer's index. Its `master` is not set yet then.
    pub fn create_veth(&mut self, spec: &VethSpec<'_>) -> Result<Option<Link>> {
        let mut peer = LinkMessage::default();
        peer.attributes = new_link_attributes(spec.peer_name, spec.mtu, spec.peer_mac);
        let queues = spec.queues.map(|q| [LinkAttribute::NumTxQueues(q), LinkAttribute::NumRxQueues(q)]);
        peer.attributes.extend(queues.clone().into_iter().flatten());
        if let Some(ns) = spec.peer_netns {
            peer.attributes.push(LinkAttribute::NetNsFd(ns.as_raw_fd()));
        }
        let mut msg = LinkMessage::default();
        if spec.up {
            // Only this end: the kernel brings the peer up before the pair is joined, which
            // fails (ENOTCONN); the peer is set up afterwards by its owner.
            msg.header.flags = LinkFlags::Up;
            msg.header.change_mask = LinkFlags::Up;
        }
        if let Some(master) = spec.master {
            msg.attributes.push(LinkAttribute::Controller(master));
        }
        msg.attributes.extend(new_link_attributes(spec.name, spec.mtu, spec.mac));
        msg.attributes.extend(queues.into_iter().flatten());
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        let object = format!("{} peer {}", spec.name, spec.peer_name);
        let echoed =
            self.change_echo(RouteNetlinkMessage::NewLink(msg), Mode::Create, "create veth", &object, Link::parse)?;
        Ok(echoed.into_iter().find(|l| l.name == spec.name))
    }

    /// `ip link set dev INDEX up` / `down`.
    pub fn set_up(&mut self, index: u32, up: bool) -> Result<()> {
        self.set_flag(index, LinkFlags::Up, up, "set link up")
    }

    /// `ip link set dev INDEX promisc on|off`.
    pub fn set_promisc(&mut self, index: u32, on: bool) -> Result<()> {
        self.set_flag(index, LinkFlags::Promisc, on, "set promisc")
    }

    fn set_flag(&mut self, index: u32, flag: LinkFlags, on: bool, op: &'static str) -> Result<()> {
        let mut msg = by_index(index);
        msg.header.change_mask = flag;
        if on {
            msg.header.flags = flag;
        }
        self.change(RouteNetlinkMessage::SetLink(msg), Mode::Modify, op, &index)
    }

    /// `ip link set dev INDEX master MASTER`.
    pub fn set_master(&mut self, index: u32, master: u32) -> Result<()> {
        let mut msg = by_index(index);
        msg.attributes.push(LinkAttribute::Controller(master));
        self.change(RouteNetlinkMessage::SetLink(msg), Mode::Modify, "set master", &index)
    }

    /// `ip link set dev INDEX mtu MTU`.
    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<()> {
        let mut msg = by_index(index);
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        self.change(RouteNetlinkMessage::SetLink(msg), Mode::Modify, "set mtu", &index)
    }

    /// `ip link set dev INDEX address MAC`.
    pub fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<()> {
        let mut msg = by_index(index);
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        self.change(RouteNetlinkMessage::SetLink(msg), Mode::Modify, "set address", &index)
    }

    /// `ip link set dev INDEX type bridge_slave hairpin on|off`.
    pub fn set_hairpin(&mut self, index: u32, on: bool) -> Result<()> {
        let mut msg = by_index(index);
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(on)])),
        ]));
        self.change(RouteNetlinkMessage::NewLink(msg), Mode::Modify, "set hairpin", &index)
    }

    /// `ip link del dev INDEX`.
    pub fn delete_link(&mut self, index: u32) -> Result<()> {
        self.change(RouteNetlinkMessage::DelLink(by_index(index)), Mode::Modify, "delete link", &index)
    }

    /// `ip link delete group GROUP`: every link of the group, unregistered by the kernel in one
    /// batch (one wait for RCU instead of one per link). False when the group has no link.
    pub fn delete_group(&mut self, group: u32) -> Result<bool> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::Group(group));
        match self.change(RouteNetlinkMessage::DelLink(msg), Mode::Modify, "delete link group", &group) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `ip link set dev INDEX down group GROUP`, in one request.
    pub fn set_down_in_group(&mut self, index: u32, group: u32) -> Result<()> {
        let mut msg = by_index(index);
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes.push(LinkAttribute::Group(group));
        self.change(RouteNetlinkMessage::SetLink(msg), Mode::Modify, "set link down in group", &index)
    }
}

impl Netlink {
    /// `ip link set dev INDEX name NAME` (the link must be down).
    pub fn set_name(&mut self, index: u32, name: &str) -> Result<()> {
        let mut msg = by_index(index);
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.change(RouteNetlinkMessage::SetLink(msg), Mode::Modify, "rename link", &index)
    }
}

impl Netlink {
    /// `ip link add NAME [mtu M] [address MAC] type vxlan id VNI local IP dev UNDERLAY dstport PORT
    /// nolearning`.
    pub fn create_vxlan(&mut self, spec: &VxlanSpec<'_>) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.attributes = new_link_attributes(spec.name, spec.mtu, spec.mac);
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(vec![
                InfoVxlan::Id(spec.vni),
                InfoVxlan::Local(spec.local),
                InfoVxlan::Link(spec.underlay),
                InfoVxlan::Port(spec.port),
                InfoVxlan::Learning(false),
            ])),
        ]));
        self.change(RouteNetlinkMessage::NewLink(msg), Mode::Create, "create vxlan", &spec.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let len = 4 + value.len();
        let mut out = Vec::new();
        out.extend_from_slice(&(len as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(len.next_multiple_of(4), 0);
        out
    }

    fn message(kind: u16, index: u32, flags: u32, attrs: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; IFINFO_OFFSET];
        out[4..6].copy_from_slice(&kind.to_ne_bytes());
        let mut info = [0u8; 16];
        info[4..8].copy_from_slice(&index.to_ne_bytes());
        info[8..12].copy_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&info);
        out.extend_from_slice(attrs);
        let len = out.len() as u32;
        out[0..4].copy_from_slice(&len.to_ne_bytes());
        out
    }

    #[test]
    fn parses_what_a_link_holds_and_survives_garbage() {
        let mut attrs = attr(IFLA_IFNAME, b"veth0\0");
        attrs.extend(attr(IFLA_MTU, &1400u32.to_ne_bytes()));
        attrs.extend(attr(IFLA_LINK, &7u32.to_ne_bytes()));
        attrs.extend(attr(IFLA_GROUP, &9u32.to_ne_bytes()));
        let mut info = attr(IFLA_INFO_KIND, b"veth\0");
        info.extend(attr(IFLA_INFO_SLAVE_DATA, &attr(IFLA_BRPORT_MODE, &[1])));
        attrs.extend(attr(IFLA_LINKINFO, &info));
        // A trailing attribute claiming more bytes than there are: ignored, not a panic.
        attrs.extend_from_slice(&[0xff, 0x00, 0x01, 0x00, 0xaa]);
        let link = Link::parse(&message(RTM_NEWLINK, 5, IFF_UP, &attrs)).unwrap().unwrap();
        assert_eq!((link.index, link.name.as_str(), link.mtu, link.up, link.promisc), (5, "veth0", 1400, true, false));
        assert_eq!((link.peer_index, link.group, link.kind, link.hairpin), (Some(7), 9, LinkKind::Veth, Some(true)));

        // Another message type, a message too short, a link without a name.
        assert!(Link::parse(&message(RTM_NEWLINK + 1, 5, 0, &attrs)).unwrap().is_none());
        assert!(Link::parse(&message(RTM_NEWLINK, 5, 0, &attrs)[..20]).unwrap().is_none());
        assert!(Link::parse(&message(RTM_NEWLINK, 5, 0, &attr(IFLA_MTU, &[1, 2]))).is_err());
    }
}
