//! nftables through the `nftables` crate's JSON interface (`nft -j`): every change is one JSON
//! transaction that the kernel applies whole or not at all. weft only ever reads back its own
//! tables.

use serde_json::{json, Value};

use crate::error::{DataplaneError, Result};

const NO_ARGS: &[&str] = &[];

/// Applies `commands` (each `{"add": ...}`, `{"delete": ...}`, `{"flush": ...}`) as one transaction.
pub fn apply(commands: Vec<Value>) -> Result<()> {
    if commands.is_empty() {
        return Ok(());
    }
    let payload = json!({ "nftables": commands }).to_string();
    nftables::helper::apply_ruleset_raw(&payload, nftables::helper::DEFAULT_NFT, NO_ARGS)
        .map(drop)
        .map_err(|e| DataplaneError::Nft { op: "apply", detail: error_detail(e) })
}

/// The objects of table `family name` (`nft -j list table FAMILY NAME`), or `None` when the table
/// does not exist.
pub fn list_table(family: &str, name: &str) -> Result<Option<Vec<Value>>> {
    let args = ["list", "table", family, name];
    match nftables::helper::get_current_ruleset_raw(nftables::helper::DEFAULT_NFT, args.iter()) {
        Ok(out) => {
            let value: Value = serde_json::from_str(&out)
                .map_err(|e| DataplaneError::Nft { op: "list", detail: format!("decoding nft output: {e}") })?;
            Ok(Some(value["nftables"].as_array().cloned().unwrap_or_default()))
        }
        Err(nftables::helper::NftablesError::NftFailed { stderr, .. })
            if stderr.contains("No such file or directory") || stderr.contains("does not exist") =>
        {
            Ok(None)
        }
        Err(e) => Err(DataplaneError::Nft { op: "list", detail: error_detail(e) }),
    }
}

/// The rules of `chain` in a listing from [`list_table`].
pub fn rules_of<'a>(objects: &'a [Value], chain: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    objects.iter().filter_map(|o| o.get("rule")).filter(move |r| r["chain"] == chain)
}

/// The chain names in a listing from [`list_table`].
pub fn chains_of(objects: &[Value]) -> impl Iterator<Item = &str> + '_ {
    objects.iter().filter_map(|o| o.get("chain")).filter_map(|c| c["name"].as_str())
}

fn error_detail(e: nftables::helper::NftablesError) -> String {
    match e {
        nftables::helper::NftablesError::NftFailed { stderr, .. } => stderr.trim().to_string(),
        other => other.to_string(),
    }
}

/// The nftables objects weft writes, typed: one builder for the agent's rules and the plugins'.
/// Each method returns one command of a transaction for [`apply`].
pub mod build {
    use std::net::IpAddr;

    use ipnet::IpNet;
    use serde_json::{json, Value};

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Family {
        Ip,
        Ip6,
        Inet,
    }

    impl Family {
        pub fn as_str(self) -> &'static str {
            match self {
                Family::Ip => "ip",
                Family::Ip6 => "ip6",
                Family::Inet => "inet",
            }
        }
    }

    /// A table of weft's.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Table {
        pub family: Family,
        pub name: &'static str,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ChainKind {
        Filter,
        Nat,
    }

    /// A base chain: attached to a hook, policy accept.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct BaseChain {
        pub name: &'static str,
        pub kind: ChainKind,
        pub hook: &'static str,
        pub prio: i32,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Op {
        Eq,
        Ne,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Field {
        Saddr,
        Daddr,
    }

    /// One statement of a rule.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Expr {
        /// `ip saddr == NET` (`ip6` for an IPv6 network; a host prefix matches the address).
        Addr {
            field: Field,
            op: Op,
            net: IpNet,
        },
        /// `meta mark & MASK == VALUE`.
        Mark {
            mask: u32,
            value: u32,
        },
        /// `meta nfproto ipv4|ipv6`.
        Nfproto {
            ipv6: bool,
        },
        /// `fib daddr type local`.
        LocalDestination,
        /// `ct status dnat`: the connection's destination was translated.
        CtDnat,
        /// `fib saddr . iif oif missing`: no route back to the source through the interface it
        /// came in on (strict reverse-path filtering, for one rule).
        NoRouteBack,
        /// `meta iifkind { KIND, ... }`: the input interface is of one of these kinds.
        IifKinds(Vec<String>),
        /// `meta iifname ==|!= NAME`.
        Iifname {
            op: Op,
            name: String,
        },
        /// `PROTO dport == PORT`.
        Dport {
            proto: String,
            port: u16,
        },
        Accept,
        Drop,
        Return,
        Masquerade {
            fully_random: bool,
        },
        /// `dnat ip|ip6 to ADDR:PORT`.
        Dnat {
            addr: IpAddr,
            port: u16,
        },
    }

    impl Expr {
        pub fn to_json(&self) -> Value {
            let op = |op: Op| if op == Op::Eq { "==" } else { "!=" };
            match self {
                Expr::Addr { field, op: o, net } => {
                    let protocol = if net.addr().is_ipv4() { "ip" } else { "ip6" };
                    let field = if *field == Field::Saddr { "saddr" } else { "daddr" };
                    let right = if net.prefix_len() == net.max_prefix_len() {
                        json!(net.addr().to_string())
                    } else {
                        json!({"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}})
                    };
                    json!({"match": {"op": op(*o), "left": {"payload": {"protocol": protocol, "field": field}}, "right": right}})
                }
                Expr::Mark { mask, value } => {
                    json!({"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, mask]}, "right": value}})
                }
                Expr::Nfproto { ipv6 } => json!({"match": {"op": "==", "left": {"meta": {"key": "nfproto"}},
                    "right": if *ipv6 { "ipv6" } else { "ipv4" }}}),
                Expr::LocalDestination => {
                    json!({"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}})
                }
                Expr::CtDnat => json!({"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}),
                Expr::NoRouteBack => json!({"match": {"op": "==",
                    "left": {"fib": {"result": "oif", "flags": ["saddr", "iif"]}}, "right": false}}),
                Expr::IifKinds(kinds) => {
                    json!({"match": {"op": "==", "left": {"meta": {"key": "iifkind"}}, "right": {"set": kinds}}})
                }
                Expr::Iifname { op: o, name } => {
                    json!({"match": {"op": op(*o), "left": {"meta": {"key": "iifname"}}, "right": name}})
                }
                Expr::Dport { proto, port } => {
                    json!({"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "dport"}}, "right": port}})
                }
                Expr::Accept => json!({"accept": null}),
                Expr::Drop => json!({"drop": null}),
                Expr::Return => json!({"return": null}),
                Expr::Masquerade { fully_random: true } => json!({"masquerade": {"flags": ["fully-random"]}}),
                Expr::Masquerade { fully_random: false } => json!({"masquerade": null}),
                Expr::Dnat { addr, port } => {
                    json!({"dnat": {"family": if addr.is_ipv4() { "ip" } else { "ip6" }, "addr": addr.to_string(), "port": port}})
                }
            }
        }
    }

    /// A rule: its chain, an optional comment (the plugins' attachment key) and its statements.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Rule {
        pub chain: &'static str,
        pub comment: Option<String>,
        pub exprs: Vec<Expr>,
    }

    impl Table {
        fn id(&self) -> Value {
            json!({"family": self.family.as_str(), "name": self.name})
        }

        /// `add table` (a no-op when it exists).
        pub fn add(&self) -> Value {
            json!({"add": {"table": self.id()}})
        }

        /// `flush table`: every rule of every chain goes.
        pub fn flush(&self) -> Value {
            json!({"flush": {"table": self.id()}})
        }

        /// `add chain` for a base chain (a no-op when it exists).
        pub fn add_chain(&self, chain: &BaseChain) -> Value {
            let kind = if chain.kind == ChainKind::Nat { "nat" } else { "filter" };
            json!({"add": {"chain": {"family": self.family.as_str(), "table": self.name, "name": chain.name,
                "type": kind, "hook": chain.hook, "prio": chain.prio, "policy": "accept"}}})
        }

        pub fn delete_chain(&self, name: &str) -> Value {
            json!({"delete": {"chain": {"family": self.family.as_str(), "table": self.name, "name": name}}})
        }

        pub fn add_rule(&self, rule: &Rule) -> Value {
            let mut body = json!({"family": self.family.as_str(), "table": self.name, "chain": rule.chain,
                "expr": rule.exprs.iter().map(Expr::to_json).collect::<Vec<_>>()});
            if let (Some(comment), Some(obj)) = (&rule.comment, body.as_object_mut()) {
                obj.insert("comment".into(), json!(comment));
            }
            json!({"add": {"rule": body}})
        }

        /// `delete rule` by the handle a listing gave.
        pub fn delete_rule(&self, chain: &Value, handle: &Value) -> Value {
            json!({"delete": {"rule": {"family": self.family.as_str(), "table": self.name, "chain": chain, "handle": handle}}})
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn statements_as_nft_reads_them() {
            let net: IpNet = "10.244.0.0/16".parse().unwrap();
            let host: IpNet = "fd00::5/128".parse().unwrap();
            assert_eq!(
                Expr::Addr { field: Field::Saddr, op: Op::Ne, net }.to_json(),
                json!({"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                    "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}})
            );
            assert_eq!(
                Expr::Addr { field: Field::Daddr, op: Op::Eq, net: host }.to_json()["match"]["right"],
                json!("fd00::5")
            );
            assert_eq!(
                Expr::Masquerade { fully_random: true }.to_json(),
                json!({"masquerade": {"flags": ["fully-random"]}})
            );
            let table = Table { family: Family::Inet, name: "t" };
            let rule = Rule { chain: "c", comment: Some("k".into()), exprs: vec![Expr::Accept] };
            assert_eq!(
                table.add_rule(&rule),
                json!({"add": {"rule": {"family": "inet", "table": "t", "chain": "c", "comment": "k", "expr": [{"accept": null}]}}})
            );
            let nat = BaseChain { name: "post", kind: ChainKind::Nat, hook: "postrouting", prio: 100 };
            assert_eq!(table.add_chain(&nat)["add"]["chain"]["type"], "nat");
        }
    }
}
