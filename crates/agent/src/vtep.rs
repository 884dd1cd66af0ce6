//! The VXLAN device (`weft.<VNI>`): created once with the node's address as local endpoint and a
//! MAC that stays the same across restarts (kept in the agent's state directory), so peers never
//! have to re-learn it. An existing device with the right settings is kept as it is — restarting
//! the agent must not drop a packet.

use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::{IpNet, Ipv4Net};
use weft_dataplane::{format_mac, parse_mac, Link, LinkKind, Netlink, VxlanSpec};

use crate::{kernel, AgentError, Result};

pub fn name(vni: u32) -> String {
    format!("weft.{vni}")
}

/// Six random bytes for a new VTEP MAC. No randomness, no MAC: a fixed fallback would give every
/// node the same one.
pub fn random_mac() -> Result<[u8; 6]> {
    let mut b = [0u8; 6];
    match rustix::rand::getrandom(&mut b[..], rustix::rand::GetRandomFlags::empty()) {
        Ok(6) => Ok(b),
        Ok(n) => Err(AgentError::Config(format!("the kernel gave {n} of 6 random bytes for the VTEP MAC"))),
        Err(e) => Err(AgentError::Config(format!("no random bytes for the VTEP MAC: {e}"))),
    }
}

/// The VTEP MAC: the saved one, else a new locally administered one from `random`, saved.
pub fn stable_mac(state_dir: &Path, random: fn() -> Result<[u8; 6]>) -> Result<[u8; 6]> {
    let path = state_dir.join("vtep-mac");
    if let Some(mac) = std::fs::read_to_string(&path).ok().and_then(|t| parse_mac(t.trim())) {
        return Ok(mac);
    }
    new_mac(state_dir, random)
}

/// A new locally administered VTEP MAC from `random`, saved in place of the old one.
pub fn new_mac(state_dir: &Path, random: fn() -> Result<[u8; 6]>) -> Result<[u8; 6]> {
    let path = state_dir.join("vtep-mac");
    let mut mac = random()?;
    mac[0] = (mac[0] & 0xfe) | 0x02; // unicast, locally administered
    std::fs::create_dir_all(state_dir)
        .map_err(|e| AgentError::Config(format!("creating {}: {e}", state_dir.display())))?;
    std::fs::write(&path, format_mac(&mac))
        .map_err(|e| AgentError::Config(format!("writing {}: {e}", path.display())))?;
    Ok(mac)
}

/// What the VTEP must be, its uplink resolved to an index.
pub struct VtepConfig<'a> {
    pub name: &'a str,
    pub vni: u32,
    pub port: u16,
    pub local: Ipv4Addr,
    pub uplink: u32,
    pub mtu: u32,
    pub mac: [u8; 6],
    /// The node subnet's `.0/32`.
    pub address: Ipv4Net,
}

fn matches(link: &Link, cfg: &VtepConfig<'_>) -> bool {
    link.mac == cfg.mac && matches_but_mac(link, cfg)
}

/// Everything but the MAC as configured (a new MAC is set in place: making the device again
/// would drop every peer's objects on it for a moment).
fn matches_but_mac(link: &Link, cfg: &VtepConfig<'_>) -> bool {
    link.kind == LinkKind::Vxlan
        && link.vxlan.as_ref().is_some_and(|v| {
            v.vni == cfg.vni
                && v.port == cfg.port
                && v.local == Some(cfg.local)
                && !v.learning
                && v.underlay == Some(cfg.uplink)
        })
}

/// Makes sure the VTEP exists as configured, is up, has the MTU and the address. Returns its
/// index and whether it was (re)created (then every peer must be replayed).
pub fn ensure(nl: &mut Netlink, cfg: &VtepConfig<'_>) -> Result<(u32, bool)> {
    let mut created = false;
    let link = match nl.link_by_name(cfg.name).map_err(kernel("reading the VTEP"))? {
        Some(link) if matches(&link, cfg) => link,
        Some(link) if matches_but_mac(&link, cfg) => {
            nl.set_mac(link.index, cfg.mac).map_err(kernel("setting the VTEP's MAC"))?;
            link
        }
        existing => {
            if let Some(old) = existing {
                nl.delete_link(old.index).map_err(kernel("replacing a VTEP with other settings"))?;
            }
            let spec = VxlanSpec {
                name: cfg.name,
                vni: cfg.vni,
                port: cfg.port,
                local: cfg.local,
                underlay: cfg.uplink,
                mtu: Some(cfg.mtu),
                mac: Some(cfg.mac),
            };
            nl.create_vxlan(&spec).map_err(kernel("creating the VTEP"))?;
            created = true;
            nl.require_link(cfg.name).map_err(kernel("reading the VTEP"))?
        }
    };
    settle(nl, &link, cfg.mtu, cfg.address, "the VTEP")?;
    Ok((link.index, created))
}

/// A backend's device (`what`, for errors) given `mtu`, `address` as its only IPv4 address,
/// and up — each only when it is not so already.
pub fn settle(nl: &mut Netlink, link: &Link, mtu: u32, address: Ipv4Net, what: &str) -> Result<()> {
    let step = |action: &str| kernel(format!("{action} {what}"));
    if link.mtu != mtu {
        nl.set_mtu(link.index, mtu).map_err(step("setting the MTU of"))?;
    }
    let addr = IpNet::V4(address);
    let have = nl.addresses(Some(link.index)).map_err(step("reading the addresses of"))?;
    for stale in have.iter().filter(|a| a.net.addr().is_ipv4() && a.net != addr) {
        nl.delete_address(link.index, &stale.net).map_err(step("removing an old address of"))?;
    }
    if !have.iter().any(|a| a.net == addr) {
        nl.add_address(link.index, &addr).map_err(step("adding the address of"))?;
    }
    if !link.up {
        nl.set_up(link.index, true).map_err(step("setting up"))?;
    }
    Ok(())
}
