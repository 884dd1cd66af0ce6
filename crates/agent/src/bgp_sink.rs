//! The BGP speaker's routes into the kernel (`weft bgp run --install` and the agent's `bgp`
//! backend): best routes go into the main table with weft's BGP route protocol (202), through
//! nexthop objects of the same protocol; routes of other owners are never touched.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use weft_bgp::daemon::RouteSink;
use weft_dataplane::route::RTPROT_WEFT_BGP;
use weft_dataplane::{Netlink, Nexthop, RouteSpec};

/// Routes into the kernel as weft's BGP routes. Each next hop becomes a nexthop object of
/// protocol 202 the routes through it name by id: the kernel checks the gateway once, not once a
/// route (a large table goes in about a quarter faster). A next hop the kernel takes no object
/// for gets routes with the gateway in each, as before.
pub struct KernelSink {
    nl: Netlink,
    /// The nexthop objects made (or, after a restart, found), by gateway.
    nexthops: HashMap<IpAddr, u32>,
    /// The next nexthop id to try.
    next_id: u32,
    /// Prefixes that could not be installed (another producer's route, a next hop the kernel
    /// refuses), said once each and tried again at each reconcile.
    refused: HashSet<IpNet>,
}

/// Where this speaker's nexthop ids start (ids are per namespace; a taken one is skipped).
const FIRST_NEXTHOP_ID: u32 = 0x0202_0000;

impl KernelSink {
    pub fn new() -> weft_dataplane::Result<KernelSink> {
        let mut nl = Netlink::new()?;
        // A previous run's objects are taken over (its routes name them).
        let nexthops = match nl.nexthops() {
            Ok(all) => all
                .into_iter()
                .filter(|nh| nh.protocol == RTPROT_WEFT_BGP)
                .filter_map(|nh| Some((nh.gateway?, nh.id)))
                .collect(),
            Err(e) => {
                tracing::debug!("listing nexthop objects: {e}");
                HashMap::new()
            }
        };
        Ok(KernelSink { nl, nexthops, next_id: FIRST_NEXTHOP_ID, refused: HashSet::new() })
    }

    fn spec(prefix: IpNet) -> RouteSpec {
        RouteSpec::new(prefix).protocol(RTPROT_WEFT_BGP)
    }

    /// The nexthop object for `gateway`, made when there is none; None when the kernel takes
    /// none (the gateway not directly reachable, or a kernel without nexthop objects).
    fn nexthop(&mut self, gateway: IpAddr) -> Option<u32> {
        if let Some(id) = self.nexthops.get(&gateway) {
            return Some(*id);
        }
        let oif = match self.nl.route_get(gateway) {
            Ok(r) if r.gateway.is_none() => r.oif?,
            _ => return None,
        };
        for _ in 0..64 {
            let nh = Nexthop { id: self.next_id, gateway: Some(gateway), oif: Some(oif), protocol: RTPROT_WEFT_BGP };
            self.next_id = self.next_id.checked_add(1).unwrap_or(FIRST_NEXTHOP_ID);
            match self.nl.add_nexthop(&nh) {
                Ok(()) => {
                    self.nexthops.insert(gateway, nh.id);
                    return Some(nh.id);
                }
                Err(e) if e.is_exists() => continue,
                Err(e) => {
                    tracing::debug!("a nexthop object for {gateway}: {e}");
                    return None;
                }
            }
        }
        None
    }

    fn put(&mut self, prefix: IpNet, next_hop: IpAddr) -> weft_dataplane::Result<Option<u8>> {
        match self.nexthop(next_hop) {
            Some(id) => match self.nl.put_owned_route(&Self::spec(prefix).nexthop(id)) {
                // The object gone underneath (its device went): made again, once.
                Err(e) if !e.is_exists() => {
                    self.nexthops.remove(&next_hop);
                    match self.nexthop(next_hop) {
                        Some(id) => self.nl.put_owned_route(&Self::spec(prefix).nexthop(id)),
                        None => self.nl.put_owned_route(&Self::spec(prefix).via(next_hop)),
                    }
                }
                other => other,
            },
            None => self.nl.put_owned_route(&Self::spec(prefix).via(next_hop)),
        }
    }
}

impl RouteSink for KernelSink {
    fn leftovers(&mut self) -> Vec<IpNet> {
        match self.nl.routes() {
            Ok(routes) => routes.into_iter().filter(|r| r.protocol == RTPROT_WEFT_BGP).map(|r| r.dst).collect(),
            Err(e) => {
                tracing::warn!("listing routes: {e}");
                Vec::new()
            }
        }
    }

    fn install(&mut self, prefix: IpNet, next_hop: IpAddr) {
        match self.put(prefix, next_hop) {
            Ok(None) => {
                self.refused.remove(&prefix);
            }
            Ok(Some(p)) => {
                if self.refused.insert(prefix) {
                    tracing::warn!("the route to {prefix} belongs to another producer (protocol {p}); left alone")
                }
            }
            Err(e) => {
                if self.refused.insert(prefix) {
                    tracing::warn!("installing {prefix} via {next_hop}: {e}")
                }
            }
        }
    }

    fn remove(&mut self, prefix: IpNet) {
        self.refused.remove(&prefix);
        if let Err(e) = weft_dataplane::error::ignore_not_found(self.nl.delete_route(&Self::spec(prefix))) {
            tracing::warn!("removing {prefix}: {e}");
        }
    }

    fn reconcile(&mut self, wanted: &[(IpNet, IpAddr)]) -> Option<usize> {
        let (routes, objects) = match (self.nl.routes(), self.nl.nexthops()) {
            (Ok(r), Ok(n)) => (r, n),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("reading the kernel's routes: {e}");
                return None;
            }
        };
        // Objects gone (a link went down and took them): forgotten, made again when used.
        let live: HashMap<u32, Option<IpAddr>> = objects.into_iter().map(|n| (n.id, n.gateway)).collect();
        self.nexthops.retain(|gw, id| live.get(id) == Some(&Some(*gw)));
        let held: HashMap<IpNet, Option<IpAddr>> = routes
            .into_iter()
            .filter(|r| r.protocol == RTPROT_WEFT_BGP)
            .map(|r| (r.dst, r.gateway.or_else(|| r.nexthop.and_then(|id| live.get(&id).copied().flatten()))))
            .collect();
        let mut repaired = 0;
        for (prefix, next_hop) in wanted {
            if held.get(prefix) != Some(&Some(*next_hop)) {
                // What could not be installed before is tried again, without counting.
                repaired += usize::from(!self.refused.contains(prefix));
                self.install(*prefix, *next_hop);
            }
        }
        let wanted_set: HashSet<&IpNet> = wanted.iter().map(|(p, _)| p).collect();
        for stray in held.keys().filter(|p| !wanted_set.contains(p)) {
            repaired += 1;
            self.remove(*stray);
        }
        if repaired > 0 {
            tracing::warn!("the kernel differed from the installed routes: {repaired} put back or removed");
        }
        // What the kernel refused is known (said once, kept in `refused`): no second dump.
        Some(wanted.iter().filter(|(p, _)| !self.refused.contains(p)).count())
    }

    fn next_hops_in_use(&mut self, in_use: &HashSet<IpAddr>) {
        let unused: Vec<(IpAddr, u32)> =
            self.nexthops.iter().filter(|(gw, _)| !in_use.contains(gw)).map(|(gw, id)| (*gw, *id)).collect();
        for (gateway, id) in unused {
            self.nexthops.remove(&gateway);
            if let Err(e) = weft_dataplane::error::ignore_not_found(self.nl.delete_nexthop(id)) {
                tracing::warn!("removing the nexthop object {id} ({gateway}): {e}");
            }
        }
    }
}
