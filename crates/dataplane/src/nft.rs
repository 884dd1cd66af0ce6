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
