//! `portmap`: publishes container ports on the host (`runtimeConfig.portMappings`). Traffic to a
//! local address and host port is DNATed to the container (from outside, from other pods and
//! from the host itself, `127.0.0.1` included); a pod reaching its own host port is masqueraded
//! (hairpin). All of an attachment's rules are one nftables transaction tagged with the
//! attachment key: a re-ADD replaces them, DEL and GC remove exactly them.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;
use weft_cni::args::CmdArgs;
use weft_cni::skel::{parse_plugin_conf, Attachment, Plugin};
use weft_cni::{CniError, CniResult, NetConf};
use weft_dataplane::sysctl;

use crate::common::{attachment_key, prev_result};
use crate::rules::{self, BaseChain, Expr, Field, Op, HOSTPORTS_OUT, HOSTPORTS_PRE, HOSTPORTS_SNAT};

pub struct Portmap;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct PortMapping {
    #[serde(rename = "hostPort")]
    pub host_port: u16,
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
    #[serde(rename = "hostIP", default)]
    pub host_ip: String,
}

fn tcp() -> String {
    "tcp".to_string()
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Default, Deserialize)]
struct RuntimeConfig {
    #[serde(rename = "portMappings", default)]
    port_mappings: Vec<PortMapping>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct PortmapConf {
    #[serde(default)]
    name: String,
    #[serde(default = "default_true")]
    snat: bool,
    #[serde(rename = "runtimeConfig", default)]
    runtime_config: RuntimeConfig,
}

impl PortmapConf {
    pub(crate) fn load(stdin: &[u8]) -> Result<PortmapConf, CniError> {
        let conf: PortmapConf = parse_plugin_conf(stdin)?;
        for m in &conf.runtime_config.port_mappings {
            if m.host_port == 0 || m.container_port == 0 {
                return Err(CniError::invalid_config(format!("invalid port mapping {m:?}: ports must be 1-65535")));
            }
            if !matches!(m.protocol.to_lowercase().as_str(), "tcp" | "udp" | "sctp") {
                return Err(CniError::invalid_config(format!("unknown protocol {:?}", m.protocol)));
            }
            if !m.host_ip.is_empty() && m.host_ip.parse::<IpAddr>().is_err() {
                return Err(CniError::invalid_config(format!("invalid hostIP {:?}", m.host_ip)));
            }
        }
        Ok(conf)
    }

    fn key(&self, args: &CmdArgs) -> String {
        attachment_key("hostport", &self.name, &args.container_id, &args.ifname)
    }
}

/// The rules publishing `mappings` to the container addresses `ips` (one per family).
fn mapping_rules(key: &str, mappings: &[PortMapping], ips: &[IpAddr], snat: bool) -> Vec<Value> {
    let mut cmds = Vec::new();
    for ip in ips {
        let own = IpNet::from(*ip);
        for m in mappings {
            let host_ip: Option<IpAddr> = m.host_ip.parse().ok().filter(|h: &IpAddr| !h.is_unspecified());
            if host_ip.is_some_and(|h| h.is_ipv4() != ip.is_ipv4()) {
                continue;
            }
            let dest = match host_ip {
                Some(h) => Expr::Addr { field: Field::Daddr, op: Op::Eq, net: IpNet::from(h) },
                None => Expr::LocalDestination,
            };
            let family_match = Expr::Nfproto { ipv6: ip.is_ipv6() };
            let port = Expr::Dport { proto: m.protocol.to_lowercase(), port: m.host_port };
            let dnat = Expr::Dnat { addr: *ip, port: m.container_port };
            for chain in [&HOSTPORTS_PRE, &HOSTPORTS_OUT] {
                cmds.push(rules::rule(
                    chain,
                    key,
                    vec![family_match.clone(), dest.clone(), port.clone(), dnat.clone()],
                ));
            }
        }
        if snat && !mappings.is_empty() {
            let masquerade = Expr::Masquerade { fully_random: false };
            let addr = |field, net| Expr::Addr { field, op: Op::Eq, net };
            // Hairpin: the pod reaching its own published port is answered through the host.
            cmds.push(rules::rule(
                &HOSTPORTS_SNAT,
                key,
                vec![addr(Field::Saddr, own), addr(Field::Daddr, own), masquerade.clone()],
            ));
            if ip.is_ipv4() {
                let localhost: IpNet = "127.0.0.0/8".parse().unwrap_or(own);
                cmds.push(rules::rule(
                    &HOSTPORTS_SNAT,
                    key,
                    vec![addr(Field::Saddr, localhost), addr(Field::Daddr, own), masquerade],
                ));
            }
        }
    }
    cmds
}

/// The container's addresses (first of each family on the sandboxed interface) from prevResult.
fn container_ips(result: &CniResult, ifname: &str) -> Vec<IpAddr> {
    let iface = result.container_interface(ifname);
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in result.ips.iter().filter(|ip| iface.is_none() || ip.interface == iface) {
        let addr = ip.address.addr();
        if !out.iter().any(|o| o.is_ipv4() == addr.is_ipv4()) {
            out.push(addr);
        }
    }
    out
}

const CHAINS: [BaseChain; 3] = [HOSTPORTS_PRE, HOSTPORTS_OUT, HOSTPORTS_SNAT];

impl Plugin for Portmap {
    fn name(&self) -> &'static str {
        "portmap"
    }

    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError> {
        let pconf = PortmapConf::load(&args.stdin)?;
        let prev = prev_result(conf)?.ok_or_else(|| CniError::internal("must be called as chained plugin"))?;
        let mappings = &pconf.runtime_config.port_mappings;
        if mappings.is_empty() {
            return Ok(prev);
        }
        let ips = container_ips(&prev, &args.ifname);
        if ips.is_empty() {
            return Err(CniError::internal("prevResult has no container address to publish ports to"));
        }
        let key = pconf.key(args);
        if pconf.snat && ips.iter().any(IpAddr::is_ipv4) {
            // 127.0.0.1:hostPort reaches the container only if the host side routes localnet.
            if let Some(host_if) = prev.interfaces.iter().find(|i| i.sandbox.is_empty()) {
                sysctl::set(&format!("net/ipv4/conf/{}/route_localnet", host_if.name), "1")
                    .map_err(|e| CniError::internal(e.to_string()))?;
            }
        }
        let mut cmds = rules::ensure(&CHAINS);
        cmds.extend(rules::delete_matching(&rules::list()?, &|c| c == key));
        cmds.extend(mapping_rules(&key, mappings, &ips, pconf.snat));
        rules::apply(cmds)?;
        Ok(prev)
    }

    fn del(&self, args: &CmdArgs, _conf: &NetConf) -> Result<(), CniError> {
        let pconf = PortmapConf::load(&args.stdin)?;
        let key = pconf.key(args);
        rules::remove_matching(&|c| c == key)
    }

    fn check(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let pconf = PortmapConf::load(&args.stdin)?;
        prev_result(conf)?.ok_or_else(|| CniError::internal("Required prevResult missing"))?;
        if !pconf.runtime_config.port_mappings.is_empty() && !rules::has_rules(&pconf.key(args))? {
            return Err(CniError::internal("port mapping rules for this attachment are missing"));
        }
        Ok(())
    }

    fn gc(&self, args: &CmdArgs, _conf: &NetConf, valid: &[Attachment]) -> Result<(), CniError> {
        let pconf = PortmapConf::load(&args.stdin)?;
        rules::gc("hostport", &pconf.name, valid)
    }
}
