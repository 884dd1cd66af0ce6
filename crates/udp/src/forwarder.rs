//! The forwarding process: one TUN queue and one UDP socket, a thread each way and a control
//! socket. Its table is pushed by the agent over the control socket and swapped whole; the
//! packet threads take the new one between batches. It runs on when the agent is gone (killed,
//! restarted, upgraded), so pods keep talking, and ends when its TUN device does.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::Ipv4Net;
use serde_json::{json, Value};

use crate::packet;
use crate::sys::{self, Batch, Received};
use crate::table::{Drop, Table};

/// Packets handled per system call at most.
const BATCH: usize = 64;
/// The largest packet carried: a jumbo frame's.
const SLOT: usize = 9216;

/// How the forwarder runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The TUN device (made, persistent, by the agent).
    pub device: String,
    /// The UDP port datagrams go to and come from (flannel's 8285).
    pub port: u16,
    /// This node's subnet and the cluster network (also set later over the control socket).
    pub subnet: Option<Ipv4Net>,
    pub network: Option<Ipv4Net>,
    /// The control socket.
    pub socket: PathBuf,
}

/// Packets and bytes each way, and drops by reason.
#[derive(Default)]
pub struct Counters {
    pub tun_rx_packets: AtomicU64,
    pub tun_rx_bytes: AtomicU64,
    pub udp_tx_packets: AtomicU64,
    pub udp_tx_bytes: AtomicU64,
    pub udp_rx_packets: AtomicU64,
    pub udp_rx_bytes: AtomicU64,
    pub tun_tx_packets: AtomicU64,
    pub tun_tx_bytes: AtomicU64,
    pub icmp_sent: AtomicU64,
    drops: [AtomicU64; Drop::ALL.len()],
}

impl Counters {
    fn drop(&self, why: Drop) {
        self.drops[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped(&self, why: Drop) -> u64 {
        self.drops[why.index()].load(Ordering::Relaxed)
    }

    fn json(&self) -> Value {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let drops: serde_json::Map<String, Value> =
            Drop::ALL.iter().map(|d| (d.name().to_string(), json!(self.dropped(*d)))).collect();
        json!({
            "tun_rx_packets": n(&self.tun_rx_packets), "tun_rx_bytes": n(&self.tun_rx_bytes),
            "udp_tx_packets": n(&self.udp_tx_packets), "udp_tx_bytes": n(&self.udp_tx_bytes),
            "udp_rx_packets": n(&self.udp_rx_packets), "udp_rx_bytes": n(&self.udp_rx_bytes),
            "tun_tx_packets": n(&self.tun_tx_packets), "tun_tx_bytes": n(&self.tun_tx_bytes),
            "icmp_sent": n(&self.icmp_sent),
            "drops": drops,
        })
    }
}

/// What the threads share: the current table (swapped whole) and the counters.
struct Shared {
    table: Mutex<Arc<Table>>,
    generation: AtomicU64,
    counters: Counters,
}

impl Shared {
    fn table(&self) -> Arc<Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn swap(&self, f: impl FnOnce(&Table) -> Table) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        *table = Arc::new(f(&table));
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// A thread's copy of the table, taken again when it changed.
struct Current<'a> {
    shared: &'a Shared,
    table: Arc<Table>,
    generation: u64,
}

impl<'a> Current<'a> {
    fn new(shared: &'a Shared) -> Current<'a> {
        Current { shared, table: shared.table(), generation: shared.generation.load(Ordering::Acquire) }
    }

    fn refresh(&mut self) -> &Table {
        let now = self.shared.generation.load(Ordering::Acquire);
        if now != self.generation {
            self.table = self.shared.table();
            self.generation = now;
        }
        &self.table
    }
}

/// Asks the forwarder on `socket` one request; its JSON answer.
pub fn ask(socket: &Path, request: &Value) -> io::Result<Value> {
    let mut conn = UnixStream::connect(socket)?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    conn.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    let answer: Value = serde_json::from_str(&line)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}: {line:?}")))?;
    match answer.get("error").and_then(Value::as_str) {
        Some(e) => Err(io::Error::other(e.to_string())),
        None => Ok(answer),
    }
}

/// Runs the forwarder until its TUN device goes (Ok) or it cannot start (Err).
pub fn run(config: Config) -> io::Result<()> {
    if ask(&config.socket, &json!({"op": "status"})).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("a forwarder already answers on {}", config.socket.display()),
        ));
    }
    if sys::if_index(&config.device).is_none() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no device {} (the agent makes it)", config.device),
        ));
    }
    let tun = File::from(sys::tun_open(&config.device, sys::IFF_TUN | sys::IFF_NO_PI | sys::IFF_MULTI_QUEUE)?);
    sys::set_nonblocking(tun.as_fd())?;
    let udp = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, config.port))?;
    let _ = std::fs::remove_file(&config.socket);
    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let control = UnixListener::bind(&config.socket)?;
    let shared = Arc::new(Shared {
        table: Mutex::new(Arc::new(Table::new(config.subnet, config.network, []))),
        generation: AtomicU64::new(0),
        counters: Counters::default(),
    });
    let (tun, udp) = (Arc::new(tun), Arc::new(udp));
    tracing::info!("forwarding between {} and UDP port {}", config.device, config.port);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<io::Error>();
    {
        let (tun, udp, shared, done) = (tun.clone(), udp.clone(), shared.clone(), done_tx.clone());
        std::thread::Builder::new().name("tun-to-udp".into()).spawn(move || {
            let e = tun_to_udp(&tun, &udp, config.port, &shared);
            let _ = done.send(e);
        })?;
    }
    {
        let (tun, udp, shared, done) = (tun.clone(), udp.clone(), shared.clone(), done_tx);
        std::thread::Builder::new().name("udp-to-tun".into()).spawn(move || {
            let e = udp_to_tun(&tun, &udp, &shared);
            let _ = done.send(e);
        })?;
    }
    {
        let (shared, config) = (shared.clone(), config.clone());
        std::thread::Builder::new().name("control".into()).spawn(move || {
            for conn in control.incoming().flatten() {
                serve(conn, &shared, &config);
            }
        })?;
    }
    let e = done_rx.recv().unwrap_or_else(|_| io::Error::other("the packet threads ended"));
    let _ = std::fs::remove_file(&config.socket);
    // The device gone (deleted, its namespace going): the forwarder's work is over.
    if e.raw_os_error() == Some(libc::EBADFD) || sys::if_index(&config.device).is_none() {
        tracing::info!("{} is gone; stopping", config.device);
        return Ok(());
    }
    Err(e)
}

/// One control request: a JSON line in, a JSON line out.
fn serve(conn: UnixStream, shared: &Shared, config: &Config) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    if BufReader::new((&conn).take(64 * 1024)).read_line(&mut line).is_err() {
        return;
    }
    let answer = match serde_json::from_str::<Value>(&line) {
        Ok(request) => handle(&request, shared, config).unwrap_or_else(|e| json!({ "error": e })),
        Err(e) => json!({ "error": format!("not JSON: {e}") }),
    };
    let _ = (&conn).write_all(format!("{answer}\n").as_bytes());
}

fn net(request: &Value, key: &str) -> Result<Option<Ipv4Net>, String> {
    match request.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_str().and_then(|s| s.parse().ok()).map(Some).ok_or_else(|| format!("{key}: not a network")),
    }
}

fn handle(request: &Value, shared: &Shared, config: &Config) -> Result<Value, String> {
    match request.get("op").and_then(Value::as_str) {
        Some("status") => {}
        Some("set") => {
            let (subnet, network) = (net(request, "subnet")?, net(request, "network")?);
            shared.swap(|t| Table::new(subnet, network, t.peers()));
        }
        Some("put") => {
            let subnet = net(request, "subnet")?.ok_or("put: no subnet")?;
            let ip: Ipv4Addr = request
                .get("ip")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
                .ok_or("put: ip: not an address")?;
            shared.swap(|t| t.with_peer(subnet, ip));
        }
        Some("del") => {
            let subnet = net(request, "subnet")?.ok_or("del: no subnet")?;
            shared.swap(|t| t.without_peer(subnet));
        }
        other => return Err(format!("unknown op {other:?} (status, set, put, del)")),
    }
    let table = shared.table();
    let peers: Vec<Value> =
        table.peers().map(|(s, ip)| json!({"subnet": s.to_string(), "ip": ip.to_string()})).collect();
    Ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "device": config.device,
        "port": config.port,
        "subnet": table.subnet.map(|s| s.to_string()),
        "network": table.network.map(|s| s.to_string()),
        "peers": peers,
        "counters": shared.counters.json(),
    }))
}

fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Pods to peers: packets read from the TUN (as many as are ready, up to a batch), each sent
/// to the peer whose subnet holds its destination, in one `sendmmsg`.
fn tun_to_udp(tun: &File, udp: &UdpSocket, port: u16, shared: &Shared) -> io::Error {
    let mut slots = vec![vec![0u8; SLOT]; BATCH];
    let mut lens = [0usize; BATCH];
    let mut icmp = [0u8; 128];
    let mut batch = Batch::new(BATCH);
    let mut current = Current::new(shared);
    let counters = &shared.counters;
    let mut reader = tun;
    loop {
        if let Err(e) = sys::wait_readable(tun.as_fd()) {
            return e;
        }
        let mut n = 0;
        while n < BATCH {
            match reader.read(&mut slots[n]) {
                Ok(len) => {
                    lens[n] = len;
                    n += 1;
                }
                Err(e) if is_would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return e,
            }
        }
        let table = current.refresh();
        let mut out: Vec<(&[u8], SocketAddrV4)> = Vec::with_capacity(n);
        for (slot, len) in slots.iter_mut().zip(lens).take(n) {
            counters.tun_rx_packets.fetch_add(1, Ordering::Relaxed);
            counters.tun_rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
            let Ok(header) = packet::parse(&slot[..len]) else {
                counters.drop(Drop::Malformed);
                continue;
            };
            match table.route(header.dst) {
                Ok(peer) => {
                    if !packet::decrement_ttl(&mut slot[..len]) {
                        counters.drop(Drop::TtlExpired);
                        continue;
                    }
                    out.push((&slot[..header.total_len], SocketAddrV4::new(peer, port)));
                }
                Err(Drop::NoRoute) => {
                    counters.drop(Drop::NoRoute);
                    let from = table.subnet.map_or(Ipv4Addr::UNSPECIFIED, |s| s.network());
                    if let Some(l) = packet::net_unreachable(&slot[..len], &header, from, &mut icmp) {
                        if (&*tun).write(&icmp[..l]).is_ok() {
                            counters.icmp_sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(why) => counters.drop(why),
            }
        }
        let mut sent = 0;
        while sent < out.len() {
            match batch.send(udp.as_fd(), &out[sent..]) {
                Ok(k) => {
                    for (bytes, _) in &out[sent..sent + k] {
                        counters.udp_tx_packets.fetch_add(1, Ordering::Relaxed);
                        counters.udp_tx_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    }
                    sent += k.max(1);
                }
                // The first of the rest could not go (no route to the peer, ...): skipped.
                Err(_) => {
                    counters.drop(Drop::IoError);
                    sent += 1;
                }
            }
        }
    }
}

/// Peers to pods: datagrams received a batch at a time; each admitted one written to the TUN.
fn udp_to_tun(tun: &File, udp: &UdpSocket, shared: &Shared) -> io::Error {
    let mut slots = vec![vec![0u8; SLOT]; BATCH];
    let mut received =
        [Received { len: 0, truncated: false, from: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0) }; BATCH];
    let mut batch = Batch::new(BATCH);
    let mut current = Current::new(shared);
    let counters = &shared.counters;
    loop {
        let n = match batch.recv(udp.as_fd(), &mut slots, &mut received) {
            Ok(n) => n,
            Err(e) => return e,
        };
        let table = current.refresh();
        for (slot, r) in slots.iter().zip(&received).take(n) {
            counters.udp_rx_packets.fetch_add(1, Ordering::Relaxed);
            counters.udp_rx_bytes.fetch_add(r.len as u64, Ordering::Relaxed);
            if r.truncated {
                counters.drop(Drop::Malformed);
                continue;
            }
            let bytes = &slot[..r.len];
            // The sender first: a stranger's datagram is not even parsed.
            if !table.knows(*r.from.ip()) {
                counters.drop(Drop::UnknownSource);
                continue;
            }
            let Ok(header) = packet::parse(bytes) else {
                counters.drop(Drop::Malformed);
                continue;
            };
            if let Err(why) = table.admit(*r.from.ip(), header.src, header.dst) {
                counters.drop(why);
                continue;
            }
            match (&*tun).write(&bytes[..header.total_len]) {
                Ok(_) => {
                    counters.tun_tx_packets.fetch_add(1, Ordering::Relaxed);
                    counters.tun_tx_bytes.fetch_add(header.total_len as u64, Ordering::Relaxed);
                }
                Err(e) if e.raw_os_error() == Some(libc::EBADFD) => return e,
                Err(_) => counters.drop(Drop::IoError),
            }
        }
    }
}
