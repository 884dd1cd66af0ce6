//! The versioned key-value store leases (and, next, IPAM blocks) are built on: one interface,
//! implemented once for the embedded file store ([`FileKv`]) and once for etcd v3 ([`EtcdKv`]).
//!
//! Every change gets the next store revision; an entry carries the revision that created it and
//! the one that last changed it. Writes are create-if-absent, compare-and-swap on the last
//! change's revision, or unconditional; a watch lists a prefix and then reports every change
//! after the listed revision (listing again whenever it lost track). Values are JSON objects
//! (the file store keeps its bookkeeping fields in them). An entry may carry an expiry time (the
//! file store keeps it; etcd removes the key itself when its lease runs out).

mod etcd;
mod file;

use std::time::{Duration, SystemTime};

pub use etcd::EtcdKv;
pub use file::FileKv;

use crate::Result;

/// One key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the store's root: `subnets/10.244.1.0-24`.
    pub key: String,
    /// The value (a JSON object), as bytes; empty when `damaged`. (The file store's carries its
    /// bookkeeping fields too.)
    pub value: Vec<u8>,
    /// The revision that created the key, and the one of its last change.
    pub created: i64,
    pub modified: i64,
    /// When it stops counting (the file store; `None` for etcd, which deletes it instead).
    pub expires: Option<SystemTime>,
    /// Why the stored bytes are not an entry at all, when they are not.
    pub damaged: Option<String>,
}

/// A change a watch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// Every entry under the prefix (the first report, and again whenever the watch had to list
    /// afresh: what is not in it is gone).
    Snapshot(Vec<Entry>),
    Put(Entry),
    Delete(String),
}

/// The store.
pub trait Kv: Send + Sync {
    /// Where it is, for humans.
    fn describe(&self) -> String;
    /// The store's current revision.
    fn revision(&self) -> Result<i64>;
    fn get(&self, key: &str) -> Result<Option<Entry>>;
    /// Every entry under `prefix`, and the revision they are as of.
    fn list(&self, prefix: &str) -> Result<(Vec<Entry>, i64)>;
    /// Creates `key` unless it exists (`None` then).
    fn create(&self, key: &str, value: &[u8], ttl: Option<Ttl>) -> Result<Option<Entry>>;
    /// Writes `key`: only if its last change was at revision `expected` (`Some`), else
    /// whatever it holds. `None` when the comparison failed (changed meanwhile, or gone).
    fn put(&self, key: &str, value: &[u8], ttl: Option<Ttl>, expected: Option<i64>) -> Result<Option<Entry>>;
    /// Removes `key`: only if its last change was at `expected` (`Some`). Whether it removed it.
    fn delete(&self, key: &str, expected: Option<i64>) -> Result<bool>;
    /// A watch on `prefix`: from `from` (a revision the caller has listed at) or, with `None`,
    /// a listing first.
    fn watch(&self, prefix: &str, from: Option<i64>) -> Result<Box<dyn KvWatch>>;
    /// An unversioned document (net-conf.json), if present.
    fn read_document(&self, key: &str) -> Result<Option<String>>;
    fn write_document(&self, key: &str, text: &str) -> Result<()>;
}

/// A watch; `poll` never blocks for long.
pub trait KvWatch: Send {
    /// What changed since the last call.
    fn poll(&mut self) -> Result<Vec<Update>>;
    /// Blocks until the store may have changed or `timeout` passed.
    fn wait(&mut self, timeout: Duration);
}

/// How long an entry lives: until `expires` (from `now`, the caller's clock: etcd grants
/// `expires - now`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttl {
    pub now: SystemTime,
    pub ttl: Duration,
}

impl Ttl {
    pub fn expires(&self) -> Option<SystemTime> {
        self.now.checked_add(self.ttl)
    }
}

/// A key is one or more `/`-separated names of letters, digits and `.-_&:`, none of them `.`
/// or `..` or ending in `.tmp`.
pub fn check_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.split('/').all(|name| {
            !name.is_empty()
                && name != "."
                && name != ".."
                && !name.contains(".tmp")
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-&:".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(crate::LeaseError::Store(format!("{key:?} is not a key")))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys() {
        for good in ["subnets/10.244.1.0-24", "subnets/10.244.1.0-24&fc00::-64", "config", "blocks/a_b"] {
            assert!(super::check_key(good).is_ok(), "{good}");
        }
        for bad in ["", "/x", "x/", "a//b", "../x", "a/./b", "a b", "subnets/x.tmp1", "a\nb"] {
            assert!(super::check_key(bad).is_err(), "{bad:?}");
        }
    }
}
