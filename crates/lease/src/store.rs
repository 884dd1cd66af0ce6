//! The interface every lease store offers the agent (synchronous: the etcd store runs its own
//! small runtime inside).

use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use weft_netconf::NetworkConfig;

use crate::{Lease, LeaseAttrs, LeaseEvent, Result};

pub trait LeaseStore: Send {
    /// The cluster's `net-conf.json`, if the store holds one.
    fn network_config(&self) -> Result<Option<String>>;
    /// Every lease that has not expired.
    fn list(&self, now: SystemTime) -> Result<Vec<Lease>>;
    /// This node's lease: its existing one (same public IP), else `previous` if free, else a
    /// free subnet chosen at random; created atomically so two nodes never share a subnet.
    fn acquire(
        &self,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Net>,
        ttl: Option<Duration>,
        now: SystemTime,
        random: &mut dyn FnMut(usize) -> usize,
    ) -> Result<Lease>;
    /// Extends `lease`; `NotFound` when it is gone or another node's now.
    fn renew(&self, lease: &Lease, ttl: Option<Duration>, now: SystemTime) -> Result<Lease>;
    /// Removes a lease (a missing one is fine).
    fn delete(&self, subnet: &Ipv4Net) -> Result<()>;
    /// Routed mode: one more subnet (an IPAM block) for the node of `attrs`, held without a
    /// TTL; `None` when the network has none free. Two nodes never get the same one.
    fn claim_block(
        &self,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
        now: SystemTime,
        random: &mut dyn FnMut(usize) -> usize,
    ) -> Result<Option<Lease>>;
    /// Gives a block back, if the store still holds it for this node unchanged.
    fn release_block(&self, lease: &Lease) -> Result<bool>;
    /// Claims `block` again for this node (the store lost it while pods still use it), unless
    /// another claim holds it. Whether it did.
    fn take_back_block(&self, attrs: &LeaseAttrs, block: Ipv4Net, now: SystemTime) -> Result<bool>;
    /// A watch over every lease, starting with the current ones (reported as added).
    fn watch(&self) -> Result<Box<dyn LeaseWatcher>>;
    /// Where the store is, for humans.
    fn describe(&self) -> String;
}

/// A watch; `poll` never blocks for long.
pub trait LeaseWatcher: Send {
    fn poll(&mut self, now: SystemTime) -> Result<Vec<LeaseEvent>>;
    /// Every lease as of the last poll (a copy).
    fn leases(&self) -> Vec<Lease>;
    /// The lease on `subnet` as of the last poll.
    fn lease(&self, subnet: &Ipv4Net) -> Option<Lease>;
    /// How many leases there were at the last poll.
    fn count(&self) -> usize;
    /// Whether the watch has listed every lease at least once: before that, what it knows is
    /// partial, and nothing may be removed on its word.
    fn synced(&self) -> bool;
    /// How many entries could not be read as leases at the last poll (skipped).
    fn damaged(&self) -> usize {
        0
    }
    /// Blocks until the store may have changed or `timeout` passed, whichever is first (so a
    /// loop reacts to a change at once and still wakes up for its periodic work).
    fn wait(&mut self, timeout: Duration) {
        std::thread::sleep(timeout);
    }
}
