//! The thin I/O layer: a [`Speaker`] run over TCP and timers on a single-threaded tokio
//! runtime. One task owns the speaker and takes events (connections accepted or made, bytes,
//! closes, timers, status requests) from a channel; connections have a reader and a writer task
//! each; timers are sleeps tagged with a generation, so one stopped or restarted is ignored when
//! it fires. Routes go to a [`RouteSink`] (the kernel, for `weft bgp run --install`), and a unix
//! socket answers `status` with JSON.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{mpsc, oneshot};

use crate::neighbor::{self, Action, Config, State, Timer};
use crate::packet::{self, Codec, Message};
use crate::rib::{PeerId, Policy, Rib};
use crate::speaker::{Output, Speaker};

/// After a failed accept (out of descriptors, most likely): said, and a pause before the
/// next, so a listener neither dies nor spins.
async fn pause_after(e: &std::io::Error, what: &str) {
    tracing::warn!("{what}: {e}; trying again in 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// `after` less up to a quarter, at random (the clock's low bits and the process id: enough
/// to take two speakers out of step).
fn jitter(after: Duration) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let byte = ((nanos >> 10) ^ nanos ^ std::process::id()) as u8;
    after.mul_f64(0.75 + 0.25 * f64::from(byte) / 255.0)
}

/// The NOTIFICATION that closes the connection a collision gave up (Cease, subcode 7).
fn cease_collision() -> Vec<u8> {
    let notification = packet::Notification::new(packet::error::CEASE, packet::error::CEASE_COLLISION, []);
    packet::to_bytes(&Message::Notification(notification), Codec::default())
}

/// How often the sink hears which next hops are in use, when routes went since it last did.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Every this many sweeps, the kernel is compared with what is installed (and repaired).
const RECONCILE_EVERY_SWEEPS: u32 = 2;

/// A configured neighbour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighborSpec {
    pub address: IpAddr,
    pub asn: u32,
    pub passive: bool,
    pub rr_client: bool,
    /// Advertise only this speaker's own prefixes to it.
    pub originated_only: bool,
}

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub local_as: u32,
    pub router_id: std::net::Ipv4Addr,
    pub listen: SocketAddr,
    /// The next hop this speaker announces.
    pub next_hop: IpAddr,
    /// Its IPv6 next hop, for IPv6 prefixes (without one, none are announced).
    pub next_hop_v6: Option<std::net::Ipv6Addr>,
    pub neighbors: Vec<NeighborSpec>,
    /// Accept sessions from any address in a range, with this AS.
    pub ranges: Vec<(IpNet, u32)>,
    pub announce: Vec<IpNet>,
    pub policy: Policy,
    pub hold_time: u16,
    pub connect_retry: Duration,
    /// The graceful-restart time offered: how long neighbours keep this speaker's routes when
    /// it goes away without a word, and how long, after a restart, the routes it had installed
    /// are kept for its neighbours to send again.
    pub restart_time: u16,
    /// After a restart, how long at most this speaker defers advertising while neighbours send
    /// their End-of-RIB (RFC 4724's selection deferral; `None`: the restart time). The routes it
    /// had installed are kept for the whole restart time all the same.
    pub selection_deferral: Option<Duration>,
    pub socket: PathBuf,
}

/// Where best routes go (the kernel).
pub trait RouteSink {
    /// The routes a previous run installed and left (it did not stop cleanly).
    fn leftovers(&mut self) -> Vec<IpNet> {
        Vec::new()
    }
    /// The best path to `prefix` is via `next_hop` now.
    fn install(&mut self, prefix: IpNet, next_hop: IpAddr);
    /// No path to `prefix` any more.
    fn remove(&mut self, prefix: IpNet);
    /// The next hops installed routes go through now: what the sink keeps for others (the
    /// kernel's nexthop objects) can go.
    fn next_hops_in_use(&mut self, _in_use: &std::collections::HashSet<IpAddr>) {}
    /// Makes what the sink holds exactly `wanted` again (routes removed or changed behind its
    /// back: a link that went down took them, someone deleted them); how many of `wanted` it
    /// holds after, when it can tell.
    fn reconcile(&mut self, _wanted: &[(IpNet, IpAddr)]) -> Option<usize> {
        None
    }
}

/// A sink that keeps nothing (a speaker that does not install routes).
pub struct NoSink;

impl RouteSink for NoSink {
    fn install(&mut self, _: IpNet, _: IpAddr) {}
    fn remove(&mut self, _: IpNet) {}
}

enum Event {
    Accepted(TcpStream, SocketAddr),
    Connected(PeerId, TcpStream),
    ConnectFailed(PeerId),
    Data(PeerId, u64, Vec<u8>),
    Closed(PeerId, u64),
    Timer(PeerId, Timer, u64),
    Stale(PeerId, u64),
    Status(oneshot::Sender<String>),
    /// The restart time after a restart is over: what no neighbour sent again goes.
    RestartOver,
    /// The selection deferral of a restart is over: advertise whatever is known.
    DeferralOver,
    /// Time to tell the sink which next hops are in use.
    Sweep,
    /// An embedding program's new neighbours and prefixes (see [`Handle::configure`]).
    Configure(Vec<NeighborSpec>, Vec<IpNet>),
    Shutdown,
}

/// A speaker run on a thread of its own inside another program (the agent's `bgp` backend):
/// its neighbours and prefixes are set while it runs; it stops when dropped, not on
/// signals.
pub struct Handle {
    tx: mpsc::UnboundedSender<Event>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handle {
    /// From now on the neighbours are exactly `neighbors` (new ones are started; gone ones
    /// get a Cease and their routes go; one whose AS or role changed is started again) and
    /// the prefixes announced exactly `announce`.
    pub fn configure(&self, neighbors: Vec<NeighborSpec>, announce: Vec<IpNet>) {
        let _ = self.tx.send(Event::Configure(neighbors, announce));
    }

    /// Asks for the status JSON (as `weft bgp status` prints it) without waiting for it: the answer comes when the speaker gets to the
    /// question (after what is queued before it), to be taken with [`StatusAnswer::take`].
    pub fn ask_status(&self) -> Option<StatusAnswer> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Event::Status(reply)).ok()?;
        Some(StatusAnswer(answer))
    }
}

/// Dropped, the speaker stops as SIGTERM stops `weft bgp run` (Ceases sent, installed routes
/// removed), and the drop waits for that.
impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.tx.send(Event::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A status asked for with [`Handle::ask_status`].
pub struct StatusAnswer(oneshot::Receiver<String>);

impl StatusAnswer {
    /// The status if it is there; `Err(self)` to ask again later, `Ok(None)` when the speaker
    /// is gone.
    pub fn take(mut self) -> Result<Option<String>, StatusAnswer> {
        match self.0.try_recv() {
            Ok(text) => Ok(Some(text)),
            Err(oneshot::error::TryRecvError::Empty) => Err(self),
            Err(oneshot::error::TryRecvError::Closed) => Ok(None),
        }
    }
}

/// Starts a speaker on a thread of its own (see [`Handle`]); an error when it cannot start
/// (its port or control socket taken).
pub fn spawn(config: DaemonConfig, sink: Box<dyn RouteSink + Send>) -> std::io::Result<Handle> {
    let sink: Box<dyn RouteSink + Send> = sink;
    let (tx, rx) = mpsc::unbounded_channel();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let events = tx.clone();
    let thread = std::thread::Builder::new().name("bgp".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = started_tx.send(Err(e));
                return;
            }
        };
        let outcome = rt.block_on(serve_with(config, sink, events, rx, false, Some(started_tx.clone())));
        if let Err(e) = outcome {
            let _ = started_tx.send(Err(e));
        }
    })?;
    match started_rx.recv() {
        Ok(Ok(())) => Ok(Handle { tx, thread: Some(thread) }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(std::io::Error::other("the BGP speaker's thread ended at start"))
        }
    }
}

/// The sending side of a connection: bytes queued for its writer task, at most
/// [`MAX_QUEUED`] (a neighbour that stops reading does not make this speaker grow).
struct Writer {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    queued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Bytes waiting for one neighbour at most; past it the neighbour is taken as gone.
const MAX_QUEUED: usize = 32 << 20;

impl Writer {
    /// Queues `bytes`; false when the neighbour has more than [`MAX_QUEUED`] waiting already.
    fn send(&self, bytes: Vec<u8>) -> bool {
        use std::sync::atomic::Ordering;
        if self.queued.load(Ordering::Relaxed) > MAX_QUEUED {
            return false;
        }
        self.queued.fetch_add(bytes.len(), Ordering::Relaxed);
        let _ = self.tx.send(bytes);
        true
    }
}

/// A second connection to a neighbour whose session is in OpenSent or OpenConfirm: this
/// speaker's OPEN goes out on it at once and the neighbour's is read, whose BGP identifier
/// decides which connection stays (the one opened by the speaker with the higher identifier).
struct Pending {
    conn: u64,
    writer: Writer,
    outgoing: bool,
    /// What arrived on it so far (the neighbour's OPEN, and what follows it).
    read: Vec<u8>,
}

/// One neighbour's I/O state.
struct Link {
    address: IpAddr,
    asn: u32,
    rr_client: bool,
    originated_only: bool,
    /// The current connection: its number and its writer.
    conn: Option<(u64, Writer)>,
    /// Whether this speaker opened the current connection.
    outgoing: bool,
    /// A second connection held while a collision is resolved (RFC 4271 §6.8).
    pending: Option<Pending>,
    /// The connection being dropped because the neighbour reads nothing.
    dropping: Option<u64>,
    up_since: Option<Instant>,
    generations: HashMap<Timer, u64>,
    stale_generation: u64,
}

struct Daemon {
    config: DaemonConfig,
    /// The prefixes this speaker announces now.
    announced: std::collections::BTreeSet<IpNet>,
    speaker: Speaker,
    links: HashMap<PeerId, Link>,
    tx: mpsc::UnboundedSender<Event>,
    sink: Box<dyn RouteSink>,
    /// Routes a previous run left in the kernel, not sent again yet.
    leftovers: std::collections::BTreeSet<IpNet>,
    /// This run follows one that did not stop cleanly (graceful restart: neighbours are told).
    restarting: bool,
    /// Routes were removed since the sink last heard which next hops are in use.
    removed: bool,
    sweeps: u32,
    /// Neighbours that came from a `--neighbor-range` (forgotten when their session is over).
    dynamic: std::collections::HashSet<PeerId>,
    /// How many installed routes the kernel held at the last reconcile.
    in_kernel: Option<usize>,
    next_conn: u64,
    next_peer: PeerId,
}

/// Runs the daemon until SIGTERM or SIGINT; then the routes it installed are removed.
pub fn run(config: DaemonConfig, sink: Box<dyn RouteSink>) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (tx, rx) = mpsc::unbounded_channel();
    rt.block_on(serve_with(config, sink, tx, rx, true, None))
}

type Started = std::sync::mpsc::Sender<std::io::Result<()>>;

async fn serve_with(
    config: DaemonConfig,
    sink: Box<dyn RouteSink>,
    tx: mpsc::UnboundedSender<Event>,
    mut rx: mpsc::UnboundedReceiver<Event>,
    signals: bool,
    started: Option<Started>,
) -> std::io::Result<()> {
    // One speaker per control socket: a second one must not take it over (nor, restarting,
    // the first one's routes).
    if std::os::unix::net::UnixStream::connect(&config.socket).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("a speaker already answers on {} (give another --socket)", config.socket.display()),
        ));
    }
    let listener = TcpListener::bind(config.listen).await?;
    // A control socket left behind: the previous run did not stop cleanly (killed): this is a
    // restart. So is a start that finds routes of its own in the kernel (even when whoever
    // cleaned /run took the socket): they are kept while neighbours send theirs again.
    let mut sink = sink;
    let found: Vec<IpNet> = sink.leftovers();
    let restarting = config.socket.exists() || !found.is_empty();
    let _ = std::fs::remove_file(&config.socket);
    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let control = UnixListener::bind(&config.socket)?;
    tracing::info!("BGP AS {} router id {} listening on {}", config.local_as, config.router_id, config.listen);
    if let Some(started) = started {
        let _ = started.send(Ok(()));
    }
    let mut rib = Rib::new(config.local_as, config.router_id);
    rib.policy = config.policy.clone();
    // No learned path may lead back to this speaker.
    rib.own_addresses = [Some(IpAddr::V4(config.router_id)), Some(config.next_hop), config.next_hop_v6.map(IpAddr::V6)]
        .into_iter()
        .flatten()
        .chain((!config.listen.ip().is_unspecified()).then_some(config.listen.ip()))
        .collect();
    let mut speaker = Speaker::new(rib, config.next_hop);
    if config.next_hop_v6.is_some() {
        speaker.next_hop_v6 = config.next_hop_v6;
    }
    let leftovers: std::collections::BTreeSet<IpNet> = found.into_iter().collect();
    if restarting {
        tracing::info!(
            "restarting: {} routes from the last run kept for {} s while neighbours send theirs again",
            leftovers.len(),
            config.restart_time
        );
    }
    if restarting {
        speaker.defer_until_end_of_rib();
    }
    let announced = config.announce.iter().copied().collect();
    let mut daemon = Daemon {
        announced,
        speaker,
        links: HashMap::new(),
        tx: tx.clone(),
        sink,
        leftovers,
        restarting,
        removed: false,
        sweeps: 0,
        dynamic: Default::default(),
        in_kernel: None,
        next_conn: 0,
        next_peer: 1,
        config,
    };
    // Accepting connections.
    let accept_tx = tx.clone();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, from)) => {
                    if accept_tx.send(Event::Accepted(stream, from)).is_err() {
                        return;
                    }
                }
                // Out of descriptors, most likely: keep listening, a little later.
                Err(e) => pause_after(&e, "accepting a BGP connection").await,
            }
        }
    });
    // The control socket: a line in, JSON out.
    let control_tx = tx.clone();
    tokio::spawn(async move {
        loop {
            let mut stream = match control.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    pause_after(&e, "accepting a control connection").await;
                    continue;
                }
            };
            let tx = control_tx.clone();
            tokio::spawn(async move {
                let mut line = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut line)).await;
                let (reply, answer) = oneshot::channel();
                if tx.send(Event::Status(reply)).is_ok() {
                    if let Ok(text) = answer.await {
                        let _ = stream.write_all(text.as_bytes()).await;
                    }
                }
            });
        }
    });
    // Stopping.
    let signal_tx = tx.clone();
    let on_signals = async move {
        use tokio::signal::unix::{signal, SignalKind};
        // A hang-up (the terminal gone, `kill -HUP`) stops it cleanly too: its default would
        // end the process with its routes and socket left behind and no Cease sent.
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
        else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {}
        }
        let _ = signal_tx.send(Event::Shutdown);
    };
    if signals {
        tokio::spawn(on_signals);
    }
    for prefix in daemon.config.announce.clone() {
        let out = daemon.speaker.originate(prefix);
        daemon.carry_out(out);
    }
    for spec in daemon.config.neighbors.clone() {
        daemon.add(spec);
    }
    let restart_tx = tx.clone();
    let restart_time = Duration::from_secs(u64::from(daemon.config.restart_time));
    let deferral = daemon.config.selection_deferral.unwrap_or(restart_time).min(restart_time);
    tokio::spawn(async move {
        tokio::time::sleep(deferral).await;
        let _ = restart_tx.send(Event::DeferralOver);
        tokio::time::sleep(restart_time - deferral).await;
        let _ = restart_tx.send(Event::RestartOver);
    });
    let sweep_tx = tx.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        every.tick().await;
        loop {
            every.tick().await;
            if sweep_tx.send(Event::Sweep).is_err() {
                return;
            }
        }
    });
    while let Some(event) = rx.recv().await {
        if matches!(event, Event::Shutdown) {
            break;
        }
        daemon.handle(event);
        daemon.forget_idle_dynamic();
    }
    daemon.shutdown();
    // The Ceases go out before the runtime ends.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = std::fs::remove_file(&daemon.config.socket);
    Ok(())
}

impl Daemon {
    fn add(&mut self, spec: NeighborSpec) -> PeerId {
        let id = self.next_peer;
        self.next_peer += 1;
        let mut config = Config::new(self.config.local_as, self.config.router_id, spec.asn);
        config.passive = spec.passive;
        config.originated_only = spec.originated_only;
        config.hold_time = self.config.hold_time;
        config.connect_retry = self.config.connect_retry;
        config.graceful_restart = Some(self.config.restart_time);
        config.restarting = self.restarting;
        self.links.insert(
            id,
            Link {
                address: spec.address,
                asn: spec.asn,
                rr_client: spec.rr_client,
                originated_only: spec.originated_only,
                conn: None,
                outgoing: false,
                pending: None,
                dropping: None,
                up_since: None,
                generations: HashMap::new(),
                stale_generation: 0,
            },
        );
        let out = self.speaker.add_neighbor(id, spec.address, config, spec.rr_client);
        self.carry_out(out);
        id
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Accepted(stream, from) => {
                // On a socket listening on `::`, IPv4 neighbours arrive as ::ffff:a.b.c.d.
                let address = from.ip().to_canonical();
                let id = match self.speaker.neighbor_at(address) {
                    Some(id) => id,
                    None => match self.config.ranges.iter().find(|(net, _)| net.contains(&address)) {
                        Some((_, asn)) => {
                            let spec = NeighborSpec {
                                address,
                                asn: *asn,
                                passive: true,
                                rr_client: false,
                                originated_only: false,
                            };
                            let id = self.add(spec);
                            self.dynamic.insert(id);
                            id
                        }
                        None => {
                            tracing::info!("refused a connection from {address}: not a neighbour");
                            return;
                        }
                    },
                };
                self.offer(id, stream, false);
            }
            Event::Connected(id, stream) => {
                tracing::debug!("connected to {} in {:?}", self.address_of(id), self.speaker.state(id));
                self.offer(id, stream, true)
            }
            Event::ConnectFailed(id) => {
                tracing::debug!("connecting to {} failed in {:?}", self.address_of(id), self.speaker.state(id));
                let out = self.speaker.transport_lost(id);
                self.carry_out(out);
            }
            Event::Data(id, conn, bytes) => {
                if self.current(id, conn) {
                    let before = self.speaker.state(id);
                    let out = self.speaker.received(id, &bytes);
                    self.carry_out(out);
                    let after = self.speaker.state(id);
                    if matches!(before, Some(State::OpenSent | State::OpenConfirm)) && after == Some(State::Idle) {
                        if let Some(link) = self.links.get(&id) {
                            tracing::info!("the session with {} failed before it was established", link.address);
                        }
                    }
                } else if let Some(pending) = self.pending_mut(id, conn) {
                    pending.read.extend_from_slice(&bytes);
                    self.resolve(id);
                }
            }
            Event::Closed(id, conn) => {
                tracing::debug!(
                    "connection {conn} of {} closed (current: {})",
                    self.address_of(id),
                    self.current(id, conn)
                );
                if self.current(id, conn) {
                    if let Some(link) = self.links.get_mut(&id) {
                        link.conn = None;
                    }
                    let out = self.speaker.transport_lost(id);
                    self.carry_out(out);
                    // The connection held beside it goes on, if the session may take it.
                    if self.links.get(&id).is_some_and(|l| l.pending.is_some()) {
                        self.promote(id);
                    }
                } else if self.pending_mut(id, conn).is_some() {
                    if let Some(link) = self.links.get_mut(&id) {
                        link.pending = None;
                    }
                }
            }
            Event::Timer(id, timer, generation) => {
                let live = self.links.get(&id).is_some_and(|l| l.generations.get(&timer) == Some(&generation));
                tracing::debug!(
                    "timer {timer:?} of {} (live: {live}) in {:?}",
                    self.address_of(id),
                    self.speaker.state(id)
                );
                if live {
                    let out = self.speaker.timer(id, timer);
                    self.carry_out(out);
                }
            }
            Event::Stale(id, generation) => {
                if self.links.get(&id).is_some_and(|l| l.stale_generation == generation) {
                    let out = self.speaker.stale_expired(id);
                    self.carry_out(out);
                }
            }
            Event::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Event::DeferralOver => {
                let out = self.speaker.end_deferral();
                self.carry_out(out);
            }
            Event::RestartOver => {
                let out = self.speaker.end_deferral();
                self.carry_out(out);
                for prefix in std::mem::take(&mut self.leftovers) {
                    if self.speaker.rib.best(&prefix).is_none_or(|p| p.from.is_none()) {
                        self.sink.remove(prefix);
                    }
                }
                self.sweep();
            }
            Event::Sweep => {
                self.sweeps += 1;
                if self.removed {
                    self.sweep();
                }
                if self.sweeps.is_multiple_of(RECONCILE_EVERY_SWEEPS) && self.leftovers.is_empty() {
                    let wanted: Vec<(IpNet, IpAddr)> = self.speaker.rib.learned().map(|(p, nh)| (*p, nh)).collect();
                    self.in_kernel = self.sink.reconcile(&wanted);
                }
            }
            Event::Configure(neighbors, announce) => self.configure(neighbors, announce),
            Event::Shutdown => {}
        }
    }

    /// The neighbours and announced prefixes become these (see [`Handle::configure`]).
    fn configure(&mut self, neighbors: Vec<NeighborSpec>, announce: Vec<IpNet>) {
        let wanted: std::collections::BTreeSet<IpNet> = announce.into_iter().collect();
        for prefix in self.announced.difference(&wanted).copied().collect::<Vec<_>>() {
            let out = self.speaker.withdraw(prefix);
            self.carry_out(out);
        }
        for prefix in wanted.difference(&self.announced).copied().collect::<Vec<_>>() {
            let out = self.speaker.originate(prefix);
            self.carry_out(out);
        }
        self.announced = wanted;
        // Configured neighbours (not those of a range) that are not wanted as they are go.
        let stale: Vec<PeerId> = self
            .links
            .iter()
            .filter(|(id, link)| {
                !self.dynamic.contains(id)
                    && !neighbors.iter().any(|n| {
                        n.address == link.address
                            && n.asn == link.asn
                            && n.rr_client == link.rr_client
                            && n.originated_only == link.originated_only
                    })
            })
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(link) = self.links.get(&id) {
                tracing::info!("neighbour {} (AS {}) removed", link.address, link.asn);
            }
            let out = self.speaker.stop(id);
            self.carry_out(out);
            if let Some(link) = self.links.remove(&id) {
                if let Some((_, writer)) = link.conn {
                    drop(writer); // what was queued (the Cease) is written, then the socket shut
                }
            }
            let out = self.speaker.remove_neighbor(id);
            self.carry_out(out);
            self.removed = true;
        }
        for spec in neighbors {
            let known = self.links.iter().any(|(id, l)| l.address == spec.address && !self.dynamic.contains(id));
            if !known {
                // A neighbour that came from a range becomes a configured one.
                if let Some(id) = self.speaker.neighbor_at(spec.address) {
                    self.dynamic.remove(&id);
                    self.links.remove(&id);
                    let out = self.speaker.remove_neighbor(id);
                    self.carry_out(out);
                }
                tracing::info!("neighbour {} (AS {}) added", spec.address, spec.asn);
                self.add(spec);
            }
        }
    }

    /// Neighbours from a range whose session is over (no connection, no session, no paths kept
    /// for a restart) are forgotten: a range that many addresses passed through does not keep
    /// an entry for each.
    fn forget_idle_dynamic(&mut self) {
        let idle: Vec<PeerId> = self
            .dynamic
            .iter()
            .copied()
            .filter(|id| {
                let link = self.links.get(id);
                // (No paths counts stale ones too: those of a restart it is in the middle of.)
                link.is_some_and(|l| l.conn.is_none() && l.pending.is_none())
                    && matches!(self.speaker.state(*id), Some(State::Idle | State::Active) | None)
                    && self.speaker.rib.count(*id) == 0
            })
            .collect();
        for id in idle {
            self.dynamic.remove(&id);
            self.links.remove(&id);
            let out = self.speaker.remove_neighbor(id);
            self.carry_out(out);
        }
    }

    /// Tells the sink the next hops of what is installed (and of leftovers still kept).
    fn sweep(&mut self) {
        if !self.leftovers.is_empty() {
            return;
        }
        self.removed = false;
        let in_use = self.speaker.rib.learned().map(|(_, nh)| nh).collect();
        self.sink.next_hops_in_use(&in_use);
    }

    /// Neighbour `id`'s address, for the log.
    fn address_of(&self, id: PeerId) -> String {
        self.links.get(&id).map_or_else(|| format!("#{id}"), |l| l.address.to_string())
    }

    fn current(&self, id: PeerId, conn: u64) -> bool {
        self.links.get(&id).and_then(|l| l.conn.as_ref()).is_some_and(|(c, _)| *c == conn)
    }

    fn pending_mut(&mut self, id: PeerId, conn: u64) -> Option<&mut Pending> {
        self.links.get_mut(&id).and_then(|l| l.pending.as_mut()).filter(|p| p.conn == conn)
    }

    /// A connection to or from neighbour `id`: the session's, or (a session further along
    /// holds one) the second of a collision, or refused (Established keeps its own).
    fn offer(&mut self, id: PeerId, stream: TcpStream, outgoing: bool) {
        let Some(state) = self.speaker.state(id) else { return };
        let has_conn = self.links.get(&id).is_some_and(|l| l.conn.is_some());
        tracing::debug!(
            "a connection {} {} in {state:?} (one already: {has_conn})",
            if outgoing { "to" } else { "from" },
            self.address_of(id)
        );
        match state {
            State::Connect | State::Active if !has_conn => self.attach(id, stream, outgoing),
            State::OpenSent | State::OpenConfirm | State::Connect | State::Active => {
                let Some(open) = self.speaker.open_bytes(id) else { return };
                let (conn, writer) = self.spawn_connection(id, stream);
                tracing::debug!("connection {conn} held beside the session's with {}", self.address_of(id));
                let _ = writer.send(open);
                if let Some(link) = self.links.get_mut(&id) {
                    // A newer second connection replaces an older one (dropped: closed).
                    link.pending = Some(Pending { conn, writer, outgoing, read: Vec::new() });
                }
            }
            State::Established => {
                let (_, writer) = self.spawn_connection(id, stream);
                let _ = writer.send(cease_collision());
            }
            // Waiting to start again after an error: the neighbour's connection is taken; stopped:
            // refused (dropped, closed).
            State::Idle => {
                if self.speaker.wake(id) {
                    self.attach(id, stream, outgoing);
                }
            }
        }
    }

    /// The collision of neighbour `id` decided once its OPEN on the held connection is read:
    /// the connection opened by the speaker with the higher BGP identifier stays (RFC 4271
    /// §6.8); of two the neighbour opened, the newer. The one given up gets a Cease
    /// (connection collision resolution).
    fn resolve(&mut self, id: PeerId) {
        let Some(link) = self.links.get_mut(&id) else { return };
        let Some(pending) = &link.pending else { return };
        let remote_id = match packet::decode(&pending.read, Codec::default()) {
            Ok(None) => return,
            Ok(Some((Message::Open(open), _))) => open.router_id,
            // Not an OPEN first: that connection is given up.
            _ => {
                link.pending = None;
                return;
            }
        };
        let local_id = self.config.router_id;
        let keep_pending = if link.conn.is_none() {
            true
        } else if remote_id == local_id {
            false
        } else if pending.outgoing == link.outgoing {
            true
        } else {
            pending.outgoing == neighbor::keep_own_connection(local_id, remote_id)
        };
        tracing::debug!(
            "collision with {}: keeping the {} connection (first {:?}, second {})",
            link.address,
            if keep_pending { "second" } else { "first" },
            link.conn.as_ref().map(|(c, _)| *c),
            pending.conn
        );
        if keep_pending {
            if let Some((_, writer)) = link.conn.take() {
                let _ = writer.send(cease_collision());
            }
            self.promote(id);
        } else if let Some(pending) = link.pending.take() {
            let _ = pending.writer.send(cease_collision());
        }
    }

    /// The held connection of neighbour `id` becomes the session's (its OPEN sent already).
    fn promote(&mut self, id: PeerId) {
        let Some(link) = self.links.get_mut(&id) else { return };
        let Some(pending) = link.pending.take() else { return };
        if link.conn.is_some() {
            return;
        }
        link.conn = Some((pending.conn, pending.writer));
        link.outgoing = pending.outgoing;
        let out = self.speaker.switch_connection(id);
        self.carry_out(out);
        if !pending.read.is_empty() && self.current(id, pending.conn) {
            let out = self.speaker.received(id, &pending.read);
            self.carry_out(out);
        }
    }

    /// Takes `stream` as neighbour `id`'s connection.
    fn attach(&mut self, id: PeerId, stream: TcpStream, outgoing: bool) {
        let (conn, writer) = self.spawn_connection(id, stream);
        tracing::debug!("connection {conn} is the session's with {}", self.address_of(id));
        if let Some(link) = self.links.get_mut(&id) {
            link.conn = Some((conn, writer));
            link.outgoing = outgoing;
        }
        let out = self.speaker.connected(id);
        self.carry_out(out);
    }

    /// A reader and a writer task for a connection of neighbour `id`: its number and writer.
    /// The connection lives as long as its writer: when the last sender is dropped, what was
    /// queued is written, the socket shut and the reader stopped (a neighbour that never closes
    /// its end does not keep the socket open).
    fn spawn_connection(&mut self, id: PeerId, stream: TcpStream) -> (u64, Writer) {
        let _ = stream.set_nodelay(true);
        self.next_conn += 1;
        let conn = self.next_conn;
        let (mut reader, mut writer) = stream.into_split();
        let tx = self.tx.clone();
        let reading = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Event::Closed(id, conn));
                        return;
                    }
                    Ok(n) => {
                        if tx.send(Event::Data(id, conn, buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let (wtx, mut wrx) = mpsc::unbounded_channel::<Vec<u8>>();
        let queued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = queued.clone();
        let broken = self.tx.clone();
        tokio::spawn(async move {
            while let Some(bytes) = wrx.recv().await {
                counted.fetch_sub(bytes.len(), std::sync::atomic::Ordering::Relaxed);
                if writer.write_all(&bytes).await.is_err() {
                    // The connection broke under a write (the neighbour reset it): the session
                    // is told here, since the reader is stopped below before it may have said
                    // so — else a session would stay Established on a dead connection until
                    // its hold timer ran out (found in a 50-node mesh: a few in a thousand).
                    let _ = broken.send(Event::Closed(id, conn));
                    break;
                }
            }
            let _ = writer.shutdown().await;
            reading.abort();
        });
        (conn, Writer { tx: wtx, queued })
    }

    fn carry_out(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Session(id, action) => self.session(id, action),
                Output::StaleTimer(id, after) => {
                    let Some(link) = self.links.get_mut(&id) else { continue };
                    link.stale_generation += 1;
                    let (generation, tx) = (link.stale_generation, self.tx.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let _ = tx.send(Event::Stale(id, generation));
                    });
                }
                Output::Route(prefix, Some(next_hop)) => {
                    self.leftovers.remove(&prefix);
                    self.sink.install(prefix, next_hop);
                }
                // (What the RIB holds says what is installed: no second copy of every prefix.)
                Output::Route(prefix, None) => {
                    self.sink.remove(prefix);
                    self.removed = true;
                }
            }
        }
    }

    fn session(&mut self, id: PeerId, action: Action) {
        let Some(link) = self.links.get_mut(&id) else { return };
        match action {
            Action::Connect => {
                let (address, tx) = (SocketAddr::new(link.address, 179), self.tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(address)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Event::Connected(id, stream));
                        }
                        _ => {
                            let _ = tx.send(Event::ConnectFailed(id));
                        }
                    }
                });
            }
            Action::Send(bytes) => {
                // A NOTIFICATION (type 3 after the 16-byte marker and the length) is news.
                if bytes.len() >= 21 && bytes[18] == 3 {
                    tracing::info!("NOTIFICATION {}/{} sent to {}", bytes[19], bytes[20], link.address);
                }
                if let Some((conn, writer)) = &link.conn {
                    if link.dropping == Some(*conn) {
                        return;
                    }
                    if !writer.send(bytes) {
                        // It stopped reading: the connection is dropped as if it had closed (the
                        // session hears of it when the event comes round: the connection stays
                        // the current one until then, so that it counts; nothing more is queued).
                        tracing::warn!(
                            "neighbour {} reads nothing ({} MiB waiting); dropping its connection",
                            link.address,
                            MAX_QUEUED >> 20
                        );
                        let _ = self.tx.send(Event::Closed(id, *conn));
                        link.dropping = Some(*conn);
                    }
                }
            }
            Action::Close => link.conn = None,
            Action::StartTimer(timer, after) => {
                // RFC 4271 §10: jitter (a quarter) on the connect retry, so two speakers that
                // failed together do not keep retrying in step.
                let after = if timer == Timer::ConnectRetry { jitter(after) } else { after };
                let generation = link.generations.entry(timer).or_default();
                *generation += 1;
                let (generation, tx) = (*generation, self.tx.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = tx.send(Event::Timer(id, timer, generation));
                });
            }
            Action::StopTimer(timer) => *link.generations.entry(timer).or_default() += 1,
            Action::Established(n) => {
                link.up_since = Some(Instant::now());
                // A collision with an Established session: the other connection goes.
                if let Some(pending) = link.pending.take() {
                    let _ = pending.writer.send(cease_collision());
                }
                tracing::info!(
                    "neighbour {} (AS {}) established, hold time {} s",
                    link.address,
                    n.peer_as,
                    n.hold_time
                );
            }
            Action::Down { reason, keep_for } => {
                link.up_since = None;
                match keep_for {
                    Some(t) => tracing::warn!(
                        "neighbour {} down ({reason:?}); its routes are kept {} s for its restart",
                        link.address,
                        t.as_secs()
                    ),
                    None => tracing::warn!("neighbour {} down ({reason:?})", link.address),
                }
            }
            Action::Received(_) | Action::RefreshRequested(_) => {}
        }
    }

    fn status(&self) -> String {
        let mut ids: Vec<&PeerId> = self.links.keys().collect();
        ids.sort();
        let neighbors: Vec<serde_json::Value> = ids
            .into_iter()
            .map(|id| {
                let link = &self.links[id];
                json!({
                    "address": link.address.to_string(),
                    "as": link.asn,
                    "state": self.speaker.state(*id).map_or("Idle", State::name),
                    "uptime_seconds": link.up_since.map_or(0, |t| t.elapsed().as_secs()),
                    "prefixes_received": self.speaker.rib.count(*id) + self.speaker.rib.refused(*id),
                    "prefixes_accepted": self.speaker.rib.count(*id),
                    "prefixes_advertised": self.speaker.advertised(*id),
                })
            })
            .collect();
        json!({
            "as": self.config.local_as,
            "router_id": self.config.router_id.to_string(),
            "neighbors": neighbors,
            "routes": self.speaker.rib.best_paths().count(),
            "installed": self.speaker.rib.learned().count(),
            "in_kernel": self.in_kernel,
        })
        .to_string()
    }

    /// Stopping: every session told (Cease), every installed route removed.
    fn shutdown(&mut self) {
        // What is installed, before the sessions end and their paths go.
        let installed: Vec<IpNet> = self.speaker.rib.learned().map(|(p, _)| *p).collect();
        let ids: Vec<PeerId> = self.links.keys().copied().collect();
        for id in ids {
            let out = self.speaker.stop(id);
            for o in out {
                if let Output::Session(id, Action::Send(bytes)) = o {
                    if let Some((_, writer)) = self.links.get(&id).and_then(|l| l.conn.as_ref()) {
                        let _ = writer.send(bytes);
                    }
                }
            }
        }
        for prefix in installed {
            self.sink.remove(prefix);
        }
        self.sink.next_hops_in_use(&Default::default());
        tracing::info!("stopped");
    }
}
