//! weft's nftables table for the plugins, `inet weft-cni`: the base chains, and rules tagged with
//! an attachment key in their comment so DEL and GC find them without knowing the addresses.

use serde_json::Value;
use weft_cni::CniError;
use weft_dataplane::nft;
use weft_dataplane::nft::build::Table;
pub use weft_dataplane::nft::build::{BaseChain, ChainKind, Expr, Family, Field, Op, Rule};

/// weft's table for the plugins.
pub const TABLE: Table = Table { family: Family::Inet, name: "weft-cni" };

pub const MASQUERADE: BaseChain =
    BaseChain { name: "masquerade", kind: ChainKind::Nat, hook: "postrouting", prio: 100 };
pub const HOSTPORTS_PRE: BaseChain =
    BaseChain { name: "hostports-prerouting", kind: ChainKind::Nat, hook: "prerouting", prio: -100 };
pub const HOSTPORTS_OUT: BaseChain =
    BaseChain { name: "hostports-output", kind: ChainKind::Nat, hook: "output", prio: -100 };
pub const HOSTPORTS_SNAT: BaseChain =
    BaseChain { name: "hostports-snat", kind: ChainKind::Nat, hook: "postrouting", prio: 99 };

/// `add table` and `add chain` commands for the given base chains (no-ops when they exist).
pub fn ensure(chains: &[BaseChain]) -> Vec<Value> {
    let mut cmds = vec![TABLE.add()];
    cmds.extend(chains.iter().map(|c| TABLE.add_chain(c)));
    cmds
}

/// An `add rule` command in `chain`, tagged with `key`.
pub fn rule(chain: &BaseChain, key: &str, exprs: Vec<Expr>) -> Value {
    TABLE.add_rule(&Rule { chain: chain.name, comment: Some(key.to_string()), exprs })
}

fn nft_error(e: weft_dataplane::DataplaneError) -> CniError {
    CniError::internal(format!("nftables: {e}"))
}

/// Applies one transaction.
pub fn apply(cmds: Vec<Value>) -> Result<(), CniError> {
    nft::apply(cmds).map_err(nft_error)
}

/// `delete rule` commands for every rule whose comment `matches`, from a listing of the table.
pub fn delete_matching(objects: &[Value], matches: &dyn Fn(&str) -> bool) -> Vec<Value> {
    objects
        .iter()
        .filter_map(|o| o.get("rule"))
        .filter(|r| r["comment"].as_str().is_some_and(matches))
        .map(|r| TABLE.delete_rule(&r["chain"], &r["handle"]))
        .collect()
}

/// The current objects of the table (empty when it does not exist).
pub fn list() -> Result<Vec<Value>, CniError> {
    Ok(nft::list_table(TABLE.family.as_str(), TABLE.name).map_err(nft_error)?.unwrap_or_default())
}

/// Removes every rule whose comment `matches`, in one transaction. A rule deleted concurrently
/// (by another DEL or GC) makes the transaction fail as a whole; it is listed again and retried.
pub fn remove_matching(matches: &dyn Fn(&str) -> bool) -> Result<(), CniError> {
    let mut last = Ok(());
    for _ in 0..3 {
        let cmds = delete_matching(&list()?, matches);
        if cmds.is_empty() {
            return Ok(());
        }
        last = apply(cmds);
        if last.is_ok() {
            return last;
        }
    }
    last
}

/// Whether any rule is tagged with exactly `key`.
pub fn has_rules(key: &str) -> Result<bool, CniError> {
    Ok(list()?.iter().filter_map(|o| o.get("rule")).any(|r| r["comment"] == key))
}

/// The attachment keys of every tagged rule.
pub fn keys() -> Result<Vec<String>, CniError> {
    let mut keys: Vec<String> =
        list()?.iter().filter_map(|o| o.get("rule")).filter_map(|r| r["comment"].as_str().map(String::from)).collect();
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// GC: removes the rules of `kind` in `network` whose attachment is not in `valid`.
pub fn gc(kind: &str, network: &str, valid: &[weft_cni::skel::Attachment]) -> Result<(), CniError> {
    let prefix = crate::common::attachment_prefix(kind, network);
    let keep: Vec<String> =
        valid.iter().map(|a| crate::common::attachment_key(kind, network, &a.container_id, &a.ifname)).collect();
    remove_matching(&|c| c.starts_with(&prefix) && !keep.iter().any(|k| k == c))
}
