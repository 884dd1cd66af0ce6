//! Per-attachment masquerade (bridge and ptp `ipMasq`): traffic from the container's address to
//! anywhere but its own subnet and multicast leaves with the node's address. Rules are tagged
//! with the attachment key, so DEL removes them even when the netns and addresses are gone.

use ipnet::IpNet;
use weft_cni::CniError;

use crate::rules::{self, Expr, Field, Op, MASQUERADE};

/// Adds masquerade rules for `addresses` (each with its subnet) in one transaction.
pub fn setup(key: &str, addresses: &[IpNet]) -> Result<(), CniError> {
    let mut cmds = rules::ensure(&[MASQUERADE]);
    for net in addresses {
        let own = IpNet::new(net.addr(), net.max_prefix_len()).unwrap_or(*net);
        let multicast: IpNet = if net.addr().is_ipv4() { "224.0.0.0/4" } else { "ff00::/8" }.parse().unwrap_or(*net);
        cmds.push(rules::rule(
            &MASQUERADE,
            key,
            vec![
                Expr::Addr { field: Field::Saddr, op: Op::Eq, net: own },
                Expr::Addr { field: Field::Daddr, op: Op::Ne, net: net.trunc() },
                Expr::Addr { field: Field::Daddr, op: Op::Ne, net: multicast },
                Expr::Masquerade { fully_random: false },
            ],
        ));
    }
    rules::apply(cmds)
}

/// Removes the attachment's masquerade rules (none is success).
pub fn teardown(key: &str) -> Result<(), CniError> {
    rules::remove_matching(&|comment| comment == key)
}
