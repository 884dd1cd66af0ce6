//! Makes the kernel hold exactly the desired state, touching only what weft owns: routes with
//! weft's protocol number, and the permanent neighbours and remote FDB entries of weft's VTEP.
//! Nothing is written when the kernel already agrees. Stale entries go first (route, FDB,
//! neighbour), then new ones are added in flannel's order (neighbour, FDB, route: the route last,
//! so the kernel never ARPs for the gateway).

use weft_dataplane::error::ignore_not_found;
use weft_dataplane::route::RTPROT_WEFT;
use weft_dataplane::{Netlink, RouteSpec};

use crate::backend::Desired;
use crate::{kernel, Result};

/// What one reconcile changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub removed: usize,
}

fn same_route(a: &RouteSpec, b: &RouteSpec) -> bool {
    a.dst == b.dst && a.gateway == b.gateway && a.oif == b.oif && a.onlink == b.onlink
}

/// Applies `desired`; `vtep` is the VXLAN device whose neighbours and FDB weft owns.
pub fn apply(nl: &mut Netlink, desired: &Desired, vtep: Option<u32>) -> Result<Changes> {
    let mut changes = Changes::default();
    let routes: Vec<RouteSpec> = nl
        .routes()
        .map_err(kernel("listing routes"))?
        .into_iter()
        .filter(|r| r.protocol == RTPROT_WEFT && r.dst.addr().is_ipv4())
        .collect();
    let (neighbours, fdb) = match vtep {
        Some(index) => (
            nl.neighbours(Some(index))
                .map_err(kernel("listing neighbours"))?
                .into_iter()
                .filter(|n| n.permanent)
                .collect(),
            nl.fdb(index).map_err(kernel("listing fdb"))?.into_iter().filter(|e| e.dst.is_some()).collect(),
        ),
        None => (Vec::new(), Vec::new()),
    };

    for stale in routes.iter().filter(|r| !desired.routes.iter().any(|d| same_route(d, r))) {
        // A route to the same destination that is merely different is replaced below instead.
        if desired.routes.iter().any(|d| d.dst == stale.dst) {
            continue;
        }
        ignore_not_found(nl.delete_route(stale)).map_err(kernel(format!("removing route {}", stale.dst)))?;
        changes.removed += 1;
    }
    if let Some(index) = vtep {
        for e in fdb.iter().filter(|e| !desired.fdb.iter().any(|(m, d)| e.mac == m && e.dst == Some(*d))) {
            ignore_not_found(nl.delete_fdb(index, &e.mac, e.dst))
                .map_err(kernel(format!("removing fdb {}", e.mac_string())))?;
            changes.removed += 1;
        }
        for n in neighbours.iter().filter(|n| !desired.neighbours.iter().any(|(ip, _)| *ip == n.ip)) {
            ignore_not_found(nl.delete_neighbour(index, n.ip))
                .map_err(kernel(format!("removing neighbour {}", n.ip)))?;
            changes.removed += 1;
        }
        for (ip, mac) in &desired.neighbours {
            if !neighbours.iter().any(|n| n.ip == *ip && n.mac == mac) {
                nl.replace_neighbour(index, *ip, mac).map_err(kernel(format!("adding neighbour {ip}")))?;
                changes.added += 1;
            }
        }
        for (mac, dst) in &desired.fdb {
            if !fdb.iter().any(|e| e.mac == mac && e.dst == Some(*dst)) {
                nl.replace_fdb(index, mac, Some(*dst)).map_err(kernel(format!("adding fdb entry for {dst}")))?;
                changes.added += 1;
            }
        }
    }
    for want in &desired.routes {
        if !routes.iter().any(|r| same_route(r, want)) {
            nl.replace_route(want).map_err(kernel(format!("adding route {}", want.dst)))?;
            changes.added += 1;
        }
    }
    Ok(changes)
}

/// Applies one peer's change without listing anything: removes what `old` programmed that `new`
/// does not have (a changed MAC's FDB entry, say), then replaces `new`'s objects in flannel's
/// order. Both are desired states of that single peer.
pub fn apply_peer(nl: &mut Netlink, old: &Desired, new: &Desired, vtep: Option<u32>) -> Result<Changes> {
    let mut changes = Changes::default();
    for r in old.routes.iter().filter(|r| !new.routes.iter().any(|n| n.dst == r.dst)) {
        ignore_not_found(nl.delete_route(r)).map_err(kernel(format!("removing route {}", r.dst)))?;
        changes.removed += 1;
    }
    if let Some(index) = vtep {
        for (mac, dst) in old.fdb.iter().filter(|e| !new.fdb.contains(e)) {
            ignore_not_found(nl.delete_fdb(index, mac, Some(*dst)))
                .map_err(kernel(format!("removing fdb entry for {dst}")))?;
            changes.removed += 1;
        }
        for (ip, _) in old.neighbours.iter().filter(|(ip, _)| !new.neighbours.iter().any(|(n, _)| n == ip)) {
            ignore_not_found(nl.delete_neighbour(index, *ip)).map_err(kernel(format!("removing neighbour {ip}")))?;
            changes.removed += 1;
        }
        for (ip, mac) in &new.neighbours {
            nl.replace_neighbour(index, *ip, mac).map_err(kernel(format!("adding neighbour {ip}")))?;
            changes.added += 1;
        }
        for (mac, dst) in &new.fdb {
            nl.replace_fdb(index, mac, Some(*dst)).map_err(kernel(format!("adding fdb entry for {dst}")))?;
            changes.added += 1;
        }
    }
    for r in &new.routes {
        nl.replace_route(r).map_err(kernel(format!("adding route {}", r.dst)))?;
        changes.added += 1;
    }
    Ok(changes)
}
