//! `routed`: Calico's pod shape, a veth with no bridge. The host end has the fixed MAC
//! `ee:ee:ee:ee:ee:ee`, proxy ARP on, and a /32 (/128) route to the pod through it (protocol
//! [`RTPROT_WEFT_POD`], so pod routes are told from every other); the pod gets its addresses as
//! /32 (/128), `169.254.1.1 dev eth0 scope link` and `default via 169.254.1.1` (IPv6: via the
//! host end's link-local address, `fe80::ecee:eeff:feee:eeee`), and every IPAM route via the
//! same gateway. Both ends also get a permanent neighbour entry for the other, so the first
//! packet of a pod waits for no ARP or neighbour discovery either way.
//!
//! Usable with any IPAM plugin; the `weft` meta plugin delegates to it when the node's agent
//! runs the `bgp` backend. As the bridge plugin: everything is checked before anything is made,
//! a failure rolls back what was made (the IPAM reservation included), DEL is idempotent and
//! works with the namespace gone, CHECK looks at both ends, GC removes retired links.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::Deserialize;
use weft_cni::args::CmdArgs;
use weft_cni::skel::{parse_plugin_conf, Attachment, Plugin};
use weft_cni::{CniError, CniResult, NetConf};
use weft_dataplane::route::RTPROT_WEFT_POD;
use weft_dataplane::{Netlink, RouteSpec};

use crate::attachment_lock::AttachmentLock;
use crate::common::{
    create_veth, del_veth_attachment, enable_forwarding, kernel, prev_result, roll_back_veth, Attach, HostEnd,
};
use crate::{container, ipam};

pub struct Routed;

/// The host end's MAC on every routed veth (Calico's).
pub const HOST_MAC: [u8; 6] = [0xee; 6];
/// The pod's IPv4 gateway: a link-local address answered by the host end.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pod's IPv6 gateway: the host end's link-local address (EUI-64 of [`HOST_MAC`]).
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);

#[derive(Debug, Deserialize)]
struct RoutedConf {
    #[serde(default)]
    name: String,
    #[serde(default)]
    mtu: Option<u32>,
}

fn gateway(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(GATEWAY_V6)
    } else {
        IpAddr::V4(GATEWAY_V4)
    }
}

/// The pod's routes: its gateway on the link, then the default route and the IPAM's routes via
/// it, per family the pod has an address of.
fn pod_routes(result: &CniResult, ifindex: u32) -> Vec<RouteSpec> {
    let mut routes = Vec::new();
    for v6 in [false, true] {
        if !result.ips.iter().any(|ip| ip.address.addr().is_ipv6() == v6) {
            continue;
        }
        let gw = gateway(v6);
        if !v6 {
            routes.push(RouteSpec::new(IpNet::from(gw)).dev(ifindex).link_scope());
        }
        let default: IpNet = if v6 { "::/0".parse() } else { "0.0.0.0/0".parse() }.unwrap_or_else(|_| unreachable!());
        let dsts =
            std::iter::once(default).chain(result.routes.iter().map(|r| r.dst).filter(|d| d.addr().is_ipv6() == v6));
        for dst in dsts {
            let route = RouteSpec::new(dst).dev(ifindex).via(gw);
            if !routes.contains(&route) {
                routes.push(route);
            }
        }
    }
    routes
}

/// The host route to a pod address.
fn host_route(ip: IpAddr, index: u32) -> RouteSpec {
    RouteSpec::new(IpNet::from(ip)).dev(index).link_scope().protocol(RTPROT_WEFT_POD)
}

impl Plugin for Routed {
    fn name(&self) -> &'static str {
        "routed"
    }

    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError> {
        let rconf: RoutedConf = parse_plugin_conf(&args.stdin)?;
        let ipam_type = ipam::ipam_type(conf).ok_or_else(|| CniError::invalid_config("routed needs an IPAM plugin"))?;
        if let Some(mtu) = rconf.mtu.filter(|m| !(68..=65535).contains(m)) {
            return Err(CniError::invalid_config(format!("mtu {mtu} out of range 68-65535")));
        }
        let _lock = AttachmentLock::take(self.name(), &rconf.name, args)?;
        let Attach { mac, netns, mut cnl, mut hnl } = Attach::prepare(args)?;

        let mut result = ipam::add(&ipam_type, args)?;
        let mut host_veth = None;
        let outcome = (|| {
            if result.ips.is_empty() {
                return Err(CniError::internal("IPAM plugin returned no IP config"));
            }
            // The pod's addresses are host prefixes; the gateway is the host end, whatever
            // the IPAM says.
            for ip in &mut result.ips {
                let addr = ip.address.addr();
                ip.address = IpNet::from(addr);
                ip.gateway = Some(gateway(addr.is_ipv6()));
                ip.interface = Some(1);
            }
            let host = HostEnd { master: None, mac: Some(HOST_MAC) };
            let veth = create_veth(&mut hnl, &args.ifname, rconf.mtu, mac, &netns, host)?;
            let index = veth.host.index;
            host_veth = Some(index);
            setup_host(&mut hnl, &veth.host.name, index, &veth.container_mac, &result)?;
            setup_pod(&mut cnl, veth.container_index, &result)?;
            enable_forwarding(&result)?;
            veth.fill_result(&mut result, args, conf);
            Ok(())
        })();
        if let Err(e) = outcome {
            roll_back_veth(&mut hnl, host_veth, &ipam_type, args);
            return Err(e);
        }
        Ok(result)
    }

    fn del(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let rconf: RoutedConf = parse_plugin_conf(&args.stdin)?;
        let lock = AttachmentLock::take(self.name(), &rconf.name, args)?;
        // The host route and the neighbour entries go with the link.
        lock.finish_del(del_veth_attachment(conf, args))
    }

    fn check(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let rconf: RoutedConf = parse_plugin_conf(&args.stdin)?;
        let _lock = AttachmentLock::take(self.name(), &rconf.name, args)?;
        let result = prev_result(conf)?.ok_or_else(|| CniError::internal("Required prevResult missing"))?;
        if let Some(ipam_type) = ipam::ipam_type(conf) {
            ipam::check(&ipam_type, args)?;
        }
        let mut cnl = container::check(args, &result)?;
        let pod = cnl
            .link_by_name(&args.ifname)
            .map_err(kernel("reading the pod interface"))?
            .ok_or_else(|| CniError::internal(format!("pod interface {} not found", args.ifname)))?;
        let have = cnl.routes().map_err(kernel("reading the pod's routes"))?;
        for want in pod_routes(&result, pod.index) {
            if !have.iter().any(|r| r.dst == want.dst && r.gateway == want.gateway && r.oif == want.oif) {
                return Err(CniError::internal(format!("the pod's route to {} is missing", want.dst)));
            }
        }
        let host_index =
            pod.peer_index.ok_or_else(|| CniError::internal(format!("{} has no host end", args.ifname)))?;
        let mut hnl = Netlink::new().map_err(kernel("opening netlink"))?;
        let host = hnl
            .link_by_index(host_index)
            .map_err(kernel("reading the host end"))?
            .ok_or_else(|| CniError::internal(format!("the host end of {} is missing", args.ifname)))?;
        if host.mac.as_slice() != HOST_MAC {
            return Err(CniError::internal(format!(
                "the host end {} has MAC {}, not ee:ee:ee:ee:ee:ee",
                host.name,
                host.mac_string()
            )));
        }
        if result.ips.iter().any(|ip| ip.address.addr().is_ipv4()) {
            let key = format!("net/ipv4/conf/{}/proxy_arp", host.name);
            if weft_dataplane::sysctl::get(&key).map_err(|e| CniError::internal(e.to_string()))? != "1" {
                return Err(CniError::internal(format!("proxy ARP is off on {}", host.name)));
            }
        }
        let routes = hnl.routes().map_err(kernel("reading host routes"))?;
        for ip in &result.ips {
            let want = host_route(ip.address.addr(), host.index);
            if !routes.iter().any(|r| r.dst == want.dst && r.oif == want.oif) {
                return Err(CniError::internal(format!("host route to {} missing", ip.address.addr())));
            }
        }
        Ok(())
    }

    fn gc(&self, args: &CmdArgs, conf: &NetConf, valid: &[Attachment]) -> Result<(), CniError> {
        let rconf: RoutedConf = parse_plugin_conf(&args.stdin)?;
        crate::attachment_lock::gc(self.name(), &rconf.name, valid);
        crate::teardown::sweep(&mut Netlink::new().map_err(kernel("opening netlink"))?)?;
        if let Some(ipam_type) = ipam::ipam_type(conf) {
            ipam::gc(&ipam_type, args)?;
        }
        Ok(())
    }
}

/// The host end: proxy ARP on (no delay), a neighbour entry for each pod address, and a host
/// route to it.
fn setup_host(
    hnl: &mut Netlink,
    name: &str,
    index: u32,
    pod_mac: &[u8; 6],
    result: &CniResult,
) -> Result<(), CniError> {
    let sysctl = |key: String, value: &str| {
        weft_dataplane::sysctl::set(&key, value).map_err(|e| CniError::internal(e.to_string()))
    };
    if result.ips.iter().any(|ip| ip.address.addr().is_ipv4()) {
        sysctl(format!("net/ipv4/conf/{name}/proxy_arp"), "1")?;
        sysctl(format!("net/ipv4/neigh/{name}/proxy_delay"), "0")?;
    }
    for ip in &result.ips {
        let addr = ip.address.addr();
        // The route first: the agent puts back the route of a pod it knows by its neighbour
        // entry, and must not find the entry before the route is made.
        match hnl.add_route(&host_route(addr, index)) {
            Err(e) if e.is_exists() => {
                return Err(CniError::internal(format!("another route to {addr} exists on this host")))
            }
            other => other.map_err(kernel("adding the host route to the pod"))?,
        }
        hnl.replace_neighbour(index, addr, pod_mac).map_err(kernel("adding the pod's neighbour entry"))?;
    }
    Ok(())
}

/// The pod end: up, its addresses as host prefixes (no prefix route), a neighbour entry for its
/// gateway, and its routes.
fn setup_pod(cnl: &mut Netlink, ifindex: u32, result: &CniResult) -> Result<(), CniError> {
    cnl.set_up(ifindex, true).map_err(kernel("setting the pod interface up"))?;
    for ip in &result.ips {
        cnl.add_address(ifindex, &ip.address).map_err(kernel("adding the pod address"))?;
    }
    for v6 in [false, true] {
        if result.ips.iter().any(|ip| ip.address.addr().is_ipv6() == v6) {
            cnl.replace_neighbour(ifindex, gateway(v6), &HOST_MAC)
                .map_err(kernel("adding the gateway's neighbour entry"))?;
        }
    }
    for route in pod_routes(result, ifindex) {
        match cnl.add_route(&route) {
            Err(e) if e.is_exists() => {}
            other => other.map_err(kernel("adding a pod route"))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_cni::IpConfig;

    #[test]
    fn pod_routes_go_through_the_link_local_gateway() {
        let result = CniResult {
            ips: vec![
                IpConfig { address: "198.19.0.5/32".parse().unwrap(), gateway: None, interface: Some(1) },
                IpConfig { address: "fd00::5/128".parse().unwrap(), gateway: None, interface: Some(1) },
            ],
            routes: vec![
                weft_cni::Route { dst: "198.18.0.0/16".parse().unwrap(), gw: None },
                weft_cni::Route { dst: "0.0.0.0/0".parse().unwrap(), gw: None },
            ],
            ..Default::default()
        };
        let shown: Vec<String> =
            pod_routes(&result, 7).iter().map(|r| format!("{} {:?} {}", r.dst, r.gateway, r.link_scope)).collect();
        assert_eq!(
            shown,
            [
                "169.254.1.1/32 None true",
                "0.0.0.0/0 Some(169.254.1.1) false",
                "198.18.0.0/16 Some(169.254.1.1) false",
                "::/0 Some(fe80::ecee:eeff:feee:eeee) false",
            ]
        );
    }
}
