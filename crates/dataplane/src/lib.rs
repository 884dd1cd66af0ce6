//! The dataplane: every kernel object weft creates goes through here. Netlink is spoken
//! synchronously over one socket per namespace (a CNI plugin is a short process; an async runtime
//! would cost more than the work). nftables changes go through the `nftables` crate as JSON
//! transactions, one transaction per change.

pub mod addr;
pub mod error;
pub mod link;
pub mod monitor;
pub mod neigh;
pub mod nexthop;
pub mod nft;
pub mod route;
pub mod socket;
pub mod sysctl;

pub use error::{DataplaneError, Result};
pub use link::{Link, LinkKind, VxlanInfo, VxlanSpec};
pub use neigh::{FdbEntry, Neighbour};
pub use nexthop::Nexthop;
pub use route::RouteSpec;
pub use socket::Netlink;

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (also with `-`).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    Some(mac)
}

#[cfg(test)]
mod tests {
    #[test]
    fn mac_round_trip() {
        let mac = super::parse_mac("0a:1B:2c:3d:4e:5f").unwrap();
        assert_eq!(super::format_mac(&mac), "0a:1b:2c:3d:4e:5f");
        assert!(super::parse_mac("0a:1b:2c:3d:4e").is_none());
        assert!(super::parse_mac("0a:1b:2c:3d:4e:5fg").is_none());
    }
}
