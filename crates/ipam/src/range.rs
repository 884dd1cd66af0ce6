//! Address ranges as host-local configures them: a subnet with an optional start, end and
//! gateway, canonicalized exactly as the reference plugin does (gateway .1, start .1, end the last
//! address before the IPv4 broadcast), and the round-robin walk over a range set.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{IpamError, Result};

/// One range as written in the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeConfig {
    pub subnet: String,
    #[serde(rename = "rangeStart", default, skip_serializing_if = "Option::is_none")]
    pub range_start: Option<IpAddr>,
    #[serde(rename = "rangeEnd", default, skip_serializing_if = "Option::is_none")]
    pub range_end: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

/// A canonical range: every field known and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNet,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: IpAddr,
}

/// The ranges one address is allocated from (one set per address family, usually).
pub type RangeSet = Vec<Range>;

pub(crate) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

pub(crate) fn from_u128(v: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(v.into())
    } else {
        IpAddr::V4(u32::try_from(v).unwrap_or(u32::MAX).into())
    }
}

impl Range {
    /// Checks `cfg` and fills in the defaults.
    pub fn from_config(cfg: &RangeConfig) -> Result<Range> {
        let invalid = |m: String| IpamError::InvalidRange(m);
        let subnet: IpNet = cfg.subnet.parse().map_err(|_| invalid(format!("invalid subnet {:?}", cfg.subnet)))?;
        let v6 = subnet.addr().is_ipv6();
        let bits = if v6 { 128 } else { 32 };
        if subnet.prefix_len() > bits - 2 {
            return Err(invalid(format!("network {subnet} too small to allocate from")));
        }
        if subnet.addr() != subnet.network() {
            return Err(invalid(format!(
                "network has host bits set. For a subnet mask of length {} the network address is {}",
                subnet.prefix_len(),
                subnet.network()
            )));
        }
        let network = to_u128(subnet.network());
        let last = to_u128(subnet.broadcast()) - u128::from(!v6);
        let check = |what: &str, ip: Option<IpAddr>, default: u128| -> Result<IpAddr> {
            match ip {
                None => Ok(from_u128(default, v6)),
                Some(ip) if subnet.contains(&ip) => Ok(ip),
                Some(ip) => Err(invalid(format!("{what} {ip} not in network {subnet}"))),
            }
        };
        let gateway = check("gateway", cfg.gateway, network + 1)?;
        let start = check("RangeStart", cfg.range_start, network + 1)?;
        let end = check("RangeEnd", cfg.range_end, last)?;
        if to_u128(start) > to_u128(end) {
            return Err(invalid(format!("RangeStart {start} is after RangeEnd {end}")));
        }
        Ok(Range { subnet, start, end, gateway })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv6() == self.start.is_ipv6() && (to_u128(self.start)..=to_u128(self.end)).contains(&to_u128(ip))
    }

    fn overlaps(&self, other: &Range) -> bool {
        self.start.is_ipv6() == other.start.is_ipv6()
            && to_u128(self.start) <= to_u128(other.end)
            && to_u128(other.start) <= to_u128(self.end)
    }
}

/// Checks every range of every set, that a set holds one family, and that no two ranges overlap.
pub fn canonicalize(sets: &[Vec<RangeConfig>]) -> Result<Vec<RangeSet>> {
    let sets: Vec<RangeSet> = sets
        .iter()
        .map(|set| {
            if set.is_empty() {
                return Err(IpamError::InvalidRange("empty range set".into()));
            }
            let ranges = set.iter().map(Range::from_config).collect::<Result<RangeSet>>()?;
            if ranges.iter().any(|r| r.start.is_ipv6() != ranges[0].start.is_ipv6()) {
                return Err(IpamError::InvalidRange("mixed address families in one range set".into()));
            }
            Ok(ranges)
        })
        .collect::<Result<_>>()?;
    let all: Vec<&Range> = sets.iter().flatten().collect();
    for (i, a) in all.iter().enumerate() {
        if let Some(b) = all[i + 1..].iter().find(|b| a.overlaps(b)) {
            return Err(IpamError::InvalidRange(format!("range {} overlaps with range {}", a.subnet, b.subnet)));
        }
    }
    Ok(sets)
}

/// Prints a set the way errors name it (`198.19.0.1-198.19.0.254`).
pub fn describe(set: &RangeSet) -> String {
    set.iter().map(|r| format!("{}-{}", r.start, r.end)).collect::<Vec<_>>().join(",")
}

/// Every candidate address of `set` in round-robin order: starting after `last` when it lies in
/// the set (else at the first range's start), wrapping around once, skipping each range's gateway.
pub fn round_robin(set: &RangeSet, last: Option<IpAddr>) -> impl Iterator<Item = (usize, IpAddr)> + '_ {
    let (start_range, start_ip) = match last.and_then(|ip| set.iter().position(|r| r.contains(ip)).map(|i| (i, ip))) {
        Some((i, ip)) => (i, Some(to_u128(ip))),
        None => (0, None),
    };
    // The ranges in order starting with the one holding `last`, then that range's head again.
    let order = (0..set.len()).map(move |k| (start_range + k) % set.len()).chain(std::iter::once(start_range));
    order.enumerate().flat_map(move |(pass, idx)| {
        let r = &set[idx];
        let v6 = r.start.is_ipv6();
        let (lo, hi) = (to_u128(r.start), to_u128(r.end));
        let (from, to) = match (pass, start_ip) {
            (0, Some(s)) => (s + 1, hi),
            (p, Some(s)) if p == set.len() => (lo, s),
            (p, None) if p == set.len() => (1, 0), // no wrap-around needed
            _ => (lo, hi),
        };
        let gateway = to_u128(r.gateway);
        (from..=to).filter(move |v| *v != gateway).map(move |v| (idx, from_u128(v, v6)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(subnet: &str) -> RangeConfig {
        RangeConfig { subnet: subnet.into(), range_start: None, range_end: None, gateway: None }
    }

    #[test]
    fn defaults_match_reference() {
        let r = Range::from_config(&cfg("10.1.2.0/24")).unwrap();
        assert_eq!(r.gateway.to_string(), "10.1.2.1");
        assert_eq!(r.start.to_string(), "10.1.2.1");
        assert_eq!(r.end.to_string(), "10.1.2.254");
        let r6 = Range::from_config(&cfg("fd00::/120")).unwrap();
        assert_eq!(r6.end.to_string(), "fd00::ff");
    }

    #[test]
    fn rejects_bad_ranges() {
        assert!(Range::from_config(&cfg("10.1.2.1/24")).is_err());
        assert!(Range::from_config(&cfg("10.1.2.0/31")).is_err());
        let mut c = cfg("10.1.2.0/24");
        c.range_start = Some("10.1.3.5".parse().unwrap());
        assert!(Range::from_config(&c).is_err());
        assert!(canonicalize(&[vec![cfg("10.1.0.0/16")], vec![cfg("10.1.2.0/24")]]).is_err());
        assert!(canonicalize(&[vec![cfg("10.1.0.0/24"), cfg("fd00::/64")]]).is_err());
    }

    #[test]
    fn round_robin_skips_gateway_and_wraps() {
        let mut c = cfg("10.0.0.0/29");
        c.range_end = Some("10.0.0.5".parse().unwrap());
        let set = vec![Range::from_config(&c).unwrap()];
        let all: Vec<String> = round_robin(&set, None).map(|(_, ip)| ip.to_string()).collect();
        assert_eq!(all, ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]);
        let from3: Vec<String> =
            round_robin(&set, Some("10.0.0.3".parse().unwrap())).map(|(_, ip)| ip.to_string()).collect();
        assert_eq!(from3, ["10.0.0.4", "10.0.0.5", "10.0.0.2", "10.0.0.3"]);
    }

    #[test]
    fn round_robin_over_several_ranges() {
        let set =
            vec![Range::from_config(&cfg("10.0.0.0/30")).unwrap(), Range::from_config(&cfg("10.0.1.0/30")).unwrap()];
        let all: Vec<String> =
            round_robin(&set, Some("10.0.1.2".parse().unwrap())).map(|(_, ip)| ip.to_string()).collect();
        assert_eq!(all, ["10.0.0.2", "10.0.1.2"]);
    }
}
