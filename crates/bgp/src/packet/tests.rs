//! Byte vectors for every message and attribute weft uses, the errors the RFCs name, and a
//! property test: arbitrary and damaged bytes never panic, and what is encoded decodes back.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net};

use super::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// A message of type `kind` with `body` (the header made here).
fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = MARKER.to_vec();
    out.extend_from_slice(&((HEADER_LEN + body.len()) as u16).to_be_bytes());
    out.push(kind);
    out.extend_from_slice(body);
    out
}

fn one(bytes: &[u8]) -> Result<Message, Notification> {
    let (m, used) = decode(bytes, Codec::default())?.expect("a whole message");
    assert_eq!(used, bytes.len());
    Ok(m)
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn keepalive() {
    let bytes = to_bytes(&Message::Keepalive, Codec::default());
    assert_eq!(bytes, hex("ffffffffffffffffffffffffffffffff 0013 04"));
    assert_eq!(one(&bytes).unwrap(), Message::Keepalive);
}

#[test]
fn open_with_capabilities() {
    let open = Open {
        asn: 4_200_000_000,
        hold_time: 90,
        router_id: Ipv4Addr::new(198, 18, 0, 1),
        capabilities: vec![
            Capability::Multiprotocol(Family::IPV4_UNICAST),
            Capability::Multiprotocol(Family::IPV6_UNICAST),
            Capability::RouteRefresh,
            Capability::GracefulRestart { restarting: true, time: 120, families: vec![(Family::IPV4_UNICAST, true)] },
            Capability::FourOctetAs(4_200_000_000),
        ],
    };
    let bytes = to_bytes(&Message::Open(open.clone()), Codec::default());
    let body = hex("04 5ba0 005a c6120001 1e 02 1c
         01 04 0001 00 01  01 04 0002 00 01  02 00  40 06 8078 0001 01 80  41 04 fa56ea00");
    assert_eq!(bytes, message(1, &body));
    assert_eq!(one(&bytes).unwrap(), Message::Open(open.clone()));
    assert!(open.four_octet_as() && open.route_refresh() && open.offers(Family::IPV6_UNICAST));
    // Without a multiprotocol capability a speaker offers IPv4 unicast only; unknown
    // capabilities are kept.
    let plain = hex("04 fc00 00b4 c6120002 06 02 04 ee 02 abcd");
    let Message::Open(o) = one(&message(1, &plain)).unwrap() else { panic!() };
    assert_eq!((o.asn, o.hold_time), (64512, 180));
    assert!(o.offers(Family::IPV4_UNICAST) && !o.offers(Family::IPV6_UNICAST) && !o.four_octet_as());
    assert_eq!(o.capabilities, vec![Capability::Unknown { code: 0xee, value: vec![0xab, 0xcd] }]);
}

#[test]
fn open_errors() {
    let err = |body: &str| one(&message(1, &hex(body))).unwrap_err();
    let e = err("03 fc00 005a c6120001 00");
    assert_eq!((e.code, e.subcode, e.data.as_slice()), (2, 1, &[0u8, 4][..]), "version");
    assert_eq!(err("04 fc00 0002 c6120001 00").subcode, 6, "hold time 2");
    assert_eq!(err("04 fc00 005a 00000000 00").subcode, 3, "router id 0.0.0.0");
    assert_eq!(err("04 fc00 005a c6120001 03 01 01 00").subcode, 4, "an optional parameter other than capabilities");
    assert_eq!(err("04 fc00 005a c6120001 08 02 06 41 04 0000fc01").subcode, 2, "2-octet AS and capability differ");
    assert_eq!(err("04 0000 005a c6120001 00").subcode, 2, "AS 0");
    let e = err("04 fc00 005a c6120001 05 02 03 41 01 00");
    assert_eq!((e.code, e.subcode), (2, 7), "a 4-octet AS capability of one byte");
    assert_eq!(err("04 fc00 005a c6120001 05 02 06").code, 1, "parameters running past the message");
}

/// flannel's and Calico's daily bread: an IPv4 UPDATE with ORIGIN, AS_PATH, NEXT_HOP, MED,
/// LOCAL_PREF, COMMUNITIES and the route reflection attributes.
#[test]
fn update_ipv4() {
    let update = Update {
        withdrawn: vec!["10.0.0.0/8".parse().unwrap()],
        attributes: vec![
            Attribute::Origin(Origin::Igp),
            Attribute::AsPath(AsPath::sequence(&[64512, 4_200_000_000])),
            Attribute::NextHop(Ipv4Addr::new(198, 18, 0, 1)),
            Attribute::Med(0),
            Attribute::LocalPref(100),
            Attribute::Communities(vec![0xfc00_0001]),
            Attribute::OriginatorId(Ipv4Addr::new(198, 18, 0, 9)),
            Attribute::ClusterList(vec![Ipv4Addr::new(198, 18, 0, 1)]),
        ],
        nlri: vec!["198.19.1.0/24".parse().unwrap(), "198.19.2.128/25".parse().unwrap()],
        treat_as_withdraw: false,
    };
    let bytes = to_bytes(&Message::Update(update.clone()), Codec::default());
    let body = hex("0002 08 0a
         003b
         40 01 01 00
         40 02 0a 02 02 0000fc00 fa56ea00
         40 03 04 c6120001
         80 04 04 00000000
         40 05 04 00000064
         c0 08 04 fc000001
         80 09 04 c6120009
         80 0a 04 c6120001
         18 c61301  19 c6130280");
    assert_eq!(bytes, message(2, &body));
    let Message::Update(back) = one(&bytes).unwrap() else { panic!() };
    assert_eq!(back, update);
    assert_eq!(back.announcements(), vec![net("198.19.1.0/24"), net("198.19.2.128/25")]);
    assert_eq!(back.withdrawals(), vec![net("10.0.0.0/8")]);
    // The same with 2-octet AS numbers (a speaker without the capability).
    let two = Codec { four_octet_as: false };
    let u = Update { attributes: vec![Attribute::AsPath(AsPath::sequence(&[64512, 65001]))], ..Update::default() };
    let bytes = to_bytes(&Message::Update(u.clone()), two);
    assert_eq!(bytes, message(2, &hex("0000 0009 40 02 06 02 02 fc00 fde9")));
    assert_eq!(decode(&bytes, two).unwrap().unwrap().0, Message::Update(u));
}

#[test]
fn update_ipv6_multiprotocol() {
    let nh: Ipv6Addr = "fd00::1".parse().unwrap();
    let ll: Ipv6Addr = "fe80::1".parse().unwrap();
    let mut update = Update::announce(
        &[net("fd00:19:1::/64"), net("198.19.3.0/24")],
        vec![
            Attribute::Origin(Origin::Igp),
            Attribute::AsPath(AsPath::default()),
            Attribute::NextHop(Ipv4Addr::new(198, 18, 0, 1)),
        ],
        Some(nh),
    );
    let Some(Attribute::MpReach { next_hop, .. }) = update.attributes.last_mut() else { panic!() };
    next_hop.push(IpAddr::V6(ll));
    let bytes = to_bytes(&Message::Update(update.clone()), Codec::default());
    let Message::Update(back) = one(&bytes).unwrap() else { panic!() };
    assert_eq!(back, update);
    assert_eq!(back.announcements(), vec![net("198.19.3.0/24"), net("fd00:19:1::/64")]);
    let mp = hex(
        "80 0e 2e 0002 01 20 fd000000000000000000000000000001 fe800000000000000000000000000001 00 40 fd000019 00010000",
    );
    assert!(bytes.windows(mp.len()).any(|w| w == mp), "{bytes:02x?}");
    let withdraw = Update::withdraw(&[net("fd00:19:1::/64"), net("198.19.3.0/24")]);
    let bytes = to_bytes(&Message::Update(withdraw.clone()), Codec::default());
    assert_eq!(bytes, message(2, &hex("0004 18 c61303 000f 80 0f 0c 0002 01 40 fd000019 00010000")));
    let Message::Update(back) = one(&bytes).unwrap() else { panic!() };
    assert_eq!(back.withdrawals(), vec![net("198.19.3.0/24"), net("fd00:19:1::/64")]);
}

#[test]
fn notification_and_route_refresh() {
    let n = Notification::new(6, 2, b"bye".to_vec());
    let bytes = to_bytes(&Message::Notification(n.clone()), Codec::default());
    assert_eq!(bytes, message(3, &hex("06 02 627965")));
    assert_eq!(one(&bytes).unwrap(), Message::Notification(n.clone()));
    assert_eq!(n.to_string(), "cease: administrative shutdown (6/2)");
    let rr = Message::RouteRefresh(RouteRefresh { family: Family::IPV6_UNICAST });
    let bytes = to_bytes(&rr, Codec::default());
    assert_eq!(bytes, message(5, &hex("0002 00 01")));
    assert_eq!(one(&bytes).unwrap(), rr);
    let e = one(&message(5, &hex("0002 00 01 00"))).unwrap_err();
    assert_eq!((e.code, e.subcode), (7, 1));
}

#[test]
fn header_errors_and_partial_input() {
    let ka = to_bytes(&Message::Keepalive, Codec::default());
    assert_eq!(decode(&ka[..18], Codec::default()).unwrap(), None, "not a whole header yet");
    let open = to_bytes(
        &Message::Open(Open { asn: 64512, hold_time: 90, router_id: Ipv4Addr::new(1, 2, 3, 4), capabilities: vec![] }),
        Codec::default(),
    );
    assert_eq!(decode(&open[..25], Codec::default()).unwrap(), None, "not a whole message yet");
    // Two messages in one read: the first, and how much of the buffer it took.
    let mut two = ka.clone();
    two.extend_from_slice(&open);
    assert_eq!(decode(&two, Codec::default()).unwrap(), Some((Message::Keepalive, 19)));
    let mut bad = ka.clone();
    bad[3] = 0;
    assert_eq!(decode(&bad, Codec::default()).unwrap_err(), Notification::new(1, 1, vec![]));
    for len in [18u16, 4097] {
        let mut bad = ka.clone();
        bad[16..18].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode(&bad, Codec::default()).unwrap_err(), Notification::new(1, 2, len.to_be_bytes().to_vec()));
    }
    assert_eq!(one(&message(4, &[0])).unwrap_err(), Notification::new(1, 2, 20u16.to_be_bytes().to_vec()));
    assert_eq!(one(&message(9, &[])).unwrap_err(), Notification::new(1, 3, vec![9]));
    assert_eq!(one(&message(2, &[0, 0])).unwrap_err().subcode, 2, "an UPDATE shorter than 23");
}

fn update_bytes(attrs: &str, nlri: &str) -> Vec<u8> {
    let attrs = hex(attrs);
    let mut body = vec![0, 0];
    body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    body.extend_from_slice(&attrs);
    body.extend_from_slice(&hex(nlri));
    message(2, &body)
}

const GOOD: &str = "40 01 01 00  40 02 06 02 01 0000fc00  40 03 04 c6120001";

/// RFC 7606: attribute errors that leave the NLRI readable withdraw it or drop the attribute;
/// only what makes the message unreadable ends the session.
#[test]
fn update_errors_as_rfc_7606_says() {
    let update = |attrs: &str| match one(&update_bytes(attrs, "18 c61301")) {
        Ok(Message::Update(u)) => Ok(u),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e),
    };
    let ok = update(GOOD).unwrap();
    assert!(!ok.treat_as_withdraw && ok.announcements() == vec![net("198.19.1.0/24")]);
    // Treat-as-withdraw: a bad ORIGIN value, a bad AS_PATH, a NEXT_HOP of 3 bytes, a missing
    // mandatory attribute, well-known flags on an optional attribute, communities of 5 bytes.
    for attrs in [
        "40 01 01 05  40 02 06 02 01 0000fc00  40 03 04 c6120001",
        "40 01 01 00  40 02 06 02 00 0000fc00  40 03 04 c6120001",
        "40 01 01 00  40 02 06 02 01 0000fc00  40 03 03 c61200",
        "40 01 01 00  40 02 06 02 01 0000fc00",
        "40 01 01 00  40 02 06 02 01 0000fc00  40 03 04 c6120001  40 04 04 00000000",
        "40 01 01 00  40 02 06 02 01 0000fc00  40 03 04 c6120001  c0 08 05 0000000000",
        // An attribute running past the end of the attributes.
        "40 01 01 00  40 02 06 02 01 0000fc00  40 03 09 c6120001",
    ] {
        let u = update(attrs).unwrap();
        assert!(u.treat_as_withdraw, "{attrs}");
        assert_eq!(u.withdrawals(), vec![net("198.19.1.0/24")], "{attrs}");
        assert!(u.announcements().is_empty());
    }
    // Discarded: a malformed ATOMIC_AGGREGATE or AGGREGATOR, a repeated attribute.
    for attrs in [
        "40 01 01 00  40 02 06 02 01 0000fc00  40 03 04 c6120001  40 06 01 00",
        "40 01 01 00  40 02 06 02 01 0000fc00  40 03 04 c6120001  c0 07 03 000000",
        "40 01 01 00  40 02 06 02 01 0000fc00  40 03 04 c6120001  40 01 01 02",
    ] {
        let u = update(attrs).unwrap();
        assert!(!u.treat_as_withdraw, "{attrs}");
        assert_eq!(u.attributes.len(), 3, "{attrs}: {:?}", u.attributes);
        assert_eq!(u.attribute(1), Some(&Attribute::Origin(Origin::Igp)));
    }
    // Kept as received: an unknown optional transitive attribute.
    let u = update(&format!("{GOOD} c0 63 02 abcd")).unwrap();
    assert_eq!(u.attribute(0x63), Some(&Attribute::Unknown { flags: 0xc0, code: 0x63, value: vec![0xab, 0xcd] }));
    // Session reset: an unknown well-known attribute, a repeated MP_REACH, a malformed MP_REACH,
    // a prefix longer than 32 bits, a withdrawn-routes length past the message.
    let e = update(&format!("{GOOD} 40 63 01 00")).unwrap_err();
    assert_eq!((e.code, e.subcode, e.data), (3, 2, hex("40 63 01 00")));
    let mp = "80 0f 03 0001 01";
    assert_eq!(update(&format!("{GOOD} {mp} {mp}")).unwrap_err().subcode, 1);
    assert_eq!(update(&format!("{GOOD} 80 0e 05 0002 01 03 00")).unwrap_err().subcode, 9);
    assert_eq!(one(&update_bytes(GOOD, "21 c6130100ff")).unwrap_err().subcode, 10);
    assert_eq!(one(&message(2, &hex("0009 0000"))).unwrap_err().subcode, 1);
}

/// xorshift64*: deterministic, so a failure names its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn prefix(&mut self, v6: bool) -> IpNet {
        if v6 {
            let a = Ipv6Addr::from(((self.next() as u128) << 64) | self.next() as u128);
            IpNet::new(IpAddr::V6(a), self.below(129) as u8).unwrap().trunc()
        } else {
            let a = Ipv4Addr::from(self.next() as u32);
            IpNet::V4(Ipv4Net::new(a, self.below(33) as u8).unwrap().trunc())
        }
    }

    fn update(&mut self) -> Update {
        let v4 = |r: &mut Rng, n: usize| -> Vec<IpNet> { (0..n).map(|_| r.prefix(false)).collect() };
        let v6 = |r: &mut Rng, n: usize| -> Vec<IpNet> { (0..n).map(|_| r.prefix(true)).collect() };
        let (n1, n2, n3, n4) = (self.below(20), self.below(20), self.below(10), self.below(10));
        let announced: Vec<IpNet> = v4(self, n1).into_iter().chain(v6(self, n3)).collect();
        let withdrawn: Vec<IpNet> = v4(self, n2).into_iter().chain(v6(self, n4)).collect();
        let path: Vec<u32> = (0..self.below(8)).map(|_| self.next() as u32).collect();
        let mut attributes = vec![
            Attribute::Origin([Origin::Igp, Origin::Egp, Origin::Incomplete][self.below(3)]),
            Attribute::AsPath(AsPath::sequence(&path)),
            Attribute::NextHop(Ipv4Addr::from(self.next() as u32)),
        ];
        if self.below(2) == 0 {
            attributes.push(Attribute::Med(self.next() as u32));
        }
        if self.below(2) == 0 {
            attributes.push(Attribute::Communities((0..self.below(100)).map(|_| self.next() as u32).collect()));
        }
        let mut u = Update::announce(&announced, attributes, Some(Ipv6Addr::from(self.next() as u128)));
        let w = Update::withdraw(&withdrawn);
        u.withdrawn = w.withdrawn;
        u.attributes.extend(w.attributes);
        u
    }
}

#[test]
fn arbitrary_and_damaged_bytes_never_panic_and_updates_round_trip() {
    let seed = 0x5eed_b9b0_0001_u64;
    let mut rng = Rng(seed);
    for i in 0..20_000 {
        let update = rng.update();
        let bytes = to_bytes(&Message::Update(update.clone()), Codec::default());
        if bytes.len() <= MAX_LEN {
            let back = decode(&bytes, Codec::default()).unwrap_or_else(|e| panic!("seed {seed:#x} case {i}: {e}"));
            assert_eq!(back, Some((Message::Update(update), bytes.len())), "seed {seed:#x} case {i}");
        }
        // Damage: flipped bytes, a cut, a wrong length; and bytes that are nothing at all.
        let mut damaged = bytes.clone();
        for _ in 0..rng.below(4) + 1 {
            let at = rng.below(damaged.len());
            damaged[at] = rng.next() as u8;
        }
        damaged.truncate(rng.below(damaged.len() + 1).max(HEADER_LEN));
        let _ = decode(&damaged, Codec::default());
        let _ = decode(&damaged, Codec { four_octet_as: false });
        let noise: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
        let mut framed = MARKER.to_vec();
        framed.extend_from_slice(&((HEADER_LEN + noise.len()) as u16).to_be_bytes());
        framed.push(1 + rng.below(5) as u8);
        framed.extend_from_slice(&noise);
        let _ = decode(&framed, Codec::default());
    }
}
