//! The VXLAN device (`weft.<VNI>`): created once with the node's address as local endpoint and a
//! MAC that stays the same across restarts (kept in the agent's state directory), so peers never
//! have to re-learn it. An existing device with the right settings is kept as it is — restarting
//! the agent must not drop a packet.

use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::{IpNet, Ipv4Net};
use weft_dataplane::{format_mac, parse_mac, Link, LinkKind, Netlink, VxlanSpec};

use crate::{kernel, AgentError, Result};

/// What the VTEP must be.
pub struct VtepConfig<'a> {
    pub vni: u32,
    pub port: u16,
    pub local: Ipv4Addr,
    pub uplink: u32,
    pub mtu: u32,
    /// The node's subnet: the VTEP gets its `.0/32`.
    pub subnet: Ipv4Net,
    /// Where the MAC is kept across restarts.
    pub state_dir: &'a Path,
}

pub fn name(vni: u32) -> String {
    format!("weft.{vni}")
}

/// The VTEP MAC: the saved one, else a new locally administered one, saved.
pub fn stable_mac(state_dir: &Path, random: [u8; 6]) -> Result<[u8; 6]> {
    let path = state_dir.join("vtep-mac");
    if let Some(mac) = std::fs::read_to_string(&path).ok().and_then(|t| parse_mac(t.trim())) {
        return Ok(mac);
    }
    let mut mac = random;
    mac[0] = (mac[0] & 0xfe) | 0x02; // unicast, locally administered
    std::fs::create_dir_all(state_dir)
        .map_err(|e| AgentError::Config(format!("creating {}: {e}", state_dir.display())))?;
    std::fs::write(&path, format_mac(&mac))
        .map_err(|e| AgentError::Config(format!("writing {}: {e}", path.display())))?;
    Ok(mac)
}

fn matches(link: &Link, cfg: &VtepConfig<'_>, mac: &[u8; 6]) -> bool {
    link.kind == LinkKind::Vxlan
        && link.mac == mac
        && link.vxlan.as_ref().is_some_and(|v| {
            v.vni == cfg.vni
                && v.port == cfg.port
                && v.local == Some(cfg.local)
                && !v.learning
                && v.underlay == Some(cfg.uplink)
        })
}

/// Makes sure the VTEP exists as configured, is up, has the MTU and the subnet's `.0/32`.
/// Returns its index and whether it was (re)created (then every peer must be replayed).
pub fn ensure(nl: &mut Netlink, cfg: &VtepConfig<'_>, mac: [u8; 6]) -> Result<(u32, bool)> {
    let name = name(cfg.vni);
    let mut created = false;
    let link = match nl.link_by_name(&name).map_err(kernel("reading the VTEP"))? {
        Some(link) if matches(&link, cfg, &mac) => link,
        existing => {
            if let Some(old) = existing {
                nl.delete_link(old.index).map_err(kernel("replacing a VTEP with other settings"))?;
            }
            let spec = VxlanSpec {
                name: &name,
                vni: cfg.vni,
                port: cfg.port,
                local: cfg.local,
                underlay: cfg.uplink,
                mtu: Some(cfg.mtu),
                mac: Some(mac),
            };
            nl.create_vxlan(&spec).map_err(kernel("creating the VTEP"))?;
            created = true;
            nl.require_link(&name).map_err(kernel("reading the VTEP"))?
        }
    };
    if link.mtu != cfg.mtu {
        nl.set_mtu(link.index, cfg.mtu).map_err(kernel("setting the VTEP MTU"))?;
    }
    let addr = IpNet::new(cfg.subnet.network().into(), 32).map_err(|e| AgentError::Config(e.to_string()))?;
    let have = nl.addresses(Some(link.index)).map_err(kernel("reading VTEP addresses"))?;
    for stale in have.iter().filter(|a| a.net.addr().is_ipv4() && a.net != addr) {
        nl.delete_address(link.index, &stale.net).map_err(kernel("removing an old VTEP address"))?;
    }
    if !have.iter().any(|a| a.net == addr) {
        nl.add_address(link.index, &addr).map_err(kernel("adding the VTEP address"))?;
    }
    if !link.up {
        nl.set_up(link.index, true).map_err(kernel("setting the VTEP up"))?;
    }
    Ok((link.index, created))
}
