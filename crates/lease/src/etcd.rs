//! The etcd v3 store, in flannel's layout so weft and flannel nodes can share a cluster:
//! `<prefix>/config` holds net-conf.json, `<prefix>/subnets/<a.b.c.d>-<len>` one lease per node
//! (value: flannel's lease JSON), its TTL an etcd lease ([`EtcdKv`]). A new lease is created
//! with a transaction `If(Version(key) == 0)`, so two nodes never get the same subnet; renewal
//! attaches a fresh etcd lease, as flannel does, and gives the old one back.

use crate::kv::EtcdKv;
use crate::leases::Leases;
use crate::Result;

/// flannel's default prefix.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

/// Leases in etcd.
pub type EtcdStore = Leases<EtcdKv>;

impl Leases<EtcdKv> {
    pub fn connect(endpoints: &[String], prefix: &str) -> Result<EtcdStore> {
        Ok(Leases::new(EtcdKv::connect(endpoints, prefix)?))
    }
}
