//! One neighbour's session, sans-IO (RFC 4271 §8): the finite state machine takes events — a
//! start or stop, the transport connected or lost, a timer expired, bytes received — and
//! returns actions — connect, send these bytes, close, start or stop a timer, the session is up
//! or down, an UPDATE arrived. The I/O layer carries the actions out and reports what happens.
//! Graceful restart (RFC 4724) is negotiated here; keeping a restarting peer's routes is the
//! RIB's, told by [`Action::Down`].

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::packet::{
    self, error, AsPath, Attribute, Capability, Codec, Family, Message, Notification, Open, RouteRefresh, Update,
};

/// The session's state, with the RFC's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Idle => "Idle",
            State::Connect => "Connect",
            State::Active => "Active",
            State::OpenSent => "OpenSent",
            State::OpenConfirm => "OpenConfirm",
            State::Established => "Established",
        }
    }
}

/// The session's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// Try to connect again (and, in Idle after an error, start again).
    ConnectRetry,
    Hold,
    Keepalive,
}

/// How a neighbour is configured.
#[derive(Debug, Clone)]
pub struct Config {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    /// The AS the neighbour must have (equal to `local_as`: iBGP).
    pub peer_as: u32,
    /// Wait for the neighbour to connect; never connect to it.
    pub passive: bool,
    /// The hold time offered (0: no keepalives; else at least 3 s).
    pub hold_time: u16,
    pub connect_retry: Duration,
    pub families: Vec<Family>,
    /// Offer graceful restart with this restart time; `restarting` when this speaker has just
    /// restarted and kept its forwarding state.
    pub graceful_restart: Option<u16>,
    pub restarting: bool,
    /// Advertise only this speaker's own prefixes to the neighbour (routed mode's external
    /// peers: a top-of-rack router reaches each block through its own node).
    pub originated_only: bool,
}

impl Config {
    pub fn new(local_as: u32, router_id: Ipv4Addr, peer_as: u32) -> Config {
        Config {
            local_as,
            router_id,
            peer_as,
            passive: false,
            hold_time: 90,
            connect_retry: Duration::from_secs(5),
            families: vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST],
            graceful_restart: Some(120),
            restarting: false,
            originated_only: false,
        }
    }

    pub fn ibgp(&self) -> bool {
        self.local_as == self.peer_as
    }

    /// The OPEN this speaker sends.
    pub fn open(&self) -> Open {
        let mut capabilities: Vec<Capability> = self.families.iter().map(|f| Capability::Multiprotocol(*f)).collect();
        capabilities.push(Capability::RouteRefresh);
        if let Some(time) = self.graceful_restart {
            capabilities.push(Capability::GracefulRestart {
                restarting: self.restarting,
                time,
                families: self.families.iter().map(|f| (*f, self.restarting)).collect(),
            });
        }
        capabilities.push(Capability::FourOctetAs(self.local_as));
        Open { asn: self.local_as, hold_time: self.hold_time, router_id: self.router_id, capabilities }
    }
}

/// What both sides agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub peer_as: u32,
    pub peer_id: Ipv4Addr,
    pub hold_time: u16,
    pub families: Vec<Family>,
    pub codec: Codec,
    pub route_refresh: bool,
    /// The neighbour's graceful restart capability: its restart time and whether it says it
    /// restarted, and the families whose forwarding state it kept.
    pub peer_restart: Option<(u16, bool, Vec<Family>)>,
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// This speaker sent this NOTIFICATION.
    Sent(Notification),
    /// The neighbour sent this NOTIFICATION.
    Received(Notification),
    /// The transport closed or failed.
    TransportLost,
    /// Stopped by its operator.
    Stopped,
}

/// What the I/O layer is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Connect,
    Send(Vec<u8>),
    Close,
    StartTimer(Timer, Duration),
    StopTimer(Timer),
    /// The session is up.
    Established(Negotiated),
    /// The session that was up is down. `keep_for`: the neighbour's routes are to be kept, as
    /// stale, this long (graceful restart) rather than withdrawn now.
    Down {
        reason: Reason,
        keep_for: Option<Duration>,
    },
    /// An UPDATE from the neighbour.
    Received(Update),
    /// The neighbour asks for `family` again (route refresh).
    RefreshRequested(Family),
}

/// One neighbour.
pub struct Neighbor {
    pub config: Config,
    state: State,
    /// Bytes received that do not make a whole message yet.
    buffer: Vec<u8>,
    negotiated: Option<Negotiated>,
    /// Stopped by the operator: no automatic restart.
    stopped: bool,
    /// Held off until its connect-retry timer (over its prefix limit).
    held: bool,
}

/// The hold time while waiting for the neighbour's OPEN (RFC 4271 suggests 4 minutes).
const OPEN_HOLD: Duration = Duration::from_secs(240);

impl Neighbor {
    pub fn new(config: Config) -> Neighbor {
        Neighbor { config, state: State::Idle, buffer: Vec::new(), negotiated: None, stopped: true, held: false }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    fn codec(&self) -> Codec {
        self.negotiated.as_ref().map_or_else(Codec::default, |n| n.codec)
    }

    fn send(&self, message: &Message) -> Action {
        Action::Send(packet::to_bytes(message, self.codec()))
    }

    /// Starts the session (automatic restarts follow errors until [`Neighbor::stop`]).
    pub fn start(&mut self) -> Vec<Action> {
        self.stopped = false;
        if self.state != State::Idle {
            return Vec::new();
        }
        self.begin()
    }

    fn begin(&mut self) -> Vec<Action> {
        self.held = false;
        self.buffer.clear();
        if self.config.passive {
            self.state = State::Active;
            return Vec::new();
        }
        self.state = State::Connect;
        vec![Action::Connect, Action::StartTimer(Timer::ConnectRetry, self.config.connect_retry)]
    }

    /// Stops the session: a Cease to the neighbour if it was talking, then Idle for good.
    pub fn stop(&mut self) -> Vec<Action> {
        self.cease(error::CEASE_ADMIN_SHUTDOWN)
    }

    /// Stops the session with a Cease of `subcode` (RFC 4486: 1, maximum number of prefixes
    /// reached; 2, administrative shutdown; ...), then Idle until started again.
    pub fn cease(&mut self, subcode: u8) -> Vec<Action> {
        self.stopped = true;
        match self.state {
            State::Idle => Vec::new(),
            State::Connect | State::Active => {
                self.state = State::Idle;
                vec![Action::Close, Action::StopTimer(Timer::ConnectRetry)]
            }
            _ => self.end(Reason::Sent(Notification::new(error::CEASE, subcode, []))),
        }
    }

    /// The neighbour connected while this session waits in Idle to start again after an error
    /// (not stopped): the session takes that connection instead of refusing it (two speakers
    /// whose retries keep the same rhythm would otherwise refuse each other for ever). Whether
    /// it can now take a connection (see [`Neighbor::connected`]).
    pub fn wake(&mut self) -> bool {
        if self.state == State::Idle && !self.stopped && !self.held {
            self.state = State::Active;
        }
        matches!(self.state, State::Connect | State::Active)
    }

    /// A transport connection to the neighbour is up (ours, or one it made and the I/O layer
    /// handed to this neighbour).
    pub fn connected(&mut self) -> Vec<Action> {
        match self.state {
            State::Connect | State::Active => {
                self.state = State::OpenSent;
                self.buffer.clear();
                vec![
                    Action::StopTimer(Timer::ConnectRetry),
                    self.send(&Message::Open(self.config.open())),
                    Action::StartTimer(Timer::Hold, OPEN_HOLD),
                ]
            }
            // Not expecting one (stopped, or a session already): refused.
            _ => vec![Action::Close],
        }
    }

    /// The OPEN this speaker sends, as bytes (for a second connection the I/O layer holds
    /// while a collision is resolved: RFC 4271 §6.8).
    pub fn open_bytes(&self) -> Vec<u8> {
        packet::to_bytes(&Message::Open(self.config.open()), Codec::default())
    }

    /// Ends the session with a Cease of `subcode` and starts it again after `after` (not
    /// stopped for good: a neighbour over its prefix limit is tried again later).
    pub fn cease_for_a_while(&mut self, subcode: u8, after: Duration) -> Vec<Action> {
        let mut actions = self.cease(subcode);
        self.stopped = false;
        // Not even a connection of the neighbour's own ends the wait ([`Neighbor::wake`]).
        self.held = true;
        actions.retain(|a| !matches!(a, Action::StopTimer(Timer::ConnectRetry)));
        actions.push(Action::StartTimer(Timer::ConnectRetry, after));
        actions
    }

    /// The I/O layer resolved a connection collision (RFC 4271 §6.8) for the other connection,
    /// on which this speaker's OPEN is already sent: the session goes on there from OpenSent
    /// (what was read on the connection given up is dropped). A session already Established
    /// keeps its connection; a stopped one takes none.
    pub fn switch_connection(&mut self) -> Vec<Action> {
        if self.stopped || self.state == State::Established {
            return vec![Action::Close];
        }
        self.state = State::OpenSent;
        self.negotiated = None;
        self.buffer.clear();
        vec![
            Action::StopTimer(Timer::ConnectRetry),
            Action::StopTimer(Timer::Keepalive),
            Action::StartTimer(Timer::Hold, OPEN_HOLD),
        ]
    }

    /// The transport failed or the neighbour closed it.
    pub fn transport_lost(&mut self) -> Vec<Action> {
        match self.state {
            State::Idle => Vec::new(),
            State::Connect | State::Active => {
                self.state = State::Active;
                vec![Action::StartTimer(Timer::ConnectRetry, self.config.connect_retry)]
            }
            _ => self.end(Reason::TransportLost),
        }
    }

    /// A timer expired.
    pub fn timer(&mut self, timer: Timer) -> Vec<Action> {
        match (timer, self.state) {
            (Timer::ConnectRetry, State::Idle) if !self.stopped => self.begin(),
            (Timer::ConnectRetry, State::Connect | State::Active) if !self.config.passive => {
                self.state = State::Connect;
                vec![Action::Close, Action::Connect, Action::StartTimer(Timer::ConnectRetry, self.config.connect_retry)]
            }
            (Timer::Hold, State::OpenSent | State::OpenConfirm | State::Established) => {
                self.end(Reason::Sent(Notification::new(error::HOLD_TIMER_EXPIRED, 0, [])))
            }
            (Timer::Keepalive, State::OpenConfirm | State::Established) => {
                vec![self.send(&Message::Keepalive), Action::StartTimer(Timer::Keepalive, self.keepalive_interval())]
            }
            _ => Vec::new(),
        }
    }

    fn keepalive_interval(&self) -> Duration {
        let hold = self.negotiated.as_ref().map_or(self.config.hold_time, |n| n.hold_time);
        Duration::from_secs(u64::from(hold / 3).max(1))
    }

    /// Bytes from the neighbour.
    pub fn received(&mut self, bytes: &[u8]) -> Vec<Action> {
        self.buffer.extend_from_slice(bytes);
        let mut actions = Vec::new();
        loop {
            if matches!(self.state, State::Idle | State::Connect | State::Active) {
                self.buffer.clear();
                return actions;
            }
            match packet::decode(&self.buffer, self.codec()) {
                Ok(None) => return actions,
                Ok(Some((message, used))) => {
                    self.buffer.drain(..used);
                    actions.extend(self.message(message));
                }
                Err(notification) => {
                    actions.extend(self.end(Reason::Sent(notification)));
                    return actions;
                }
            }
        }
    }

    /// The session ends: a NOTIFICATION sent if that is the reason, the transport closed,
    /// timers stopped, and Idle — restarted after the connect-retry time unless stopped.
    fn end(&mut self, reason: Reason) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Reason::Sent(n) = &reason {
            actions.push(self.send(&Message::Notification(n.clone())));
        }
        actions.extend([Action::Close, Action::StopTimer(Timer::Hold), Action::StopTimer(Timer::Keepalive)]);
        if self.state == State::Established {
            // RFC 4724: a neighbour that can restart gracefully keeps its routes in our RIB
            // for its restart time when the session ends without a NOTIFICATION from it or us
            // (its transport went, its hold timer ran out).
            let graceful = matches!(reason, Reason::TransportLost)
                || matches!(&reason, Reason::Sent(n) if n.code == error::HOLD_TIMER_EXPIRED);
            let keep_for = self
                .negotiated
                .as_ref()
                .and_then(|n| n.peer_restart.as_ref())
                .filter(|_| graceful && self.config.graceful_restart.is_some())
                .map(|(time, _, _)| Duration::from_secs(u64::from(*time)));
            actions.push(Action::Down { reason, keep_for });
        }
        self.state = State::Idle;
        self.negotiated = None;
        self.buffer.clear();
        if self.stopped {
            actions.push(Action::StopTimer(Timer::ConnectRetry));
        } else if self.config.passive {
            // A passive neighbour waits for the next connection at once.
            self.state = State::Active;
        } else {
            actions.push(Action::StartTimer(Timer::ConnectRetry, self.config.connect_retry));
        }
        actions
    }

    fn message(&mut self, message: Message) -> Vec<Action> {
        let fsm_error = |state: State| {
            let subcode = match state {
                State::OpenSent => 1,
                State::OpenConfirm => 2,
                _ => 3,
            };
            Reason::Sent(Notification::new(error::FSM, subcode, []))
        };
        match (self.state, message) {
            (_, Message::Notification(n)) => self.end(Reason::Received(n)),
            (State::OpenSent, Message::Open(open)) => match self.check_open(&open) {
                Err(n) => self.end(Reason::Sent(n)),
                Ok(negotiated) => {
                    let hold = negotiated.hold_time;
                    self.negotiated = Some(negotiated);
                    self.state = State::OpenConfirm;
                    let mut actions = vec![self.send(&Message::Keepalive)];
                    if hold == 0 {
                        actions.push(Action::StopTimer(Timer::Hold));
                    } else {
                        actions.push(Action::StartTimer(Timer::Hold, Duration::from_secs(u64::from(hold))));
                        actions.push(Action::StartTimer(Timer::Keepalive, self.keepalive_interval()));
                    }
                    actions
                }
            },
            (State::OpenConfirm, Message::Keepalive) => {
                self.state = State::Established;
                // Restarting is over once a session is up again: later OPENs say so no more.
                self.config.restarting = false;
                let mut actions = self.hold_again();
                actions.extend(self.negotiated.clone().map(Action::Established));
                actions
            }
            (State::Established, Message::Keepalive) => self.hold_again(),
            (State::Established, Message::Update(mut update)) => {
                let mut actions = self.hold_again();
                as4_received(&mut update, self.codec().four_octet_as);
                actions.push(Action::Received(update));
                actions
            }
            (State::Established, Message::RouteRefresh(RouteRefresh { family })) => {
                let mut actions = self.hold_again();
                if self.negotiated.as_ref().is_some_and(|n| n.families.contains(&family)) {
                    actions.push(Action::RefreshRequested(family));
                }
                actions
            }
            (state, _) => self.end(fsm_error(state)),
        }
    }

    /// The hold timer starts again (a message arrived).
    fn hold_again(&self) -> Vec<Action> {
        match self.negotiated.as_ref().map(|n| n.hold_time) {
            Some(0) | None => Vec::new(),
            Some(hold) => vec![Action::StartTimer(Timer::Hold, Duration::from_secs(u64::from(hold)))],
        }
    }

    /// The neighbour's OPEN, checked against the configuration (RFC 4271 §6.2).
    fn check_open(&self, open: &Open) -> Result<Negotiated, Notification> {
        if open.asn != self.config.peer_as {
            let as2 = u16::try_from(open.asn).unwrap_or(packet::AS_TRANS);
            return Err(Notification::new(error::OPEN, error::OPEN_BAD_PEER_AS, as2.to_be_bytes()));
        }
        if open.router_id == self.config.router_id {
            return Err(Notification::new(error::OPEN, error::OPEN_BAD_IDENTIFIER, []));
        }
        let hold_time = open.hold_time.min(self.config.hold_time);
        let families: Vec<Family> = self.config.families.iter().copied().filter(|f| open.offers(*f)).collect();
        let peer_restart = open.graceful_restart().and_then(|c| match c {
            Capability::GracefulRestart { restarting, time, families } => {
                Some((*time, *restarting, families.iter().filter(|(_, kept)| *kept).map(|(f, _)| *f).collect()))
            }
            _ => None,
        });
        Ok(Negotiated {
            peer_as: open.asn,
            peer_id: open.router_id,
            hold_time,
            families,
            codec: Codec { four_octet_as: open.four_octet_as() },
            route_refresh: open.route_refresh(),
            peer_restart,
        })
    }

    /// Sends an UPDATE (only in Established; otherwise nothing).
    pub fn send_update(&mut self, update: &Update) -> Vec<Action> {
        if self.state != State::Established {
            return Vec::new();
        }
        let mut update = update.clone();
        as4_to_send(&mut update, self.codec().four_octet_as);
        vec![self.send(&Message::Update(update))]
    }

    /// Asks the neighbour to send `family` again (when it can).
    pub fn refresh(&mut self, family: Family) -> Vec<Action> {
        match &self.negotiated {
            Some(n) if self.state == State::Established && n.route_refresh => {
                vec![self.send(&Message::RouteRefresh(RouteRefresh { family }))]
            }
            _ => Vec::new(),
        }
    }
}

/// RFC 6793 §4.2.3, receiving from a neighbour without 4-octet AS numbers: AS_PATH has
/// AS_TRANS where a number did not fit, AS4_PATH the real numbers of its trailing part; the
/// path is both put together (AS4_PATH ignored when it is the longer). From a neighbour with
/// them, AS4_PATH and AS4_AGGREGATOR mean nothing and are dropped.
fn as4_received(update: &mut Update, four_octet_as: bool) {
    let as4 = update.attributes.iter().find_map(|a| match a {
        Attribute::As4Path(p) => Some(p.clone()),
        _ => None,
    });
    update.attributes.retain(|a| !matches!(a, Attribute::As4Path(_) | Attribute::As4Aggregator { .. }));
    let (Some(as4), false) = (as4, four_octet_as) else { return };
    let count = |p: &AsPath| {
        p.segments.iter().map(|s| if s.kind == crate::packet::AS_SET { 1 } else { s.asns.len() }).sum::<usize>()
    };
    let Some(Attribute::AsPath(path)) = update.attributes.iter_mut().find(|a| matches!(a, Attribute::AsPath(_))) else {
        return;
    };
    let (have, real) = (count(path), count(&as4));
    if real > have {
        return;
    }
    // The leading (have - real) numbers of AS_PATH, then AS4_PATH.
    let mut keep = have - real;
    let mut merged = AsPath::default();
    for s in &path.segments {
        if keep == 0 {
            break;
        }
        if s.kind == crate::packet::AS_SET {
            merged.segments.push(s.clone());
            keep -= 1;
        } else {
            let take = keep.min(s.asns.len());
            merged.segments.push(crate::packet::Segment { kind: s.kind, asns: s.asns[..take].to_vec() });
            keep -= take;
        }
    }
    for segment in as4.segments {
        match merged.segments.last_mut() {
            // Two sequences side by side are one.
            Some(last) if last.kind == crate::packet::AS_SEQUENCE && segment.kind == crate::packet::AS_SEQUENCE => {
                last.asns.extend(segment.asns)
            }
            _ => merged.segments.push(segment),
        }
    }
    *path = merged;
}

/// RFC 6793 §4.2.2, sending to a neighbour without 4-octet AS numbers: the encoder puts
/// AS_TRANS for numbers that do not fit in two octets; the real path goes in AS4_PATH beside it.
fn as4_to_send(update: &mut Update, four_octet_as: bool) {
    if four_octet_as {
        return;
    }
    let path = update.attributes.iter().find_map(|a| match a {
        Attribute::AsPath(p) if p.segments.iter().any(|s| s.asns.iter().any(|asn| *asn > 0xffff)) => Some(p.clone()),
        _ => None,
    });
    if let Some(path) = path {
        update.attributes.push(Attribute::As4Path(path));
    }
}

/// RFC 4271 §6.8: of two connections between the same speakers, the one opened by the speaker
/// with the higher BGP identifier stays. Whether the connection this speaker opened stays.
pub fn keep_own_connection(local_id: Ipv4Addr, remote_id: Ipv4Addr) -> bool {
    u32::from(local_id) > u32::from(remote_id)
}

#[cfg(test)]
mod tests;
