//! BGP receivers compared on this machine in one run: the same sender (this program, with its
//! UPDATEs encoded before the clock starts and written in one go) feeds N /32 routes over one
//! eBGP session to each receiver — `weft bgp run --install` and BIRD 2 with a kernel protocol —
//! measured from the first UPDATE written until the kernel holds every route, the same for
//! withdrawing them all, and the receiver's resident memory. Run through `bench/bgp-bench.sh`.
//!
//! Usage: bgp_bench WEFT_BINARY RUNS N...

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use weft_bgp::packet::{self, AsPath, Attribute, Capability, Codec, Family, Message, Open, Origin, Update};
use weft_dataplane::Netlink;

struct Guard {
    names: Vec<String>,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            let _ = weft_netns::delete_named(n);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sh(ns: &str, argv: &[&str]) {
    let ok = Command::new("ip").args(["netns", "exec", ns]).args(argv).status().unwrap();
    assert!(ok.success(), "{argv:?}");
}

/// N host routes 10.0.0.0/32, 10.0.0.1/32, ...
fn prefixes(n: usize) -> Vec<IpNet> {
    (0..n as u32).map(|i| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i), 32).unwrap())).collect()
}

/// The UPDATEs announcing (or withdrawing) `prefixes`, as many per message as fit.
fn encode(prefixes: &[IpNet], withdraw: bool) -> Vec<u8> {
    let attrs = vec![
        Attribute::Origin(Origin::Igp),
        Attribute::AsPath(AsPath::sequence(&[64513])),
        Attribute::NextHop(Ipv4Addr::new(198, 18, 90, 2)),
    ];
    let mut out = Vec::new();
    // 4096 bytes a message: 19 header, 4 lengths, ~25 of attributes, 5 a /32.
    for chunk in prefixes.chunks(800) {
        let update = if withdraw { Update::withdraw(chunk) } else { Update::announce(chunk, attrs.clone(), None) };
        packet::encode(&Message::Update(update), Codec::default(), &mut out);
    }
    out
}

/// Routes of protocol `proto` in the receiver's main table.
fn count(nl: &mut Netlink, proto: u8) -> usize {
    nl.routes().unwrap().iter().filter(|r| r.protocol == proto && r.dst.prefix_len() == 32).count()
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0.0)))
        .unwrap_or(0.0);
    kb / 1024.0
}

struct Outcome {
    install: Duration,
    withdraw: Duration,
    rss_mb: f64,
}

/// One run against a receiver started by `start` (its routes carry protocol `proto`).
fn run(prefix: &str, n: usize, proto: u8, start: &dyn Fn(&str, &std::path::Path) -> Child) -> Outcome {
    let (rx, tx) = (format!("{prefix}r"), format!("{prefix}s"));
    let dir = std::env::temp_dir().join(format!("{prefix}-bgp"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut guard = Guard { names: vec![rx.clone(), tx.clone()], dir: dir.clone(), child: None };
    let rns = weft_netns::create_named(&rx).unwrap();
    let sns = weft_netns::create_named(&tx).unwrap();
    sh(&rx, &["ip", "link", "set", "lo", "up"]);
    sh(&rx, &["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &tx]);
    sh(&rx, &["ip", "addr", "add", "198.18.90.1/24", "dev", "eth0"]);
    sh(&rx, &["ip", "link", "set", "eth0", "up"]);
    sh(&tx, &["ip", "addr", "add", "198.18.90.2/24", "dev", "eth0"]);
    sh(&tx, &["ip", "link", "set", "eth0", "up"]);
    let child = start(&rx, &dir);
    let pid = child.id();
    guard.child = Some(child);
    let all = prefixes(n);
    let (announce, withdraw) = (encode(&all, false), encode(&all, true));
    let mut nl = rns.run(Netlink::new).unwrap().unwrap();
    // The session: connect, OPEN, KEEPALIVE; a thread drains what the receiver sends.
    let mut stream = sns
        .run(|| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match TcpStream::connect("198.18.90.1:179") {
                    Ok(s) => return s,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                    Err(e) => panic!("the receiver does not listen: {e}"),
                }
            }
        })
        .unwrap();
    let open = Open {
        asn: 64513,
        hold_time: 240,
        router_id: Ipv4Addr::new(198, 18, 90, 2),
        capabilities: vec![Capability::Multiprotocol(Family::IPV4_UNICAST), Capability::FourOctetAs(64513)],
    };
    // No Nagle: a small UPDATE must not wait for the receiver's delayed ACK.
    stream.set_nodelay(true).unwrap();
    stream.write_all(&packet::to_bytes(&Message::Open(open), Codec::default())).unwrap();
    let mut reader = stream.try_clone().unwrap();
    let (up_tx, up_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 65536];
        let mut open_seen = false;
        while let Ok(n) = reader.read(&mut chunk) {
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            while let Ok(Some((m, used))) = packet::decode(&buf, Codec::default()) {
                buf.drain(..used);
                match m {
                    Message::Open(_) => open_seen = true,
                    Message::Keepalive if open_seen => {
                        let _ = up_tx.send(());
                    }
                    _ => {}
                }
            }
        }
    });
    stream.write_all(&packet::to_bytes(&Message::Keepalive, Codec::default())).unwrap();
    up_rx.recv_timeout(Duration::from_secs(10)).expect("no session with the receiver");
    // The receiver is Established once our KEEPALIVE is in; give it a moment to settle.
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    stream.write_all(&announce).unwrap();
    while count(&mut nl, proto) < n {
        assert!(started.elapsed() < Duration::from_secs(120), "not every route installed");
    }
    let install = started.elapsed();
    let rss_mb = rss_mb(pid);
    let started = Instant::now();
    stream.write_all(&withdraw).unwrap();
    while count(&mut nl, proto) > 0 {
        assert!(started.elapsed() < Duration::from_secs(120), "not every route withdrawn");
    }
    let withdraw = started.elapsed();
    drop(guard);
    Outcome { install, withdraw, rss_mb }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let weft = args.next().expect("usage: bgp_bench WEFT_BINARY RUNS N...");
    let runs: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(3);
    let sizes: Vec<usize> = args.map(|a| a.parse().unwrap()).collect();
    let sizes = if sizes.is_empty() { vec![1, 10_000, 100_000] } else { sizes };
    let prefix = std::env::var("WEFT_BENCH_PREFIX").unwrap_or_else(|_| format!("wbb{}", std::process::id()));
    let weft_start = |ns: &str, dir: &std::path::Path| {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&weft)
            .args(["bgp", "run", "--local-as", "64512", "--router-id", "198.18.90.1", "--listen", "198.18.90.1"])
            .args(["--neighbor", "198.18.90.2,64513,passive", "--install", "--socket"])
            .arg(dir.join("bgp.sock"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let bird_start = |ns: &str, dir: &std::path::Path| {
        let conf = "router id 198.18.90.1;
protocol device {}
protocol kernel { ipv4 { export all; }; }
protocol bgp sender { local 198.18.90.1 as 64512; neighbor 198.18.90.2 as 64513; passive on;
    ipv4 { import all; export none; }; }
";
        std::fs::write(dir.join("bird.conf"), conf).unwrap();
        Command::new("ip")
            .args(["netns", "exec", ns, "bird", "-f", "-c"])
            .arg(dir.join("bird.conf"))
            .arg("-s")
            .arg(dir.join("bird.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    println!("| routes | receiver | install (ms) | withdraw (ms) | RSS (MB) |");
    println!("|---:|---|---:|---:|---:|");
    for n in sizes {
        let mut results: Vec<(&str, f64, f64, f64)> = Vec::new();
        type Start<'a> = &'a dyn Fn(&str, &std::path::Path) -> Child;
        let receivers: [(&str, u8, Start<'_>); 2] = [("BIRD 2", 12, &bird_start), ("weft", 202, &weft_start)];
        for (name, proto, start) in receivers {
            let (mut i, mut w, mut m) = (vec![], vec![], vec![]);
            for run_no in 0..runs {
                let o = run(&format!("{prefix}{run_no}"), n, proto, start);
                i.push(o.install.as_secs_f64());
                w.push(o.withdraw.as_secs_f64());
                m.push(o.rss_mb);
            }
            results.push((name, median(i), median(w), median(m)));
        }
        for (name, i, w, m) in &results {
            println!("| {n} | {name} | {:.2} | {:.2} | {m:.1} |", i * 1e3, w * 1e3);
        }
        let (b, wt) = (&results[0], &results[1]);
        println!("| {n} | weft/BIRD | {:.2} | {:.2} | {:.2} |", wt.1 / b.1, wt.2 / b.2, wt.3 / b.3);
    }
}
