//! `ptp`: a veth pair per container and no bridge. The container gets its address, a /32 (/128)
//! route to the gateway on its link and every other route via that gateway; the host end gets
//! the gateway address as a /32 (/128) and a host route to the container. Routed mode builds on
//! this shape.

use ipnet::IpNet;
use serde::Deserialize;
use weft_cni::args::CmdArgs;
use weft_cni::skel::{parse_plugin_conf, Attachment, Plugin};
use weft_cni::{CniError, CniResult, NetConf};
use weft_dataplane::{Netlink, RouteSpec};

use crate::attachment_lock::AttachmentLock;
use crate::common::{
    attachment_key, create_veth, del_veth_attachment, enable_forwarding, kernel, prev_result, roll_back_veth, Attach,
    HostEnd,
};
use crate::{container, ipam, masq, rules};

pub struct Ptp;

#[derive(Debug, Deserialize)]
pub(crate) struct PtpConf {
    #[serde(default)]
    name: String,
    #[serde(rename = "ipMasq", default)]
    ip_masq: bool,
    #[serde(default)]
    mtu: Option<u32>,
}

impl PtpConf {
    fn masq_key(&self, args: &CmdArgs) -> String {
        attachment_key("masq", &self.name, &args.container_id, &args.ifname)
    }
}

fn host_prefix(ip: std::net::IpAddr) -> IpNet {
    IpNet::from(ip)
}

impl Plugin for Ptp {
    fn name(&self) -> &'static str {
        "ptp"
    }

    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError> {
        let pconf: PtpConf = parse_plugin_conf(&args.stdin)?;
        let ipam_type = ipam::ipam_type(conf).ok_or_else(|| CniError::invalid_config("ptp needs an IPAM plugin"))?;
        let _lock = AttachmentLock::take(self.name(), &pconf.name, args)?;
        let Attach { mac, netns, mut cnl, mut hnl } = Attach::prepare(args)?;

        let mut result = ipam::add(&ipam_type, args)?;
        let mut host_veth = None;
        let outcome = (|| {
            if result.ips.is_empty() || result.ips.iter().any(|ip| ip.gateway.is_none()) {
                return Err(CniError::internal("IPAM plugin returned missing IP config or gateway"));
            }
            let veth = create_veth(&mut hnl, &args.ifname, pconf.mtu, mac, &netns, HostEnd::default())?;
            let index = veth.host.index;
            host_veth = Some(index);
            setup_container(&mut cnl, veth.container_index, &mut result)?;
            setup_host(&mut hnl, index, &result)?;
            enable_forwarding(&result)?;
            if pconf.ip_masq {
                let nets: Vec<IpNet> = result.ips.iter().map(|ip| ip.address).collect();
                masq::setup(&pconf.masq_key(args), &nets)?;
            }
            veth.fill_result(&mut result, args, conf);
            Ok(())
        })();
        if let Err(e) = outcome {
            if pconf.ip_masq {
                let _ = masq::teardown(&pconf.masq_key(args));
            }
            roll_back_veth(&mut hnl, host_veth, &ipam_type, args);
            return Err(e);
        }
        Ok(result)
    }

    fn del(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let pconf: PtpConf = parse_plugin_conf(&args.stdin)?;
        let lock = AttachmentLock::take(self.name(), &pconf.name, args)?;
        let mut errors = del_veth_attachment(conf, args);
        if pconf.ip_masq {
            errors.extend(masq::teardown(&pconf.masq_key(args)).err());
        }
        lock.finish_del(errors)
    }

    fn check(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let pconf: PtpConf = parse_plugin_conf(&args.stdin)?;
        let _lock = AttachmentLock::take(self.name(), &pconf.name, args)?;
        let result = prev_result(conf)?.ok_or_else(|| CniError::internal("Required prevResult missing"))?;
        if let Some(ipam_type) = ipam::ipam_type(conf) {
            ipam::check(&ipam_type, args)?;
        }
        container::check(args, &result)?;
        let mut hnl = Netlink::new().map_err(kernel("opening netlink"))?;
        let routes = hnl.routes().map_err(kernel("reading host routes"))?;
        for ip in &result.ips {
            if !routes.iter().any(|r| r.dst == host_prefix(ip.address.addr())) {
                return Err(CniError::internal(format!("host route to {} missing", ip.address.addr())));
            }
        }
        if pconf.ip_masq && !rules::has_rules(&pconf.masq_key(args))? {
            return Err(CniError::internal("masquerade rules for this attachment are missing"));
        }
        Ok(())
    }

    fn gc(&self, args: &CmdArgs, conf: &NetConf, valid: &[Attachment]) -> Result<(), CniError> {
        let pconf: PtpConf = parse_plugin_conf(&args.stdin)?;
        rules::gc("masq", &pconf.name, valid)?;
        crate::attachment_lock::gc(self.name(), &pconf.name, valid);
        crate::teardown::sweep(&mut Netlink::new().map_err(kernel("opening netlink"))?)?;
        if let Some(ipam_type) = ipam::ipam_type(conf) {
            ipam::gc(&ipam_type, args)?;
        }
        Ok(())
    }
}

/// The container end: addresses, no subnet route, a link route to the gateway and every other
/// route (the subnet's included) via the gateway.
fn setup_container(cnl: &mut Netlink, ifindex: u32, result: &mut CniResult) -> Result<(), CniError> {
    for ip in &mut result.ips {
        ip.interface = Some(1);
    }
    cnl.set_up(ifindex, true).map_err(kernel("setting the container interface up"))?;
    for ip in &result.ips {
        cnl.add_address(ifindex, &ip.address).map_err(kernel("adding the container address"))?;
        let subnet = RouteSpec::new(ip.address.trunc()).dev(ifindex).link_scope().protocol(2);
        let _ = cnl.delete_route(&subnet); // the kernel's prefix route (proto kernel)
        let Some(gw) = ip.gateway else { continue };
        let to_gw = RouteSpec::new(host_prefix(gw)).dev(ifindex).link_scope();
        cnl.add_route(&to_gw).map_err(kernel("adding the route to the gateway"))?;
        let via = RouteSpec::new(ip.address.trunc()).dev(ifindex).via(gw);
        cnl.add_route(&via).map_err(kernel("adding the subnet route"))?;
    }
    let extra = CniResult { routes: result.routes.clone(), ips: result.ips.clone(), ..Default::default() };
    for route in container::routes_for(&extra, ifindex) {
        match cnl.add_route(&route) {
            Err(e) if e.is_exists() => {}
            other => other.map_err(kernel("adding a container route"))?,
        }
    }
    Ok(())
}

/// The host end: the gateway address as a host prefix, a host route to the container.
fn setup_host(hnl: &mut Netlink, index: u32, result: &CniResult) -> Result<(), CniError> {
    for ip in &result.ips {
        if let Some(gw) = ip.gateway {
            hnl.add_address(index, &host_prefix(gw)).map_err(kernel("adding the gateway address to the host veth"))?;
        }
        let route = RouteSpec::new(host_prefix(ip.address.addr())).dev(index).link_scope();
        match hnl.add_route(&route) {
            Err(e) if e.is_exists() => {}
            other => other.map_err(kernel("adding the host route to the container"))?,
        }
    }
    Ok(())
}
