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
    fn from_message(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: Vec::new(),
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
            promisc: msg.header.flags.contains(LinkFlags::Promisc),
            kind: LinkKind::None,
            master: None,
            peer_index: None,
            group: 0,
            hairpin: None,
            vxlan: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name.clone_from(n),
                LinkAttribute::Address(a) => link.mac.clone_from(a),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::Controller(m) => link.master = Some(*m),
                LinkAttribute::Link(l) => link.peer_index = Some(*l),
                LinkAttribute::Group(g) => link.group = *g,
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(kind) => link.kind = kind_of(kind),
                            LinkInfo::Data(InfoData::Vxlan(attrs)) => link.vxlan = Some(vxlan_info(attrs)),
                            LinkInfo::PortData(InfoPortData::BridgePort(port)) => {
                                link.hairpin = port.iter().find_map(|p| match p {
                                    InfoBridgePort::HairpinMode(h) => Some(*h),
                                    _ => None,
                                });
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    /// The MAC as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }
}

fn vxlan_info(attrs: &[InfoVxlan]) -> VxlanInfo {
    let mut info = VxlanInfo::default();
    for a in attrs {
        match a {
            InfoVxlan::Id(v) => info.vni = *v,
            InfoVxlan::Port(p) => info.port = *p,
            InfoVxlan::Local(l) => info.local = Some(*l),
            InfoVxlan::Learning(l) => info.learning = *l,
            InfoVxlan::Link(l) => info.underlay = Some(*l),
            _ => {}
        }
    }
    info
}

fn kind_of(kind: &InfoKind) -> LinkKind {
    match kind {
        InfoKind::Bridge => LinkKind::Bridge,
        InfoKind::Veth => LinkKind::Veth,
        InfoKind::Vxlan => LinkKind::Vxlan,
        InfoKind::Tun => LinkKind::Tun,
        other => LinkKind::Other(format!("{other:?}").to_lowercase()),
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
        let msgs = self.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()), "dump links")?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(Link::from_message(l)),
                _ => None,
            })
            .collect())
    }

    /// The link named `name` (`ip link show NAME`).
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(skip_stats());
        Ok(match self.get(RouteNetlinkMessage::GetLink(msg), "get link", &name)? {
            Some(RouteNetlinkMessage::NewLink(l)) => Some(Link::from_message(&l)),
            _ => None,
        })
    }

    /// The link with `index`.
    pub fn link_by_index(&mut self, index: u32) -> Result<Option<Link>> {
        let mut msg = by_index(index);
        msg.attributes.push(skip_stats());
        Ok(match self.get(RouteNetlinkMessage::GetLink(msg), "get link", &index)? {
            Some(RouteNetlinkMessage::NewLink(l)) => Some(Link::from_message(&l)),
            _ => None,
        })
    }

    /// Like [`Netlink::link_by_name`], but a missing link is an error.
    pub fn require_link(&mut self, name: &str) -> Result<Link> {
        self.link_by_name(name)?.ok_or_else(|| DataplaneError::LinkNotFound(name.to_string()))
    }

    /// `ip link add NAME [mtu MTU] type bridge`.
    pub fn create_bridge(&mut self, name: &str, mtu: Option<u32>) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.attributes = new_link_attributes(name, mtu, None);
        msg.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]));
        self.change(RouteNetlinkMessage::NewLink(msg), Mode::Create, "create bridge", &name)
    }

    /// `ip link add NAME [mtu M] [address MAC] [master BR] [up] type veth peer name PEER [netns NS] [address MAC]`.
    /// Returns the new link as the kernel echoed it (kernels from 6.3 do; `None` before): its
    /// index, MAC and, in `peer_index`, the peer's index. Its `master` is not set yet then.
    pub fn create_veth(&mut self, spec: &VethSpec<'_>) -> Result<Option<Link>> {
        let mut peer = LinkMessage::default();
        peer.attributes = new_link_attributes(spec.peer_name, spec.mtu, spec.peer_mac);
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
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        let object = format!("{} peer {}", spec.name, spec.peer_name);
        let echoed = self.change_echo(RouteNetlinkMessage::NewLink(msg), Mode::Create, "create veth", &object)?;
        Ok(echoed.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(Link::from_message(l)).filter(|l| l.name == spec.name),
            _ => None,
        }))
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
