//! Leases in flannel's layout: the key `<a.b.c.d>-<len>` and the value
//! `{"PublicIP", "PublicIPv6", "BackendType", "BackendData"}`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::SystemTime;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{LeaseError, Result};

/// What a lease says about its node, as flannel writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(rename = "BackendType")]
    pub backend_type: String,
    #[serde(rename = "BackendData", default)]
    pub backend_data: Value,
}

/// The VXLAN backend's data: `{"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanData {
    #[serde(rename = "VNI", default)]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: String,
}

/// One node's lease on a subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub subnet: Ipv4Net,
    pub attrs: LeaseAttrs,
    /// When it expires unless renewed; `None` for a reservation (never expires).
    pub expires: Option<SystemTime>,
    /// The store's revision when the key was created (etcd's create revision): of two claims
    /// that conflict (one subnet, one VTEP MAC), the older one counts. `None` when unknown
    /// (counts as the youngest).
    pub created: Option<i64>,
}

/// The BackendData key that marks a routed-mode block claimed beyond its node's lease.
pub const BLOCK_KEY: &str = "Block";

impl Lease {
    /// A routed-mode block claimed beyond its node's lease (`"Block": true` in its BackendData).
    pub fn is_block(&self) -> bool {
        self.attrs.backend_data.get(BLOCK_KEY).and_then(serde_json::Value::as_bool) == Some(true)
    }

    /// The store key: `10.244.1.0-24`.
    pub fn key(&self) -> String {
        subnet_key(&self.subnet)
    }

    /// The VXLAN data, if the lease carries it.
    pub fn vxlan(&self) -> Option<VxlanData> {
        serde_json::from_value(self.attrs.backend_data.clone()).ok()
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

/// `10.244.1.0/24` → `10.244.1.0-24`.
pub(crate) fn subnet_key(subnet: &Ipv4Net) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix_len())
}

/// `10.244.1.0-24` → `10.244.1.0/24` (dual-stack keys `...&fc00::-64` keep their IPv4 part).
/// Only a canonical key names a subnet: `10.244.1.5-24` (host bits set) is refused.
pub(crate) fn parse_key(key: &str) -> Result<Ipv4Net> {
    let v4 = key.split('&').next().unwrap_or(key);
    let bad = |reason: &str| LeaseError::Corrupt { key: key.to_string(), reason: reason.into() };
    let subnet: Ipv4Net = v4.replacen('-', "/", 1).parse().map_err(|_| bad("not a subnet key"))?;
    if subnet_key(&subnet) != v4 {
        return Err(bad("not a subnet's network address (host bits set)"));
    }
    Ok(subnet)
}

impl Lease {
    /// Whether `self` counts over `other` when both claim the same thing: the older claim, and
    /// between equally old ones the lower subnet (so the choice never alternates).
    pub fn outranks(&self, other: &Lease) -> bool {
        let age = |l: &Lease| l.created.unwrap_or(i64::MAX);
        (age(self), self.subnet) < (age(other), other.subnet)
    }
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    Added(Lease),
    Removed(Lease),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_json() {
        let text = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
        let attrs: LeaseAttrs = serde_json::from_str(text).unwrap();
        let lease =
            Lease { subnet: "10.5.52.0/24".parse().unwrap(), attrs: attrs.clone(), expires: None, created: None };
        assert_eq!(lease.key(), "10.5.52.0-24");
        assert_eq!(lease.vxlan().unwrap().vtep_mac, "c6:d2:32:6f:8f:44");
        assert_eq!(serde_json::to_string(&attrs).unwrap(), text);
        assert_eq!(parse_key("10.5.52.0-24&fc00::-64").unwrap().to_string(), "10.5.52.0/24");
        assert!(parse_key("nonsense").is_err());
        assert!(parse_key("10.5.52.7-24").is_err(), "host bits");
        assert!(parse_key("10.5.52.0-24 ").is_err());
    }
}
