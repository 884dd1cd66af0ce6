//! IP address management for host-local: address ranges and range sets with the reference
//! plugin's defaults and checks ([`range`]), the on-disk store in the reference plugin's format
//! with an index that keeps every call O(1) ([`store`]), and the round-robin allocator that joins
//! them ([`allocator`]). Nothing here touches the network.

pub mod allocator;
pub mod range;
pub mod store;

pub use allocator::{Allocation, Allocator};
pub use range::{Range, RangeConfig, RangeSet};
pub use store::Store;

/// IPAM errors; the plugin maps them to CNI codes.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("invalid range: {0}")]
    InvalidRange(String),
    #[error("no IP addresses available in range set: {0}")]
    Exhausted(String),
    #[error("requested IP address {0} is not available in range set {1}")]
    RequestedUnavailable(std::net::IpAddr, String),
    #[error("requested IP address {0} is not in any range")]
    RequestedOutOfRange(std::net::IpAddr),
    #[error("{ip} has been allocated to {container_id}, duplicate allocation is not allowed")]
    Duplicate { ip: std::net::IpAddr, container_id: String },
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: String, source: std::io::Error },
}

pub type Result<T, E = IpamError> = std::result::Result<T, E>;
