//! `weft bgp run` and `weft bgp status`: the BGP speaker as a daemon of its own, and what it
//! says about its neighbours. Received best routes go into the kernel's main table with weft's
//! BGP route protocol (202) when `--install` is given; routes of other owners are never touched.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use weft_agent::bgp_sink::KernelSink;
use weft_agent::http::StatusCode;
use weft_bgp::daemon::{DaemonConfig, NeighborSpec, NoSink, RouteSink};
use weft_bgp::rib::Policy;

/// `weft bgp run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// This speaker's AS (1-4294967295).
    #[arg(long)]
    local_as: u32,
    /// This speaker's BGP identifier (an IPv4 address, unique among the speakers it meets).
    #[arg(long)]
    router_id: Ipv4Addr,
    /// Where to accept sessions: ADDR or ADDR:PORT (port 179 by default).
    #[arg(long, default_value = "0.0.0.0:179")]
    listen: String,
    /// A neighbour: ADDR,AS[,passive][,rr-client]; repeatable. AS equal to --local-as is iBGP;
    /// `passive` waits for it to connect; `rr-client` reflects routes to it (route reflector).
    #[arg(long = "neighbor")]
    neighbors: Vec<String>,
    /// Accept sessions from any address in PREFIX with AS (PREFIX,AS); repeatable.
    #[arg(long = "neighbor-range")]
    ranges: Vec<String>,
    /// A prefix this speaker announces; repeatable.
    #[arg(long = "announce")]
    announce: Vec<IpNet>,
    /// Accept only prefixes inside NETWORK, no longer than N bits (NETWORK[,le=N]); repeatable;
    /// default: accept all. Prefixes overlapping announced ones are never accepted.
    #[arg(long = "accept")]
    accept: Vec<String>,
    /// Advertise only prefixes inside NETWORK, no longer than N bits (NETWORK[,le=N]);
    /// repeatable; default: advertise every best path the rules allow.
    #[arg(long = "export")]
    export: Vec<String>,
    /// End a session whose neighbour sends more prefixes than this (it is tried again after a
    /// minute).
    #[arg(long)]
    max_prefix: Option<usize>,
    /// Put the best received routes into the kernel's main table (protocol 202).
    #[arg(long)]
    install: bool,
    /// The next hop this speaker announces (default: the router id).
    #[arg(long)]
    next_hop: Option<IpAddr>,
    /// The IPv6 next hop for IPv6 prefixes (multiprotocol BGP); without it, no IPv6 prefix is
    /// announced (learned ones are installed all the same).
    #[arg(long)]
    next_hop6: Option<std::net::Ipv6Addr>,
    /// The hold time offered, in seconds (0, or 3 and more).
    #[arg(long, default_value_t = 90)]
    hold_time: u16,
    /// Graceful restart (RFC 4724): how long neighbours keep this speaker's routes when it goes
    /// away without a word, and how long after a restart the routes it had installed stay while
    /// neighbours send theirs again (1-4095 s).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u16).range(1..=4095))]
    restart_time: u16,
    /// The control socket `weft bgp status` asks.
    #[arg(long, default_value = "/run/weft/bgp.sock")]
    socket: PathBuf,
    /// Serve /healthz and Prometheus /metrics (sessions, prefixes, routes) on ADDR:PORT.
    #[arg(long)]
    health: Option<SocketAddr>,
}

/// `weft bgp status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// The control socket of the speaker to ask.
    #[arg(long, default_value = "/run/weft/bgp.sock")]
    socket: PathBuf,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn neighbor(text: &str) -> Result<NeighborSpec> {
    let mut parts = text.split(',');
    let address: IpAddr =
        parts.next().unwrap_or_default().parse().with_context(|| format!("--neighbor {text:?}: not an address"))?;
    let asn: u32 = parts
        .next()
        .ok_or_else(|| anyhow::anyhow!("--neighbor {text:?}: ADDR,AS[,passive][,rr-client]"))?
        .parse()
        .with_context(|| format!("--neighbor {text:?}: not an AS number"))?;
    if asn == 0 {
        bail!("--neighbor {text:?}: AS 0 is not an AS");
    }
    let address = address.to_canonical();
    if let IpAddr::V6(v6) = address {
        if v6.is_unicast_link_local() {
            bail!("--neighbor {text:?}: a link-local neighbour needs an interface, which is not supported; use a global or unique-local address");
        }
    }
    if address.is_unspecified() || address.is_multicast() {
        bail!("--neighbor {text:?}: not a unicast address");
    }
    let mut spec = NeighborSpec { address, asn, passive: false, rr_client: false, originated_only: false };
    for flag in parts {
        match flag {
            "passive" => spec.passive = true,
            "rr-client" => spec.rr_client = true,
            other => bail!("--neighbor {text:?}: unknown flag {other:?} (passive, rr-client)"),
        }
    }
    Ok(spec)
}

fn range(text: &str) -> Result<(IpNet, u32)> {
    let (net, asn) = text.split_once(',').ok_or_else(|| anyhow::anyhow!("--neighbor-range {text:?}: PREFIX,AS"))?;
    let asn: u32 = asn.parse().with_context(|| format!("--neighbor-range {text:?}: not an AS number"))?;
    if asn == 0 {
        bail!("--neighbor-range {text:?}: AS 0 is not an AS");
    }
    Ok((net.parse().with_context(|| format!("--neighbor-range {text:?}: not a prefix"))?, asn))
}

/// The control socket's path must be free for one: nothing there, or a socket left behind. A
/// file or directory of another kind is not this speaker's to remove.
fn check_socket_path(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            bail!("--socket {}: something else is there (not a socket); give another path", path.display())
        }
        _ => Ok(()),
    }
}

/// A prefix filter entry, NETWORK[,le=N], of the flag `flag`.
fn filter(flag: &str, text: &str) -> Result<(IpNet, u8)> {
    let (net, le) = match text.split_once(',') {
        Some((net, le)) => {
            let n = le.strip_prefix("le=").ok_or_else(|| anyhow::anyhow!("{flag} {text:?}: NETWORK[,le=N]"))?;
            (net, Some(n.parse::<u8>().with_context(|| format!("{flag} {text:?}: le is a length"))?))
        }
        None => (text, None),
    };
    let net: IpNet = net.parse().with_context(|| format!("{flag} {text:?}: not a network"))?;
    let max = if net.addr().is_ipv4() { 32 } else { 128 };
    let le = le.unwrap_or(max);
    if le < net.prefix_len() || le > max {
        bail!("{flag} {text:?}: le must be between {} and {max}", net.prefix_len());
    }
    Ok((net, le))
}

pub fn run(args: RunArgs) -> Result<()> {
    if args.local_as == 0 {
        bail!("--local-as 0 is not an AS");
    }
    if args.hold_time != 0 && args.hold_time < 3 {
        bail!("--hold-time {}: 0, or at least 3", args.hold_time);
    }
    let listen: SocketAddr = match args.listen.parse() {
        Ok(a) => a,
        Err(_) => SocketAddr::new(args.listen.parse().context("--listen: ADDR or ADDR:PORT")?, 179),
    };
    if args.router_id.is_unspecified() || args.router_id.is_broadcast() || args.router_id.is_multicast() {
        bail!("--router-id {}: not a BGP identifier (a unicast IPv4 address of this router)", args.router_id);
    }
    if args.max_prefix == Some(0) {
        bail!("--max-prefix 0 would end every session at its first prefix");
    }
    if args.next_hop.is_some_and(|nh| nh.is_ipv6()) {
        bail!("--next-hop is the IPv4 next hop; give an IPv6 one with --next-hop6");
    }
    let neighbors = args.neighbors.iter().map(|n| neighbor(n)).collect::<Result<Vec<_>>>()?;
    for (i, n) in neighbors.iter().enumerate() {
        if neighbors[..i].iter().any(|m| m.address == n.address) {
            bail!("--neighbor {}: given twice (one session per neighbour address)", n.address);
        }
        if n.address == listen.ip() || n.address == IpAddr::V4(args.router_id) {
            bail!("--neighbor {}: that is this speaker's own address", n.address);
        }
    }
    let ranges = args.ranges.iter().map(|r| range(r)).collect::<Result<Vec<_>>>()?;
    check_socket_path(&args.socket)?;
    let policy = Policy {
        accept: args.accept.iter().map(|a| filter("--accept", a)).collect::<Result<Vec<_>>>()?,
        max_prefix: args.max_prefix,
        export: args.export.iter().map(|a| filter("--export", a)).collect::<Result<Vec<_>>>()?,
    };
    let config = DaemonConfig {
        local_as: args.local_as,
        router_id: args.router_id,
        listen,
        next_hop: args.next_hop.unwrap_or(IpAddr::V4(args.router_id)),
        next_hop_v6: args.next_hop6,
        neighbors,
        ranges,
        announce: args.announce,
        policy,
        hold_time: args.hold_time,
        connect_retry: Duration::from_secs(5),
        restart_time: args.restart_time,
        selection_deferral: None,
        socket: args.socket,
    };
    if let Some(addr) = args.health {
        let socket = config.socket.clone();
        let bound = weft_agent::http::serve_with(addr, Arc::new(move |path: &str| health(&socket, path)))
            .with_context(|| format!("--health {addr}"))?;
        tracing::info!("health and metrics on http://{bound}/");
    }
    // One installing speaker per network namespace: two would fight over protocol 202's routes
    // and nexthop objects (and one stopping would remove the other's). An abstract socket is
    // per namespace and goes with its process.
    let _install_lock = if args.install {
        use std::os::linux::net::SocketAddrExt;
        let name = std::os::unix::net::SocketAddr::from_abstract_name(b"weft-bgp-install")?;
        Some(std::os::unix::net::UnixListener::bind_addr(&name).map_err(|_| {
            anyhow::anyhow!(
                "another weft bgp speaker installs routes in this network namespace; only one may (run this one without --install)"
            )
        })?)
    } else {
        None
    };
    let sink: Box<dyn RouteSink> =
        if args.install { Box::new(KernelSink::new().context("netlink")?) } else { Box::new(NoSink) };
    weft_bgp::daemon::run(config, sink).context("the BGP speaker")
}

/// The speaker's status, as JSON, from its control socket.
pub(crate) fn query(socket: &std::path::Path) -> Result<String> {
    use std::io::{Read, Write};
    let mut conn = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("no speaker answers on {} (is `weft bgp run` running?)", socket.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"status\n")?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    if text.is_empty() {
        bail!("the speaker on {} gave no answer", socket.display());
    }
    Ok(text)
}

/// `--health`: /healthz is ok while the speaker answers its control socket; /metrics is its
/// status in Prometheus' text format.
fn health(socket: &std::path::Path, path: &str) -> (StatusCode, String) {
    let status = || -> Result<serde_json::Value> { Ok(serde_json::from_str(&query(socket)?)?) };
    match path {
        "/healthz" => match status() {
            Ok(_) => (StatusCode::OK, "ok\n".into()),
            Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not healthy: {e:#}\n")),
        },
        "/metrics" => match status() {
            Ok(v) => (StatusCode::OK, weft_agent::http::bgp_metrics(&v)),
            Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("# the speaker does not answer: {e:#}\n")),
        },
        _ => (StatusCode::NOT_FOUND, "not found: try /healthz or /metrics\n".into()),
    }
}

pub fn status(args: StatusArgs) -> Result<()> {
    let text = query(&args.socket)?;
    if args.json {
        outln!("{text}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&text).context("the speaker's answer")?;
    outln!(
        "AS {} router id {}: {} routes, {} installed",
        v["as"],
        v["router_id"].as_str().unwrap_or("?"),
        v["routes"],
        v["installed"]
    );
    outln!(
        "{:<40} {:>10} {:<12} {:>9} {:>9} {:>9} {:>11}",
        "neighbor",
        "AS",
        "state",
        "uptime",
        "received",
        "accepted",
        "advertised"
    );
    for n in v["neighbors"].as_array().into_iter().flatten() {
        outln!(
            "{:<40} {:>10} {:<12} {:>8}s {:>9} {:>9} {:>11}",
            n["address"].as_str().unwrap_or("?"),
            n["as"].to_string(),
            n["state"].as_str().unwrap_or("?"),
            n["uptime_seconds"].to_string(),
            n["prefixes_received"].to_string(),
            n["prefixes_accepted"].to_string(),
            n["prefixes_advertised"].to_string()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_checked_with_a_reason() {
        let n = neighbor("198.18.0.2,64513,passive,rr-client").unwrap();
        assert!(n.passive && n.rr_client && n.asn == 64513);
        assert_eq!(neighbor("::ffff:198.18.0.2,1").unwrap().address, "198.18.0.2".parse::<IpAddr>().unwrap());
        for (bad, why) in [
            ("198.18.0.2", "ADDR,AS"),
            ("198.18.0.2,x", "not an AS number"),
            ("nope,1", "not an address"),
            ("198.18.0.2,1,active", "unknown flag"),
            ("fe80::1,1", "link-local"),
            ("::,1", "not a unicast address"),
            ("224.0.0.5,1", "not a unicast address"),
        ] {
            let e = format!("{:#}", neighbor(bad).unwrap_err());
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(range("198.18.0.0/16,64512").unwrap().1, 64512);
        assert!(range("198.18.0.0/16").is_err());
        assert!(format!("{:#}", range("198.18.0.0/16,0").unwrap_err()).contains("AS 0"));
        assert!(format!("{:#}", neighbor("198.18.0.2,0").unwrap_err()).contains("AS 0"));
        let dir = std::env::temp_dir().join(format!("weft-bgp-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("important.conf");
        std::fs::write(&file, "keep me").unwrap();
        assert!(format!("{:#}", check_socket_path(&file).unwrap_err()).contains("not a socket"));
        assert!(check_socket_path(&dir).is_err(), "a directory");
        assert!(check_socket_path(&dir.join("free.sock")).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(filter("--accept", "198.19.0.0/16,le=26").unwrap(), ("198.19.0.0/16".parse().unwrap(), 26));
        assert_eq!(filter("--export", "fd00::/48").unwrap().1, 128);
        for bad in ["198.19.0.0/16,le=8", "198.19.0.0/16,le=33", "198.19.0.0/16,ge=20"] {
            assert!(format!("{:#}", filter("--export", bad).unwrap_err()).contains("--export"), "{bad}");
        }
    }

    #[test]
    fn metrics_have_one_series_per_neighbour() {
        let v = serde_json::json!({"routes": 3, "installed": 2, "neighbors": [
            {"address": "198.18.0.2", "as": 64513, "state": "Established", "uptime_seconds": 5,
             "prefixes_received": 4, "prefixes_accepted": 2, "prefixes_advertised": 1},
            {"address": "fd00::2", "as": 64514, "state": "Active", "uptime_seconds": 0,
             "prefixes_received": 0, "prefixes_accepted": 0, "prefixes_advertised": 0}]});
        let m = weft_agent::http::bgp_metrics(&v);
        for line in [
            "weft_bgp_routes 3",
            "weft_bgp_routes_installed 2",
            "weft_bgp_session_established{neighbor=\"198.18.0.2\",as=\"64513\"} 1",
            "weft_bgp_session_established{neighbor=\"fd00::2\",as=\"64514\"} 0",
            "weft_bgp_prefixes_received{neighbor=\"198.18.0.2\",as=\"64513\"} 4",
            "weft_bgp_prefixes_accepted{neighbor=\"198.18.0.2\",as=\"64513\"} 2",
        ] {
            assert!(m.lines().any(|l| l == line), "{line} not in\n{m}");
        }
        assert_eq!(m.matches("# TYPE").count(), 7, "{m}");
    }
}
