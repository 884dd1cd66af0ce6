//! The forwarding process: one TUN queue and one UDP socket, one thread forwarding both ways,
//! and a control socket. Its table is pushed by the agent over the control socket and swapped
//! whole; the packet thread takes the new one between batches. It runs on when the agent is
//! gone (killed, restarted, upgraded), so pods keep talking, and ends when its TUN device does.

use std::collections::HashMap;
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

use crate::offload::{self, Coalescer, Encap, Probe, VnetHdr, ENCAP_PREFIX_LEN, VNET_HDR_LEN};
use crate::packet;
use crate::sys::{self, Batch, Received};
use crate::table::{Drop, Table};

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
    /// Large TCP packets go to the kernel to be cut where it can (also set later over the
    /// control socket).
    pub kernel_segmentation: bool,
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
    /// Writes to the TUN (fewer than packets when segments were joined).
    pub tun_writes: AtomicU64,
    /// Large TCP packets handed to the kernel to cut (through the sending TAP).
    pub kernel_cut: AtomicU64,
    /// Datagrams that came uncut (a peer's kernel-cut send over veth), written whole.
    pub whole_received: AtomicU64,
    /// Probes sent through the TAP, answers to them received, answers sent to peers' probes.
    pub probes_sent: AtomicU64,
    pub probes_answered: AtomicU64,
    pub probe_answers_sent: AtomicU64,
    /// Probes not answered: more than `ANSWERS_PER_SECOND` from one peer.
    pub probe_answers_withheld: AtomicU64,
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
            "tun_writes": n(&self.tun_writes),
            "kernel_cut": n(&self.kernel_cut), "whole_received": n(&self.whole_received),
            "probes_sent": n(&self.probes_sent), "probes_answered": n(&self.probes_answered),
            "probe_answers_sent": n(&self.probe_answers_sent),
            "probe_answers_withheld": n(&self.probe_answers_withheld),
            "icmp_sent": n(&self.icmp_sent),
            "drops": drops,
        })
    }
}

/// What the packet thread and the control threads share: the current table (swapped whole),
/// the counters, the sending TAP and what peers take.
struct Shared {
    /// The TUN device's name.
    device: String,
    table: Mutex<Arc<Table>>,
    generation: AtomicU64,
    counters: Counters,
    /// Whether large packets are to go to the kernel to be cut; where they go (the TAP's
    /// name), or why they are cut here.
    want_cut: std::sync::atomic::AtomicBool,
    tap: Mutex<TapState>,
    /// Per peer (public address), whether it takes what this node's kernel cuts.
    peers_cut: Mutex<HashMap<Ipv4Addr, PeerCut>>,
}

/// Whether a peer takes what this node's kernel cuts: asked with a probe that goes the way
/// those packets go (through the TAP, the node's forwarding and its firewall) and answered by a
/// weft forwarder. A flannel node (it would get uncut packets over veth), or a firewall that
/// drops what the node forwards, never answers: the peer's large packets are cut here. Only a
/// fresh answer counts (one within `CONFIRMED_FOR`): a peer is asked every `PROBE_EVERY`
/// while packets go to it, and a probe unanswered after `PROBE_PATIENCE` (answers take well
/// under a millisecond) sends them the safe way until it is answered; one never answered
/// (`PROBE_TIMEOUT`) ends the confirmation, and the peer is asked again `PROBE_RETRY` later.
#[derive(Debug, Default)]
struct PeerCut {
    answered_at: Option<std::time::Instant>,
    asked: Option<(u64, std::time::Instant)>,
    next_ask: Option<std::time::Instant>,
}

impl PeerCut {
    /// Before a large packet goes to the peer: a probe to send now (its nonce), if one is due,
    /// and whether the packet may go to the kernel to be cut.
    fn before_send(&mut self, now: std::time::Instant, nonce: impl FnOnce() -> u64) -> (Option<u64>, bool) {
        if self.asked.is_some_and(|(_, at)| now.duration_since(at) >= PROBE_TIMEOUT) {
            self.asked = None;
            self.answered_at = None;
            self.next_ask = Some(now + PROBE_RETRY);
        }
        let ask = (self.asked.is_none() && self.next_ask.is_none_or(|t| now >= t)).then(|| {
            let n = nonce();
            self.asked = Some((n, now));
            self.next_ask = Some(now + PROBE_EVERY);
            n
        });
        (ask, self.taking(now))
    }

    /// Whether it takes kernel-cut packets now: answered lately, and no probe waiting long.
    fn taking(&self, now: std::time::Instant) -> bool {
        let fresh = self.answered_at.is_some_and(|t| now.duration_since(t) < CONFIRMED_FOR);
        let waiting = self.asked.is_some_and(|(_, at)| now.duration_since(at) > PROBE_PATIENCE);
        fresh && !waiting
    }

    /// An answer: true when it answers the probe asked.
    fn answered(&mut self, nonce: u64, now: std::time::Instant) -> bool {
        if self.asked.is_some_and(|(n, _)| n == nonce) {
            self.asked = None;
            self.answered_at = Some(now);
            return true;
        }
        false
    }
}

/// Answers to one peer's probes, at most `ANSWERS_PER_SECOND` a second: a flood of probes (or
/// of datagrams posing as a peer's) costs a little and is not reflected.
#[derive(Debug, Default)]
struct AnswerLimit {
    window: Option<std::time::Instant>,
    sent: u32,
}

impl AnswerLimit {
    fn allow(&mut self, now: std::time::Instant) -> bool {
        if self.window.is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1)) {
            self.window = Some(now);
            self.sent = 0;
        }
        self.sent += 1;
        self.sent <= ANSWERS_PER_SECOND
    }
}

/// The sending TAP as the control thread set it up (the packet thread takes it when the table
/// generation changes), where large packets go or why not, and when to try again.
struct TapState {
    tap: Option<Arc<GsoTap>>,
    cutting: Result<String, String>,
    again: Option<std::time::Instant>,
}

impl Shared {
    fn tap_state(&self) -> std::sync::MutexGuard<'_, TapState> {
        self.tap.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens or closes the sending TAP as asked (at the start, on `set`, and again a while
    /// after another process held it); the packet thread takes the change with the next
    /// table generation.
    fn sync_tap(&self) {
        let mut state = self.tap_state();
        state.again = None;
        let now = if !self.want_cut.load(Ordering::Relaxed) {
            state.tap = None;
            Err("off (KernelSegmentation: false)".to_string())
        } else if let Some(tap) = &state.tap {
            Ok(tap.name.clone())
        } else {
            match open_gso_tap(&self.device) {
                Ok(tap) => {
                    let name = tap.name.clone();
                    state.tap = Some(Arc::new(tap));
                    Ok(name)
                }
                Err(no) => {
                    if no.again {
                        state.again = Some(std::time::Instant::now() + TAP_AGAIN);
                    }
                    Err(no.why)
                }
            }
        };
        Self::note(&mut state, now);
        drop(state);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Tries for the TAP again when it is time; gives it up when a setting of the node's changed
    /// under it (also while no packet goes: the status says so).
    fn sync_tap_when_due(&self) {
        let (due, unusable) = {
            let state = self.tap_state();
            let due = state.again.is_some_and(|t| std::time::Instant::now() >= t);
            (due, state.tap.as_ref().and_then(|tap| tap_unusable(&tap.name)))
        };
        if let Some(why) = unusable {
            self.give_up_tap(why, TAP_AGAIN);
            self.generation.fetch_add(1, Ordering::Release);
        } else if due {
            self.sync_tap();
        }
    }

    /// The packet thread's TAP was refused a packet or can no longer work: given up, tried
    /// again a while later (or on the next `set`).
    fn give_up_tap(&self, why: String, again: Duration) {
        let mut state = self.tap_state();
        state.tap = None;
        state.again = Some(std::time::Instant::now() + again);
        Self::note(&mut state, Err(why));
    }

    fn note(state: &mut TapState, now: Result<String, String>) {
        if state.cutting != now {
            match &now {
                Ok(tap) => tracing::info!("large TCP packets go to {tap} for the kernel to cut"),
                Err(why) => tracing::info!("large TCP packets are cut here: {why}"),
            }
            state.cutting = now;
        }
    }
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

    /// The current table (a reference count, not a copy).
    fn refresh(&mut self) -> Arc<Table> {
        let now = self.shared.generation.load(Ordering::Acquire);
        if now != self.generation {
            self.table = self.shared.table();
            self.generation = now;
        }
        self.table.clone()
    }
}

/// Where the forwarder serving `socket` writes its process id.
pub fn pid_path(socket: &Path) -> PathBuf {
    socket.with_extension("pid")
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
    let flags = sys::IFF_TUN | sys::IFF_NO_PI | sys::IFF_MULTI_QUEUE | sys::IFF_VNET_HDR;
    let tun = File::from(sys::tun_open(&config.device, flags)?);
    sys::set_nonblocking(tun.as_fd())?;
    // Large TCP packets from the TUN (cut here), joined datagrams from the socket: where the
    // kernel cannot, packets come one by one, which works the same, slower.
    if let Err(e) = sys::tun_offload_tso4(tun.as_fd()) {
        tracing::warn!("no TSO from {}: {e}", config.device);
    }
    let udp = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, config.port))?;
    if let Err(e) = sys::udp_gro(udp.as_fd()) {
        tracing::warn!("no UDP GRO: {e}");
    }
    sys::set_buffers(udp.as_fd(), SOCKET_BUFFER);
    let _ = std::fs::remove_file(&config.socket);
    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let control = UnixListener::bind(&config.socket)?;
    // Who serves the socket, for an agent that finds it not answering (a hung forwarder).
    let _ = std::fs::write(pid_path(&config.socket), std::process::id().to_string());
    let shared = Arc::new(Shared {
        table: Mutex::new(Arc::new(Table::new(config.subnet, config.network, []))),
        generation: AtomicU64::new(0),
        counters: Counters::default(),
        want_cut: std::sync::atomic::AtomicBool::new(config.kernel_segmentation),
        tap: Mutex::new(TapState { tap: None, cutting: Err("not yet".into()), again: None }),
        peers_cut: Mutex::new(HashMap::new()),
        device: config.device.clone(),
    });
    shared.sync_tap();
    let (tun, udp) = (Arc::new(tun), Arc::new(udp));
    tracing::info!("forwarding between {} and UDP port {}", config.device, config.port);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<io::Error>();
    {
        let (tun, udp, shared, done, config) = (tun.clone(), udp.clone(), shared.clone(), done_tx, config.clone());
        std::thread::Builder::new().name("forward".into()).spawn(move || {
            let e = forward(&tun, &udp, &config, &shared);
            let _ = done.send(e);
        })?;
    }
    {
        let (shared, config) = (shared.clone(), config.clone());
        std::thread::Builder::new().name("control".into()).spawn(move || {
            // Each connection on a thread of its own (a few at a time at most): one that says
            // nothing does not hold up the agent's requests for its read timeout.
            let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for conn in control.incoming() {
                let Ok(conn) = conn else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                if busy.load(Ordering::Relaxed) >= MAX_CONTROL_CONNECTIONS {
                    continue;
                }
                busy.fetch_add(1, Ordering::Relaxed);
                let (shared, config, done) = (shared.clone(), config.clone(), busy.clone());
                let spawned = std::thread::Builder::new().name("control-conn".into()).spawn(move || {
                    serve(conn, &shared, &config);
                    done.fetch_sub(1, Ordering::Relaxed);
                });
                if spawned.is_err() {
                    busy.fetch_sub(1, Ordering::Relaxed);
                }
            }
        })?;
    }
    let e = done_rx.recv().unwrap_or_else(|_| io::Error::other("the packet thread ended"));
    let _ = std::fs::remove_file(&config.socket);
    // The sending TAP goes with the forwarder (the packet thread has let go of its own).
    shared.tap_state().tap = None;
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
    let mut line = Vec::new();
    if BufReader::new((&conn).take(64 * 1024)).read_until(b'\n', &mut line).is_err() {
        return;
    }
    let answer = match serde_json::from_slice::<Value>(&line) {
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
    shared.sync_tap_when_due();
    match request.get("op").and_then(Value::as_str) {
        Some("status") => {}
        Some("set") => {
            let (subnet, network) = (net(request, "subnet")?, net(request, "network")?);
            match request.get("kernel_segmentation") {
                None | Some(Value::Null) => {}
                Some(Value::Bool(b)) => {
                    shared.want_cut.store(*b, Ordering::Relaxed);
                    shared.sync_tap();
                }
                Some(other) => return Err(format!("kernel_segmentation: {other} is not true or false")),
            }
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
    let now = std::time::Instant::now();
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
        "kernel_segmentation": shared.want_cut.load(Ordering::Relaxed),
        "kernel_cut": match &shared.tap_state().cutting {
            Ok(device) => {
                let peers: serde_json::Map<String, Value> = shared
                    .peers_cut
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .map(|(ip, p)| (ip.to_string(), json!(p.taking(now))))
                    .collect();
                json!({"device": device, "peers": peers})
            }
            Err(why) => json!({"off": why}),
        },
        "counters": shared.counters.json(),
    }))
}

/// The sending TAP: large TCP packets from the TUN go into it with their outer headers in
/// front, the kernel forwards them to the peer as it does any packet and cuts them into
/// datagrams where they leave (or lets a NIC do it). Its own to the forwarder: it goes when
/// the forwarder does.
struct GsoTap {
    file: File,
    name: String,
    mac: [u8; 6],
}

/// The name of the sending TAP beside the TUN device `device`.
pub fn tap_name(device: &str) -> String {
    format!("{device}-tx")
}

/// Why the sending TAP could not be had, and whether to try again soon (another forwarder,
/// being replaced, still holds it).
struct NoTap {
    why: String,
    again: bool,
}

/// Opens the sending TAP beside `device`, or says why large packets are cut in user space
/// instead.
fn open_gso_tap(device: &str) -> Result<GsoTap, NoTap> {
    let name = tap_name(device);
    let no = |why: String| NoTap { why, again: false };
    if name.len() >= libc::IFNAMSIZ {
        return Err(no(format!("{name:?} is too long a device name")));
    }
    // What the node forwards from its own address, through a device with no address of its
    // own: reverse-path filtering, strict or loose, drops it.
    if let Some(why) = all_rp_filter() {
        return Err(NoTap { why, again: true });
    }
    let fd = sys::tap_open_tunnel_gso(&name).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => NoTap { why: format!("{name} is held by another process: {e}"), again: true },
        _ => no(format!("the kernel does not cut packets already in UDP (TUN/TAP, Linux 6.17+): {e}")),
    })?;
    let no = |why: String| NoTap { why, again: true };
    let file = File::from(fd);
    // Taken as if it came from the TAP: accepted though its source is this node's own address,
    // and forwarded.
    for (key, value) in [("accept_local", "1"), ("rp_filter", "0"), ("forwarding", "1")] {
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{name}/{key}"), value)
            .map_err(|e| no(format!("net.ipv4.conf.{name}.{key}: {e}")))?;
    }
    // No IPv6 on it (no addresses, no router solicitations).
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let mac = sys::link_up(&name).map_err(|e| no(format!("{name}: {e}")))?;
    if let Some(why) = tap_unusable(&name) {
        return Err(no(why));
    }
    Ok(GsoTap { file, name, mac })
}

fn sysctl(key: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{key}")).map(|v| v.trim().to_string()).unwrap_or_default()
}

/// Why the node's reverse-path filtering would drop what comes in through the TAP, if it would.
fn all_rp_filter() -> Option<String> {
    let all = sysctl("all/rp_filter");
    (all != "0").then(|| format!("net.ipv4.conf.all.rp_filter is {all:?}, not 0"))
}

/// Why packets written to the TAP `name` would not be forwarded now (a setting changed under
/// it), if they would not.
fn tap_unusable(name: &str) -> Option<String> {
    if !std::path::Path::new(&format!("/proc/sys/net/ipv4/conf/{name}")).exists() {
        return Some(format!("{name} is gone"));
    }
    all_rp_filter().or_else(|| {
        [("rp_filter", "0"), ("accept_local", "1"), ("forwarding", "1")].into_iter().find_map(|(key, want)| {
            let now = sysctl(&format!("{name}/{key}"));
            (now != want).then(|| format!("net.ipv4.conf.{name}.{key} is {now:?}, not {want}"))
        })
    })
}

fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// How soon to try for the sending TAP again when another process held it or a setting was
/// wrong; after it refused a packet (it was taken down, deleted).
const TAP_AGAIN: Duration = Duration::from_secs(1);
const TAP_REFUSED_AGAIN: Duration = Duration::from_secs(5);
/// Probing a peer (see `PeerCut`): how long an answer counts, how often a peer is asked while
/// packets go to it, how long kernel-cut packets go on while a probe waits, when a probe counts
/// as unanswered and how long a peer that did not answer waits to be asked again.
const CONFIRMED_FOR: Duration = Duration::from_secs(3);
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_PATIENCE: Duration = Duration::from_millis(100);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const PROBE_RETRY: Duration = Duration::from_secs(2);
/// Answers to one peer's probes a second at most.
const ANSWERS_PER_SECOND: u32 = 20;
/// Destinations whose route MTU is kept at most (emptied when full).
const MTU_CACHE: usize = 4096;
/// How often the packet thread looks at the TAP's settings while it uses it.
const TAP_CHECK: Duration = Duration::from_secs(1);
/// Reads from the TUN per wake-up at most.
const TUN_BATCH: usize = 16;
/// A TUN read: the vnet header and up to 64 KiB of packet.
const TUN_SLOT: usize = VNET_HDR_LEN + 65536;
/// Datagrams (each up to 64 KiB when GRO joined several) per receive at most.
const UDP_BATCH: usize = 8;
const UDP_SLOT: usize = 65536;
/// Control connections served at once at most (the rest are closed at once).
const MAX_CONTROL_CONNECTIONS: usize = 16;
/// The UDP socket's buffers each way.
const SOCKET_BUFFER: libc::c_int = 8 << 20;
/// Datagrams in one UDP GSO send at most.
const MAX_GSO_SEGMENTS: usize = 64;
/// The most one UDP datagram (or one UDP GSO send) carries.
const MAX_UDP_PAYLOAD: usize = 65_507;

/// Sends the single datagrams gathered (`(slot, start, end, peer)`) in `sendmmsg` batches.
fn send_singles(
    batch: &mut Batch,
    udp: &UdpSocket,
    slots: &[Vec<u8>],
    singles: &mut Vec<(usize, usize, usize, SocketAddrV4)>,
    counters: &Counters,
) {
    // On the stack: no allocation per batch.
    let mut out = [(&[][..], SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); TUN_BATCH];
    for (slot, (i, a, b, to)) in out.iter_mut().zip(singles.iter()) {
        *slot = (&slots[*i][*a..*b], *to);
    }
    let out = &out[..singles.len().min(TUN_BATCH)];
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
    singles.clear();
}

/// Pods to peers: packets read from the TUN (as many as are ready, up to a batch). A large
/// TCP packet the kernel handed over whole (TSO) is cut into the segments TSO would make and
/// sent in one UDP GSO call; the others go as single datagrams, in one `sendmmsg`, in order.
struct TunToUdp<'a> {
    tun: &'a File,
    udp: &'a UdpSocket,
    port: u16,
    slots: Vec<Vec<u8>>,
    lens: [usize; TUN_BATCH],
    icmp: [u8; VNET_HDR_LEN + 128],
    segments: Vec<u8>,
    singles: Vec<(usize, usize, usize, SocketAddrV4)>,
    batch: Batch,
    current: Current<'a>,
    /// The sending TAP (taken from the control thread's when the generation changes; it may
    /// keep one the control thread let go until the next packet comes), and per peer the
    /// address the kernel sends to it from (looked up again then too).
    tap: Option<Arc<GsoTap>>,
    sources: HashMap<Ipv4Addr, Option<Ipv4Addr>>,
    generation: u64,
    ip_id: u16,
    /// When to look at the TAP's settings again (the node's may change under it).
    check_at: std::time::Instant,
}

impl<'a> TunToUdp<'a> {
    fn new(tun: &'a File, udp: &'a UdpSocket, port: u16, shared: &'a Shared) -> TunToUdp<'a> {
        let current = Current::new(shared);
        TunToUdp {
            tun,
            udp,
            port,
            slots: vec![vec![0u8; TUN_SLOT]; TUN_BATCH],
            lens: [0; TUN_BATCH],
            icmp: [0; VNET_HDR_LEN + 128],
            segments: Vec::with_capacity(TUN_SLOT + 8192),
            singles: Vec::with_capacity(TUN_BATCH),
            batch: Batch::new(TUN_BATCH),
            generation: current.generation,
            tap: shared.tap_state().tap.clone(),
            current,
            sources: HashMap::new(),
            ip_id: 0,
            check_at: std::time::Instant::now(),
        }
    }

    /// Hands the large TCP packet `packet` (read with `hdr`) to the kernel to cut, through the
    /// TAP; false when it cannot go that way (it is then cut here): no TAP, a setting of the
    /// node's in the way, a peer that has not answered a probe lately (one is sent when due). A
    /// TAP the kernel refuses packets from is given up, and taken again a while later.
    fn kernel_cut(&mut self, packet: &[u8], hdr: &VnetHdr, peer: SocketAddrV4) -> bool {
        let shared = self.current.shared;
        if self.tap.is_none() {
            shared.sync_tap_when_due();
        }
        if self.current.generation != self.generation {
            self.generation = self.current.generation;
            self.sources.clear();
            self.tap = shared.tap_state().tap.clone();
            let table = &self.current.table;
            shared.peers_cut.lock().unwrap_or_else(|e| e.into_inner()).retain(|ip, _| table.knows(*ip));
        }
        let Some(tap) = &self.tap else { return false };
        let now = std::time::Instant::now();
        if now >= self.check_at {
            self.check_at = now + TAP_CHECK;
            if let Some(why) = tap_unusable(&tap.name) {
                shared.give_up_tap(why, TAP_AGAIN);
                self.tap = None;
                return false;
            }
        }
        let Some(src) = *self.sources.entry(*peer.ip()).or_insert_with(|| sys::source_for(peer)) else {
            return false;
        };
        let mut encap = Encap { mac: tap.mac, src, dst: *peer.ip(), port: peer.port(), id: self.ip_id };
        let (ask, confirmed) = shared
            .peers_cut
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(*peer.ip())
            .or_default()
            .before_send(now, sys::random_u64);
        let counters = &shared.counters;
        if let Some(nonce) = ask {
            let mut frame = [0u8; offload::TUNNEL_VNET_HDR_LEN + 42 + offload::PROBE_LEN];
            offload::probe_frame(&encap, Probe::Ask(nonce), &mut frame);
            self.ip_id = self.ip_id.wrapping_add(1);
            encap.id = self.ip_id;
            match sys::write_two(tap.file.as_fd(), &frame, &[]) {
                Ok(_) => {
                    counters.probes_sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    shared.give_up_tap(format!("{} refused a packet: {e}", tap.name), TAP_REFUSED_AGAIN);
                    self.tap = None;
                    return false;
                }
            }
        }
        if !confirmed {
            return false;
        }
        let mut prefix = [0u8; ENCAP_PREFIX_LEN];
        let Some(datagrams) = offload::encapsulate(packet, hdr, &encap, &mut prefix) else {
            return false;
        };
        match sys::write_two(tap.file.as_fd(), &prefix, packet) {
            Ok(_) => {
                self.ip_id = self.ip_id.wrapping_add(datagrams as u16);
                counters.kernel_cut.fetch_add(1, Ordering::Relaxed);
                counters.udp_tx_packets.fetch_add(datagrams as u64, Ordering::Relaxed);
                counters.udp_tx_bytes.fetch_add(packet.len() as u64, Ordering::Relaxed);
                true
            }
            Err(e) => {
                shared.give_up_tap(format!("{} refused a packet: {e}", tap.name), TAP_REFUSED_AGAIN);
                self.tap = None;
                false
            }
        }
    }

    /// Forwards what the TUN has ready (a batch at most) without waiting; how many packets.
    fn step(&mut self) -> io::Result<usize> {
        let mut n = 0;
        let mut reader = self.tun;
        while n < TUN_BATCH {
            match reader.read(&mut self.slots[n]) {
                Ok(len) => {
                    self.lens[n] = len;
                    n += 1;
                }
                Err(e) if is_would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let table = self.current.refresh();
        let counters = &self.current.shared.counters;
        let (tun, udp, port) = (self.tun, self.udp, self.port);
        for i in 0..n {
            let len = self.lens[i];
            counters.tun_rx_packets.fetch_add(1, Ordering::Relaxed);
            counters.tun_rx_bytes.fetch_add(len.saturating_sub(VNET_HDR_LEN) as u64, Ordering::Relaxed);
            let slot = &mut self.slots[i][..len];
            let (Some(hdr), Some(packet)) = (VnetHdr::decode(slot), slot.get_mut(VNET_HDR_LEN..)) else {
                counters.drop(Drop::Malformed);
                continue;
            };
            let Ok(header) = packet::parse(packet) else {
                counters.drop(Drop::Malformed);
                continue;
            };
            let peer = match table.route(header.dst) {
                Ok(peer) => SocketAddrV4::new(peer, port),
                Err(Drop::NoRoute) => {
                    counters.drop(Drop::NoRoute);
                    // No answer to a broadcast or multicast (RFC 1122 §3.2.2).
                    let broadcast = header.dst.is_broadcast()
                        || header.dst.is_multicast()
                        || table.network.is_some_and(|n| n.broadcast() == header.dst);
                    if broadcast {
                        continue;
                    }
                    let from = table.subnet.map_or(Ipv4Addr::UNSPECIFIED, |s| s.network());
                    let icmp = &mut self.icmp;
                    if let Some(l) = packet::net_unreachable(packet, &header, from, &mut icmp[VNET_HDR_LEN..]) {
                        if (&*tun).write(&icmp[..VNET_HDR_LEN + l]).is_ok() {
                            counters.icmp_sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    continue;
                }
                Err(why) => {
                    counters.drop(why);
                    continue;
                }
            };
            if !packet::decrement_ttl(packet) {
                counters.drop(Drop::TtlExpired);
                continue;
            }
            match hdr.gso_type & !offload::GSO_ECN {
                offload::GSO_NONE => {
                    if hdr.flags & offload::F_NEEDS_CSUM != 0
                        && !offload::complete_checksum(&mut packet[..header.total_len], &hdr)
                    {
                        counters.drop(Drop::Malformed);
                        continue;
                    }
                    self.singles.push((i, VNET_HDR_LEN, VNET_HDR_LEN + header.total_len, peer));
                }
                offload::GSO_TCPV4 => {
                    // In order: what came before it goes first.
                    send_singles(&mut self.batch, udp, &self.slots, &mut self.singles, counters);
                    let slot = std::mem::take(&mut self.slots[i]);
                    let cut = self.kernel_cut(&slot[VNET_HDR_LEN..len], &hdr, peer);
                    self.slots[i] = slot;
                    if cut {
                        continue;
                    }
                    let counters = &self.current.shared.counters;
                    let packet = &self.slots[i][VNET_HDR_LEN..len];
                    let Ok((size, _)) = offload::segment(packet, &hdr, &mut self.segments) else {
                        counters.drop(Drop::Malformed);
                        continue;
                    };
                    // One UDP GSO send carries at most 65,507 bytes (one IP packet's worth).
                    // and at most 64 datagrams (the kernel's UDP GSO limit on older kernels).
                    let per_send = (MAX_UDP_PAYLOAD / size).clamp(1, MAX_GSO_SEGMENTS) * size;
                    for part in self.segments.chunks(per_send) {
                        match sys::send_segments(udp.as_fd(), part, size as u16, peer) {
                            Ok(_) => {
                                counters.udp_tx_packets.fetch_add(part.len().div_ceil(size) as u64, Ordering::Relaxed);
                                counters.udp_tx_bytes.fetch_add(part.len() as u64, Ordering::Relaxed);
                            }
                            Err(_) => counters.drop(Drop::IoError),
                        }
                    }
                }
                _ => counters.drop(Drop::Malformed),
            }
        }
        send_singles(&mut self.batch, udp, &self.slots, &mut self.singles, counters);
        Ok(n)
    }
}

/// Peers to pods: datagrams received a batch at a time (UDP GRO hands several of one flow
/// joined); each admitted packet goes to the coalescer, which writes runs of one TCP flow to
/// the TUN as one large packet and the rest one by one.
struct UdpToTun<'a> {
    tun: &'a File,
    udp: &'a UdpSocket,
    slots: Vec<Vec<u8>>,
    received: [Received; UDP_BATCH],
    batch: Batch,
    current: Current<'a>,
    coalescer: Coalescer,
    /// Answers to each peer's probes lately.
    answer_limits: HashMap<Ipv4Addr, AnswerLimit>,
    mtus: Mtus<'a>,
}

impl<'a> UdpToTun<'a> {
    fn new(tun: &'a File, udp: &'a UdpSocket, device: &'a str, shared: &'a Shared) -> UdpToTun<'a> {
        let current = Current::new(shared);
        UdpToTun {
            answer_limits: HashMap::new(),
            mtus: Mtus { device, by_dst: HashMap::new(), tun: 0, until: std::time::Instant::now() },
            tun,
            udp,
            slots: vec![vec![0u8; UDP_SLOT]; UDP_BATCH],
            received: [Received::default(); UDP_BATCH],
            batch: Batch::new(UDP_BATCH),
            current,
            coalescer: Coalescer::default(),
        }
    }

    /// Delivers what the socket has (a batch at most) without waiting; how many datagrams
    /// (joined ones counted once).
    fn step(&mut self) -> io::Result<usize> {
        let n = match self.batch.recv(self.udp.as_fd(), &mut self.slots, &mut self.received) {
            Ok(n) => n,
            Err(e) if is_would_block(&e) => return Ok(0),
            Err(e) => return Err(e),
        };
        let table = self.current.refresh();
        let counters = &self.current.shared.counters;
        let tun = self.tun;
        let failed: std::cell::Cell<Option<io::Error>> = std::cell::Cell::new(None);
        let mut write = |bytes: &[u8]| match (&*tun).write(bytes) {
            Ok(_) => {
                counters.tun_writes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.raw_os_error() == Some(libc::EBADFD) => failed.set(Some(e)),
            Err(_) => counters.drop(Drop::IoError),
        };
        let coalescer = &mut self.coalescer;
        for (slot, r) in self.slots.iter().zip(&self.received).take(n) {
            let size = usize::from(r.segment.unwrap_or(0)).max(1).min(r.len.max(1));
            let datagrams = if r.segment.is_some() { r.len.div_ceil(size) } else { 1 };
            counters.udp_rx_packets.fetch_add(datagrams as u64, Ordering::Relaxed);
            counters.udp_rx_bytes.fetch_add(r.len as u64, Ordering::Relaxed);
            if r.truncated {
                counters.drop(Drop::Malformed);
                continue;
            }
            // The sender first: a stranger's datagrams are not even parsed.
            if !table.knows(*r.from.ip()) {
                for _ in 0..datagrams {
                    counters.drop(Drop::UnknownSource);
                }
                continue;
            }
            let bytes = &slot[..r.len];
            if bytes.is_empty() {
                counters.drop(Drop::Malformed);
                continue;
            }
            let chunks = if r.segment.is_some() { bytes.chunks(size) } else { bytes.chunks(bytes.len().max(1)) };
            for datagram in chunks {
                // A peer asking whether it may send what its kernel cuts, or answering this
                // node (alone, or the short last of datagrams GRO joined).
                if let Some(probe) = Probe::decode(datagram) {
                    match probe {
                        Probe::Ask(nonce) => {
                            let now = std::time::Instant::now();
                            if self.answer_limits.len() > MTU_CACHE {
                                self.answer_limits.clear();
                            }
                            if !self.answer_limits.entry(*r.from.ip()).or_default().allow(now) {
                                counters.probe_answers_withheld.fetch_add(1, Ordering::Relaxed);
                            } else if self.udp.send_to(&Probe::Answer(nonce).encode(), r.from).is_ok() {
                                counters.probe_answers_sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Probe::Answer(nonce) => {
                            let now = std::time::Instant::now();
                            let mut peers = self.current.shared.peers_cut.lock().unwrap_or_else(|e| e.into_inner());
                            if peers.get_mut(r.from.ip()).is_some_and(|p| p.answered(nonce, now)) {
                                counters.probes_answered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    continue;
                }
                // A header whose checksum is wrong would be dropped by the kernel: not counted
                // as delivered.
                let Ok(header) = packet::parse(datagram)
                    .map_err(drop)
                    .and_then(|h| (packet::checksum(&datagram[..h.header_len]) == 0).then_some(h).ok_or(()))
                else {
                    counters.drop(Drop::Malformed);
                    continue;
                };
                if let Err(why) = table.admit(*r.from.ip(), header.src, header.dst) {
                    counters.drop(why);
                    continue;
                }
                counters.tun_tx_packets.fetch_add(1, Ordering::Relaxed);
                counters.tun_tx_bytes.fetch_add(header.total_len as u64, Ordering::Relaxed);
                let packet = &datagram[..header.total_len];
                let mtu_for = |dst| self.mtus.to(dst);
                if let Some(whole) = r.segment.is_none().then(|| offload::whole_tcp(packet, mtu_for)).flatten() {
                    coalescer.flush(&mut write);
                    let mut vnet = [0u8; VNET_HDR_LEN];
                    whole.encode(&mut vnet);
                    match sys::write_two(tun.as_fd(), &vnet, packet) {
                        Ok(_) => {
                            counters.tun_writes.fetch_add(1, Ordering::Relaxed);
                            counters.whole_received.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.raw_os_error() == Some(libc::EBADFD) => failed.set(Some(e)),
                        Err(_) => counters.drop(Drop::IoError),
                    }
                    continue;
                }
                coalescer.push(packet, &mut write);
            }
        }
        coalescer.flush(&mut write);
        match failed.take() {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }
}

/// What a peer's kernel-cut send that came uncut is taken as segments of: the smaller of the
/// TUN's MTU and the route's to its destination (a pod's bridge may be smaller than the TUN, or
/// larger), both read again each second: after the uplink's MTU changed, the pods made before
/// keep theirs.
struct Mtus<'a> {
    /// The TUN device.
    device: &'a str,
    by_dst: HashMap<Ipv4Addr, usize>,
    tun: usize,
    until: std::time::Instant,
}

impl Mtus<'_> {
    /// The MTU for `dst` (0, unknown: the packet is not taken whole).
    fn to(&mut self, dst: Ipv4Addr) -> usize {
        let now = std::time::Instant::now();
        if now >= self.until || self.by_dst.len() >= MTU_CACHE {
            self.by_dst.clear();
            self.tun = sys::mtu(self.device).unwrap_or(0);
            self.until = now + Duration::from_secs(1);
        }
        let tun = self.tun;
        *self.by_dst.entry(dst).or_insert_with(|| sys::route_mtu(dst).map_or(0, |m| m.min(tun)))
    }
}

/// Both ways on one thread: what either side has is forwarded without waking another thread
/// (a TUN write often leaves the pod's answer ready to read at once: its ACK, its next
/// segments); it sleeps only when neither has anything. On two cores this beat a thread each
/// way (fewer context switches; docs/benchmarks.md).
fn forward(tun: &File, udp: &UdpSocket, config: &Config, shared: &Shared) -> io::Error {
    let mut out = TunToUdp::new(tun, udp, config.port, shared);
    let mut inbound = UdpToTun::new(tun, udp, &config.device, shared);
    loop {
        let sent = match out.step() {
            Ok(n) => n,
            Err(e) => return e,
        };
        let delivered = match inbound.step() {
            Ok(n) => n,
            Err(e) => return e,
        };
        if sent == 0 && delivered == 0 {
            if let Err(e) = sys::wait_readable(&[tun.as_fd(), udp.as_fd()]) {
                return e;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_peer_takes_kernel_cut_packets_only_on_a_fresh_answer() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut p = PeerCut::default();
        // First packet: a probe goes, the packet is cut here.
        assert_eq!(p.before_send(ms(0), || 7), (Some(7), false));
        assert!(!p.answered(8, ms(1)), "another nonce");
        assert!(p.answered(7, ms(1)));
        assert_eq!(p.before_send(ms(2), || 9), (None, true));
        // Asked again a second later; meanwhile still taking, until the probe waits too long.
        assert_eq!(p.before_send(ms(1001), || 9), (Some(9), true));
        assert_eq!(p.before_send(ms(1050), || 0), (None, true));
        assert_eq!(p.before_send(ms(1150), || 0), (None, false), "unanswered past the patience");
        assert!(p.answered(9, ms(1160)));
        assert_eq!(p.before_send(ms(1170), || 0), (None, true));
        // Nothing sent for a while: the answer is stale; the next packet asks first.
        assert_eq!(p.before_send(ms(5000), || 11), (Some(11), false));
        // Never answered: confirmation over, asked again only after the retry time.
        assert_eq!(p.before_send(ms(6001), || 12), (None, false));
        assert_eq!(p.before_send(ms(7000), || 12), (None, false));
        assert_eq!(p.before_send(ms(8001), || 12), (Some(12), false));
        assert!(!p.answered(11, ms(8002)), "a late answer to an old probe");
        assert!(p.answered(12, ms(8002)));
        assert!(p.taking(ms(8003)));
    }

    #[test]
    fn answers_to_one_peer_are_limited_per_second() {
        let t0 = Instant::now();
        let mut limit = AnswerLimit::default();
        let allowed = (0..100).filter(|_| limit.allow(t0)).count();
        assert_eq!(allowed, ANSWERS_PER_SECOND as usize);
        assert!(limit.allow(t0 + Duration::from_secs(1)), "a new second");
    }
}
