//! The agent's control plane facing 1000 peer leases: time from start to the initial sync being
//! in the kernel, the latency from a lease written to the store to its kernel objects (median and
//! p99 over 100 events), and the agent's resident memory. Run through `bench/agent-bench.sh`.

#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use weft_dataplane::route::RTPROT_WEFT;
use weft_dataplane::Netlink;
use weft_lease::file::FileStore;
use weft_lease::{Lease, LeaseAttrs};
use weft_netconf::NetworkConfig;

const PEERS: usize = 1000;
const EVENTS: usize = 100;

struct Guard {
    ns: String,
    dir: std::path::PathBuf,
    agent: Option<Child>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = weft_netns::delete_named(&self.ns);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn lease(subnet: ipnet::Ipv4Net, i: usize) -> Lease {
    Lease {
        subnet,
        attrs: LeaseAttrs {
            public_ip: Ipv4Addr::new(198, 18, (i / 250 + 1) as u8, (i % 250 + 2) as u8),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: json!({"VNI": 1, "VtepMAC": format!("0a:58:00:00:{:02x}:{:02x}", i / 256, i % 256)}),
        },
        expires: None,
        created: None,
    }
}

fn weft_routes(nl: &mut Netlink) -> Vec<ipnet::IpNet> {
    nl.routes().unwrap().into_iter().filter(|r| r.protocol == RTPROT_WEFT).map(|r| r.dst).collect()
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let weft = std::env::args().nth(1).expect("usage: agent_bench WEFT_BINARY");
    let ns_name = std::env::var("WEFT_BENCH_PREFIX").unwrap_or_else(|_| format!("wab{}", std::process::id()));
    let dir = std::env::temp_dir().join(&ns_name);
    let mut guard = Guard { ns: ns_name.clone(), dir: dir.clone(), agent: None };
    let ns = weft_netns::create_named(&ns_name).expect("creating a namespace (root?)");
    for argv in [
        vec!["ip", "link", "set", "lo", "up"],
        vec!["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"],
        vec!["ip", "addr", "add", "198.18.0.1/16", "dev", "eth0"],
        vec!["ip", "link", "set", "eth0", "up"],
        vec!["ip", "link", "set", "eth0p", "up"],
    ] {
        let ok = ns.run(|| Command::new(argv[0]).args(&argv[1..]).status()).unwrap().unwrap();
        assert!(ok.success(), "{argv:?}");
    }
    let conf = r#"{"Network": "198.19.0.0/16", "SubnetLen": 26, "Backend": {"Type": "vxlan"}}"#;
    let network = NetworkConfig::parse(conf).unwrap();
    let store = FileStore::open(dir.join("store")).unwrap();
    store.set_network_config(conf).unwrap();
    let mut subnets = network.subnets();
    for i in 0..PEERS {
        store.put_lease(&lease(subnets.next().unwrap(), i)).unwrap();
    }
    let spare: Vec<ipnet::Ipv4Net> = subnets.collect();

    let subnet_file = dir.join("subnet.env");
    let started = Instant::now();
    let agent = ns
        .run(|| {
            Command::new(&weft)
                .args(["agent", "--iface", "eth0", "--store"])
                .arg(dir.join("store"))
                .arg("--subnet-file")
                .arg(&subnet_file)
                .arg("--state-dir")
                .arg(&dir)
                .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
                .stdout(Stdio::null())
                .stderr(match std::env::var_os("WEFT_BENCH_AGENT_LOG") {
                    Some(path) => Stdio::from(std::fs::File::create(path).expect("the agent log")),
                    None => Stdio::null(),
                })
                .spawn()
        })
        .unwrap()
        .unwrap();
    let pid = agent.id();
    guard.agent = Some(agent);
    while !subnet_file.exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "no initial sync within 60 s");
        std::thread::sleep(Duration::from_millis(1));
    }
    let initial = started.elapsed();
    let mut nl = ns.run(Netlink::new).unwrap().unwrap();
    let programmed = weft_routes(&mut nl).len();
    assert_eq!(programmed, PEERS, "routes after the initial sync");

    // The agent leased one of the spare subnets itself.
    let own = weft_netconf::SubnetEnv::read(&subnet_file).unwrap().subnet_network();
    let mut latencies = Vec::new();
    for (k, subnet) in spare.iter().filter(|s| ipnet::IpNet::V4(**s) != own).take(EVENTS).enumerate() {
        let dst = ipnet::IpNet::V4(*subnet);
        let t = Instant::now();
        store.put_lease(&lease(*subnet, PEERS + k)).unwrap();
        while !weft_routes(&mut nl).contains(&dst) {
            assert!(t.elapsed() < Duration::from_secs(10), "event {k} not programmed");
        }
        latencies.push(t.elapsed());
    }
    let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap()))
        .unwrap();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("| measurement | weft | target |");
    println!("|---|---:|---:|");
    println!("| initial sync of {PEERS} peers (start to subnet file, {PEERS} routes + FDB + neighbours) | {:.0} ms | < 1000 ms |", ms(initial));
    println!(
        "| lease event to kernel objects, median of {EVENTS} | {:.2} ms | < 10 ms |",
        ms(percentile(latencies.clone(), 0.5))
    );
    println!("| lease event to kernel objects, p99 | {:.2} ms | |", ms(percentile(latencies, 0.99)));
    println!("| agent resident memory with {} peers | {:.1} MB | < 30 MB |", PEERS + EVENTS, rss_kb as f64 / 1024.0);
}
