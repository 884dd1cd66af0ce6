//! The session FSM replayed against event sequences: each step's actions, as the I/O layer
//! would carry them out. No sockets, no clocks.

use std::net::Ipv4Addr;
use std::time::Duration;

use super::*;
use crate::packet::{to_bytes, AsPath, Attribute, Origin};

const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

fn config(peer_as: u32) -> Config {
    Config::new(64512, LOCAL, peer_as)
}

/// The neighbour's OPEN: AS 64513, hold 60 s, graceful restart 90 s.
fn peer_open(asn: u32, hold: u16, restart: Option<u16>) -> Vec<u8> {
    let mut c = Config::new(asn, REMOTE, 64512);
    c.hold_time = hold;
    c.graceful_restart = restart;
    to_bytes(&Message::Open(c.open()), Codec::default())
}

fn keepalive() -> Vec<u8> {
    to_bytes(&Message::Keepalive, Codec::default())
}

fn sends(actions: &[Action]) -> Vec<Message> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(bytes) => Some(packet::decode(bytes, Codec::default()).unwrap().unwrap().0),
            _ => None,
        })
        .collect()
}

/// A neighbour brought to Established with a peer in AS 64513.
fn established() -> Neighbor {
    let mut n = Neighbor::new(config(64513));
    n.start();
    n.connected();
    n.received(&peer_open(64513, 60, Some(90)));
    n.received(&keepalive());
    assert_eq!(n.state(), State::Established);
    n
}

#[test]
fn an_active_open_reaches_established() {
    let mut n = Neighbor::new(config(64513));
    assert_eq!(n.start(), vec![Action::Connect, Action::StartTimer(Timer::ConnectRetry, Duration::from_secs(5))]);
    assert_eq!(n.state(), State::Connect);
    let a = n.connected();
    assert_eq!(a[0], Action::StopTimer(Timer::ConnectRetry));
    assert_eq!(sends(&a), vec![Message::Open(n.config.open())]);
    assert_eq!(a[2], Action::StartTimer(Timer::Hold, Duration::from_secs(240)));
    assert_eq!(n.state(), State::OpenSent);
    // The neighbour's OPEN, one byte at a time: nothing until it is whole.
    let open = peer_open(64513, 60, Some(90));
    for b in &open[..open.len() - 1] {
        assert!(n.received(std::slice::from_ref(b)).is_empty());
    }
    let a = n.received(&open[open.len() - 1..]);
    assert_eq!(sends(&a), vec![Message::Keepalive]);
    assert!(a.contains(&Action::StartTimer(Timer::Hold, Duration::from_secs(60))), "the lower hold time: {a:?}");
    assert!(a.contains(&Action::StartTimer(Timer::Keepalive, Duration::from_secs(20))));
    assert_eq!(n.state(), State::OpenConfirm);
    let a = n.received(&keepalive());
    assert_eq!(n.state(), State::Established);
    let Some(Action::Established(negotiated)) = a.last() else { panic!("{a:?}") };
    assert_eq!(negotiated.peer_as, 64513);
    assert_eq!(negotiated.peer_id, REMOTE);
    assert_eq!(negotiated.hold_time, 60);
    assert_eq!(negotiated.families, vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST]);
    assert!(negotiated.codec.four_octet_as && negotiated.route_refresh);
    assert_eq!(negotiated.peer_restart, Some((90, false, vec![])));
    // Keepalives go out on their timer.
    let a = n.timer(Timer::Keepalive);
    assert_eq!(sends(&a), vec![Message::Keepalive]);
    assert_eq!(a[1], Action::StartTimer(Timer::Keepalive, Duration::from_secs(20)));
}

#[test]
fn a_passive_neighbor_waits_and_never_connects() {
    let mut c = config(64512);
    c.passive = true;
    let mut n = Neighbor::new(c);
    assert!(n.start().is_empty());
    assert_eq!(n.state(), State::Active);
    assert!(n.timer(Timer::ConnectRetry).is_empty(), "a passive neighbour never connects");
    let a = n.connected();
    assert_eq!(sends(&a).len(), 1);
    n.received(&peer_open(64512, 90, None));
    n.received(&keepalive());
    assert_eq!(n.state(), State::Established);
}

#[test]
fn a_failed_connect_is_retried_on_its_timer() {
    let mut n = Neighbor::new(config(64513));
    n.start();
    assert_eq!(n.transport_lost(), vec![Action::StartTimer(Timer::ConnectRetry, Duration::from_secs(5))]);
    assert_eq!(n.state(), State::Active);
    let a = n.timer(Timer::ConnectRetry);
    assert!(a.contains(&Action::Connect));
    assert_eq!(n.state(), State::Connect);
}

#[test]
fn a_bad_open_is_refused_with_the_right_notification_and_retried() {
    let mut n = Neighbor::new(config(64513));
    n.start();
    n.connected();
    let a = n.received(&peer_open(64999, 90, None));
    let sent = sends(&a);
    assert_eq!(sent.len(), 1);
    let Message::Notification(e) = &sent[0] else { panic!() };
    assert_eq!((e.code, e.subcode, e.data.clone()), (2, 2, 64999u16.to_be_bytes().to_vec()), "bad peer AS");
    assert!(a.contains(&Action::Close));
    assert!(!a.iter().any(|x| matches!(x, Action::Down { .. })), "it never was up");
    assert_eq!(n.state(), State::Idle);
    assert_eq!(a.last(), Some(&Action::StartTimer(Timer::ConnectRetry, Duration::from_secs(5))));
    assert!(n.timer(Timer::ConnectRetry).contains(&Action::Connect), "started again");
    // Our own router id: refused too.
    let mut n = Neighbor::new(config(64513));
    n.start();
    n.connected();
    let mut c = Config::new(64513, LOCAL, 64512);
    c.graceful_restart = None;
    let a = n.received(&to_bytes(&Message::Open(c.open()), Codec::default()));
    let Message::Notification(e) = &sends(&a)[0] else { panic!() };
    assert_eq!((e.code, e.subcode), (2, 3));
}

#[test]
fn a_message_out_of_turn_is_an_fsm_error() {
    let mut n = Neighbor::new(config(64513));
    n.start();
    n.connected();
    let a = n.received(&keepalive());
    let Message::Notification(e) = &sends(&a)[0] else { panic!() };
    assert_eq!((e.code, e.subcode), (5, 1), "a KEEPALIVE in OpenSent");
    assert_eq!(n.state(), State::Idle);
}

#[test]
fn updates_and_route_refresh_flow_in_established_and_restart_the_hold_timer() {
    let mut n = established();
    let update = Update::announce(
        &["198.19.2.0/24".parse().unwrap()],
        vec![Attribute::Origin(Origin::Igp), Attribute::AsPath(AsPath::sequence(&[64513])), Attribute::NextHop(REMOTE)],
        None,
    );
    let a = n.received(&to_bytes(&Message::Update(update.clone()), Codec::default()));
    assert_eq!(a, vec![Action::StartTimer(Timer::Hold, Duration::from_secs(60)), Action::Received(update.clone())]);
    let refresh = to_bytes(&Message::RouteRefresh(RouteRefresh { family: Family::IPV6_UNICAST }), Codec::default());
    assert_eq!(n.received(&refresh).last(), Some(&Action::RefreshRequested(Family::IPV6_UNICAST)));
    assert_eq!(sends(&n.send_update(&update)), vec![Message::Update(update)]);
    assert_eq!(sends(&n.refresh(Family::IPV4_UNICAST)).len(), 1);
}

#[test]
fn a_malformed_update_ends_the_session_with_its_notification() {
    let mut n = established();
    // An unrecognized well-known attribute.
    let mut body = vec![0, 0, 0, 4, 0x40, 0x63, 1, 0];
    let mut bytes = packet::MARKER.to_vec();
    bytes.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
    bytes.push(2);
    bytes.append(&mut body);
    let a = n.received(&bytes);
    let Message::Notification(e) = &sends(&a)[0] else { panic!() };
    assert_eq!((e.code, e.subcode), (3, 2));
    let Some(Action::Down { reason, keep_for }) = a.iter().find(|x| matches!(x, Action::Down { .. })) else { panic!() };
    assert!(matches!(reason, Reason::Sent(n) if n.code == 3));
    assert_eq!(*keep_for, None, "an error is no graceful restart");
}

/// RFC 4724: a neighbour that can restart gracefully keeps its routes for its restart time
/// when its transport goes or its hold timer runs out; not when a NOTIFICATION ended it.
#[test]
fn graceful_restart_keeps_routes_only_when_the_neighbour_just_went_away() {
    let mut n = established();
    let a = n.transport_lost();
    assert!(a.contains(&Action::Down { reason: Reason::TransportLost, keep_for: Some(Duration::from_secs(90)) }));
    assert_eq!(n.state(), State::Idle);
    assert!(n.timer(Timer::ConnectRetry).contains(&Action::Connect), "and it comes back");

    let mut n = established();
    let a = n.timer(Timer::Hold);
    let Message::Notification(e) = &sends(&a)[0] else { panic!() };
    assert_eq!(e.code, 4);
    assert!(a.iter().any(|x| matches!(x, Action::Down { keep_for: Some(_), .. })));

    let mut n = established();
    let cease = to_bytes(&Message::Notification(Notification::new(6, 4, [])), Codec::default());
    let a = n.received(&cease);
    assert!(a.contains(&Action::Down { reason: Reason::Received(Notification::new(6, 4, [])), keep_for: None }));
    assert!(sends(&a).is_empty(), "no NOTIFICATION answers a NOTIFICATION");

    // A neighbour without the capability: withdrawn at once.
    let mut n = Neighbor::new(config(64513));
    n.start();
    n.connected();
    n.received(&peer_open(64513, 60, None));
    n.received(&keepalive());
    assert!(n.transport_lost().contains(&Action::Down { reason: Reason::TransportLost, keep_for: None }));
}

#[test]
fn a_stopped_session_says_cease_and_stays_down() {
    let mut n = established();
    let a = n.stop();
    let Message::Notification(e) = &sends(&a)[0] else { panic!() };
    assert_eq!((e.code, e.subcode), (6, 2));
    assert_eq!(a.last(), Some(&Action::StopTimer(Timer::ConnectRetry)));
    assert!(n.timer(Timer::ConnectRetry).is_empty());
    assert_eq!(n.state(), State::Idle);
    assert_eq!(n.connected(), vec![Action::Close], "a connection to a stopped neighbour is refused");
}

#[test]
fn a_zero_hold_time_means_no_keepalives() {
    let mut n = Neighbor::new(config(64513));
    n.start();
    n.connected();
    let a = n.received(&peer_open(64513, 0, None));
    assert!(a.contains(&Action::StopTimer(Timer::Hold)));
    assert!(!a.iter().any(|x| matches!(x, Action::StartTimer(Timer::Keepalive, _))));
    n.received(&keepalive());
    assert_eq!(n.negotiated().unwrap().hold_time, 0);
}

#[test]
fn collisions_keep_the_connection_of_the_higher_identifier() {
    assert!(keep_own_connection(REMOTE, LOCAL));
    assert!(!keep_own_connection(LOCAL, REMOTE));
}

#[test]
fn a_session_switches_to_the_connection_a_collision_kept() {
    // OpenConfirm on the first connection; the collision keeps the second, where this
    // speaker's OPEN went already: OpenSent there, nothing sent again, the OPEN hold time.
    let mut n = Neighbor::new(config(64513));
    n.start();
    n.connected();
    n.received(&peer_open(64513, 60, None));
    assert_eq!(n.state(), State::OpenConfirm);
    assert_eq!(packet::decode(&n.open_bytes(), Codec::default()).unwrap().unwrap().0, Message::Open(n.config.open()));
    let a = n.switch_connection();
    assert!(sends(&a).is_empty(), "{a:?}");
    assert!(a.contains(&Action::StopTimer(Timer::Keepalive)));
    assert!(a.contains(&Action::StartTimer(Timer::Hold, Duration::from_secs(240))));
    assert_eq!(n.state(), State::OpenSent);
    assert!(n.negotiated().is_none());
    // The neighbour's OPEN and KEEPALIVE on the kept connection: Established.
    let a = n.received(&peer_open(64513, 60, None));
    assert_eq!(sends(&a), vec![Message::Keepalive]);
    n.received(&keepalive());
    assert_eq!(n.state(), State::Established);
    // Established keeps its connection; a stopped session takes none.
    assert_eq!(n.switch_connection(), vec![Action::Close]);
    assert_eq!(n.state(), State::Established);
    n.stop();
    assert_eq!(n.switch_connection(), vec![Action::Close]);
    // After a lost transport (Idle, waiting to connect again) a held connection is taken.
    let mut n = Neighbor::new(config(64513));
    n.start();
    n.connected();
    n.transport_lost();
    let a = n.switch_connection();
    assert!(a.contains(&Action::StopTimer(Timer::ConnectRetry)), "{a:?}");
    assert_eq!(n.state(), State::OpenSent);
}

/// RFC 6793 with a neighbour that has no 4-octet AS numbers: AS4_PATH goes beside an AS_PATH
/// that needed AS_TRANS, and what arrives is put back together; from a 4-octet neighbour an
/// AS4_PATH is dropped.
#[test]
fn as4_path_for_neighbours_with_two_octet_as_numbers() {
    use crate::packet::{AsPath, Attribute};
    let path = |asns: &[u32]| Attribute::AsPath(AsPath::sequence(asns));
    let as4 = |asns: &[u32]| Attribute::As4Path(AsPath::sequence(asns));
    let mut out = Update { attributes: vec![path(&[4_200_000_000, 65010])], ..Update::default() };
    super::as4_to_send(&mut out, false);
    assert_eq!(out.attributes, vec![path(&[4_200_000_000, 65010]), as4(&[4_200_000_000, 65010])]);
    let mut small = Update { attributes: vec![path(&[65001, 65010])], ..Update::default() };
    super::as4_to_send(&mut small, false);
    assert_eq!(small.attributes.len(), 1, "nothing to add when every number fits");
    let mut four = Update { attributes: vec![path(&[4_200_000_000])], ..Update::default() };
    super::as4_to_send(&mut four, true);
    assert_eq!(four.attributes.len(), 1);

    let received = |attrs: Vec<Attribute>, four_octet: bool| {
        let mut u = Update { attributes: attrs, ..Update::default() };
        super::as4_received(&mut u, four_octet);
        u.attributes
    };
    assert_eq!(
        received(vec![path(&[23456, 65010]), as4(&[4_200_000_000, 65010])], false),
        vec![path(&[4_200_000_000, 65010])]
    );
    assert_eq!(
        received(vec![path(&[65001, 23456, 65010]), as4(&[4_200_000_000, 65010])], false),
        vec![path(&[65001, 4_200_000_000, 65010])],
        "the leading numbers AS4_PATH lacks come from AS_PATH"
    );
    assert_eq!(
        received(vec![path(&[23456]), as4(&[1, 2])], false),
        vec![path(&[23456])],
        "a longer AS4_PATH is ignored"
    );
    assert_eq!(
        received(vec![path(&[65001]), as4(&[7])], true),
        vec![path(&[65001])],
        "from a 4-octet neighbour: dropped"
    );
}

/// Two speakers whose sessions failed together retry in step: each one's connection reaches
/// the other while it waits in Idle. A session waiting to start again takes the connection (a
/// stopped one still refuses it); found in a lab whose three nodes never met.
#[test]
fn an_idle_session_waiting_to_restart_takes_an_incoming_connection() {
    let mut n = Neighbor::new(config(64512));
    n.start();
    n.connected();
    n.transport_lost();
    assert_eq!(n.state(), State::Idle);
    assert!(n.wake(), "waiting to restart: the neighbour's connection is taken");
    let actions = n.connected();
    assert_eq!(n.state(), State::OpenSent);
    assert!(matches!(sends(&actions)[..], [Message::Open(_)]));
    let mut stopped = Neighbor::new(config(64512));
    stopped.start();
    stopped.stop();
    assert!(!stopped.wake(), "stopped: refused");
    assert_eq!(stopped.state(), State::Idle);
}

/// Over its prefix limit, a neighbour is held off for a while: its own new connection does not
/// end the wait (a peer that reconnected at once flooded again and again).
#[test]
fn a_neighbour_held_off_for_its_prefix_limit_stays_held() {
    let mut n = established();
    n.cease_for_a_while(error::CEASE_MAX_PREFIXES, Duration::from_secs(60));
    assert_eq!(n.state(), State::Idle);
    assert!(!n.wake(), "held off: its connection is refused");
    // The wait over, it is started again (and takes connections).
    n.timer(Timer::ConnectRetry);
    assert_eq!(n.state(), State::Connect);
}
