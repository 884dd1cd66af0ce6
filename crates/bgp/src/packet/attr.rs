//! Path attributes (RFC 4271 §4.3, §5; 4456 route reflection; 4760 multiprotocol; 6793 4-octet
//! AS; 1997 communities), with RFC 7606's revised error handling.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::reader::Reader;
use super::{error, read_prefixes, update_error, write_prefix, Codec, Family, Notification, AS_TRANS};

pub const ORIGIN: u8 = 1;
pub const AS_PATH: u8 = 2;
pub const NEXT_HOP: u8 = 3;
pub const MED: u8 = 4;
pub const LOCAL_PREF: u8 = 5;
pub const ATOMIC_AGGREGATE: u8 = 6;
pub const AGGREGATOR: u8 = 7;
pub const COMMUNITIES: u8 = 8;
pub const ORIGINATOR_ID: u8 = 9;
pub const CLUSTER_LIST: u8 = 10;
pub const MP_REACH: u8 = 14;
pub const MP_UNREACH: u8 = 15;
pub const AS4_PATH: u8 = 17;
pub const AS4_AGGREGATOR: u8 = 18;

const OPTIONAL: u8 = 0x80;
const TRANSITIVE: u8 = 0x40;
pub const PARTIAL: u8 = 0x20;
const EXTENDED: u8 = 0x10;

/// ORIGIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    Igp = 0,
    Egp = 1,
    Incomplete = 2,
}

/// One AS_PATH segment: its type (1 AS_SET, 2 AS_SEQUENCE, 3/4 the confederation ones of RFC 5065)
/// and its AS numbers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Segment {
    pub kind: u8,
    pub asns: Vec<u32>,
}

pub const AS_SET: u8 = 1;
pub const AS_SEQUENCE: u8 = 2;

/// AS_PATH (or AS4_PATH).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AsPath {
    pub segments: Vec<Segment>,
}

impl AsPath {
    /// A path of one sequence.
    pub fn sequence(asns: &[u32]) -> AsPath {
        if asns.is_empty() {
            return AsPath::default();
        }
        AsPath { segments: vec![Segment { kind: AS_SEQUENCE, asns: asns.to_vec() }] }
    }

    /// Its length for the decision process (RFC 4271 §9.1.2.2: a set counts as one,
    /// confederation segments not at all).
    pub fn len(&self) -> usize {
        self.segments
            .iter()
            .map(|s| match s.kind {
                AS_SEQUENCE => s.asns.len(),
                AS_SET => 1,
                _ => 0,
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    pub fn contains(&self, asn: u32) -> bool {
        self.segments.iter().any(|s| s.asns.contains(&asn))
    }

    /// The neighbouring AS (the first of the first sequence), if any.
    pub fn first(&self) -> Option<u32> {
        self.segments.first().filter(|s| s.kind == AS_SEQUENCE).and_then(|s| s.asns.first().copied())
    }

    /// `asn` put in front (as an eBGP speaker does when sending).
    pub fn prepend(&self, asn: u32) -> AsPath {
        let mut out = self.clone();
        match out.segments.first_mut() {
            Some(s) if s.kind == AS_SEQUENCE && s.asns.len() < 255 => s.asns.insert(0, asn),
            _ => out.segments.insert(0, Segment { kind: AS_SEQUENCE, asns: vec![asn] }),
        }
        out
    }
}

/// A path attribute.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Attribute {
    Origin(Origin),
    AsPath(AsPath),
    NextHop(Ipv4Addr),
    Med(u32),
    LocalPref(u32),
    AtomicAggregate,
    Aggregator {
        asn: u32,
        address: Ipv4Addr,
    },
    Communities(Vec<u32>),
    OriginatorId(Ipv4Addr),
    ClusterList(Vec<Ipv4Addr>),
    /// Reachable prefixes of `family` via `next_hop` (IPv6: global, and link-local if sent).
    MpReach {
        family: Family,
        next_hop: Vec<IpAddr>,
        nlri: Vec<IpNet>,
    },
    MpUnreach {
        family: Family,
        withdrawn: Vec<IpNet>,
    },
    As4Path(AsPath),
    As4Aggregator {
        asn: u32,
        address: Ipv4Addr,
    },
    /// An attribute weft does not interpret, as received (flags, type code, value).
    Unknown {
        flags: u8,
        code: u8,
        value: Vec<u8>,
    },
}

impl Attribute {
    pub fn code(&self) -> u8 {
        match self {
            Attribute::Origin(_) => ORIGIN,
            Attribute::AsPath(_) => AS_PATH,
            Attribute::NextHop(_) => NEXT_HOP,
            Attribute::Med(_) => MED,
            Attribute::LocalPref(_) => LOCAL_PREF,
            Attribute::AtomicAggregate => ATOMIC_AGGREGATE,
            Attribute::Aggregator { .. } => AGGREGATOR,
            Attribute::Communities(_) => COMMUNITIES,
            Attribute::OriginatorId(_) => ORIGINATOR_ID,
            Attribute::ClusterList(_) => CLUSTER_LIST,
            Attribute::MpReach { .. } => MP_REACH,
            Attribute::MpUnreach { .. } => MP_UNREACH,
            Attribute::As4Path(_) => AS4_PATH,
            Attribute::As4Aggregator { .. } => AS4_AGGREGATOR,
            Attribute::Unknown { code, .. } => *code,
        }
    }

    /// The flags it is sent with (optional/transitive as its specification says).
    fn flags(&self) -> u8 {
        match self {
            Attribute::Origin(_)
            | Attribute::AsPath(_)
            | Attribute::NextHop(_)
            | Attribute::LocalPref(_)
            | Attribute::AtomicAggregate => TRANSITIVE,
            Attribute::Med(_)
            | Attribute::OriginatorId(_)
            | Attribute::ClusterList(_)
            | Attribute::MpReach { .. }
            | Attribute::MpUnreach { .. } => OPTIONAL,
            Attribute::Aggregator { .. }
            | Attribute::Communities(_)
            | Attribute::As4Path(_)
            | Attribute::As4Aggregator { .. } => OPTIONAL | TRANSITIVE,
            Attribute::Unknown { flags, .. } => flags & (OPTIONAL | TRANSITIVE | PARTIAL),
        }
    }
}

/// What RFC 7606 says to do with a malformed attribute.
enum OnError {
    /// Handle the announced prefixes as withdrawn.
    TreatAsWithdraw,
    /// Drop the attribute.
    Discard,
    /// End the session with this NOTIFICATION.
    Reset(Notification),
}

pub(super) struct Decoded {
    pub attributes: Vec<Attribute>,
    pub treat_as_withdraw: bool,
}

/// Decodes the path attributes of an UPDATE (`has_nlri`: it announces IPv4 prefixes).
pub(super) fn decode_all(buf: &[u8], codec: Codec, has_nlri: bool) -> Result<Decoded, Notification> {
    let mut r = Reader::new(buf);
    let mut attributes: Vec<Attribute> = Vec::new();
    let mut treat_as_withdraw = false;
    let mut seen = [false; 256];
    while !r.is_empty() {
        let start = buf.len() - r.len();
        let header = (|| {
            let flags = r.u8()?;
            let code = r.u8()?;
            let len = if flags & EXTENDED != 0 { r.u16()? as usize } else { r.u8()? as usize };
            Some((flags, code, len))
        })();
        let Some((flags, code, len)) = header else {
            return overrun(&attributes);
        };
        let Some(value) = r.take(len) else {
            return overrun(&attributes);
        };
        let raw = &buf[start..start + (buf.len() - r.len() - start)];
        if std::mem::replace(&mut seen[code as usize], true) {
            // RFC 7606 §3 g: a repeated MP_REACH/MP_UNREACH resets; any other repeat is dropped.
            if code == MP_REACH || code == MP_UNREACH {
                return Err(update_error(error::UPDATE_MALFORMED_ATTRIBUTE_LIST, []));
            }
            continue;
        }
        match decode_one(flags, code, value, raw, codec) {
            Ok(attr) => attributes.push(attr),
            Err(OnError::TreatAsWithdraw) => treat_as_withdraw = true,
            Err(OnError::Discard) => {}
            Err(OnError::Reset(n)) => return Err(n),
        }
    }
    // Mandatory attributes of an UPDATE that announces something (RFC 7606 §3 d).
    let mp_announces = attributes.iter().any(|a| matches!(a, Attribute::MpReach { nlri, .. } if !nlri.is_empty()));
    if (has_nlri || mp_announces)
        && (!seen[ORIGIN as usize] || !seen[AS_PATH as usize] || (has_nlri && !seen[NEXT_HOP as usize]))
    {
        treat_as_withdraw = true;
    }
    Ok(Decoded { attributes, treat_as_withdraw })
}

/// An attribute runs past the end of the attributes (RFC 7606 §4): with multiprotocol
/// attributes there is no knowing what else was meant, so the session resets; else the
/// announced prefixes are withdrawn.
fn overrun(attributes: &[Attribute]) -> Result<Decoded, Notification> {
    if attributes.iter().any(|a| matches!(a, Attribute::MpReach { .. } | Attribute::MpUnreach { .. })) {
        return Err(update_error(error::UPDATE_MALFORMED_ATTRIBUTE_LIST, []));
    }
    Ok(Decoded { attributes: attributes.to_vec(), treat_as_withdraw: true })
}

fn decode_one(flags: u8, code: u8, value: &[u8], raw: &[u8], codec: Codec) -> Result<Attribute, OnError> {
    let mut r = Reader::new(value);
    let exact = |n: usize| if value.len() == n { Ok(()) } else { Err(OnError::TreatAsWithdraw) };
    let well_known = flags & (OPTIONAL | TRANSITIVE) == TRANSITIVE;
    let optional = |transitive: bool| flags & OPTIONAL != 0 && (flags & TRANSITIVE != 0) == transitive;
    let asn = |r: &mut Reader<'_>, four: bool| if four { r.u32() } else { r.u16().map(u32::from) };
    match code {
        ORIGIN => {
            exact(1)?;
            if !well_known {
                return Err(OnError::TreatAsWithdraw);
            }
            match value[0] {
                0 => Ok(Attribute::Origin(Origin::Igp)),
                1 => Ok(Attribute::Origin(Origin::Egp)),
                2 => Ok(Attribute::Origin(Origin::Incomplete)),
                _ => Err(OnError::TreatAsWithdraw),
            }
        }
        AS_PATH => {
            if !well_known {
                return Err(OnError::TreatAsWithdraw);
            }
            as_path(value, codec.four_octet_as).map(Attribute::AsPath).ok_or(OnError::TreatAsWithdraw)
        }
        NEXT_HOP => {
            exact(4)?;
            if !well_known {
                return Err(OnError::TreatAsWithdraw);
            }
            Ok(Attribute::NextHop(Ipv4Addr::new(value[0], value[1], value[2], value[3])))
        }
        MED => {
            exact(4)?;
            if !optional(false) {
                return Err(OnError::TreatAsWithdraw);
            }
            r.u32().map(Attribute::Med).ok_or(OnError::TreatAsWithdraw)
        }
        LOCAL_PREF => {
            exact(4)?;
            if !well_known {
                return Err(OnError::TreatAsWithdraw);
            }
            r.u32().map(Attribute::LocalPref).ok_or(OnError::TreatAsWithdraw)
        }
        ATOMIC_AGGREGATE => {
            if !value.is_empty() || !well_known {
                return Err(OnError::Discard);
            }
            Ok(Attribute::AtomicAggregate)
        }
        AGGREGATOR | AS4_AGGREGATOR => {
            let four = code == AS4_AGGREGATOR || codec.four_octet_as;
            if value.len() != if four { 8 } else { 6 } || !optional(true) {
                return Err(OnError::Discard);
            }
            let asn = asn(&mut r, four).ok_or(OnError::Discard)?;
            let address = Ipv4Addr::from(r.u32().ok_or(OnError::Discard)?);
            Ok(if code == AGGREGATOR {
                Attribute::Aggregator { asn, address }
            } else {
                Attribute::As4Aggregator { asn, address }
            })
        }
        COMMUNITIES => {
            if !value.len().is_multiple_of(4) || !optional(true) {
                return Err(OnError::TreatAsWithdraw);
            }
            Ok(Attribute::Communities(value.chunks(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect()))
        }
        ORIGINATOR_ID => {
            exact(4)?;
            if !optional(false) {
                return Err(OnError::TreatAsWithdraw);
            }
            Ok(Attribute::OriginatorId(Ipv4Addr::new(value[0], value[1], value[2], value[3])))
        }
        CLUSTER_LIST => {
            if value.is_empty() || !value.len().is_multiple_of(4) || !optional(false) {
                return Err(OnError::TreatAsWithdraw);
            }
            Ok(Attribute::ClusterList(value.chunks(4).map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3])).collect()))
        }
        MP_REACH | MP_UNREACH => {
            // Without them the NLRI cannot be known: any error ends the session (RFC 7606 §7.11).
            let reset = || OnError::Reset(update_error(error::UPDATE_OPTIONAL_ATTRIBUTE, raw));
            if !optional(false) {
                return Err(reset());
            }
            let afi = r.u16().ok_or_else(reset)?;
            let safi = r.u8().ok_or_else(reset)?;
            let family = Family { afi, safi };
            let v6 = match family {
                Family::IPV4_UNICAST => false,
                Family::IPV6_UNICAST => true,
                // A family weft did not offer: kept as it is, its prefixes ignored.
                _ => return Ok(Attribute::Unknown { flags, code, value: value.to_vec() }),
            };
            if code == MP_UNREACH {
                let withdrawn = read_prefixes(&mut r, v6).ok_or_else(reset)?;
                return Ok(Attribute::MpUnreach { family, withdrawn });
            }
            let nh_len = r.u8().ok_or_else(reset)? as usize;
            let nh = r.take(nh_len).ok_or_else(reset)?;
            let next_hop = match (v6, nh_len) {
                (false, 4) => vec![IpAddr::V4(Ipv4Addr::new(nh[0], nh[1], nh[2], nh[3]))],
                (true, 16) | (true, 32) => nh
                    .chunks(16)
                    .map(|c| {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(c);
                        IpAddr::V6(Ipv6Addr::from(a))
                    })
                    .collect(),
                _ => return Err(reset()),
            };
            r.u8().ok_or_else(reset)?; // reserved
            let nlri = read_prefixes(&mut r, v6).ok_or_else(reset)?;
            Ok(Attribute::MpReach { family, next_hop, nlri })
        }
        AS4_PATH => {
            // RFC 6793 §6: a malformed AS4_PATH is discarded.
            if !optional(true) {
                return Err(OnError::Discard);
            }
            as_path(value, true).map(Attribute::As4Path).ok_or(OnError::Discard)
        }
        _ if flags & OPTIONAL == 0 => Err(OnError::Reset(update_error(error::UPDATE_UNRECOGNIZED_WELL_KNOWN, raw))),
        _ => Ok(Attribute::Unknown { flags, code, value: value.to_vec() }),
    }
}

fn as_path(value: &[u8], four: bool) -> Option<AsPath> {
    let mut r = Reader::new(value);
    let mut segments = Vec::new();
    while !r.is_empty() {
        let kind = r.u8()?;
        let count = r.u8()? as usize;
        if !(1..=4).contains(&kind) || count == 0 {
            return None;
        }
        let mut asns = Vec::with_capacity(count);
        for _ in 0..count {
            asns.push(if four { r.u32()? } else { u32::from(r.u16()?) });
        }
        segments.push(Segment { kind, asns });
    }
    Some(AsPath { segments })
}

fn encode_as_path(path: &AsPath, four: bool, out: &mut Vec<u8>) {
    for s in &path.segments {
        // A segment holds at most 255 AS numbers: longer ones go out in pieces.
        for chunk in s.asns.chunks(255) {
            out.push(s.kind);
            out.push(chunk.len() as u8);
            for asn in chunk {
                if four {
                    out.extend_from_slice(&asn.to_be_bytes());
                } else {
                    out.extend_from_slice(&u16::try_from(*asn).unwrap_or(AS_TRANS).to_be_bytes());
                }
            }
        }
    }
}

/// Appends one attribute (extended length when its value needs it).
pub(super) fn encode(a: &Attribute, codec: Codec, out: &mut Vec<u8>) {
    let mut value = Vec::new();
    match a {
        Attribute::Origin(o) => value.push(*o as u8),
        Attribute::AsPath(p) => encode_as_path(p, codec.four_octet_as, &mut value),
        Attribute::NextHop(ip) | Attribute::OriginatorId(ip) => value.extend_from_slice(&ip.octets()),
        Attribute::Med(n) | Attribute::LocalPref(n) => value.extend_from_slice(&n.to_be_bytes()),
        Attribute::AtomicAggregate => {}
        Attribute::Aggregator { asn, address } => {
            if codec.four_octet_as {
                value.extend_from_slice(&asn.to_be_bytes());
            } else {
                value.extend_from_slice(&u16::try_from(*asn).unwrap_or(AS_TRANS).to_be_bytes());
            }
            value.extend_from_slice(&address.octets());
        }
        Attribute::As4Aggregator { asn, address } => {
            value.extend_from_slice(&asn.to_be_bytes());
            value.extend_from_slice(&address.octets());
        }
        Attribute::Communities(c) => c.iter().for_each(|c| value.extend_from_slice(&c.to_be_bytes())),
        Attribute::ClusterList(ids) => ids.iter().for_each(|id| value.extend_from_slice(&id.octets())),
        Attribute::MpReach { family, next_hop, nlri } => {
            value.extend_from_slice(&family.afi.to_be_bytes());
            value.push(family.safi);
            let at = value.len();
            value.push(0);
            for nh in next_hop {
                match nh {
                    IpAddr::V4(a) => value.extend_from_slice(&a.octets()),
                    IpAddr::V6(a) => value.extend_from_slice(&a.octets()),
                }
            }
            value[at] = (value.len() - at - 1) as u8;
            value.push(0);
            nlri.iter().for_each(|n| write_prefix(n, &mut value));
        }
        Attribute::MpUnreach { family, withdrawn } => {
            value.extend_from_slice(&family.afi.to_be_bytes());
            value.push(family.safi);
            withdrawn.iter().for_each(|n| write_prefix(n, &mut value));
        }
        Attribute::As4Path(p) => encode_as_path(p, true, &mut value),
        Attribute::Unknown { value: v, .. } => value.extend_from_slice(v),
    }
    let mut flags = a.flags();
    if value.len() > 255 {
        flags |= EXTENDED;
    }
    out.push(flags);
    out.push(a.code());
    if value.len() > 255 {
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    } else {
        out.push(value.len() as u8);
    }
    out.extend_from_slice(&value);
}
