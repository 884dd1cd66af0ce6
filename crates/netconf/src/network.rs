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
    /// What an operator should hear about: keys weft does not know (a typo flannel would
    /// ignore too), flannel settings weft does not implement.
    pub warnings: Vec<String>,
}

/// The top-level keys flannel reads; those weft acts on come first.
const KEYS: &[&str] = &["Network", "SubnetLen", "SubnetMin", "SubnetMax", "Backend"];
const FLANNEL_ONLY_KEYS: &[&str] =
    &["EnableIPv4", "EnableIPv6", "IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax", "EnableNFTables"];
const VXLAN_KEYS: &[&str] = &["Type", "VNI", "Port", "DirectRouting"];
const VXLAN_FLANNEL_ONLY_KEYS: &[&str] = &["GBP", "Learning", "MTU", "MacPrefix"];
const HOST_GW_KEYS: &[&str] = &["Type"];

/// A JSON object's keys as flannel (Go's `encoding/json`) matches them: the exact name, else
/// the name in any case. Keys matching none of `known` or `ignored` are reported.
struct Keys<'a> {
    object: &'a serde_json::Map<String, Value>,
}

impl<'a> Keys<'a> {
    fn of(value: &'a Value, what: &str) -> Result<Keys<'a>> {
        match value {
            Value::Object(object) => Ok(Keys { object }),
            _ => Err(invalid(format!("{what} must be a JSON object"))),
        }
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.object
            .get(name)
            .or_else(|| self.object.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v))
            .filter(|v| !v.is_null())
    }

    fn unknown(&self, known: &[&str], ignored: &[&str], what: &str, warnings: &mut Vec<String>) {
        for key in self.object.keys() {
            if ignored.iter().any(|k| k.eq_ignore_ascii_case(key)) {
                warnings.push(format!("{what}: {key:?} is a flannel setting weft does not implement; ignored"));
            } else if !known.iter().any(|k| k.eq_ignore_ascii_case(key)) {
                warnings.push(format!("{what}: unknown key {key:?} ignored (known: {})", known.join(", ")));
            }
        }
    }
}

fn string<'v>(value: Option<&'v Value>, name: &str) -> Result<Option<&'v str>> {
    match value {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(format!("{name} must be a string, not {other}"))),
    }
}

fn number(value: Option<&Value>, name: &str) -> Result<Option<u64>> {
    match value {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| invalid(format!("{name} must be a whole number, not {v}"))),
    }
}

fn address(value: Option<&Value>, name: &str) -> Result<Option<Ipv4Addr>> {
    string(value, name)?
        .map(|s| s.parse().map_err(|_| invalid(format!("{name} {s:?} is not an IPv4 address"))))
        .transpose()
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

impl NetworkConfig {
    /// Parses and checks `net-conf.json` with flannel's rules: keys in any case; SubnetLen 24
    /// for networks of /22 or larger, else two more bits than the network (four subnets), and
    /// never fewer; SubnetMin skips the first subnet; networks smaller than /28 are refused.
    /// Unknown keys are reported in `warnings`.
    pub fn parse(text: &str) -> Result<NetworkConfig> {
        let value: Value = serde_json::from_str(text).map_err(|e| invalid(format!("net-conf.json: {e}")))?;
        let keys = Keys::of(&value, "net-conf.json")?;
        let mut warnings = Vec::new();
        keys.unknown(KEYS, FLANNEL_ONLY_KEYS, "net-conf.json", &mut warnings);
        let network: Ipv4Net = string(keys.get("Network"), "Network")?
            .ok_or_else(|| invalid("Network is missing (e.g. \"Network\": \"10.244.0.0/16\")"))?
            .parse()
            .map_err(|_| invalid("Network is not an IPv4 CIDR"))?;
        if network.addr() != network.network() {
            return Err(invalid(format!("Network {network} has host bits set (did you mean {}?)", network.trunc())));
        }
        if network.prefix_len() > 28 {
            return Err(invalid(format!("Network {network} is too small: it must be /28 or larger")));
        }
        let subnet_len = match number(keys.get("SubnetLen"), "SubnetLen")? {
            None | Some(0) if network.prefix_len() <= 22 => 24,
            None | Some(0) => network.prefix_len() + 2,
            Some(n) if n > 30 => return Err(invalid(format!("SubnetLen {n} is too small a subnet: at most 30"))),
            Some(n) if n < u64::from(network.prefix_len()) + 2 => {
                return Err(invalid(format!(
                    "SubnetLen {n}: the Network /{} must hold at least four subnets, so at least {}",
                    network.prefix_len(),
                    network.prefix_len() + 2
                )))
            }
            Some(n) => n as u8,
        };
        let size = 1u32 << (32 - subnet_len);
        let first = u32::from(network.network());
        let last = u32::from(network.broadcast());
        let subnet_min = address(keys.get("SubnetMin"), "SubnetMin")?.unwrap_or(Ipv4Addr::from(first + size));
        let subnet_max = address(keys.get("SubnetMax"), "SubnetMax")?.unwrap_or(Ipv4Addr::from(last + 1 - size));
        for (name, ip) in [("SubnetMin", subnet_min), ("SubnetMax", subnet_max)] {
            if !network.contains(&ip) || u32::from(ip) % size != 0 {
                return Err(invalid(format!("{name} {ip} is not a /{subnet_len} subnet inside {network}")));
            }
        }
        if u32::from(subnet_min) > u32::from(subnet_max) {
            return Err(invalid(format!("SubnetMin {subnet_min} is after SubnetMax {subnet_max}")));
        }
        let backend = parse_backend(keys.get("Backend"), &mut warnings)?;
        Ok(NetworkConfig { network, subnet_len, subnet_min, subnet_max, backend, warnings })
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

/// The `Backend` section, read by its `Type`'s own rules.
fn parse_backend(v: Option<&Value>, warnings: &mut Vec<String>) -> Result<Backend> {
    let empty = Value::Object(serde_json::Map::new());
    let keys = Keys::of(v.unwrap_or(&empty), "Backend")?;
    let kind = match string(keys.get("Type"), "Backend.Type")?.unwrap_or("vxlan") {
        "vxlan" => BackendType::Vxlan,
        "host-gw" => BackendType::HostGw,
        other => {
            return Err(invalid(format!("unknown backend type {other:?}; weft supports \"vxlan\" and \"host-gw\"")));
        }
    };
    match kind {
        BackendType::Vxlan => keys.unknown(VXLAN_KEYS, VXLAN_FLANNEL_ONLY_KEYS, "Backend (vxlan)", warnings),
        BackendType::HostGw => keys.unknown(HOST_GW_KEYS, &[], "Backend (host-gw)", warnings),
    }
    let vni = number(keys.get("VNI"), "VNI")?.unwrap_or(1);
    if vni == 0 || vni >= 1 << 24 {
        return Err(invalid(format!("VNI {vni} out of range 1-16777215")));
    }
    let port = number(keys.get("Port"), "Port")?.unwrap_or(8472);
    let port =
        u16::try_from(port).ok().filter(|p| *p != 0).ok_or_else(|| invalid(format!("Port {port} out of range")))?;
    let direct_routing = match keys.get("DirectRouting") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(invalid(format!("DirectRouting must be true or false, not {other}"))),
    };
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
        assert_eq!(small.subnet_len, 26, "flannel: four subnets");
        assert_eq!(NetworkConfig::parse(r#"{"Network": "10.5.0.0/22"}"#).unwrap().subnet_len, 24);
        assert_eq!(NetworkConfig::parse(r#"{"Network": "10.5.0.0/23"}"#).unwrap().subnet_len, 25);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn keys_in_any_case_as_flannel_reads_them_and_unknown_keys_reported() {
        let c = NetworkConfig::parse(
            r#"{"network": "10.244.0.0/16", "subnetlen": 26, "backend": {"type": "vxlan", "vni": 7, "PORT": 4789}}"#,
        )
        .unwrap();
        assert_eq!((c.network.to_string().as_str(), c.subnet_len), ("10.244.0.0/16", 26));
        assert_eq!((c.backend.vni, c.backend.port), (7, 4789));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        // The exact name wins over another case.
        let c = NetworkConfig::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"vni": 5, "VNI": 6}}"#).unwrap();
        assert_eq!(c.backend.vni, 6);
        let c = NetworkConfig::parse(
            r#"{"Network": "10.244.0.0/16", "SubnetLenght": 26, "EnableIPv6": false, "Backend": {"VNi": 3, "Learning": true, "Vni2": 1}}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.backend.vni, 3);
        let all = c.warnings.join("\n");
        assert_eq!(c.warnings.len(), 4, "{all}");
        for said in
            ["\"SubnetLenght\"", "\"EnableIPv6\" is a flannel setting", "\"Learning\" is a flannel setting", "\"Vni2\""]
        {
            assert!(all.contains(said), "no warning says {said}: {all}");
        }
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
        assert!(err(r#"{"Network": "10.0.0.0/16", "SubnetLen": 16}"#).contains("at least four subnets, so at least 18"));
        assert!(err(r#"{"Network": "10.0.0.0/16", "SubnetLen": 17}"#).contains("at least 18"));
        assert!(err(r#"{"Network": "10.0.0.0/16", "Backend": {"VNI": "7"}}"#).contains("whole number"));
        assert!(err(r#"{"Network": "10.0.0.0/16", "Backend": []}"#).contains("JSON object"));
        assert!(err(r#"[]"#).contains("JSON object"));
        assert!(err(r#"{}"#).contains("Network is missing"));
        assert!(err(r#"{"Network": "10.0.0.0/16", "SubnetMin": "10.1.0.0"}"#).contains("SubnetMin"));
    }
}
