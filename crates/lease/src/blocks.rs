//! IPAM blocks (routed mode, issue 12): the pod network cut into blocks (a /26 by default), each
//! held by one node (its affinity) under `blocks/<network>-<len>` — `{"Node": "<name>"}`. A node
//! claims the first free block with create-if-absent, so two nodes racing for one never both
//! get it; it releases a block only while the store still holds its own claim unchanged.
//! Anything under `blocks/` that is not a claim of this shape still counts as taken: a damaged
//! entry is never handed out again.

use ipnet::Ipv4Net;
use serde_json::{json, Value};

use crate::kv::Kv;
use crate::{LeaseError, Result};

const PREFIX: &str = "blocks/";

/// Blocks of one network, on a store.
pub struct Blocks<'a> {
    kv: &'a dyn Kv,
    network: Ipv4Net,
    len: u8,
}

/// A claimed block: which node holds it, and the revision of its claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub block: Ipv4Net,
    pub node: String,
    pub modified: i64,
}

fn key(block: &Ipv4Net) -> String {
    format!("{PREFIX}{}-{}", block.network(), block.prefix_len())
}

fn block_of(key: &str) -> Option<Ipv4Net> {
    let (addr, len) = key.strip_prefix(PREFIX)?.split_once('-')?;
    Ipv4Net::new(addr.parse().ok()?, len.parse().ok()?).ok()
}

impl<'a> Blocks<'a> {
    /// Blocks of `len` bits in `network`.
    pub fn new(kv: &'a dyn Kv, network: Ipv4Net, len: u8) -> Result<Blocks<'a>> {
        if len < network.prefix_len() || len > 32 {
            return Err(LeaseError::Store(format!(
                "a block of /{len} does not fit the network {network} (between /{} and /32)",
                network.prefix_len()
            )));
        }
        Ok(Blocks { kv, network: network.trunc(), len })
    }

    /// Every claim under `blocks/` (an entry that is not one is returned as held by nobody:
    /// still taken), with the blocks it covers.
    pub fn all(&self) -> Result<Vec<Claim>> {
        let (entries, _) = self.kv.list(PREFIX)?;
        Ok(entries
            .iter()
            .filter_map(|e| {
                let block = block_of(&e.key)?;
                let node = serde_json::from_slice::<Value>(&e.value)
                    .ok()
                    .and_then(|v| v.get("Node")?.as_str().map(str::to_string))
                    .unwrap_or_default();
                Some(Claim { block, node, modified: e.modified })
            })
            .collect())
    }

    /// The blocks `node` holds.
    pub fn held(&self, node: &str) -> Result<Vec<Ipv4Net>> {
        Ok(self.all()?.into_iter().filter(|c| c.node == node && !node.is_empty()).map(|c| c.block).collect())
    }

    /// Claims a free block for `node`: the first one no claim overlaps, taken with
    /// create-if-absent (a block another node took meanwhile is skipped). `None` when the
    /// network has no free block left.
    pub fn claim(&self, node: &str) -> Result<Option<Ipv4Net>> {
        if node.is_empty() {
            return Err(LeaseError::Store("a block needs a node name".into()));
        }
        let taken: Vec<Ipv4Net> = self.all()?.into_iter().map(|c| c.block).collect();
        let candidates = self.network.subnets(self.len).map_err(|e| LeaseError::Store(e.to_string()))?;
        for block in candidates {
            if taken.iter().any(|t| t.contains(&block.network()) || block.contains(&t.network())) {
                continue;
            }
            let value = json!({ "Node": node }).to_string();
            if self.kv.create(&key(&block), value.as_bytes(), None)?.is_some() {
                return Ok(Some(block));
            }
        }
        Ok(None)
    }

    /// Gives `block` up, if `node` still holds it (a claim changed or taken over meanwhile is
    /// left alone). Whether it was released.
    pub fn release(&self, node: &str, block: &Ipv4Net) -> Result<bool> {
        let Some(entry) = self.kv.get(&key(block))? else { return Ok(false) };
        let holder = serde_json::from_slice::<Value>(&entry.value)
            .ok()
            .and_then(|v| v.get("Node")?.as_str().map(str::to_string));
        if holder.as_deref() != Some(node) {
            return Ok(false);
        }
        self.kv.delete(&key(block), Some(entry.modified))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_block() {
        let b: Ipv4Net = "198.19.0.64/26".parse().unwrap();
        assert_eq!(key(&b), "blocks/198.19.0.64-26");
        assert_eq!(block_of(&key(&b)), Some(b));
        assert_eq!(block_of("blocks/garbage"), None);
        assert_eq!(block_of("subnets/198.19.0.0-24"), None);
    }
}
