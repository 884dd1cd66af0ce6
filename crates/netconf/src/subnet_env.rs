//! `subnet.env`: `FLANNEL_NETWORK`, `FLANNEL_SUBNET` (the first usable address with the subnet's
//! prefix), `FLANNEL_MTU`, `FLANNEL_IPMASQ`, and the IPv6 pair when dual stack. Written
//! atomically by the agent once the node is ready.

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
        Ok(SubnetEnv {
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
    fn rejects_broken_files() {
        assert!(SubnetEnv::parse("FLANNEL_SUBNET=10.244.1.1/24\n").is_err());
        assert!(SubnetEnv::parse("FLANNEL_NETWORK=x\nFLANNEL_SUBNET=10.244.1.1/24\n").is_err());
        assert!(SubnetEnv::parse("garbage\n").is_err());
    }
}
