//! Masquerade and forward rules in weft's own table (`ip weft-agent`), as flannel keeps them:
//! pod traffic leaving the cluster network is masqueraded, traffic inside it is not, kube-proxy's
//! masquerade mark is respected, and the forward chain accepts the cluster network. The whole
//! table is replaced in one transaction, so there is never a moment without rules (a restart
//! does not flush anything first).

use ipnet::Ipv4Net;
use serde_json::{json, Value};
use weft_dataplane::nft;

use crate::{AgentError, Result};

pub const TABLE: &str = "weft-agent";

fn net(n: &Ipv4Net) -> Value {
    json!({"prefix": {"addr": n.network().to_string(), "len": n.prefix_len()}})
}

fn m(field: &str, op: &str, right: Value) -> Value {
    json!({"match": {"op": op, "left": {"payload": {"protocol": "ip", "field": field}}, "right": right}})
}

fn rule(chain: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": "ip", "table": TABLE, "chain": chain, "expr": expr}}})
}

/// The transaction that makes the table exactly this.
pub fn commands(network: &Ipv4Net, masquerade: bool) -> Vec<Value> {
    let chain = |name: &str, kind: &str, hook: &str, prio: i32| json!({"add": {"chain": {"family": "ip", "table": TABLE, "name": name, "type": kind, "hook": hook, "prio": prio, "policy": "accept"}}});
    let mut cmds = vec![
        json!({"add": {"table": {"family": "ip", "name": TABLE}}}),
        json!({"flush": {"table": {"family": "ip", "name": TABLE}}}),
        chain("forward", "filter", "forward", 0),
        rule("forward", vec![m("saddr", "==", net(network)), json!({"accept": null})]),
        rule("forward", vec![m("daddr", "==", net(network)), json!({"accept": null})]),
    ];
    if masquerade {
        let multicast = json!({"prefix": {"addr": "224.0.0.0", "len": 4}});
        let mark = json!({"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 0x4000]}, "right": 0x4000}});
        cmds.push(chain("postrouting", "nat", "postrouting", 100));
        cmds.push(rule("postrouting", vec![mark, json!({"return": null})]));
        cmds.push(rule(
            "postrouting",
            vec![m("saddr", "==", net(network)), m("daddr", "==", net(network)), json!({"return": null})],
        ));
        cmds.push(rule(
            "postrouting",
            vec![
                m("saddr", "==", net(network)),
                m("daddr", "!=", multicast),
                json!({"masquerade": {"flags": ["fully-random"]}}),
            ],
        ));
        cmds.push(rule(
            "postrouting",
            vec![
                m("saddr", "!=", net(network)),
                m("daddr", "==", net(network)),
                json!({"masquerade": {"flags": ["fully-random"]}}),
            ],
        ));
    } else {
        cmds.push(json!({"delete": {"chain": {"family": "ip", "table": TABLE, "name": "postrouting"}}}));
    }
    cmds
}

/// Applies the rules (one transaction).
pub fn apply(network: &Ipv4Net, masquerade: bool) -> Result<()> {
    let mut cmds = commands(network, masquerade);
    if !masquerade {
        // Deleting a chain that does not exist would fail the transaction: only when present.
        let present = nft::list_table("ip", TABLE)
            .map_err(|e| AgentError::Config(format!("nftables: {e}")))?
            .is_some_and(|objs| nft::chains_of(&objs).any(|c| c == "postrouting"));
        if !present {
            cmds.pop();
        }
    }
    nft::apply(cmds).map_err(|e| AgentError::Config(format!("nftables: {e}")))
}
