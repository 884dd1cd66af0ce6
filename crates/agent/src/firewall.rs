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
const INPUT: BaseChain = BaseChain { name: "input", kind: ChainKind::Filter, hook: "input", prio: 0 };

/// kube-proxy's masquerade mark: its traffic is left to it.
const KUBE_PROXY_MARK: u32 = 0x4000;

/// The transaction that makes the table exactly this. With a userspace tunnel on
/// `tunnel_port` (the udp backend), datagrams to that port that this node would forward out of
/// the pod network are dropped, whatever their source: a pod must not reach another node's
/// forwarder, neither posing as a node (a node's address as source) nor as itself (masqueraded
/// to this node's address, which the peer takes for this node's forwarder), to get packets
/// into other nodes' pods. What comes in from the forwarder's own sending TAP (its large
/// packets, for the kernel to cut) is not. Pods cannot reach a service on that UDP port
/// outside the cluster. Nor this node's own forwarder: datagrams to the port that come in on an
/// interface of the kinds pods attach by (bridge, veth, tun) that the way back to their source
/// does not leave by (a pod posing as a node, its packets from the pods' side; a physical,
/// bond or VLAN uplink may route asymmetrically) and those whose destination was translated (a
/// Service or NodePort pointed at the port) are dropped on input.
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
    match tunnel_port {
        Some(port) => {
            let udp = || Expr::Dport { proto: "udp".into(), port };
            cmds.push(TABLE.add_chain(&INPUT));
            cmds.push(rule(&INPUT, vec![udp(), Expr::CtDnat, Expr::Drop]));
            let pods_side = Expr::IifKinds(["bridge", "veth", "tun"].map(String::from).to_vec());
            cmds.push(rule(&INPUT, vec![udp(), pods_side, Expr::NoRouteBack, Expr::Drop]));
        }
        None => cmds.extend(gone(&INPUT)),
    }
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
        cmds.extend(gone(&POSTROUTING));
    }
    cmds
}

/// The chain `chain` removed whether it is there or not: made (if missing), then deleted (it is
/// empty: the table was flushed), in the same transaction — no listing first.
fn gone(chain: &BaseChain) -> [Value; 2] {
    [TABLE.add_chain(chain), TABLE.delete_chain(chain.name)]
}

/// Applies the rules (one transaction).
pub fn apply(network: &Ipv4Net, masquerade: bool, tunnel_port: Option<u16>) -> Result<()> {
    let cmds = commands(network, masquerade, tunnel_port);
    nft::apply(cmds).map_err(|e| AgentError::Config(format!("nftables: {e}")))
}
