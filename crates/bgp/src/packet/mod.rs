//! BGP messages on the wire: RFC 4271 (header, OPEN, UPDATE, NOTIFICATION, KEEPALIVE), RFC 2918
//! (ROUTE-REFRESH), RFC 5492 capabilities (multiprotocol RFC 4760, 4-octet AS RFC 6793, route
//! refresh, graceful restart RFC 4724), and the route reflection attributes of RFC 4456.
//!
//! [`decode`] takes the bytes received so far and returns a whole message (or `None`: not enough
//! bytes yet) and how many bytes it used; what is wrong with a message comes back as the
//! [`Notification`] the RFCs say to send. UPDATE errors follow RFC 7606: an attribute error that
//! leaves the NLRI readable makes the UPDATE "treat-as-withdraw" (its announced prefixes are
//! withdrawn instead) or discards the attribute, and only errors that make the message
//! unparseable reset the session.

mod attr;
mod open;
mod reader;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

pub use attr::{AsPath, Attribute, Origin, Segment, AS_SEQUENCE, AS_SET, PARTIAL};
pub use open::{Capability, Open};
use reader::Reader;

/// The 16 bytes of ones every message starts with.
pub const MARKER: [u8; 16] = [0xff; 16];
pub const HEADER_LEN: usize = 19;
/// The largest message (without RFC 8654's extended messages).
pub const MAX_LEN: usize = 4096;
/// The AS a 4-octet AS is replaced with where only two octets fit (RFC 6793).
pub const AS_TRANS: u16 = 23456;

/// An address family and subsequent address family (RFC 4760).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Family {
    pub afi: u16,
    pub safi: u8,
}

impl Family {
    pub const IPV4_UNICAST: Family = Family { afi: 1, safi: 1 };
    pub const IPV6_UNICAST: Family = Family { afi: 2, safi: 1 };

    /// The unicast family of `net`.
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::IPV4_UNICAST,
            IpNet::V6(_) => Family::IPV6_UNICAST,
        }
    }
}

/// A NOTIFICATION: what went wrong, as RFC 4271 §4.5 and its successors number it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

/// NOTIFICATION error codes and subcodes.
pub mod error {
    pub const HEADER: u8 = 1;
    pub const HEADER_NOT_SYNCHRONIZED: u8 = 1;
    pub const HEADER_BAD_LENGTH: u8 = 2;
    pub const HEADER_BAD_TYPE: u8 = 3;
    pub const OPEN: u8 = 2;
    pub const OPEN_UNSUPPORTED_VERSION: u8 = 1;
    pub const OPEN_BAD_PEER_AS: u8 = 2;
    pub const OPEN_BAD_IDENTIFIER: u8 = 3;
    pub const OPEN_UNSUPPORTED_PARAMETER: u8 = 4;
    pub const OPEN_UNACCEPTABLE_HOLD_TIME: u8 = 6;
    pub const OPEN_UNSUPPORTED_CAPABILITY: u8 = 7;
    pub const UPDATE: u8 = 3;
    pub const UPDATE_MALFORMED_ATTRIBUTE_LIST: u8 = 1;
    pub const UPDATE_UNRECOGNIZED_WELL_KNOWN: u8 = 2;
    pub const UPDATE_MISSING_WELL_KNOWN: u8 = 3;
    pub const UPDATE_ATTRIBUTE_FLAGS: u8 = 4;
    pub const UPDATE_ATTRIBUTE_LENGTH: u8 = 5;
    pub const UPDATE_INVALID_ORIGIN: u8 = 6;
    pub const UPDATE_INVALID_NEXT_HOP: u8 = 8;
    pub const UPDATE_OPTIONAL_ATTRIBUTE: u8 = 9;
    pub const UPDATE_INVALID_NETWORK: u8 = 10;
    pub const UPDATE_MALFORMED_AS_PATH: u8 = 11;
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM: u8 = 5;
    pub const CEASE: u8 = 6;
    pub const CEASE_MAX_PREFIXES: u8 = 1;
    pub const CEASE_ADMIN_SHUTDOWN: u8 = 2;
    pub const CEASE_PEER_DECONFIGURED: u8 = 3;
    pub const CEASE_CONNECTION_REJECTED: u8 = 5;
    pub const CEASE_COLLISION: u8 = 7;
    pub const ROUTE_REFRESH: u8 = 7;
    pub const ROUTE_REFRESH_BAD_LENGTH: u8 = 1;
}

impl Notification {
    pub fn new(code: u8, subcode: u8, data: impl Into<Vec<u8>>) -> Notification {
        Notification { code, subcode, data: data.into() }
    }
}

impl std::fmt::Display for Notification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match (self.code, self.subcode) {
            (1, 1) => "connection not synchronized",
            (1, 2) => "bad message length",
            (1, 3) => "bad message type",
            (2, 1) => "unsupported version number",
            (2, 2) => "bad peer AS",
            (2, 3) => "bad BGP identifier",
            (2, 4) => "unsupported optional parameter",
            (2, 6) => "unacceptable hold time",
            (2, 7) => "unsupported capability",
            (2, _) => "OPEN message error",
            (3, 1) => "malformed attribute list",
            (3, 2) => "unrecognized well-known attribute",
            (3, 3) => "missing well-known attribute",
            (3, 4) => "attribute flags error",
            (3, 5) => "attribute length error",
            (3, 6) => "invalid ORIGIN attribute",
            (3, 8) => "invalid NEXT_HOP attribute",
            (3, 9) => "optional attribute error",
            (3, 10) => "invalid network field",
            (3, 11) => "malformed AS_PATH",
            (3, _) => "UPDATE message error",
            (4, _) => "hold timer expired",
            (5, _) => "finite state machine error",
            (6, 1) => "cease: maximum number of prefixes reached",
            (6, 2) => "cease: administrative shutdown",
            (6, 3) => "cease: peer de-configured",
            (6, 4) => "cease: administrative reset",
            (6, 5) => "cease: connection rejected",
            (6, 6) => "cease: other configuration change",
            (6, 7) => "cease: connection collision resolution",
            (6, 8) => "cease: out of resources",
            (6, _) => "cease",
            (7, _) => "ROUTE-REFRESH message error",
            _ => "unknown error",
        };
        write!(f, "{name} ({}/{})", self.code, self.subcode)
    }
}

/// An UPDATE (RFC 4271 §4.3; other families in MP_REACH/MP_UNREACH attributes, RFC 4760).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    /// IPv4 unicast prefixes withdrawn (the Withdrawn Routes field).
    pub withdrawn: Vec<Ipv4Net>,
    pub attributes: Vec<Attribute>,
    /// IPv4 unicast prefixes announced (the NLRI field).
    pub nlri: Vec<Ipv4Net>,
    /// RFC 7606: an attribute was malformed such that the announced prefixes must be handled as
    /// withdrawn (the attributes are not to be used).
    pub treat_as_withdraw: bool,
}

impl Update {
    /// Every prefix this UPDATE withdraws, of every family (with treat-as-withdraw, the
    /// announced ones too).
    pub fn withdrawals(&self) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self.withdrawn.iter().map(|n| IpNet::V4(*n)).collect();
        for a in &self.attributes {
            if let Attribute::MpUnreach { withdrawn, .. } = a {
                out.extend(withdrawn.iter().copied());
            }
        }
        if self.treat_as_withdraw {
            out.extend(self.announcements_unchecked());
        }
        out
    }

    /// Every prefix this UPDATE announces, of every family (none with treat-as-withdraw).
    pub fn announcements(&self) -> Vec<IpNet> {
        if self.treat_as_withdraw {
            return Vec::new();
        }
        self.announcements_unchecked()
    }

    fn announcements_unchecked(&self) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self.nlri.iter().map(|n| IpNet::V4(*n)).collect();
        for a in &self.attributes {
            if let Attribute::MpReach { nlri, .. } = a {
                out.extend(nlri.iter().copied());
            }
        }
        out
    }

    /// The attribute of type `code`, if present.
    pub fn attribute(&self, code: u8) -> Option<&Attribute> {
        self.attributes.iter().find(|a| a.code() == code)
    }

    /// An UPDATE announcing `prefixes` (any family; IPv6 in MP_REACH_NLRI with `v6_next_hop`)
    /// with `attributes` (ORIGIN, AS_PATH, ...; NEXT_HOP for IPv4 included by the caller).
    pub fn announce(prefixes: &[IpNet], attributes: Vec<Attribute>, v6_next_hop: Option<Ipv6Addr>) -> Update {
        let (nlri, v6) = split(prefixes);
        let mut update = Update { attributes, nlri, ..Update::default() };
        if !v6.is_empty() {
            let next_hop = vec![IpAddr::V6(v6_next_hop.unwrap_or(Ipv6Addr::UNSPECIFIED))];
            update.attributes.push(Attribute::MpReach { family: Family::IPV6_UNICAST, next_hop, nlri: v6 });
        }
        update
    }

    /// An UPDATE withdrawing `prefixes` (any family).
    pub fn withdraw(prefixes: &[IpNet]) -> Update {
        let (withdrawn, v6) = split(prefixes);
        let mut update = Update { withdrawn, ..Update::default() };
        if !v6.is_empty() {
            update.attributes.push(Attribute::MpUnreach { family: Family::IPV6_UNICAST, withdrawn: v6 });
        }
        update
    }
}

/// IPv4 prefixes (for the UPDATE's own fields) and the others (for multiprotocol attributes).
fn split(prefixes: &[IpNet]) -> (Vec<Ipv4Net>, Vec<IpNet>) {
    let v6 = prefixes.iter().filter(|p| matches!(p, IpNet::V6(_))).copied().collect();
    (v4(prefixes.to_vec()), v6)
}

/// A ROUTE-REFRESH (RFC 2918): send me family `family` again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRefresh {
    pub family: Family,
}

/// A BGP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    Keepalive,
    RouteRefresh(RouteRefresh),
}

/// What the session negotiated that changes the encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    /// Both sides sent the 4-octet AS capability: AS numbers in AS_PATH and AGGREGATOR are four
    /// octets.
    pub four_octet_as: bool,
}

impl Default for Codec {
    /// What every modern speaker negotiates.
    fn default() -> Self {
        Codec { four_octet_as: true }
    }
}

const OPEN: u8 = 1;
const UPDATE: u8 = 2;
const NOTIFICATION: u8 = 3;
const KEEPALIVE: u8 = 4;
const ROUTE_REFRESH: u8 = 5;

fn header_error(subcode: u8, data: impl Into<Vec<u8>>) -> Notification {
    Notification::new(error::HEADER, subcode, data)
}

fn update_error(subcode: u8, data: impl Into<Vec<u8>>) -> Notification {
    Notification::new(error::UPDATE, subcode, data)
}

/// Decodes the first message in `buf`: `Ok(None)` when `buf` does not hold a whole message yet,
/// else the message and the bytes it took. An error is the NOTIFICATION to send (then the
/// session ends).
pub fn decode(buf: &[u8], codec: Codec) -> Result<Option<(Message, usize)>, Notification> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16] != MARKER {
        return Err(header_error(error::HEADER_NOT_SYNCHRONIZED, []));
    }
    let len = u16::from_be_bytes([buf[16], buf[17]]) as usize;
    let kind = buf[18];
    let bad_length = || header_error(error::HEADER_BAD_LENGTH, (len as u16).to_be_bytes());
    if !(HEADER_LEN..=MAX_LEN).contains(&len) {
        return Err(bad_length());
    }
    let min = match kind {
        OPEN => 29,
        UPDATE => 23,
        NOTIFICATION => 21,
        KEEPALIVE => HEADER_LEN,
        ROUTE_REFRESH => 23,
        other => return Err(header_error(error::HEADER_BAD_TYPE, [other])),
    };
    if len < min || (kind == KEEPALIVE && len != HEADER_LEN) {
        return Err(bad_length());
    }
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[HEADER_LEN..len];
    let message = match kind {
        OPEN => Message::Open(open::decode(body)?),
        UPDATE => Message::Update(decode_update(body, codec)?),
        NOTIFICATION => Message::Notification(Notification::new(body[0], body[1], &body[2..])),
        KEEPALIVE => Message::Keepalive,
        _ => {
            if len != 23 {
                return Err(Notification::new(error::ROUTE_REFRESH, error::ROUTE_REFRESH_BAD_LENGTH, &buf[..len]));
            }
            Message::RouteRefresh(RouteRefresh {
                family: Family { afi: u16::from_be_bytes([body[0], body[1]]), safi: body[3] },
            })
        }
    };
    Ok(Some((message, len)))
}

/// Appends `message`'s bytes to `out`. An UPDATE too large for one message is the caller's to
/// split (see [`Update::encoded_len`]).
pub fn encode(message: &Message, codec: Codec, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&MARKER);
    out.extend_from_slice(&[0, 0]);
    match message {
        Message::Open(o) => {
            out.push(OPEN);
            open::encode(o, out);
        }
        Message::Update(u) => {
            out.push(UPDATE);
            encode_update(u, codec, out);
        }
        Message::Notification(n) => {
            out.push(NOTIFICATION);
            out.push(n.code);
            out.push(n.subcode);
            out.extend_from_slice(&n.data);
        }
        Message::Keepalive => out.push(KEEPALIVE),
        Message::RouteRefresh(r) => {
            out.push(ROUTE_REFRESH);
            out.extend_from_slice(&r.family.afi.to_be_bytes());
            out.push(0);
            out.push(r.family.safi);
        }
    }
    let len = (out.len() - start) as u16;
    out[start + 16..start + 18].copy_from_slice(&len.to_be_bytes());
}

/// The bytes of one message.
pub fn to_bytes(message: &Message, codec: Codec) -> Vec<u8> {
    let mut out = Vec::new();
    encode(message, codec, &mut out);
    out
}

impl Update {
    /// How many bytes this UPDATE takes as a message.
    pub fn encoded_len(&self, codec: Codec) -> usize {
        let mut out = Vec::new();
        encode(&Message::Update(self.clone()), codec, &mut out);
        out.len()
    }
}

/// Reads prefixes (length in bits, then as many bytes as that needs) of `family` until `r` ends.
pub(crate) fn read_prefixes(r: &mut Reader<'_>, v6: bool) -> Option<Vec<IpNet>> {
    let mut out = Vec::new();
    let max = if v6 { 128 } else { 32 };
    while !r.is_empty() {
        let bits = r.u8()?;
        if bits > max {
            return None;
        }
        let bytes = r.take(usize::from(bits).div_ceil(8))?;
        let net = if v6 {
            let mut a = [0u8; 16];
            a[..bytes.len()].copy_from_slice(bytes);
            IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), bits).ok()?.trunc())
        } else {
            let mut a = [0u8; 4];
            a[..bytes.len()].copy_from_slice(bytes);
            IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), bits).ok()?.trunc())
        };
        out.push(net);
    }
    Some(out)
}

pub(crate) fn write_prefix(net: &IpNet, out: &mut Vec<u8>) {
    let bits = net.prefix_len();
    out.push(bits);
    let n = usize::from(bits).div_ceil(8);
    match net.network() {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()[..n]),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()[..n]),
    }
}

fn v4(nets: Vec<IpNet>) -> Vec<Ipv4Net> {
    nets.into_iter()
        .filter_map(|n| match n {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        })
        .collect()
}

fn decode_update(body: &[u8], codec: Codec) -> Result<Update, Notification> {
    let malformed = || update_error(error::UPDATE_MALFORMED_ATTRIBUTE_LIST, []);
    let mut r = Reader::new(body);
    let withdrawn_len = r.u16().ok_or_else(malformed)? as usize;
    let withdrawn = r.take(withdrawn_len).ok_or_else(malformed)?;
    let attrs_len = r.u16().ok_or_else(malformed)? as usize;
    let attrs = r.take(attrs_len).ok_or_else(malformed)?;
    let nlri = r.rest();
    let invalid_network = || update_error(error::UPDATE_INVALID_NETWORK, []);
    let withdrawn = v4(read_prefixes(&mut Reader::new(withdrawn), false).ok_or_else(invalid_network)?);
    let nlri = v4(read_prefixes(&mut Reader::new(nlri), false).ok_or_else(invalid_network)?);
    let parsed = attr::decode_all(attrs, codec, !nlri.is_empty())?;
    Ok(Update { withdrawn, attributes: parsed.attributes, nlri, treat_as_withdraw: parsed.treat_as_withdraw })
}

fn encode_update(u: &Update, codec: Codec, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0, 0]);
    for n in &u.withdrawn {
        write_prefix(&IpNet::V4(*n), out);
    }
    let len = (out.len() - at - 2) as u16;
    out[at..at + 2].copy_from_slice(&len.to_be_bytes());
    let at = out.len();
    out.extend_from_slice(&[0, 0]);
    for a in &u.attributes {
        attr::encode(a, codec, out);
    }
    let len = (out.len() - at - 2) as u16;
    out[at..at + 2].copy_from_slice(&len.to_be_bytes());
    for n in &u.nlri {
        write_prefix(&IpNet::V4(*n), out);
    }
}

#[cfg(test)]
mod tests;
