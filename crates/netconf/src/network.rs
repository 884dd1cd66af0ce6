//! `net-conf.json`, flannel's cluster network config, with flannel's defaults and checks.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{ConfigError, Result};

/// The backends weft implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendType {
    #[serde(rename = "vxlan")]
    Vxlan,
    #[serde(rename = "host-gw")]
    HostGw,
}

impl BackendType {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendType::Vxlan => "vxlan",
            BackendType::HostGw => "host-gw",
        }
    }
}

/// The `Backend` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub kind: BackendType,
    pub vni: u32,
    pub port: u16,
    pub direct_routing: bool,
}

/// The cluster network, checked and with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub network: Ipv4Net,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub backend: Backend,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "Network")]
    network: Option<String>,
    #[serde(rename = "SubnetLen", default)]
    subnet_len: u8,
    #[serde(rename = "SubnetMin")]
    subnet_min: Option<Ipv4Addr>,
    #[serde(rename = "SubnetMax")]
    subnet_max: Option<Ipv4Addr>,
    #[serde(rename = "Backend", default)]
    backend: Option<Value>,
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

impl NetworkConfig {
    /// Parses and checks `net-conf.json` (flannel's rules: SubnetLen 24 for networks of /22 or
    /// larger, else one more bit than the network; SubnetMin skips the first subnet; networks
    /// smaller than /28 are refused).
    pub fn parse(text: &str) -> Result<NetworkConfig> {
        let raw: Raw = serde_json::from_str(text).map_err(|e| invalid(format!("net-conf.json: {e}")))?;
        let network: Ipv4Net = raw
            .network
            .ok_or_else(|| invalid("Network is missing (e.g. \"Network\": \"10.244.0.0/16\")"))?
            .parse()
            .map_err(|_| invalid("Network is not an IPv4 CIDR"))?;
        if network.addr() != network.network() {
            return Err(invalid(format!("Network {network} has host bits set (did you mean {}?)", network.trunc())));
        }
        if network.prefix_len() > 28 {
            return Err(invalid(format!("Network {network} is too small: it must be /28 or larger")));
        }
        let subnet_len = match raw.subnet_len {
            0 if network.prefix_len() < 23 => 24,
            0 => network.prefix_len() + 1,
            n if n > 30 => return Err(invalid(format!("SubnetLen {n} is too small a subnet: at most 30"))),
            n if n <= network.prefix_len() => {
                return Err(invalid(format!(
                    "SubnetLen {n} must be longer than the Network's /{}",
                    network.prefix_len()
                )))
            }
            n => n,
        };
        let size = 1u32 << (32 - subnet_len);
        let first = u32::from(network.network());
        let last = u32::from(network.broadcast());
        let subnet_min = raw.subnet_min.unwrap_or(Ipv4Addr::from(first + size));
        let subnet_max = raw.subnet_max.unwrap_or(Ipv4Addr::from(last + 1 - size));
        for (name, ip) in [("SubnetMin", subnet_min), ("SubnetMax", subnet_max)] {
            if !network.contains(&ip) || u32::from(ip) % size != 0 {
                return Err(invalid(format!("{name} {ip} is not a /{subnet_len} subnet inside {network}")));
            }
        }
        if u32::from(subnet_min) > u32::from(subnet_max) {
            return Err(invalid(format!("SubnetMin {subnet_min} is after SubnetMax {subnet_max}")));
        }
        let backend = parse_backend(raw.backend.unwrap_or(Value::Null))?;
        Ok(NetworkConfig { network, subnet_len, subnet_min, subnet_max, backend })
    }

    /// Every subnet nodes may lease, in order.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let size = 1u32 << (32 - self.subnet_len);
        (u32::from(self.subnet_min)..=u32::from(self.subnet_max))
            .step_by(size as usize)
            .filter_map(move |a| Ipv4Net::new(Ipv4Addr::from(a), self.subnet_len).ok())
    }

    /// Whether `subnet` is one nodes may lease (inside the range, aligned, the right size).
    pub fn is_leasable(&self, subnet: &Ipv4Net) -> bool {
        let size = 1u32 << (32 - self.subnet_len);
        let a = u32::from(subnet.addr());
        subnet.prefix_len() == self.subnet_len
            && a % size == 0
            && (u32::from(self.subnet_min)..=u32::from(self.subnet_max)).contains(&a)
    }
}

fn parse_backend(v: Value) -> Result<Backend> {
    let kind = match v.get("Type").and_then(Value::as_str).unwrap_or("vxlan") {
        "vxlan" => BackendType::Vxlan,
        "host-gw" => BackendType::HostGw,
        other => {
            return Err(invalid(format!("unknown backend type {other:?}; weft supports \"vxlan\" and \"host-gw\"")));
        }
    };
    let vni = v.get("VNI").and_then(Value::as_u64).unwrap_or(1);
    if vni == 0 || vni >= 1 << 24 {
        return Err(invalid(format!("VNI {vni} out of range 1-16777215")));
    }
    let port = v.get("Port").and_then(Value::as_u64).unwrap_or(8472);
    let port =
        u16::try_from(port).ok().filter(|p| *p != 0).ok_or_else(|| invalid(format!("Port {port} out of range")))?;
    let direct_routing = v.get("DirectRouting").and_then(Value::as_bool).unwrap_or(false);
    Ok(Backend { kind, vni: vni as u32, port, direct_routing })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_defaults() {
        let c = NetworkConfig::parse(r#"{"Network": "10.244.0.0/16"}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min.to_string(), "10.244.1.0");
        assert_eq!(c.subnet_max.to_string(), "10.244.255.0");
        assert_eq!(c.backend, Backend { kind: BackendType::Vxlan, vni: 1, port: 8472, direct_routing: false });
        assert_eq!(c.subnets().count(), 255);
        let small = NetworkConfig::parse(r#"{"Network": "10.5.0.0/24"}"#).unwrap();
        assert_eq!(small.subnet_len, 25);
    }

    #[test]
    fn explicit_values() {
        let c = NetworkConfig::parse(
            r#"{"Network": "198.19.0.0/16", "SubnetLen": 26, "SubnetMin": "198.19.1.0", "SubnetMax": "198.19.1.192",
                "Backend": {"Type": "host-gw"}}"#,
        )
        .unwrap();
        assert_eq!(
            c.subnets().map(|s| s.to_string()).collect::<Vec<_>>(),
            ["198.19.1.0/26", "198.19.1.64/26", "198.19.1.128/26", "198.19.1.192/26"]
        );
        assert_eq!(c.backend.kind, BackendType::HostGw);
        assert!(c.is_leasable(&"198.19.1.64/26".parse().unwrap()));
        assert!(!c.is_leasable(&"198.19.1.32/26".parse().unwrap()));
        assert!(!c.is_leasable(&"198.19.2.0/26".parse().unwrap()));
    }

    #[test]
    fn clear_errors() {
        let err = |t: &str| NetworkConfig::parse(t).unwrap_err().to_string();
        assert!(err(r#"{"Network": "10.0.0.0/29"}"#).contains("too small"));
        assert!(err(r#"{"Network": "10.0.0.1/16"}"#).contains("host bits"));
        assert!(err(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "ipip"}}"#).contains("unknown backend"));
        assert!(err(r#"{"Network": "10.0.0.0/16", "SubnetLen": 16}"#).contains("longer"));
        assert!(err(r#"{}"#).contains("Network is missing"));
        assert!(err(r#"{"Network": "10.0.0.0/16", "SubnetMin": "10.1.0.0"}"#).contains("SubnetMin"));
    }
}
