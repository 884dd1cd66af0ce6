//! `loopback`: brings `lo` up in the container (and down again on DEL, when the netns is there).

use ipnet::IpNet;
use weft_cni::args::CmdArgs;
use weft_cni::skel::Plugin;
use weft_cni::{CniError, CniResult, Interface, IpConfig, NetConf};
use weft_dataplane::Netlink;

use crate::common::{kernel, open_netns, open_netns_for_teardown, prev_result};

pub struct Loopback;

fn lo(nl: &mut Netlink) -> Result<weft_dataplane::Link, CniError> {
    nl.require_link("lo").map_err(kernel("reading lo"))
}

impl Plugin for Loopback {
    fn name(&self) -> &'static str {
        "loopback"
    }

    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError> {
        let netns = open_netns(&args.netns)?;
        let mut nl = Netlink::in_netns_here(&netns).map_err(kernel("opening netlink in the container"))?;
        let link = lo(&mut nl)?;
        nl.set_up(link.index, true).map_err(kernel("setting lo up"))?;
        // In a chain, pass the previous result through; alone, report lo like the reference.
        if let Some(prev) = prev_result(conf)? {
            return Ok(prev);
        }
        let addrs = nl.addresses(Some(link.index)).map_err(kernel("reading lo addresses"))?;
        let ips: Vec<IpConfig> = addrs
            .iter()
            .filter(|a| a.net.addr().is_loopback())
            .map(|a| IpConfig { interface: Some(0), address: a.net, gateway: None })
            .collect();
        let ips = if ips.is_empty() {
            vec![IpConfig {
                interface: Some(0),
                address: "127.0.0.1/8".parse::<IpNet>().map_err(|e| CniError::internal(e.to_string()))?,
                gateway: None,
            }]
        } else {
            ips
        };
        Ok(CniResult {
            interfaces: vec![Interface {
                name: "lo".into(),
                mac: "00:00:00:00:00:00".into(),
                sandbox: args.netns.clone(),
            }],
            ips,
            ..Default::default()
        })
    }

    fn del(&self, args: &CmdArgs, _conf: &NetConf) -> Result<(), CniError> {
        let Some(netns) = open_netns_for_teardown(&args.netns) else { return Ok(()) };
        let mut nl = Netlink::in_netns_here(&netns).map_err(kernel("opening netlink in the container"))?;
        let link = lo(&mut nl)?;
        nl.set_up(link.index, false).map_err(kernel("setting lo down"))
    }

    fn check(&self, args: &CmdArgs, _conf: &NetConf) -> Result<(), CniError> {
        let netns = open_netns(&args.netns)?;
        let mut nl = Netlink::in_netns_here(&netns).map_err(kernel("opening netlink in the container"))?;
        if !lo(&mut nl)?.up {
            return Err(CniError::internal("loopback interface is down"));
        }
        Ok(())
    }
}
