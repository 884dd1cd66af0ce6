//! `bridge`: a Linux bridge on the host, a veth pair per container with one end on the bridge,
//! addresses from the IPAM plugin, optionally the gateway on the bridge and masquerade.
//!
//! Compared with the reference plugin: the config and netns are checked before anything on the
//! host is touched; IPAM runs first so an exhausted range creates nothing; a failed ADD undoes
//! what it made; masquerade rules are keyed by (network, container, ifname) and removed on DEL
//! even when the netns is gone; `forceAddress` never takes a gateway away from running pods.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;
use weft_cni::args::CmdArgs;
use weft_cni::skel::{parse_plugin_conf, Attachment, Plugin};
use weft_cni::{CniError, CniResult, ErrorCode, Interface, NetConf, Route};
use weft_dataplane::{format_mac, LinkKind, Netlink};
use weft_netns::NetNs;

use crate::attachment_lock::AttachmentLock;
use crate::common::{
    attachment_key, create_veth, enable_forwarding, kernel, open_netns_for_teardown, prev_result, random_mac, Attach,
    HostEnd,
};
use crate::teardown::retire_container_link;
use crate::{container, ipam, masq, rules, teardown};

pub struct Bridge;

fn default_bridge() -> String {
    "cni0".to_string()
}

/// The bridge plugin's keys.
#[derive(Debug, Deserialize)]
pub struct BridgeConf {
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_bridge")]
    pub bridge: String,
    #[serde(rename = "isGateway", default)]
    pub is_gateway: bool,
    #[serde(rename = "isDefaultGateway", default)]
    pub is_default_gateway: bool,
    #[serde(rename = "forceAddress", default)]
    pub force_address: bool,
    #[serde(rename = "ipMasq", default)]
    pub ip_masq: bool,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(rename = "hairpinMode", default)]
    pub hairpin_mode: bool,
    #[serde(rename = "promiscMode", default)]
    pub promisc_mode: bool,
    #[serde(default)]
    pub vlan: i64,
}

impl BridgeConf {
    pub fn load(stdin: &[u8]) -> Result<BridgeConf, CniError> {
        let mut conf: BridgeConf = parse_plugin_conf(stdin)?;
        if conf.is_default_gateway {
            conf.is_gateway = true;
        }
        if conf.hairpin_mode && conf.promisc_mode {
            return Err(CniError::invalid_config("cannot set hairpin mode and promiscuous mode at the same time."));
        }
        if conf.vlan != 0 {
            return Err(CniError::new(
                ErrorCode::UnsupportedField,
                "vlan is not supported: weft's bridge plugin does not use bridge VLAN filtering",
            ));
        }
        weft_cni::args::validate_ifname(&conf.bridge)
            .map_err(|e| CniError::invalid_config(format!("invalid bridge name {:?}: {}", conf.bridge, e.msg)))?;
        if conf.mtu.is_some_and(|m| !(68..=65535).contains(&m)) {
            return Err(CniError::invalid_config(format!("invalid mtu {:?}", conf.mtu)));
        }
        Ok(conf)
    }

    fn masq_key(&self, args: &CmdArgs) -> String {
        attachment_key("masq", &self.name, &args.container_id, &args.ifname)
    }
}

/// What an ADD has created so far, for rolling back.
#[derive(Default)]
struct Created {
    ipam: bool,
    bridge: Option<u32>,
    host_veth: Option<u32>,
    masq: bool,
}

impl Plugin for Bridge {
    fn name(&self) -> &'static str {
        "bridge"
    }

    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError> {
        let bconf = BridgeConf::load(&args.stdin)?;
        let _lock = AttachmentLock::take(self.name(), &bconf.name, args)?;
        let Attach { mac, netns, mut cnl, mut hnl } = Attach::prepare(args)?;
        let mut created = Created::default();
        let outcome = add_steps(args, conf, &bconf, mac, &netns, &mut hnl, &mut cnl, &mut created);
        if outcome.is_err() {
            rollback(args, conf, &bconf, &mut hnl, &created);
        }
        outcome
    }

    fn del(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let bconf = BridgeConf::load(&args.stdin)?;
        let lock = AttachmentLock::take(self.name(), &bconf.name, args)?;
        let mut errors = Vec::new();
        if let Some(ipam_type) = ipam::ipam_type(conf) {
            if let Err(e) = ipam::del(&ipam_type, args) {
                errors.push(e);
            }
        }
        match open_netns_for_teardown(&args.netns) {
            Some(netns) => errors.extend(retire_container_link(&netns, &args.ifname).err()),
            // The sandbox is gone; its veth pair goes with it, but the kernel does that
            // asynchronously: remove the host end the cached result names right away.
            None => errors.extend(delete_host_veths(conf, &bconf.bridge).err()),
        }
        if bconf.ip_masq {
            if let Err(e) = masq::teardown(&bconf.masq_key(args)) {
                errors.push(e);
            }
        }
        lock.finish_del(errors)
    }

    fn check(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let bconf = BridgeConf::load(&args.stdin)?;
        let _lock = AttachmentLock::take(self.name(), &bconf.name, args)?;
        let result = prev_result(conf)?.ok_or_else(|| CniError::internal("Required prevResult missing"))?;
        if let Some(ipam_type) = ipam::ipam_type(conf) {
            ipam::check(&ipam_type, args)?;
        }
        let mut hnl = Netlink::new().map_err(kernel("opening netlink"))?;
        let bridge = hnl
            .link_by_name(&bconf.bridge)
            .map_err(kernel("reading the bridge"))?
            .filter(|l| l.kind == LinkKind::Bridge)
            .ok_or_else(|| CniError::internal(format!("bridge {} not found", bconf.bridge)))?;
        let mut cnl = container::check(args, &result)?;
        let peer_index = cnl
            .link_by_name(&args.ifname)
            .map_err(kernel("reading the container interface"))?
            .and_then(|l| l.peer_index)
            .ok_or_else(|| CniError::internal(format!("{} is not a veth", args.ifname)))?;
        let host = hnl
            .link_by_index(peer_index)
            .map_err(kernel("reading the host veth"))?
            .ok_or_else(|| CniError::internal("the host end of the veth is gone"))?;
        if host.master != Some(bridge.index) {
            return Err(CniError::internal(format!("{} is not attached to bridge {}", host.name, bconf.bridge)));
        }
        if !result.interfaces.iter().any(|i| i.name == host.name && i.sandbox.is_empty()) {
            return Err(CniError::internal(format!("host veth {} is not in prevResult", host.name)));
        }
        if bconf.ip_masq && !rules::has_rules(&bconf.masq_key(args))? {
            return Err(CniError::internal("masquerade rules for this attachment are missing"));
        }
        Ok(())
    }

    fn gc(&self, args: &CmdArgs, conf: &NetConf, valid: &[Attachment]) -> Result<(), CniError> {
        let bconf = BridgeConf::load(&args.stdin)?;
        rules::gc("masq", &bconf.name, valid)?;
        crate::attachment_lock::gc(self.name(), &bconf.name, valid);
        teardown::sweep(&mut Netlink::new().map_err(kernel("opening netlink"))?)?;
        if let Some(ipam_type) = ipam::ipam_type(conf) {
            ipam::gc(&ipam_type, args)?;
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn add_steps(
    args: &CmdArgs,
    conf: &NetConf,
    bconf: &BridgeConf,
    mac: Option<[u8; 6]>,
    netns: &NetNs,
    hnl: &mut Netlink,
    cnl: &mut Netlink,
    created: &mut Created,
) -> Result<CniResult, CniError> {
    let mut result = match ipam::ipam_type(conf) {
        Some(ipam_type) => {
            let r = ipam::add(&ipam_type, args)?;
            created.ipam = true;
            if r.ips.is_empty() {
                return Err(CniError::internal("IPAM plugin returned missing IP config"));
            }
            r
        }
        None => CniResult::default(),
    };
    let bridge = ensure_bridge(hnl, bconf, created)?;
    let veth = create_veth(hnl, &args.ifname, bconf.mtu, mac, netns, HostEnd { master: Some(bridge), mac: None })?;
    let host = &veth.host;
    created.host_veth = Some(host.index);
    if bconf.hairpin_mode {
        hnl.set_hairpin(host.index, true).map_err(kernel("setting hairpin mode"))?;
    }

    for ip in &mut result.ips {
        ip.interface = Some(2);
        if ip.gateway.is_none() && bconf.is_gateway {
            ip.gateway = first_host(&ip.address);
        }
    }
    if bconf.is_default_gateway {
        add_default_routes(&mut result);
    }
    container::configure(cnl, veth.container_index, &result, 2)?;

    if bconf.is_gateway {
        ensure_gateway_addresses(hnl, bridge, bconf, &result)?;
    }
    if !result.ips.is_empty() && bconf.is_gateway {
        enable_forwarding(&result)?;
    }
    if bconf.ip_masq && !result.ips.is_empty() {
        created.masq = true;
        let nets: Vec<IpNet> = result.ips.iter().map(|ip| ip.address).collect();
        masq::setup(&bconf.masq_key(args), &nets)?;
    }
    if let Some(dns) = conf.dns.as_ref().filter(|d| !d.is_empty()) {
        result.dns = dns.clone();
    }
    // A bridge someone else made may take its first port's MAC: read it now.
    let bridge_mac = hnl.link_by_index(bridge).map_err(kernel("reading the bridge"))?.map(|l| l.mac_string());
    result.interfaces = vec![
        Interface { name: bconf.bridge.clone(), mac: bridge_mac.unwrap_or_default(), sandbox: String::new() },
        Interface { name: host.name.clone(), mac: host.mac_string(), sandbox: String::new() },
        Interface { name: args.ifname.clone(), mac: format_mac(&veth.container_mac), sandbox: args.netns.clone() },
    ];
    Ok(result)
}

/// Undoes a failed ADD: container link (and so the host veth), masquerade, addresses. A bridge
/// this ADD created is removed again when no port uses it.
fn rollback(args: &CmdArgs, conf: &NetConf, bconf: &BridgeConf, hnl: &mut Netlink, created: &Created) {
    if let Some(index) = created.host_veth {
        let _ = hnl.delete_link(index);
    }
    if created.masq {
        let _ = masq::teardown(&bconf.masq_key(args));
    }
    if created.ipam {
        if let Some(ipam_type) = ipam::ipam_type(conf) {
            let _ = ipam::del(&ipam_type, args);
        }
    }
    if let Some(bridge) = created.bridge {
        let has_ports = hnl.links().map(|links| links.iter().any(|l| l.master == Some(bridge))).unwrap_or(true);
        if !has_ports {
            let _ = hnl.delete_link(bridge);
        }
    }
}

/// The bridge, created if missing (`ip link add cni0 type bridge`), up, with the asked promisc.
fn ensure_bridge(nl: &mut Netlink, bconf: &BridgeConf, created: &mut Created) -> Result<u32, CniError> {
    let existing = nl.link_by_name(&bconf.bridge).map_err(kernel("reading the bridge"))?;
    let link = match existing {
        Some(link) => link,
        None => {
            // Its own MAC, so that it does not follow the lowest port MAC as ports come and go
            // (flannel #1381: neighbours' ARP entries for the gateway go stale).
            match nl.create_bridge(&bconf.bridge, bconf.mtu, Some(random_mac())) {
                Ok(()) => {}
                Err(e) if e.is_exists() => {} // created by a concurrent ADD
                Err(e) => return Err(kernel("creating the bridge")(e)),
            }
            let link = nl.require_link(&bconf.bridge).map_err(kernel("reading the bridge"))?;
            created.bridge = Some(link.index);
            link
        }
    };
    if link.kind != LinkKind::Bridge {
        return Err(CniError::internal(format!("{:?} already exists but is not a bridge", bconf.bridge)));
    }
    if bconf.promisc_mode && !link.promisc {
        nl.set_promisc(link.index, true).map_err(kernel("setting promiscuous mode"))?;
    }
    if !link.up {
        nl.set_up(link.index, true).map_err(kernel("setting the bridge up"))?;
    }
    Ok(link.index)
}

/// The first host address of a network (the reference's default gateway).
fn first_host(net: &IpNet) -> Option<IpAddr> {
    match net.network() {
        IpAddr::V4(v4) => Some(IpAddr::V4((u32::from(v4) + 1).into())),
        IpAddr::V6(v6) => Some(IpAddr::V6((u128::from(v6) + 1).into())),
    }
}

/// A default route per family via that family's gateway, unless the result already has one.
fn add_default_routes(result: &mut CniResult) {
    for v6 in [false, true] {
        let Some(gw) = result.gateway_for(v6) else { continue };
        let default: IpNet = if v6 { "::/0" } else { "0.0.0.0/0" }.parse().unwrap_or_else(|_| IpNet::from(gw));
        if !result.routes.iter().any(|r| r.dst == default && r.gw.is_some()) {
            result.routes.push(Route { dst: default, gw: Some(gw) });
        }
    }
}

/// Puts each family's gateway on the bridge (`ip addr add GW/PREFIX dev cni0`). The common case
/// (already there) costs one request; the bridge's addresses are only listed when one is new.
fn ensure_gateway_addresses(
    nl: &mut Netlink,
    bridge: u32,
    bconf: &BridgeConf,
    result: &CniResult,
) -> Result<(), CniError> {
    for ip in &result.ips {
        let Some(gw) = ip.gateway else { continue };
        let want = IpNet::new(gw, ip.address.prefix_len()).map_err(|e| CniError::internal(e.to_string()))?;
        match nl.add_address(bridge, &want) {
            Err(e) if e.is_exists() => continue,
            other => other.map_err(kernel("adding the gateway address to the bridge"))?,
        }
        let have = nl.addresses(Some(bridge)).map_err(kernel("reading bridge addresses"))?;
        let conflicting: Vec<IpNet> = have
            .iter()
            .map(|a| a.net)
            .filter(|a| {
                *a != want && a.addr().is_ipv4() == want.addr().is_ipv4() && !a.addr().is_unicast_link_local_v6()
            })
            .filter(|a| a.contains(&want.addr()) || want.contains(&a.addr()))
            .collect();
        if conflicting.is_empty() {
            continue;
        }
        if !bconf.force_address {
            let _ = nl.delete_address(bridge, &want);
            return Err(CniError::internal(format!(
                "{:?} already has an IP address different from {want}",
                bconf.bridge
            )));
        }
        // forceAddress: replace the old gateway only when no other container uses the bridge;
        // otherwise keep it beside the new one, so running pods keep their gateway.
        let ports = nl.links().map_err(kernel("reading links"))?.iter().filter(|l| l.master == Some(bridge)).count();
        if ports <= 1 {
            for old in conflicting {
                nl.delete_address(bridge, &old).map_err(kernel("removing the old gateway address"))?;
            }
        }
    }
    Ok(())
}

trait LinkLocal {
    fn is_unicast_link_local_v6(&self) -> bool;
}

impl LinkLocal for IpAddr {
    fn is_unicast_link_local_v6(&self) -> bool {
        matches!(self, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
    }
}

/// Deletes the host-side veths that prevResult names, if they still exist and are ports of
/// `bridge` (nothing else is touched).
fn delete_host_veths(conf: &NetConf, bridge: &str) -> Result<(), CniError> {
    let Some(prev) = prev_result(conf).ok().flatten() else { return Ok(()) };
    let mut nl = Netlink::new().map_err(kernel("opening netlink"))?;
    let Some(br) = nl.link_by_name(bridge).map_err(kernel("reading the bridge"))? else { return Ok(()) };
    for iface in prev.interfaces.iter().filter(|i| i.sandbox.is_empty() && i.name != bridge) {
        if let Some(link) = nl.link_by_name(&iface.name).map_err(kernel("reading the host veth"))? {
            if link.kind == LinkKind::Veth && link.master == Some(br.index) {
                teardown::retire_host_link(&mut nl, &link)?;
            }
        }
    }
    Ok(())
}
