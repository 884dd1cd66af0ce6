//! `net-conf.json`, flannel's cluster network config, with flannel's defaults and checks.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::Value;

use crate::{ConfigError, Result};

/// The `Backend` section: its `Type` (flannel's default `vxlan`) and the rest of its keys, which
/// that backend reads by its own rules ([`Options`]): a new backend adds its own parser, not a
/// field here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub kind: String,
    options: serde_json::Map<String, Value>,
}

impl Backend {
    /// A section of type `kind` with `options` (the keys besides `Type`).
    pub fn new(kind: &str, options: serde_json::Map<String, Value>) -> Backend {
        Backend { kind: kind.to_string(), options }
    }

    /// The section's keys, read as flannel reads them.
    pub fn options(&self) -> Options<'_> {
        Options { object: &self.options }
    }
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
/// The routed backend's name (its subnets are IPAM blocks of `BlockSize`).
pub const BGP: &str = "bgp";

const KEYS: &[&str] = &["Network", "SubnetLen", "SubnetMin", "SubnetMax", "Backend"];
const FLANNEL_ONLY_KEYS: &[&str] =
    &["EnableIPv4", "EnableIPv6", "IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax", "EnableNFTables"];

/// A JSON object's keys as flannel (Go's `encoding/json`) matches them: the exact name, else
/// the name in any case. Keys matching none of `known` or `ignored` are reported.
#[derive(Debug, Clone, Copy)]
pub struct Options<'a> {
    object: &'a serde_json::Map<String, Value>,
}

impl<'a> Options<'a> {
    fn of(value: &'a Value, what: &str) -> Result<Options<'a>> {
        match value {
            Value::Object(object) => Ok(Options { object }),
            _ => Err(invalid(format!("{what} must be a JSON object"))),
        }
    }

    /// The value of `name` (null counts as absent).
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.object
            .get(name)
            .or_else(|| self.object.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v))
            .filter(|v| !v.is_null())
    }

    /// `name` as a string, if present; an error when it is something else.
    pub fn string(&self, name: &str) -> Result<Option<&'a str>> {
        string(self.get(name), name)
    }

    /// `name` as a whole number, if present.
    pub fn number(&self, name: &str) -> Result<Option<u64>> {
        number(self.get(name), name)
    }

    /// `name` as true or false, if present.
    pub fn boolean(&self, name: &str) -> Result<Option<bool>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(invalid(format!("{name} must be true or false, not {other}"))),
        }
    }

    /// A warning for every key that is neither `known` nor a flannel setting weft ignores.
    pub fn unknown(&self, known: &[&str], ignored: &[&str], what: &str, warnings: &mut Vec<String>) {
        for key in self.object.keys() {
            if ignored.iter().any(|k| k.eq_ignore_ascii_case(key)) {
                warnings.push(format!("{what}: {key:?} is a flannel setting weft does not implement; ignored"));
            } else if !known.iter().any(|k| k.eq_ignore_ascii_case(key)) {
                warnings.push(format!("{what}: unknown key {key:?} ignored (known: {})", known.join(", ")));
            }
        }
    }
}

/// An invalid-config error (for backends reading their options).
pub fn invalid_option(msg: impl Into<String>) -> ConfigError {
    invalid(msg)
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
        let keys = Options::of(&value, "net-conf.json")?;
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
        let backend = parse_backend(keys.get("Backend"))?;
        // Routed mode: each node's subnets are IPAM blocks of `BlockSize` bits (26 by default,
        // as Calico's), every one of them usable (no first subnet kept back).
        let block_size = if backend.kind == BGP {
            let size = backend.options().number("BlockSize")?.unwrap_or(26);
            if !(u64::from(network.prefix_len())..=30).contains(&size) {
                return Err(invalid(format!(
                    "BlockSize {size}: a block is between the Network's /{} and /30",
                    network.prefix_len()
                )));
            }
            match number(keys.get("SubnetLen"), "SubnetLen")? {
                None | Some(0) => {}
                Some(n) if n == size => {}
                Some(n) => {
                    return Err(invalid(format!(
                        "SubnetLen {n} differs from the bgp backend's BlockSize {size}: give BlockSize only"
                    )))
                }
            }
            Some(size as u8)
        } else {
            None
        };
        let subnet_len = match number(keys.get("SubnetLen"), "SubnetLen")? {
            _ if block_size.is_some() => block_size.unwrap_or(26),
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
        let skip_first = if block_size.is_some() { 0 } else { size };
        let subnet_min = address(keys.get("SubnetMin"), "SubnetMin")?.unwrap_or(Ipv4Addr::from(first + skip_first));
        let subnet_max = address(keys.get("SubnetMax"), "SubnetMax")?.unwrap_or(Ipv4Addr::from(last + 1 - size));
        for (name, ip) in [("SubnetMin", subnet_min), ("SubnetMax", subnet_max)] {
            if !network.contains(&ip) || u32::from(ip) % size != 0 {
                return Err(invalid(format!("{name} {ip} is not a /{subnet_len} subnet inside {network}")));
            }
        }
        if u32::from(subnet_min) > u32::from(subnet_max) {
            return Err(invalid(format!("SubnetMin {subnet_min} is after SubnetMax {subnet_max}")));
        }
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

/// The `Backend` section: an object whose `Type` is a string (default `vxlan`); the rest is the
/// backend's to read.
fn parse_backend(v: Option<&Value>) -> Result<Backend> {
    let empty = Value::Object(serde_json::Map::new());
    let keys = Options::of(v.unwrap_or(&empty), "Backend")?;
    let kind = keys.string("Type")?.unwrap_or("vxlan");
    let options = keys
        .object
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("Type"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Backend::new(kind, options))
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
        assert_eq!(c.backend, Backend::new("vxlan", Default::default()));
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
        assert_eq!(
            (c.backend.options().number("VNI").unwrap(), c.backend.options().number("Port").unwrap()),
            (Some(7), Some(4789))
        );
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        // The exact name wins over another case.
        let c = NetworkConfig::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"vni": 5, "VNI": 6}}"#).unwrap();
        assert_eq!(c.backend.options().number("VNI").unwrap(), Some(6));
        let c = NetworkConfig::parse(
            r#"{"Network": "10.244.0.0/16", "SubnetLenght": 26, "EnableIPv6": false, "Backend": {"VNi": 3, "Learning": true, "Vni2": 1}}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.backend.options().number("VNI").unwrap(), Some(3));
        let mut warnings = c.warnings.clone();
        c.backend.options().unknown(&["VNI"], &["Learning"], "Backend (vxlan)", &mut warnings);
        let all = warnings.join("\n");
        assert_eq!(warnings.len(), 4, "{all}");
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
        assert_eq!(c.backend.kind, "host-gw");
        assert!(c.is_leasable(&"198.19.1.64/26".parse().unwrap()));
        assert!(!c.is_leasable(&"198.19.1.32/26".parse().unwrap()));
        assert!(!c.is_leasable(&"198.19.2.0/26".parse().unwrap()));
    }

    #[test]
    fn clear_errors() {
        let err = |t: &str| NetworkConfig::parse(t).unwrap_err().to_string();
        assert!(err(r#"{"Network": "10.0.0.0/29"}"#).contains("too small"));
        assert!(err(r#"{"Network": "10.0.0.1/16"}"#).contains("host bits"));
        assert!(err(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": 7}}"#).contains("Type must be a string"));
        assert!(err(r#"{"Network": "10.0.0.0/16", "SubnetLen": 16}"#).contains("at least four subnets, so at least 18"));
        assert!(err(r#"{"Network": "10.0.0.0/16", "SubnetLen": 17}"#).contains("at least 18"));
        assert!(err(r#"{"Network": "10.0.0.0/16", "Backend": []}"#).contains("JSON object"));
        assert!(err(r#"[]"#).contains("JSON object"));
        assert!(err(r#"{}"#).contains("Network is missing"));
        assert!(err(r#"{"Network": "10.0.0.0/16", "SubnetMin": "10.1.0.0"}"#).contains("SubnetMin"));
    }
}
