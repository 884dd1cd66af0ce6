//! Helpers every plugin shares: error mapping at the CNI boundary, random names, runtime MACs,
//! and attachment keys.

use serde_json::Value;
use weft_cni::args::CmdArgs;
use weft_cni::{CniError, ErrorCode};
use weft_dataplane::link::VethSpec;
use weft_dataplane::{DataplaneError, Netlink};
use weft_netns::{NetNs, NetnsError};

/// Kernel failures are reported as the reference plugins report them: code 999 with the reason.
pub fn kernel(context: &str) -> impl FnOnce(DataplaneError) -> CniError + '_ {
    move |e| CniError::internal(format!("{context}: {e}"))
}

/// Opens the container's namespace, as the reference does (code 999 when it is not one).
pub fn open_netns(path: &str) -> Result<NetNs, CniError> {
    NetNs::open(path).map_err(|e| match e {
        NetnsError::NotNamespace { .. } => {
            CniError::internal(format!("failed to open netns {path:?}: not a network namespace"))
        }
        other => CniError::internal(other.to_string()),
    })
}

/// Opens the container's namespace for a teardown: `None` when it is gone or unusable.
pub fn open_netns_for_teardown(path: &str) -> Option<NetNs> {
    if path.is_empty() {
        return None;
    }
    NetNs::open(path).ok()
}

/// Random bytes from the kernel (`getrandom`, which never blocks once the pool is ready).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    let filled = rustix::rand::getrandom(&mut buf[..], rustix::rand::GetRandomFlags::empty());
    if !matches!(filled, Ok(n) if n == N) {
        // No randomness to be had: time and pid, good enough for a name.
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
            ^ u128::from(std::process::id());
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (seed >> ((i % 16) * 8)) as u8;
        }
    }
    buf
}

/// A host-side veth name like the reference's: `veth` and 8 hex digits.
pub fn random_veth_name() -> String {
    let b: [u8; 4] = random_bytes();
    format!("veth{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
}

/// The container MAC asked for by the runtime: `runtimeConfig.mac`, `args.cni.mac`, or `MAC=` in
/// `CNI_ARGS`, in that order.
pub fn requested_mac(args: &CmdArgs, stdin: &Value) -> Result<Option<[u8; 6]>, CniError> {
    let from_json =
        stdin["runtimeConfig"]["mac"].as_str().or_else(|| stdin["args"]["cni"]["mac"].as_str()).map(String::from);
    let Some(text) = from_json.or_else(|| args.arg("MAC")) else { return Ok(None) };
    weft_dataplane::parse_mac(&text)
        .map(Some)
        .ok_or_else(|| CniError::new(ErrorCode::InvalidConfig, format!("invalid MAC address {text:?}")))
}

/// A short stable hash for names (FNV-1a, 64 bits, as hex).
pub(crate) fn fnv64(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{hash:016x}")
}

/// What every key of `kind` in `network` starts with: `masq NETWORK/` (a long network name is
/// hashed, since nftables comments hold 128 bytes).
pub fn attachment_prefix(kind: &str, network: &str) -> String {
    let net = if network.len() <= 40 { network.to_string() } else { fnv64(network) };
    format!("{kind} {net}/")
}

/// The key that names one attachment's objects of one kind (`masq`, `hostport`) in nftables
/// comments: kind, network, container, interface.
pub fn attachment_key(kind: &str, network: &str, container_id: &str, ifname: &str) -> String {
    let prefix = attachment_prefix(kind, network);
    let rest = format!("{container_id}/{ifname}");
    if prefix.len() + rest.len() <= 120 {
        format!("{prefix}{rest}")
    } else {
        format!("{prefix}{}", fnv64(&rest))
    }
}

/// The prevResult of a config, parsed, if present.
pub fn prev_result(conf: &weft_cni::NetConf) -> Result<Option<weft_cni::CniResult>, CniError> {
    conf.prev_result.as_ref().map(weft_cni::CniResult::from_value).transpose()
}

/// A veth pair an ADD made: the host end as the kernel reports it, and the container end (down,
/// no addresses yet), known without asking the kernel again.
pub struct Veth {
    pub host: weft_dataplane::Link,
    pub container_index: u32,
    pub container_mac: [u8; 6],
}

/// A random unicast, locally administered MAC, as the kernel gives a veth without one.
pub fn random_mac() -> [u8; 6] {
    let mut mac: [u8; 6] = random_bytes();
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// Where the host end of a new veth goes and what it looks like.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostEnd {
    /// The bridge it joins at creation.
    pub master: Option<u32>,
    /// Its MAC (routed mode's fixed `ee:ee:ee:ee:ee:ee`); the kernel picks one otherwise.
    pub mac: Option<[u8; 6]>,
}

/// The veth pair of an attachment: a random `vethXXXXXXXX` on the host (as `host` says), up, and
/// `ifname` in the container's namespace (still down) with `mac`, or a random MAC.
pub fn create_veth(
    nl: &mut Netlink,
    ifname: &str,
    mtu: Option<u32>,
    mac: Option<[u8; 6]>,
    netns: &NetNs,
    host: HostEnd,
) -> Result<Veth, CniError> {
    // Chosen here rather than by the kernel, so the result needs no second look.
    let container_mac = mac.unwrap_or_else(random_mac);
    for _ in 0..5 {
        let name = random_veth_name();
        let spec = VethSpec {
            name: &name,
            peer_name: ifname,
            peer_netns: Some(netns),
            mtu,
            mac: host.mac,
            peer_mac: Some(container_mac),
            master: host.master,
            up: true,
            // One queue each, as a veth uses anyway: the kernel's default of one per possible
            // CPU, registered and then mostly removed again, is a third of the creation cost.
            queues: Some(1),
        };
        match nl.create_veth(&spec) {
            Ok(echoed) => {
                let host = match echoed {
                    Some(link) => link,
                    None => nl.require_link(&name).map_err(kernel("reading the host veth"))?,
                };
                let container_index = host
                    .peer_index
                    .ok_or_else(|| CniError::internal(format!("the kernel reports no peer for veth {name}")))?;
                return Ok(Veth { host, container_index, container_mac });
            }
            // EEXIST for a free host name means the container name is taken (checked before, so
            // a concurrent ADD took it); else the random name collided: try another.
            Err(e) if e.is_exists() => {
                if nl.link_by_name(&name).map_err(kernel("reading links"))?.is_none() {
                    return Err(CniError::internal(format!("container veth name provided ({ifname}) already exists")));
                }
            }
            Err(e) => return Err(kernel("creating the veth pair")(e)),
        }
    }
    Err(CniError::internal("failed to find a free host veth name"))
}

/// Fails when `ifname` exists in the container already (checked before anything is created).
pub fn ensure_ifname_free(cnl: &mut Netlink, ifname: &str) -> Result<(), CniError> {
    if cnl.link_by_name(ifname).map_err(kernel("reading container links"))?.is_some() {
        return Err(CniError::internal(format!("container veth name provided ({ifname}) already exists")));
    }
    Ok(())
}

/// What an ADD that creates a veth pair checks and opens before it changes anything: the MAC
/// asked for, the container's namespace with a netlink socket in it (the interface name must be
/// free), and a netlink socket on the host.
pub struct Attach {
    pub mac: Option<[u8; 6]>,
    pub netns: NetNs,
    pub cnl: Netlink,
    pub hnl: Netlink,
}

impl Attach {
    pub fn prepare(args: &CmdArgs) -> Result<Attach, CniError> {
        let stdin: Value = serde_json::from_slice(&args.stdin).unwrap_or_default();
        let mac = requested_mac(args, &stdin)?;
        let netns = open_netns(&args.netns)?;
        let mut cnl = Netlink::in_netns_here(&netns).map_err(kernel("opening netlink in the container"))?;
        ensure_ifname_free(&mut cnl, &args.ifname)?;
        let hnl = Netlink::new().map_err(kernel("opening netlink"))?;
        Ok(Attach { mac, netns, cnl, hnl })
    }
}

/// `net.ipv4.ip_forward=1` (and IPv6 forwarding when the result has IPv6).
pub fn enable_forwarding(result: &weft_cni::CniResult) -> Result<(), CniError> {
    let sys = |key: &str| weft_dataplane::sysctl::set(key, "1").map_err(|e| CniError::internal(e.to_string()));
    if result.ips.iter().any(|ip| ip.address.addr().is_ipv4()) {
        sys("net/ipv4/ip_forward")?;
    }
    if result.ips.iter().any(|ip| ip.address.addr().is_ipv6()) {
        sys("net/ipv6/conf/all/forwarding")?;
    }
    Ok(())
}

impl Veth {
    /// The result's interfaces of a veth attachment: the host end, then the container end in
    /// its sandbox; and the network's DNS settings, if it has any.
    pub fn fill_result(
        &self,
        result: &mut weft_cni::CniResult,
        args: &weft_cni::args::CmdArgs,
        conf: &weft_cni::NetConf,
    ) {
        result.interfaces = vec![
            weft_cni::Interface { name: self.host.name.clone(), mac: self.host.mac_string(), sandbox: String::new() },
            weft_cni::Interface {
                name: args.ifname.clone(),
                mac: weft_dataplane::format_mac(&self.container_mac),
                sandbox: args.netns.clone(),
            },
        ];
        if let Some(dns) = conf.dns.as_ref().filter(|d| !d.is_empty()) {
            result.dns = dns.clone();
        }
    }
}

/// Undoes a failed ADD of a veth attachment: the host end (the container end goes with it)
/// and the IPAM reservation.
pub fn roll_back_veth(hnl: &mut Netlink, host_veth: Option<u32>, ipam_type: &str, args: &weft_cni::args::CmdArgs) {
    if let Some(index) = host_veth {
        let _ = hnl.delete_link(index);
    }
    let _ = crate::ipam::del(ipam_type, args);
}

/// DEL of a veth attachment: its IPAM reservation released and its link retired (when the
/// namespace is still there; the routes and neighbours through it go with it). The errors,
/// every step tried.
pub fn del_veth_attachment(conf: &weft_cni::NetConf, args: &weft_cni::args::CmdArgs) -> Vec<CniError> {
    let mut errors = Vec::new();
    if let Some(ipam_type) = crate::ipam::ipam_type(conf) {
        errors.extend(crate::ipam::del(&ipam_type, args).err());
    }
    if let Some(netns) = open_netns_for_teardown(&args.netns) {
        errors.extend(crate::teardown::retire_container_link(&netns, &args.ifname).err());
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_macs_are_unicast_locally_administered_and_differ() {
        let macs: Vec<[u8; 6]> = (0..8).map(|_| random_mac()).collect();
        for mac in &macs {
            assert_eq!(mac[0] & 0x01, 0, "multicast bit set in {mac:02x?}");
            assert_eq!(mac[0] & 0x02, 0x02, "not locally administered: {mac:02x?}");
        }
        assert!(macs.windows(2).any(|w| w[0] != w[1]), "eight equal random MACs");
        let name = random_veth_name();
        assert!(name.len() == 12 && name.starts_with("veth"), "{name}");
    }
}
