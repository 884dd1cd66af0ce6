//! The container side of an attachment: bring the interface up, give it the result's addresses
//! and routes, and verify them again for CHECK. Shared by bridge and ptp.

use std::net::IpAddr;

use weft_cni::{CniError, CniResult, IpConfig};
use weft_dataplane::{Netlink, RouteSpec};

use crate::common::kernel;

/// The gateway a route without `gw` uses: the gateway of the first address of its family.
fn gateway_for_route(result: &CniResult, dst_v6: bool) -> Option<IpAddr> {
    result.gateway_for(dst_v6)
}

/// The routes the container gets for `result`, on `ifindex`.
pub fn routes_for(result: &CniResult, ifindex: u32) -> Vec<RouteSpec> {
    result
        .routes
        .iter()
        .map(|r| {
            let gw = r.gw.or_else(|| gateway_for_route(result, r.dst.addr().is_ipv6()));
            let spec = RouteSpec::new(r.dst).dev(ifindex);
            match gw {
                Some(gw) => spec.via(gw),
                None => spec.link_scope(),
            }
        })
        .collect()
}

/// The addresses of `result` that belong to interface `iface` of the result.
pub fn addresses_of(result: &CniResult, iface: usize) -> impl Iterator<Item = &IpConfig> {
    result.ips.iter().filter(move |ip| ip.interface == Some(iface))
}

/// Brings the container's new interface up with the result's addresses and routes (`ip link set
/// up`, `ip addr add`, `ip route add`).
pub fn configure(nl: &mut Netlink, ifindex: u32, result: &CniResult, iface: usize) -> Result<(), CniError> {
    nl.set_up(ifindex, true).map_err(kernel("setting the container interface up"))?;
    for ip in addresses_of(result, iface) {
        nl.add_address(ifindex, &ip.address).map_err(kernel("adding the container address"))?;
    }
    for route in routes_for(result, ifindex) {
        match nl.add_route(&route) {
            Err(e) if e.is_exists() => {}
            other => other.map_err(kernel("adding a container route"))?,
        }
    }
    Ok(())
}

/// CHECK: the interface is up with every address and route of the result.
pub fn verify(nl: &mut Netlink, ifname: &str, result: &CniResult, iface: usize) -> Result<(), CniError> {
    let link = nl
        .link_by_name(ifname)
        .map_err(kernel("reading the container interface"))?
        .ok_or_else(|| CniError::internal(format!("container interface {ifname} not found")))?;
    let want_mac = &result.interfaces[iface].mac;
    if !want_mac.is_empty() && !link.mac_string().eq_ignore_ascii_case(want_mac) {
        return Err(CniError::internal(format!(
            "interface {ifname} has MAC {}, the result says {want_mac}",
            link.mac_string()
        )));
    }
    let have = nl.addresses(Some(link.index)).map_err(kernel("reading container addresses"))?;
    for ip in addresses_of(result, iface) {
        if !have.iter().any(|a| a.net == ip.address) {
            return Err(CniError::internal(format!("address {} missing on {ifname}", ip.address)));
        }
    }
    let routes = nl.routes().map_err(kernel("reading container routes"))?;
    for want in routes_for(result, link.index) {
        let found = routes.iter().any(|r| r.dst == want.dst && r.gateway == want.gateway && r.oif == want.oif);
        if !found {
            return Err(CniError::internal(format!("route to {} missing in the container", want.dst)));
        }
    }
    Ok(())
}

/// CHECK's container half: the netns opens, and the interface named in the result is up with
/// the result's addresses and routes. Returns the netlink socket in the container.
pub fn check(args: &weft_cni::args::CmdArgs, result: &CniResult) -> Result<Netlink, CniError> {
    let iface = result
        .container_interface(&args.ifname)
        .ok_or_else(|| CniError::internal(format!("prevResult has no container interface {}", args.ifname)))?;
    let netns = crate::common::open_netns(&args.netns)?;
    let mut cnl = Netlink::in_netns_here(&netns).map_err(kernel("opening netlink in the container"))?;
    verify(&mut cnl, &args.ifname, result, iface)?;
    Ok(cnl)
}
