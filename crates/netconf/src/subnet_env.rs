//! `subnet.env`: `FLANNEL_NETWORK`, `FLANNEL_SUBNET` (the first usable address with the subnet's
//! prefix), `FLANNEL_MTU`, `FLANNEL_IPMASQ`, and the IPv6 pair when dual stack. Written
//! atomically by the agent once the node is ready.
//!
//! Routed mode (the `bgp` backend) adds weft's own keys, which flannel's plugin ignores:
//! `WEFT_ROUTED=true`, `WEFT_BLOCKS` (every IPAM block the node holds, comma-separated; the
//! first is `FLANNEL_SUBNET`'s), `WEFT_IPAM_DIR` (where pods' reservations are kept, so the
//! agent sees how full its blocks are) and `WEFT_EXHAUSTED=true` when the network has no free
//! block left for this node.

use std::path::Path;

use ipnet::IpNet;

use crate::{ConfigError, Result};

/// What the node agent leased, as the CNI plugin reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: IpNet,
    /// The node's subnet, as written: its first address with the subnet's prefix length.
    pub subnet: IpNet,
    pub mtu: u32,
    pub ipmasq: bool,
    pub ipv6_network: Option<IpNet>,
    pub ipv6_subnet: Option<IpNet>,
    /// Routed mode: what the node's pods are given (see the module's documentation).
    pub routed: Option<Routed>,
}

/// Routed mode's part of the subnet file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub blocks: Vec<ipnet::Ipv4Net>,
    pub ipam_dir: std::path::PathBuf,
    pub exhausted: bool,
}

impl SubnetEnv {
    pub fn parse(text: &str) -> Result<SubnetEnv> {
        let invalid = |m: String| ConfigError::Invalid(format!("subnet file: {m}"));
        let mut get = std::collections::HashMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (k, v) = line.split_once('=').ok_or_else(|| invalid(format!("bad line {line:?}")))?;
            get.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
        }
        let net = |key: &str| -> Result<Option<IpNet>> {
            get.get(key).map(|v| v.parse().map_err(|_| invalid(format!("{key}={v:?} is not a CIDR")))).transpose()
        };
        let network = net("FLANNEL_NETWORK")?.ok_or_else(|| invalid("FLANNEL_NETWORK missing".into()))?;
        let subnet = net("FLANNEL_SUBNET")?.ok_or_else(|| invalid("FLANNEL_SUBNET missing".into()))?;
        let mtu = match get.get("FLANNEL_MTU") {
            Some(v) => v.parse().map_err(|_| invalid(format!("FLANNEL_MTU={v:?}")))?,
            None => 1500,
        };
        let ipmasq = get.get("FLANNEL_IPMASQ").is_some_and(|v| v == "true");
        let routed = if get.get("WEFT_ROUTED").is_some_and(|v| v == "true") {
            let text = get.get("WEFT_BLOCKS").map(String::as_str).unwrap_or_default();
            let blocks = text
                .split(',')
                .filter(|b| !b.trim().is_empty())
                .map(|b| b.trim().parse().map_err(|_| invalid(format!("WEFT_BLOCKS: {b:?} is not an IPv4 CIDR"))))
                .collect::<Result<Vec<ipnet::Ipv4Net>>>()?;
            let ipam_dir = get.get("WEFT_IPAM_DIR").ok_or_else(|| invalid("WEFT_IPAM_DIR missing".into()))?;
            Some(Routed {
                blocks,
                ipam_dir: ipam_dir.into(),
                exhausted: get.get("WEFT_EXHAUSTED").is_some_and(|v| v == "true"),
            })
        } else {
            None
        };
        Ok(SubnetEnv {
            routed,
            network,
            subnet,
            mtu,
            ipmasq,
            ipv6_network: net("FLANNEL_IPV6_NETWORK")?,
            ipv6_subnet: net("FLANNEL_IPV6_SUBNET")?,
        })
    }

    pub fn read(path: &Path) -> Result<SubnetEnv> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            op: "reading",
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network, self.subnet, self.mtu, self.ipmasq
        );
        if let (Some(n), Some(s)) = (self.ipv6_network, self.ipv6_subnet) {
            out.push_str(&format!("FLANNEL_IPV6_NETWORK={n}\nFLANNEL_IPV6_SUBNET={s}\n"));
        }
        if let Some(r) = &self.routed {
            let blocks: Vec<String> = r.blocks.iter().map(ToString::to_string).collect();
            out.push_str(&format!(
                "WEFT_ROUTED=true\nWEFT_BLOCKS={}\nWEFT_IPAM_DIR={}\n",
                blocks.join(","),
                r.ipam_dir.display()
            ));
            if r.exhausted {
                out.push_str("WEFT_EXHAUSTED=true\n");
            }
        }
        out
    }

    /// Writes the file atomically (a reader never sees half of it).
    pub fn write(&self, path: &Path) -> Result<()> {
        let io = |op: &'static str| move |source| ConfigError::Io { op, path: path.display().to_string(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io("creating the directory of"))?;
        }
        let tmp =
            path.with_file_name(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("subnet.env")));
        std::fs::write(&tmp, self.render()).map_err(io("writing"))?;
        std::fs::rename(&tmp, path).map_err(io("renaming"))
    }

    /// The node's subnet as a network (`10.244.1.0/24`).
    pub fn subnet_network(&self) -> IpNet {
        self.subnet.trunc()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let text =
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
        let env = SubnetEnv::parse(text).unwrap();
        assert_eq!(env.subnet_network().to_string(), "10.244.1.0/24");
        assert_eq!(env.mtu, 1450);
        assert!(env.ipmasq);
        assert_eq!(env.render(), text);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/subnet.env");
        env.write(&path).unwrap();
        assert_eq!(SubnetEnv::read(&path).unwrap(), env);
    }

    #[test]
    fn routed_keys_round_trip() {
        let text =
            "FLANNEL_NETWORK=198.19.0.0/16\nFLANNEL_SUBNET=198.19.0.1/26\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n\
                    WEFT_ROUTED=true\nWEFT_BLOCKS=198.19.0.0/26,198.19.0.64/26\nWEFT_IPAM_DIR=/var/lib/weft/ipam\n";
        let env = SubnetEnv::parse(text).unwrap();
        let routed = env.routed.clone().unwrap();
        assert_eq!(routed.blocks.len(), 2);
        assert!(!routed.exhausted);
        assert_eq!(env.render(), text);
        assert!(SubnetEnv::parse(&text.replace("198.19.0.64/26", "nonsense")).is_err());
        assert!(SubnetEnv::parse(&text.replace("WEFT_IPAM_DIR=/var/lib/weft/ipam\n", "")).is_err());
    }

    #[test]
    fn rejects_broken_files() {
        assert!(SubnetEnv::parse("FLANNEL_SUBNET=10.244.1.1/24\n").is_err());
        assert!(SubnetEnv::parse("FLANNEL_NETWORK=x\nFLANNEL_SUBNET=10.244.1.1/24\n").is_err());
        assert!(SubnetEnv::parse("garbage\n").is_err());
    }
}
