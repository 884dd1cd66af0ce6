//! `weft lab show`: each node's lease, routes, FDB and neighbours the way `ip`/`bridge` print
//! them, or the whole lab as JSON.

use anyhow::{Context, Result};
use serde_json::json;
use weft_dataplane::route::RTPROT_WEFT;
use weft_dataplane::{format_mac, Netlink};
use weft_netns::NetNs;

use super::Lab;

fn lease_of(lab: &Lab, node: &super::NodeInfo) -> Option<String> {
    let env = weft_netconf::SubnetEnv::read(&lab.node_dir(&node.name).join("subnet.env")).ok()?;
    Some(env.subnet_network().to_string())
}

/// A bgp node's speaker status, if it answers.
fn bgp_status(lab: &Lab, node: &super::NodeInfo) -> Option<serde_json::Value> {
    let socket = weft_agent::routed::socket_path(&lab.node_dir(&node.name));
    crate::bgp::query(&socket).ok().and_then(|t| serde_json::from_str(&t).ok())
}

/// A bgp node's blocks, as its subnet file says.
fn blocks_of(lab: &Lab, node: &super::NodeInfo) -> Vec<String> {
    let env = weft_netconf::SubnetEnv::read(&lab.node_dir(&node.name).join("subnet.env")).ok();
    env.and_then(|e| e.routed).map(|r| r.blocks.iter().map(ToString::to_string).collect()).unwrap_or_default()
}

/// Routed mode's part: blocks, pod routes, blackholes, learned routes, BGP sessions.
fn print_routed(
    lab: &Lab,
    node: &super::NodeInfo,
    nl: &mut Netlink,
    name_of: &dyn Fn(Option<u32>) -> String,
) -> Result<()> {
    use weft_dataplane::route::{RTPROT_WEFT_BGP, RTPROT_WEFT_BLACKHOLE, RTPROT_WEFT_POD};
    outln!("  blocks: {}", blocks_of(lab, node).join(", "));
    let routes = nl.routes().map_err(|e| anyhow::anyhow!("{e}"))?;
    outln!("  pod routes (proto 201):");
    for r in routes.iter().filter(|r| r.protocol == RTPROT_WEFT_POD) {
        outln!("    {} dev {}", r.dst, name_of(r.oif));
    }
    outln!("  blackholes (proto 203):");
    for r in nl.blackholes().map_err(|e| anyhow::anyhow!("{e}"))?.iter().filter(|r| r.protocol == RTPROT_WEFT_BLACKHOLE)
    {
        outln!("    blackhole {}", r.dst);
    }
    outln!("  learned routes (proto 202):");
    for r in routes.iter().filter(|r| r.protocol == RTPROT_WEFT_BGP) {
        let via = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
        outln!("    {}{via}{}", r.dst, r.nexthop.map(|id| format!(" nhid {id}")).unwrap_or_default());
    }
    match bgp_status(lab, node) {
        Some(s) => {
            outln!("  BGP sessions (AS {}, router id {}):", s["as"], s["router_id"].as_str().unwrap_or("?"));
            for n in s["neighbors"].as_array().into_iter().flatten() {
                outln!(
                    "    {:<16} AS {:<10} {:<12} up {:>5} s, received {}, advertised {}",
                    n["address"].as_str().unwrap_or("?"),
                    n["as"],
                    n["state"].as_str().unwrap_or("?"),
                    n["uptime_seconds"],
                    n["prefixes_accepted"],
                    n["prefixes_advertised"]
                );
            }
        }
        None => outln!("  BGP: no speaker answers"),
    }
    Ok(())
}

fn print_node(lab: &Lab, node: &super::NodeInfo) -> Result<()> {
    let ns = NetNs::open(weft_netns::named_path(&node.namespace))?;
    let mut nl = Netlink::in_netns(&ns).map_err(|e| anyhow::anyhow!("{e}"))?;
    let links = nl.links().map_err(|e| anyhow::anyhow!("{e}"))?;
    let name_of =
        |i: Option<u32>| links.iter().find(|l| Some(l.index) == i).map_or("?".to_string(), |l| l.name.clone());
    outln!(
        "{} ({}, {}): lease {}, agent pid {}",
        node.name,
        node.namespace,
        node.address,
        lease_of(lab, node).unwrap_or_else(|| "none yet".into()),
        lab.agent_pid(&node.name).map_or("-".into(), |p| p.to_string())
    );
    if lab.backend == "bgp" {
        return print_routed(lab, node, &mut nl, &name_of);
    }
    outln!("  routes (proto weft):");
    for r in nl.routes().map_err(|e| anyhow::anyhow!("{e}"))?.iter().filter(|r| r.protocol == RTPROT_WEFT) {
        let via = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
        outln!("    {}{via} dev {}{}", r.dst, name_of(r.oif), if r.onlink { " onlink" } else { "" });
    }
    if let Some(tun) = links.iter().find(|l| l.kind == weft_dataplane::LinkKind::Tun) {
        match weft_agent::tun::status(&lab.forwarder_socket(&node.name)) {
            Some(f) => {
                outln!("  udp forwarder pid {} on {} (mtu {}), port {}:", f["pid"], tun.name, tun.mtu, f["port"]);
                for p in f["peers"].as_array().into_iter().flatten() {
                    outln!("    {} -> {}", p["subnet"].as_str().unwrap_or("?"), p["ip"].as_str().unwrap_or("?"));
                }
                let c = &f["counters"];
                outln!(
                    "    packets: tun->udp {} / {}, udp->tun {} / {} (read / sent), icmp unreachable {}",
                    c["tun_rx_packets"],
                    c["udp_tx_packets"],
                    c["udp_rx_packets"],
                    c["tun_tx_packets"],
                    c["icmp_sent"]
                );
                let drops: Vec<String> =
                    c["drops"].as_object().into_iter().flatten().map(|(reason, n)| format!("{reason} {n}")).collect();
                outln!("    drops: {}", drops.join(", "));
                match (f["kernel_cut"]["device"].as_str(), f["kernel_cut"]["off"].as_str()) {
                    (Some(tap), _) => {
                        let peers = f["kernel_cut"]["peers"].as_object();
                        let taking: Vec<&String> =
                            peers.into_iter().flatten().filter(|(_, v)| **v == true).map(|(k, _)| k).collect();
                        outln!(
                            "    kernel segmentation through {tap}: {} large packets sent, {} received whole; peers that take them: {}",
                            c["kernel_cut"],
                            c["whole_received"],
                            if taking.is_empty() { "none".to_string() } else { taking.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ") }
                        )
                    }
                    (_, why) => outln!("    segmentation in the forwarder: {}", why.unwrap_or("?")),
                }
                outln!(
                    "    probes: {} sent, {} answered; peers' probes: {} answered, {} withheld",
                    c["probes_sent"],
                    c["probes_answered"],
                    c["probe_answers_sent"],
                    c["probe_answers_withheld"]
                );
            }
            None => outln!("  {}: no udp forwarder answers", tun.name),
        }
    }
    if let Some(vtep) = links.iter().find(|l| l.name.starts_with("weft.")) {
        outln!("  bridge fdb show dev {}:", vtep.name);
        for e in nl.fdb(vtep.index).map_err(|e| anyhow::anyhow!("{e}"))? {
            let dst = e.dst.map(|d| format!(" dst {d}")).unwrap_or_default();
            outln!("    {} dev {}{dst} self{}", e.mac_string(), vtep.name, if e.permanent { " permanent" } else { "" });
        }
        outln!("  ip neigh show dev {}:", vtep.name);
        for n in nl.neighbours(Some(vtep.index)).map_err(|e| anyhow::anyhow!("{e}"))? {
            outln!(
                "    {} dev {} lladdr {} {}",
                n.ip,
                vtep.name,
                format_mac(&n.mac),
                if n.permanent { "PERMANENT" } else { "" }
            );
        }
    }
    Ok(())
}

pub fn show(name: &str, node: Option<&str>, as_json: bool) -> Result<()> {
    let lab = Lab::load(name)?.with_context(|| format!("no lab named {name}; start one with `weft lab up`"))?;
    let selected: Vec<_> = lab.nodes.iter().filter(|n| node.is_none_or(|want| n.name == want)).collect();
    if selected.is_empty() {
        anyhow::bail!("lab {name} has no node {:?}", node.unwrap_or_default());
    }
    if as_json {
        let node_json = |n: &super::NodeInfo| {
            let pods: Vec<_> = lab.pods.iter().filter(|p| p.node == n.name).collect();
            json!({"name": n.name, "namespace": n.namespace, "address": n.address,
                   "subnet": lease_of(&lab, n), "agent_pid": lab.agent_pid(&n.name),
                   "health_address": super::supervise::HEALTH_ADDRESS, "pods": pods,
                   "udp_forwarder": weft_agent::tun::status(&lab.forwarder_socket(&n.name)),
                   "blocks": blocks_of(&lab, n),
                   "bgp": (lab.backend == "bgp").then(|| bgp_status(&lab, n)).flatten()})
        };
        if let Some(n) = selected.first().filter(|_| node.is_some()) {
            outln!("{}", serde_json::to_string_pretty(&node_json(n))?);
            return Ok(());
        }
        let out = json!({
            "name": lab.name, "backend": lab.backend, "network": lab.network,
            "lease_ttl": lab.lease_ttl, "complete": lab.complete,
            "supervisor_pid": lab.supervisor_pid.filter(|_| lab.supervisor_alive()),
            "store": {"kind": lab.store.kind, "endpoint": lab.store.endpoint, "namespace": lab.store.namespace, "pid": lab.store.pid},
            "underlay": {"namespace": lab.switch_namespace, "bridge": "sw0", "network": super::UNDERLAY,
                         "free_address": super::FREE_ADDRESS},
            "nodes": lab.nodes.iter().map(node_json).collect::<Vec<_>>(),
            "pods": lab.pods,
        });
        outln!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for n in selected {
        print_node(&lab, n)?;
    }
    Ok(())
}
