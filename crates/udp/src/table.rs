//! The forwarding table, immutable once built: which node holds the subnet of a destination,
//! and whether a datagram may come in. A change builds a new table that replaces the old one
//! whole (the packet thread picks it up between batches; no lock on the packet path).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Why a packet was dropped; each is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// A datagram from an address that is no peer's public address.
    UnknownSource,
    /// A datagram whose payload is not a whole IPv4 packet (truncated, IPv6, garbage), or a
    /// packet read from the TUN that is not.
    Malformed,
    /// A datagram from a peer whose inner source is outside that peer's subnet.
    SourceNotInPeerSubnet,
    /// A datagram whose inner destination is outside this node's subnet.
    DestinationNotLocal,
    /// A packet from the TUN to a destination in no lease (answered with ICMP net unreachable).
    NoRoute,
    /// A packet from the TUN whose TTL ran out.
    TtlExpired,
    /// A packet from the TUN for this node's own subnet or outside the cluster: it would go
    /// back where it came from.
    Loop,
    /// The kernel refused to send or deliver it.
    IoError,
}

impl Drop {
    pub const ALL: [Drop; 8] = [
        Drop::UnknownSource,
        Drop::Malformed,
        Drop::SourceNotInPeerSubnet,
        Drop::DestinationNotLocal,
        Drop::NoRoute,
        Drop::TtlExpired,
        Drop::Loop,
        Drop::IoError,
    ];

    /// Its name in metrics and status (`reason="..."`).
    pub fn name(self) -> &'static str {
        match self {
            Drop::UnknownSource => "unknown_source",
            Drop::Malformed => "malformed",
            Drop::SourceNotInPeerSubnet => "source_not_in_peer_subnet",
            Drop::DestinationNotLocal => "destination_not_local",
            Drop::NoRoute => "no_route",
            Drop::TtlExpired => "ttl_expired",
            Drop::Loop => "loop",
            Drop::IoError => "io_error",
        }
    }

    pub fn index(self) -> usize {
        Drop::ALL.iter().position(|d| *d == self).unwrap_or(0)
    }
}

/// Peers by subnet, this node's subnet and the cluster network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// This node's subnet: what arrives must be for it.
    pub subnet: Option<Ipv4Net>,
    /// The cluster network: what the TUN gives that is outside it is not forwarded.
    pub network: Option<Ipv4Net>,
    peers: BTreeMap<Ipv4Net, Ipv4Addr>,
    /// Lookup: per prefix length in use, subnet address -> public address.
    by_len: Vec<(u8, HashMap<u32, Ipv4Addr>)>,
    /// Public address -> the subnets it holds.
    by_ip: HashMap<Ipv4Addr, Vec<Ipv4Net>>,
}

impl Table {
    pub fn new(
        subnet: Option<Ipv4Net>,
        network: Option<Ipv4Net>,
        peers: impl IntoIterator<Item = (Ipv4Net, Ipv4Addr)>,
    ) -> Table {
        let mut table = Table { subnet, network, ..Table::default() };
        for (net, ip) in peers {
            table.peers.insert(net.trunc(), ip);
        }
        table.index();
        table
    }

    fn index(&mut self) {
        self.by_len.clear();
        self.by_ip.clear();
        for (net, ip) in &self.peers {
            let len = net.prefix_len();
            let slot = match self.by_len.iter().position(|(l, _)| *l == len) {
                Some(i) => i,
                None => {
                    self.by_len.push((len, HashMap::new()));
                    self.by_len.len() - 1
                }
            };
            self.by_len[slot].1.insert(u32::from(net.network()), *ip);
            self.by_ip.entry(*ip).or_default().push(*net);
        }
        // Longest prefix first.
        self.by_len.sort_by_key(|b| std::cmp::Reverse(b.0));
    }

    /// Every peer: (subnet, public address), by subnet.
    pub fn peers(&self) -> impl Iterator<Item = (Ipv4Net, Ipv4Addr)> + '_ {
        self.peers.iter().map(|(n, i)| (*n, *i))
    }

    /// A copy with `subnet` held by `ip` (replacing what held it).
    pub fn with_peer(&self, subnet: Ipv4Net, ip: Ipv4Addr) -> Table {
        let mut t = self.clone();
        t.peers.insert(subnet.trunc(), ip);
        t.index();
        t
    }

    /// A copy without `subnet`.
    pub fn without_peer(&self, subnet: Ipv4Net) -> Table {
        let mut t = self.clone();
        t.peers.remove(&subnet.trunc());
        t.index();
        t
    }

    /// Where a packet to `dst` read from the TUN goes: the public address of the peer whose
    /// subnet holds it.
    pub fn route(&self, dst: Ipv4Addr) -> Result<Ipv4Addr, Drop> {
        if self.subnet.is_some_and(|s| s.contains(&dst)) || self.network.is_some_and(|n| !n.contains(&dst)) {
            return Err(Drop::Loop);
        }
        let bits = u32::from(dst);
        for (len, map) in &self.by_len {
            let mask = if *len == 0 { 0 } else { u32::MAX << (32 - u32::from(*len)) };
            if let Some(ip) = map.get(&(bits & mask)) {
                return Ok(*ip);
            }
        }
        Err(Drop::NoRoute)
    }

    /// Whether `ip` is a current peer's public address.
    pub fn knows(&self, ip: Ipv4Addr) -> bool {
        self.by_ip.contains_key(&ip)
    }

    /// Whether a datagram from `from` carrying a packet `src` -> `dst` may be written to the
    /// TUN: from a current peer's public address (any port), its inner source in that peer's
    /// subnet, its inner destination in this node's subnet.
    pub fn admit(&self, from: Ipv4Addr, src: Ipv4Addr, dst: Ipv4Addr) -> Result<(), Drop> {
        let subnets = self.by_ip.get(&from).ok_or(Drop::UnknownSource)?;
        if !subnets.iter().any(|s| s.contains(&src)) {
            return Err(Drop::SourceNotInPeerSubnet);
        }
        if !self.subnet.is_some_and(|s| s.contains(&dst)) {
            return Err(Drop::DestinationNotLocal);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn table() -> Table {
        Table::new(
            Some(net("198.19.1.0/24")),
            Some(net("198.19.0.0/16")),
            [(net("198.19.2.0/24"), ip("198.18.0.2")), (net("198.19.3.0/24"), ip("198.18.0.3"))],
        )
    }

    #[test]
    fn routes_by_the_subnet_of_the_destination() {
        let t = table();
        assert_eq!(t.route(ip("198.19.2.77")), Ok(ip("198.18.0.2")));
        assert_eq!(t.route(ip("198.19.3.1")), Ok(ip("198.18.0.3")));
        assert_eq!(t.route(ip("198.19.4.1")), Err(Drop::NoRoute));
        assert_eq!(t.route(ip("198.19.1.9")), Err(Drop::Loop), "this node's own subnet");
        assert_eq!(t.route(ip("10.0.0.1")), Err(Drop::Loop), "outside the cluster network");
        // A change is a new table; the old one is untouched.
        let moved = t.with_peer(net("198.19.2.0/24"), ip("198.18.0.22")).without_peer(net("198.19.3.0/24"));
        assert_eq!(moved.route(ip("198.19.2.77")), Ok(ip("198.18.0.22")));
        assert_eq!(moved.route(ip("198.19.3.1")), Err(Drop::NoRoute));
        assert_eq!(t.route(ip("198.19.3.1")), Ok(ip("198.18.0.3")));
        // Subnets of other lengths: the longest match.
        let mixed = t.with_peer(net("198.19.2.128/25"), ip("198.18.0.9"));
        assert_eq!(mixed.route(ip("198.19.2.200")), Ok(ip("198.18.0.9")));
        assert_eq!(mixed.route(ip("198.19.2.100")), Ok(ip("198.18.0.2")));
    }

    #[test]
    fn admits_only_a_peer_s_own_traffic_for_this_node() {
        let t = table();
        assert_eq!(t.admit(ip("198.18.0.2"), ip("198.19.2.5"), ip("198.19.1.9")), Ok(()));
        assert_eq!(t.admit(ip("198.18.0.9"), ip("198.19.2.5"), ip("198.19.1.9")), Err(Drop::UnknownSource));
        assert_eq!(
            t.admit(ip("198.18.0.2"), ip("198.19.3.5"), ip("198.19.1.9")),
            Err(Drop::SourceNotInPeerSubnet),
            "another peer's subnet as source"
        );
        assert_eq!(t.admit(ip("198.18.0.2"), ip("198.19.2.5"), ip("198.19.3.9")), Err(Drop::DestinationNotLocal));
        assert_eq!(t.admit(ip("198.18.0.2"), ip("198.19.2.5"), ip("10.1.1.1")), Err(Drop::DestinationNotLocal));
        // Without a subnet of its own (not told yet) nothing is admitted.
        let none = Table::new(None, None, [(net("198.19.2.0/24"), ip("198.18.0.2"))]);
        assert_eq!(none.admit(ip("198.18.0.2"), ip("198.19.2.5"), ip("198.19.1.9")), Err(Drop::DestinationNotLocal));
        // A peer gone: its datagrams are no longer admitted.
        let gone = t.without_peer(net("198.19.2.0/24"));
        assert_eq!(gone.admit(ip("198.18.0.2"), ip("198.19.2.5"), ip("198.19.1.9")), Err(Drop::UnknownSource));
    }
}
