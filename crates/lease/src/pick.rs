//! Choosing a subnet for a node, as flannel does: the node's own lease if it has one, else the
//! subnet it had before (from its subnet file) if still free, else one at random among the first
//! 100 free ones (random, so that racing nodes rarely want the same one).

use std::collections::HashSet;

use ipnet::Ipv4Net;
use weft_netconf::NetworkConfig;

/// The subnet to try next, or `None` when none is free. `taken` are the subnets leased now;
/// `random` picks an index below its argument.
pub fn choose_subnet(
    config: &NetworkConfig,
    taken: &HashSet<Ipv4Net>,
    previous: Option<Ipv4Net>,
    random: &mut dyn FnMut(usize) -> usize,
) -> Option<Ipv4Net> {
    if let Some(prev) = previous.filter(|p| config.is_leasable(p) && !taken.contains(p)) {
        return Some(prev);
    }
    let free: Vec<Ipv4Net> = config.subnets().filter(|s| !taken.contains(s)).take(100).collect();
    if free.is_empty() {
        return None;
    }
    Some(free[random(free.len())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previous_then_random_free() {
        let config = NetworkConfig::parse(r#"{"Network": "198.19.0.0/16"}"#).unwrap();
        let taken: HashSet<Ipv4Net> = ["198.19.1.0/24".parse().unwrap()].into();
        let prev = "198.19.7.0/24".parse().unwrap();
        assert_eq!(choose_subnet(&config, &taken, Some(prev), &mut |_| 0), Some(prev));
        // A previous subnet that is taken, or outside the network, is not reused.
        let got = choose_subnet(&config, &taken, Some("198.19.1.0/24".parse().unwrap()), &mut |_| 0).unwrap();
        assert_eq!(got.to_string(), "198.19.2.0/24");
        let got = choose_subnet(&config, &taken, Some("10.0.0.0/24".parse().unwrap()), &mut |n| n - 1).unwrap();
        assert_eq!(got.to_string(), "198.19.101.0/24");
        let full: HashSet<Ipv4Net> = config.subnets().collect();
        assert_eq!(choose_subnet(&config, &full, None, &mut |_| 0), None);
    }
}
