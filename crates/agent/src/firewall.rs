//! Masquerade and forward rules in weft's own table (`ip weft-agent`), as flannel keeps them:
//! pod traffic leaving the cluster network is masqueraded, traffic inside it is not, kube-proxy's
//! masquerade mark is respected, and the forward chain accepts the cluster network. The whole
//! table is replaced in one transaction, so there is never a moment without rules (a restart
//! does not flush anything first).

use ipnet::{IpNet, Ipv4Net};
use serde_json::Value;
use weft_dataplane::nft;
use weft_dataplane::nft::build::{BaseChain, ChainKind, Expr, Family, Field, Op, Rule, Table};

use crate::{AgentError, Result};

pub const TABLE: Table = Table { family: Family::Ip, name: "weft-agent" };
const FORWARD: BaseChain = BaseChain { name: "forward", kind: ChainKind::Filter, hook: "forward", prio: 0 };
const POSTROUTING: BaseChain = BaseChain { name: "postrouting", kind: ChainKind::Nat, hook: "postrouting", prio: 100 };

/// kube-proxy's masquerade mark: its traffic is left to it.
const KUBE_PROXY_MARK: u32 = 0x4000;

/// The transaction that makes the table exactly this. With a userspace tunnel on
/// `tunnel_port` (the udp backend), datagrams to that port that this node would forward out of
/// the pod network are dropped, whatever their source: a pod must not reach another node's
/// forwarder, neither posing as a node (a node's address as source) nor as itself (masqueraded
/// to this node's address, which the peer takes for this node's forwarder), to get packets
/// into other nodes' pods. What comes in from the forwarder's own sending TAP (its large
/// packets, for the kernel to cut) is not. Pods cannot reach a service on that UDP port
/// outside the cluster.
pub fn commands(network: &Ipv4Net, masquerade: bool, tunnel_port: Option<u16>) -> Vec<Value> {
    let net = IpNet::V4(*network);
    let src = |op| Expr::Addr { field: Field::Saddr, op, net };
    let dst = |op| Expr::Addr { field: Field::Daddr, op, net };
    let rule = |chain: &BaseChain, exprs| TABLE.add_rule(&Rule { chain: chain.name, comment: None, exprs });
    let mut cmds = vec![TABLE.add(), TABLE.flush(), TABLE.add_chain(&FORWARD)];
    if let Some(port) = tunnel_port {
        let tap = weft_udp::forwarder::tap_name(crate::backend::UDP_DEVICE);
        cmds.push(rule(
            &FORWARD,
            vec![
                Expr::Iifname { op: Op::Ne, name: tap },
                dst(Op::Ne),
                Expr::Dport { proto: "udp".into(), port },
                Expr::Drop,
            ],
        ));
    }
    cmds.extend([rule(&FORWARD, vec![src(Op::Eq), Expr::Accept]), rule(&FORWARD, vec![dst(Op::Eq), Expr::Accept])]);
    if masquerade {
        let multicast = Expr::Addr {
            field: Field::Daddr,
            op: Op::Ne,
            net: IpNet::V4(Ipv4Net::new_assert([224, 0, 0, 0].into(), 4)),
        };
        let masq = Expr::Masquerade { fully_random: true };
        cmds.push(TABLE.add_chain(&POSTROUTING));
        cmds.push(rule(&POSTROUTING, vec![Expr::Mark { mask: KUBE_PROXY_MARK, value: KUBE_PROXY_MARK }, Expr::Return]));
        cmds.push(rule(&POSTROUTING, vec![src(Op::Eq), dst(Op::Eq), Expr::Return]));
        cmds.push(rule(&POSTROUTING, vec![src(Op::Eq), multicast, masq.clone()]));
        cmds.push(rule(&POSTROUTING, vec![src(Op::Ne), dst(Op::Eq), masq]));
    } else {
        cmds.push(TABLE.delete_chain(POSTROUTING.name));
    }
    cmds
}

/// Applies the rules (one transaction).
pub fn apply(network: &Ipv4Net, masquerade: bool, tunnel_port: Option<u16>) -> Result<()> {
    let mut cmds = commands(network, masquerade, tunnel_port);
    if !masquerade {
        // Deleting a chain that does not exist would fail the transaction: only when present.
        let present = nft::list_table(TABLE.family.as_str(), TABLE.name)
            .map_err(|e| AgentError::Config(format!("nftables: {e}")))?
            .is_some_and(|objs| nft::chains_of(&objs).any(|c| c == POSTROUTING.name));
        if !present {
            cmds.pop();
        }
    }
    nft::apply(cmds).map_err(|e| AgentError::Config(format!("nftables: {e}")))
}
