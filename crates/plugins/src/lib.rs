//! The CNI plugins weft ships, each taking the same JSON as the reference plugin of its name:
//! `bridge`, `host-local`, `portmap`, `loopback`, `ptp` and `routed` (Calico's pod shape), and `weft`, the meta plugin that
//! delegates to them with the node's subnet. [`by_name`] maps a plugin type (the
//! name the binary was invoked under) to its implementation.

pub mod attachment_lock;
pub mod bridge;
pub mod common;
pub mod container;
pub mod delegate;
pub mod host_local;
pub mod ipam;
pub mod loopback;
pub mod masq;
pub mod meta;
pub mod portmap;
pub mod ptp;
pub mod routed;
pub mod rules;
pub mod teardown;

#[cfg(test)]
mod fuzz;

use weft_cni::skel::Plugin;

/// Every plugin type weft implements.
pub const PLUGIN_NAMES: &[&str] = &["bridge", "host-local", "portmap", "loopback", "ptp", "routed", "weft"];

/// The plugin implementing `name`.
pub fn by_name(name: &str) -> Option<Box<dyn Plugin>> {
    Some(match name {
        "bridge" => Box::new(bridge::Bridge),
        "host-local" => Box::new(host_local::HostLocal),
        "portmap" => Box::new(portmap::Portmap),
        "loopback" => Box::new(loopback::Loopback),
        "ptp" => Box::new(ptp::Ptp),
        "routed" => Box::new(routed::Routed),
        "weft" => Box::new(meta::Meta),
        _ => return None,
    })
}
