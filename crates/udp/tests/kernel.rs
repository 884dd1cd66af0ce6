//! The forwarder against the kernel's own offloads, in a namespace made for the test. A real
//! TCP connection leaves through the forwarder's TUN; the test is the peer at the other end of
//! the UDP "wire", speaking TCP by hand. The kernel hands the forwarder TSO packets of up to
//! 64 KiB, and every datagram that reaches the peer must be one ordinary packet of at most the
//! MTU with right IP and TCP checksums, the byte stream whole (flannel's receiver writes them to
//! its TUN as they are, and the kernel checks them). The other way, the peer sends its data
//! with UDP GSO (so the forwarder's socket receives it joined) and the forwarder writes it to the
//! TUN in fewer writes than segments; the kernel's TCP takes it and the bytes are right.
//!
//! Three times: with the forwarder cutting large packets itself; with the kernel cutting them
//! (through the forwarder's TAP) on an uplink without offloads, as a NIC without them would,
//! for a peer that answers the forwarder's probe as a weft node does: what reaches the wire
//! must be the same; and for a peer that never answers (a flannel node) over a veth that would
//! carry packets uncut: it must get only cut ones.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use weft_udp::packet::checksum;

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = weft_netns::delete_named(&self.0);
    }
}

fn ip(ns: &str, args: &[&str]) {
    let out = Command::new("ip").args(["-n", ns]).args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 5);
const MTU: usize = 1400;

fn tcp_checksum(packet: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12 + packet.len());
    pseudo.extend_from_slice(&packet[12..20]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((packet.len() - 20) as u16).to_be_bytes());
    pseudo.extend_from_slice(&packet[20..]);
    checksum(&pseudo)
}

/// An IPv4/TCP packet from the peer (REMOTE:80) to LOCAL:`port`, checksums right.
fn peer_segment(port: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    peer_segment_with(port, seq, ack, flags, &[], payload)
}

/// The same with TCP options (a multiple of 4 bytes).
fn peer_segment_with(port: u16, seq: u32, ack: u32, flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    let len = 40 + options.len() + payload.len();
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0];
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p.extend_from_slice(&REMOTE.octets());
    p.extend_from_slice(&LOCAL.octets());
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&80u16.to_be_bytes());
    p.extend_from_slice(&port.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ack.to_be_bytes());
    p.extend_from_slice(&[(5 + options.len() as u8 / 4) << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p.extend_from_slice(options);
    p.extend_from_slice(payload);
    let c = tcp_checksum(&p);
    p[36..38].copy_from_slice(&c.to_be_bytes());
    p
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// `KernelSegmentation: false`.
    Here,
    /// The kernel cuts, for a peer that answers probes.
    Kernel,
    /// Kernel segmentation on, the peer silent (flannel).
    SilentPeer,
}

#[test]
fn tso_packets_leave_as_checked_segments_and_gso_datagrams_arrive_joined() {
    through_the_forwarder(Cut::Here);
}

#[test]
fn tso_packets_cut_by_the_kernel_leave_as_the_same_segments() {
    through_the_forwarder(Cut::Kernel);
}

#[test]
fn a_peer_that_does_not_answer_gets_only_cut_packets() {
    through_the_forwarder(Cut::SilentPeer);
}

fn through_the_forwarder(cut: Cut) {
    assert!(nix_is_root(), "needs root");
    let tag = std::process::id() % 100_000 * 10 + cut as u32;
    let kernel_cut = cut == Cut::Kernel;
    let (a, b) = (Ns(format!("wuk{tag}a")), Ns(format!("wuk{tag}b")));
    let na = weft_netns::create_named(&a.0).unwrap();
    let nb = weft_netns::create_named(&b.0).unwrap();
    ip(&a.0, &["link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b.0]);
    ip(&a.0, &["addr", "add", "198.18.9.1/24", "dev", "eth0"]);
    ip(&b.0, &["addr", "add", "198.18.9.2/24", "dev", "eth0"]);
    for ns in [&a.0, &b.0] {
        ip(ns, &["link", "set", "eth0", "up"]);
        ip(ns, &["link", "set", "lo", "up"]);
    }
    ip(&a.0, &["addr", "add", &format!("{LOCAL}/32"), "dev", "lo"]);
    if kernel_cut {
        // No offloads on the uplink: the kernel cuts in software and fills every checksum in.
        let out = Command::new("ip")
            .args(["netns", "exec", &a.0, "ethtool", "-K", "eth0", "tx", "off", "tx-udp_tnl-segmentation", "off"])
            .args(["tx-udp_tnl-csum-segmentation", "off"])
            .output()
            .unwrap();
        assert!(out.status.success(), "ethtool: {}", String::from_utf8_lossy(&out.stderr));
    }
    // The TUN as the agent makes it (persistent, multi-queue), the peer's subnet routed to it.
    na.run(|| {
        let fd = weft_udp::sys::tun_open(
            "wt0",
            weft_udp::sys::IFF_TUN | weft_udp::sys::IFF_NO_PI | weft_udp::sys::IFF_MULTI_QUEUE,
        )
        .unwrap();
        weft_udp::sys::set_persist(std::os::fd::AsFd::as_fd(&fd), true).unwrap();
    })
    .unwrap();
    ip(&a.0, &["link", "set", "wt0", "mtu", &MTU.to_string(), "up"]);
    ip(&a.0, &["addr", "add", "198.19.1.0/32", "dev", "wt0"]);
    ip(&a.0, &["route", "add", "198.19.0.0/16", "dev", "wt0", "src", &LOCAL.to_string()]);
    let socket = std::env::temp_dir().join(format!("wuk{tag}.sock"));
    let config = weft_udp::forwarder::Config {
        device: "wt0".into(),
        port: 8285,
        subnet: Some("198.19.1.0/24".parse().unwrap()),
        network: Some("198.19.0.0/16".parse().unwrap()),
        socket: socket.clone(),
        kernel_segmentation: cut != Cut::Here,
    };
    let forwarder_ns = weft_netns::NetNs::open(weft_netns::named_path(&a.0)).unwrap();
    std::thread::spawn(move || forwarder_ns.run(|| weft_udp::forwarder::run(config)));
    let deadline = Instant::now() + Duration::from_secs(5);
    while weft_udp::forwarder::ask(&socket, &json!({"op": "status"})).is_err() {
        assert!(Instant::now() < deadline, "the forwarder did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    weft_udp::forwarder::ask(&socket, &json!({"op": "put", "subnet": "198.19.2.0/24", "ip": "198.18.9.2"})).unwrap();

    // The peer's end of the wire.
    let wire = nb.run(|| UdpSocket::bind("198.18.9.2:8285")).unwrap().unwrap();
    wire.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Hundreds of small segments arrive at once: room for them (the default buffer drops some).
    weft_udp::sys::set_buffers(std::os::fd::AsFd::as_fd(&wire), 8 << 20);
    let forwarder = SocketAddrV4::new(Ipv4Addr::new(198, 18, 9, 1), 8285);
    // A TCP client in A: its packets go through the TUN.
    let client = std::thread::spawn(move || {
        let ns = weft_netns::NetNs::open(weft_netns::named_path(&format!("wuk{tag}a"))).unwrap();
        ns.run(|| {
            let sock = std::net::TcpStream::connect_timeout(&"198.19.2.5:80".parse().unwrap(), Duration::from_secs(5));
            let mut sock = sock.unwrap();
            let data: Vec<u8> = (0..400_000u32).map(|i| (i % 251) as u8).collect();
            sock.write_all(&data).unwrap();
            // The peer's answer, sent with UDP GSO.
            let mut answer = vec![0u8; 60_000];
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            sock.read_exact(&mut answer).unwrap();
            answer
        })
        .unwrap()
    });
    let mut buf = [0u8; 65536];
    let status_socket = socket.clone();
    let mut probes = 0;
    let mut recv = || loop {
        let (n, from) = wire.recv_from(&mut buf).unwrap_or_else(|e| {
            let status = weft_udp::forwarder::ask(&status_socket, &json!({"op": "status"}));
            panic!("nothing on the wire ({e}); the forwarder: {status:?}")
        });
        // The forwarder's probe: answered as a weft node does, or not at all (flannel).
        if let Some(weft_udp::offload::Probe::Ask(nonce)) = weft_udp::offload::Probe::decode(&buf[..n]) {
            assert_ne!(cut, Cut::Here, "a probe with kernel segmentation off");
            probes += 1;
            if cut == Cut::Kernel {
                wire.send_to(&weft_udp::offload::Probe::Answer(nonce).encode(), from).unwrap();
            }
            continue;
        }
        return buf[..n].to_vec();
    };
    // The handshake, by hand.
    let syn = recv();
    assert_eq!(syn[33] & 0x02, 0x02, "a SYN first");
    let port = u16::from_be_bytes([syn[20], syn[21]]);
    let client_seq = u32_at(&syn, 24).wrapping_add(1);
    let server_seq = 7_000_000u32;
    // The peer asks for small segments (MSS 200): a 64 KiB TSO packet is then 300 and more
    // segments (more than one GSO send may carry).
    let syn_ack = peer_segment_with(port, server_seq, client_seq, 0x12, &[2, 4, 0, 200], &[]);
    wire.send_to(&syn_ack, forwarder).unwrap();
    // The data: every datagram one whole packet within the MTU, checksums right; acked.
    let mut stream = Vec::new();
    let mut next = client_seq;
    let mut datagrams = 0;
    while stream.len() < 400_000 {
        let p = recv();
        datagrams += 1;
        assert!(datagrams < 100_000, "too many datagrams; stream {}", stream.len());
        assert!(p.len() <= MTU, "a datagram of {} bytes: more than the MTU", p.len());
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len(), "one whole packet");
        assert_eq!(checksum(&p[..20]), 0, "IP checksum");
        assert_eq!(tcp_checksum(&p), 0, "TCP checksum of a segment");
        let hl = 20 + usize::from(p[32] >> 4) * 4;
        let seq = u32_at(&p, 24);
        if seq == next && p.len() > hl {
            stream.extend_from_slice(&p[hl..]);
            next = next.wrapping_add((p.len() - hl) as u32);
        }
        wire.send_to(&peer_segment(port, server_seq + 1, next, 0x10, &[]), forwarder).unwrap();
    }
    let expected: Vec<u8> = (0..400_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(stream, expected, "the byte stream through the segments");
    let status = weft_udp::forwarder::ask(&socket, &json!({"op": "status"})).unwrap();
    let c = &status["counters"];
    assert!(
        c["tun_rx_packets"].as_u64().unwrap() * 2 < c["udp_tx_packets"].as_u64().unwrap(),
        "the kernel handed over large packets (TSO): {c}"
    );
    assert!(datagrams >= 400_000 / MTU);
    match cut {
        Cut::Kernel => {
            assert_eq!(status["kernel_cut"]["device"], "wt0-tx", "{status}");
            assert_eq!(status["kernel_cut"]["peers"]["198.18.9.2"], true, "{status}");
            assert!(c["kernel_cut"].as_u64().unwrap() > 0, "large packets went to the kernel: {c}");
            assert!(c["probes_answered"].as_u64().unwrap() > 0, "{c}");
        }
        Cut::SilentPeer => {
            assert_eq!(status["kernel_cut"]["peers"]["198.18.9.2"], false, "{status}");
            assert_eq!(c["kernel_cut"], 0, "nothing uncut for a peer that never answered: {c}");
            assert!(c["probes_sent"].as_u64().unwrap() > 0, "{c}");
        }
        Cut::Here => {
            assert_eq!(c["kernel_cut"], 0, "{c}");
            assert!(status["kernel_cut"]["off"].as_str().unwrap().contains("KernelSegmentation: false"), "{status}");
        }
    }

    // The answer: 60,000 bytes in segments of 1,000, sent with UDP GSO (joined on receipt).
    let answer: Vec<u8> = (0..60_000u32).map(|i| (i % 241) as u8).collect();
    let mut joined = Vec::new();
    for (i, chunk) in answer.chunks(1000).enumerate() {
        joined.extend(peer_segment(port, server_seq + 1 + (i * 1000) as u32, next, 0x10, chunk));
    }
    let sender = nb.run(|| UdpSocket::bind("198.18.9.2:0")).unwrap().unwrap();
    let before = weft_udp::forwarder::ask(&socket, &json!({"op": "status"})).unwrap()["counters"].clone();
    for part in joined.chunks(1040 * 40) {
        weft_udp::sys::send_segments(std::os::fd::AsFd::as_fd(&sender), part, 1040, forwarder).unwrap();
    }
    // Its ACKs may come back; read them so nothing blocks.
    let got = client.join().unwrap();
    assert_eq!(got, answer, "the bytes the kernel's TCP took from the joined writes");
    let after = weft_udp::forwarder::ask(&socket, &json!({"op": "status"})).unwrap()["counters"].clone();
    let delta = |key: &str| after[key].as_u64().unwrap() - before[key].as_u64().unwrap();
    assert_eq!(delta("tun_tx_packets"), 60, "{before} {after}");
    // A probe that GRO joined after datagrams of the same flow (the short last one) is
    // answered, to the address it came from, whatever this forwarder's own setting.
    let mut with_probe = joined[..1040 * 2].to_vec();
    with_probe.extend(weft_udp::offload::Probe::Ask(77).encode());
    weft_udp::sys::send_segments(std::os::fd::AsFd::as_fd(&sender), &with_probe, 1040, forwarder).unwrap();
    sender.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut answer_buf = [0u8; 64];
    let n = sender.recv(&mut answer_buf).expect("the probe answered");
    assert_eq!(weft_udp::offload::Probe::decode(&answer_buf[..n]), Some(weft_udp::offload::Probe::Answer(77)));
    assert!(delta("tun_writes") <= 4, "60 segments joined into a few writes: {before} {after}");
    // Connections to the control socket that say nothing do not hold up the agent's requests
    // (each would have held the socket for its 2 s read timeout).
    let idle: Vec<_> = (0..5).map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap()).collect();
    weft_udp::forwarder::ask(&socket, &json!({"op": "status"})).expect("answered beside idle connections");
    drop(idle);
    // The device gone: the forwarder ends, and its TAP with it.
    ip(&a.0, &["link", "del", "wt0"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while weft_udp::forwarder::ask(&socket, &json!({"op": "status"})).is_ok() {
        assert!(Instant::now() < deadline, "the forwarder outlived its device");
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let links = Command::new("ip").args(["-n", &a.0, "link", "show"]).output().unwrap();
        if !String::from_utf8_lossy(&links.stdout).contains("wt0-tx") {
            break;
        }
        assert!(Instant::now() < deadline, "the TAP outlived the forwarder");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}
