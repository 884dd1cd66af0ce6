//! OPEN (RFC 4271 §4.2) and its capabilities (RFC 5492): multiprotocol (RFC 4760), route refresh
//! (RFC 2918), graceful restart (RFC 4724), 4-octet AS (RFC 6793).

use std::net::Ipv4Addr;

use super::reader::Reader;
use super::{error, Family, Notification, AS_TRANS};

/// An OPEN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The speaker's AS: from the 4-octet AS capability when present, else the 2-octet field.
    pub asn: u32,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    pub capabilities: Vec<Capability>,
}

/// A capability (RFC 5492).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    Multiprotocol(Family),
    RouteRefresh,
    /// RFC 4724: the restart flag, the restart time (seconds, 12 bits) and, per family, whether
    /// its forwarding state was preserved.
    GracefulRestart {
        restarting: bool,
        time: u16,
        families: Vec<(Family, bool)>,
    },
    FourOctetAs(u32),
    Unknown {
        code: u8,
        value: Vec<u8>,
    },
}

const PARAM_CAPABILITIES: u8 = 2;
const CAP_MULTIPROTOCOL: u8 = 1;
const CAP_ROUTE_REFRESH: u8 = 2;
const CAP_GRACEFUL_RESTART: u8 = 64;
const CAP_FOUR_OCTET_AS: u8 = 65;

impl Open {
    /// Whether the speaker offered `family` (without a multiprotocol capability, IPv4 unicast).
    pub fn offers(&self, family: Family) -> bool {
        let mp: Vec<Family> = self
            .capabilities
            .iter()
            .filter_map(|c| match c {
                Capability::Multiprotocol(f) => Some(*f),
                _ => None,
            })
            .collect();
        if mp.is_empty() {
            family == Family::IPV4_UNICAST
        } else {
            mp.contains(&family)
        }
    }

    pub fn four_octet_as(&self) -> bool {
        self.capabilities.iter().any(|c| matches!(c, Capability::FourOctetAs(_)))
    }

    pub fn route_refresh(&self) -> bool {
        self.capabilities.iter().any(|c| matches!(c, Capability::RouteRefresh))
    }

    pub fn graceful_restart(&self) -> Option<&Capability> {
        self.capabilities.iter().find(|c| matches!(c, Capability::GracefulRestart { .. }))
    }
}

fn open_error(subcode: u8, data: impl Into<Vec<u8>>) -> Notification {
    Notification::new(error::OPEN, subcode, data)
}

pub(super) fn decode(body: &[u8]) -> Result<Open, Notification> {
    let bad_length =
        || Notification::new(error::HEADER, error::HEADER_BAD_LENGTH, ((body.len() + 19) as u16).to_be_bytes());
    let mut r = Reader::new(body);
    let version = r.u8().ok_or_else(bad_length)?;
    if version != 4 {
        return Err(open_error(error::OPEN_UNSUPPORTED_VERSION, 4u16.to_be_bytes()));
    }
    let as2 = r.u16().ok_or_else(bad_length)?;
    let hold_time = r.u16().ok_or_else(bad_length)?;
    if hold_time == 1 || hold_time == 2 {
        return Err(open_error(error::OPEN_UNACCEPTABLE_HOLD_TIME, []));
    }
    let router_id = Ipv4Addr::from(r.u32().ok_or_else(bad_length)?);
    if router_id.is_unspecified() {
        return Err(open_error(error::OPEN_BAD_IDENTIFIER, []));
    }
    let params_len = r.u8().ok_or_else(bad_length)? as usize;
    if r.len() != params_len {
        return Err(bad_length());
    }
    let mut capabilities = Vec::new();
    while !r.is_empty() {
        let kind = r.u8().ok_or_else(bad_length)?;
        let len = r.u8().ok_or_else(bad_length)? as usize;
        let value = r.take(len).ok_or_else(bad_length)?;
        if kind != PARAM_CAPABILITIES {
            return Err(open_error(error::OPEN_UNSUPPORTED_PARAMETER, []));
        }
        let mut c = Reader::new(value);
        while !c.is_empty() {
            let code = c.u8().ok_or_else(bad_length)?;
            let len = c.u8().ok_or_else(bad_length)? as usize;
            let value = c.take(len).ok_or_else(bad_length)?;
            capabilities.push(decode_capability(code, value).ok_or_else(|| {
                // A capability whose value does not fit its code: reported as unsupported.
                let mut data = vec![code, len as u8];
                data.extend_from_slice(value);
                open_error(error::OPEN_UNSUPPORTED_CAPABILITY, data)
            })?);
        }
    }
    let asn = capabilities
        .iter()
        .find_map(|c| match c {
            Capability::FourOctetAs(asn) => Some(*asn),
            _ => None,
        })
        .unwrap_or(u32::from(as2));
    if asn == 0 || (as2 != AS_TRANS && u32::from(as2) != asn) {
        return Err(open_error(error::OPEN_BAD_PEER_AS, as2.to_be_bytes()));
    }
    Ok(Open { asn, hold_time, router_id, capabilities })
}

fn decode_capability(code: u8, value: &[u8]) -> Option<Capability> {
    let mut r = Reader::new(value);
    Some(match code {
        CAP_MULTIPROTOCOL => {
            let afi = r.u16()?;
            r.u8()?;
            let safi = r.u8()?;
            if !r.is_empty() {
                return None;
            }
            Capability::Multiprotocol(Family { afi, safi })
        }
        CAP_ROUTE_REFRESH if value.is_empty() => Capability::RouteRefresh,
        CAP_GRACEFUL_RESTART => {
            let flags_time = r.u16()?;
            let mut families = Vec::new();
            while !r.is_empty() {
                let afi = r.u16()?;
                let safi = r.u8()?;
                let flags = r.u8()?;
                families.push((Family { afi, safi }, flags & 0x80 != 0));
            }
            Capability::GracefulRestart { restarting: flags_time & 0x8000 != 0, time: flags_time & 0x0fff, families }
        }
        CAP_FOUR_OCTET_AS => {
            let asn = r.u32()?;
            if !r.is_empty() {
                return None;
            }
            Capability::FourOctetAs(asn)
        }
        CAP_ROUTE_REFRESH => return None,
        code => Capability::Unknown { code, value: value.to_vec() },
    })
}

pub(super) fn encode(o: &Open, out: &mut Vec<u8>) {
    out.push(4);
    let as2 = u16::try_from(o.asn).unwrap_or(AS_TRANS);
    out.extend_from_slice(&as2.to_be_bytes());
    out.extend_from_slice(&o.hold_time.to_be_bytes());
    out.extend_from_slice(&o.router_id.octets());
    let mut caps = Vec::new();
    for c in &o.capabilities {
        let (code, value) = match c {
            Capability::Multiprotocol(f) => {
                let mut v = f.afi.to_be_bytes().to_vec();
                v.push(0);
                v.push(f.safi);
                (CAP_MULTIPROTOCOL, v)
            }
            Capability::RouteRefresh => (CAP_ROUTE_REFRESH, Vec::new()),
            Capability::GracefulRestart { restarting, time, families } => {
                let flags_time = (time & 0x0fff) | if *restarting { 0x8000 } else { 0 };
                let mut v = flags_time.to_be_bytes().to_vec();
                for (f, preserved) in families {
                    v.extend_from_slice(&f.afi.to_be_bytes());
                    v.push(f.safi);
                    v.push(if *preserved { 0x80 } else { 0 });
                }
                (CAP_GRACEFUL_RESTART, v)
            }
            Capability::FourOctetAs(asn) => (CAP_FOUR_OCTET_AS, asn.to_be_bytes().to_vec()),
            Capability::Unknown { code, value } => (*code, value.clone()),
        };
        caps.push(code);
        caps.push(value.len() as u8);
        caps.extend_from_slice(&value);
    }
    if caps.is_empty() {
        out.push(0);
    } else {
        // One Capabilities parameter holding them all (as BIRD and FRR send).
        out.push((caps.len() + 2) as u8);
        out.push(PARAM_CAPABILITIES);
        out.push(caps.len() as u8);
        out.extend_from_slice(&caps);
    }
}
