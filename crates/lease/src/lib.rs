//! Subnet leases. A node leases one subnet of the cluster network and publishes how to reach it
//! (its public IP, its backend's data such as the VTEP MAC) in flannel's JSON, so weft and
//! flannel nodes can share a store. [`file::FileStore`] keeps leases in a directory for a single
//! machine (the lab, tests, one-node clusters); [`etcd::EtcdStore`] keeps them in etcd v3 in
//! flannel's key layout, for clusters. Both are [`Leases`] on a versioned key-value store
//! ([`kv::Kv`]: create-if-absent, compare-and-swap, delete, list and watch from a revision),
//! implemented once per store; the lease rules and the watch-diff exist once.

pub mod etcd;
pub mod file;
pub mod kv;
mod leases;
mod model;
mod pick;
mod store;

pub use leases::{LeaseWatch, Leases};
pub use model::{Lease, LeaseAttrs, LeaseEvent, VxlanData, BLOCK_KEY};
pub use pick::choose_subnet;
pub use store::{LeaseStore, LeaseWatcher};

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: String, source: std::io::Error },
    #[error("lease {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("no free subnet left in {0}")]
    Exhausted(String),
    #[error("lease {0} not found")]
    NotFound(String),
    #[error("store: {0}")]
    Store(String),
}

pub type Result<T, E = LeaseError> = std::result::Result<T, E>;
