//! Interop of the wire format and the session FSM with BIRD 2 (Debian's `bird2`), each in a
//! namespace this test makes: an eBGP session reaches Established, BIRD's route arrives as an
//! UPDATE weft decodes, and weft's announcement is in BIRD's table. The I/O here is a small
//! blocking driver for the sans-IO neighbour.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weft_bgp::neighbor::{Action, Config, Neighbor, State, Timer};
use weft_bgp::packet::{AsPath, Attribute, Origin, Update};

/// Two namespaces joined by a veth, BIRD in one; all removed when dropped.
struct Net {
    weft: String,
    bird: String,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

fn sh(argv: &[&str]) {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Net {
    fn new(tag: &str, bird_conf: &str) -> Net {
        let id = format!("{tag}{}", std::process::id());
        let mut net = Net {
            weft: format!("bw{id}"),
            bird: format!("bb{id}"),
            dir: std::env::temp_dir().join(format!("weft-bgp-{id}")),
            child: None,
        };
        std::fs::create_dir_all(&net.dir).unwrap();
        for ns in [&net.weft, &net.bird] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        sh(&["ip", "-n", &net.weft, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &net.bird]);
        sh(&["ip", "-n", &net.weft, "addr", "add", "198.18.77.1/24", "dev", "eth0"]);
        sh(&["ip", "-n", &net.bird, "addr", "add", "198.18.77.2/24", "dev", "eth0"]);
        sh(&["ip", "-n", &net.weft, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &net.bird, "link", "set", "eth0", "up"]);
        std::fs::write(net.dir.join("bird.conf"), bird_conf).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &net.bird, "bird", "-f", "-c"])
            .arg(net.dir.join("bird.conf"))
            .arg("-s")
            .arg(net.dir.join("bird.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bird (apt-get install bird2)");
        net.child = Some(child);
        net
    }

    fn birdc(&self, args: &[&str]) -> String {
        let out = Command::new("birdc").arg("-s").arg(self.dir.join("bird.sock")).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.weft, &self.bird] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `n` over `stream`, starting with the actions `first`, until `done` says so (with every
/// action so far) or `limit` passes.
fn drive(
    n: &mut Neighbor,
    mut stream: TcpStream,
    first: Vec<Action>,
    limit: Duration,
    mut done: impl FnMut(&[Action]) -> bool,
) -> Vec<Action> {
    let mut timers: HashMap<Timer, Instant> = HashMap::new();
    let mut seen = Vec::new();
    let mut pending = first;
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 65536];
    loop {
        for action in std::mem::take(&mut pending) {
            match &action {
                Action::Send(bytes) => stream.write_all(bytes).unwrap(),
                Action::Close => {
                    let _ = stream.shutdown(Shutdown::Both);
                }
                Action::StartTimer(t, d) => {
                    timers.insert(*t, Instant::now() + *d);
                }
                Action::StopTimer(t) => {
                    timers.remove(t);
                }
                _ => {}
            }
            seen.push(action);
        }
        if done(&seen) || Instant::now() > deadline {
            return seen;
        }
        let now = Instant::now();
        if let Some(t) = timers.iter().find(|(_, at)| **at <= now).map(|(t, _)| *t) {
            timers.remove(&t);
            pending = n.timer(t);
            continue;
        }
        stream.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => pending = n.transport_lost(),
            Ok(len) => pending = n.received(&buf[..len]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => pending = n.transport_lost(),
        }
    }
}

const BIRD: &str = r#"
router id 198.18.77.2;
protocol device {}
protocol static { ipv4; route 198.19.200.0/24 blackhole; }
protocol bgp weft {
    local 198.18.77.2 as 64513;
    neighbor 198.18.77.1 as 64512;
    ipv4 { import all; export where source = RTS_STATIC; };
}
"#;

#[test]
fn ebgp_with_bird_exchanges_routes() {
    let net = Net::new("e", BIRD);
    let ns = weft_netns::NetNs::open(weft_netns::named_path(&net.weft)).unwrap();
    let mine: ipnet::IpNet = "198.19.100.0/24".parse().unwrap();
    let theirs: ipnet::IpNet = "198.19.200.0/24".parse().unwrap();
    let (seen, _session) = ns
        .run(|| {
            let mut n = Neighbor::new(Config::new(64512, Ipv4Addr::new(198, 18, 77, 1), 64513));
            let mut first = n.start();
            assert!(first.contains(&Action::Connect));
            // BIRD needs a moment to listen.
            let deadline = Instant::now() + Duration::from_secs(10);
            let stream = loop {
                match TcpStream::connect("198.18.77.2:179") {
                    Ok(s) => break s,
                    Err(e) => {
                        assert!(Instant::now() < deadline, "BIRD does not listen: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            };
            first.extend(n.connected());
            let up = drive(&mut n, stream.try_clone().unwrap(), first, Duration::from_secs(15), |seen| {
                seen.iter().any(|a| matches!(a, Action::Established(_)))
            });
            assert_eq!(n.state(), State::Established, "{up:?}");
            let update = Update::announce(
                &[mine],
                vec![
                    Attribute::Origin(Origin::Igp),
                    Attribute::AsPath(AsPath::sequence(&[64512])),
                    Attribute::NextHop(Ipv4Addr::new(198, 18, 77, 1)),
                ],
                None,
            );
            let announce = n.send_update(&update);
            // (The connection stays open until the test ends.)
            let seen = drive(&mut n, stream.try_clone().unwrap(), announce, Duration::from_secs(10), |seen| {
                seen.iter().any(|a| matches!(a, Action::Received(u) if u.announcements().contains(&theirs)))
            });
            (seen, stream)
        })
        .unwrap();
    let received = seen
        .iter()
        .find_map(|a| match a {
            Action::Received(u) if u.announcements().contains(&theirs) => Some(u.clone()),
            _ => None,
        })
        .expect("BIRD's route");
    assert_eq!(received.attribute(2), Some(&Attribute::AsPath(AsPath::sequence(&[64513]))));
    assert_eq!(received.attribute(3), Some(&Attribute::NextHop(Ipv4Addr::new(198, 18, 77, 2))));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let routes = net.birdc(&["show", "route", "for", "198.19.100.1", "all"]);
        if routes.contains("198.19.100.0/24") && routes.contains("BGP.as_path: 64512") {
            break;
        }
        assert!(Instant::now() < deadline, "weft's route is not in BIRD: {routes}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(net.birdc(&["show", "protocols"]).contains("Established"));
}
