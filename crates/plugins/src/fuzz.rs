//! A property test over every parser of what plugins read — their configs on stdin, `CNI_ARGS`,
//! `prevResult`, the meta plugin's subnet file and saved delegate configs: random JSON shaped
//! like the real thing, and random byte damage to real configs. Any input may be refused; none
//! may panic (a release build aborts on a panic, and the runtime gets no CNI error at all).

use serde_json::{json, Map, Value};
use weft_cni::args::{CmdArgs, Command};
use weft_cni::skel::{decode_conf, parse_plugin_conf};
use weft_cni::CniResult;
use weft_netconf::SubnetEnv;

use crate::bridge::BridgeConf;
use crate::meta::{parse_saved, MetaConf};
use crate::portmap::PortmapConf;
use crate::ptp::PtpConf;

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
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const KEYS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "bridge",
    "isGateway",
    "isDefaultGateway",
    "forceAddress",
    "ipMasq",
    "mtu",
    "hairpinMode",
    "promiscMode",
    "vlan",
    "ipam",
    "ranges",
    "subnet",
    "rangeStart",
    "rangeEnd",
    "gateway",
    "routes",
    "dst",
    "gw",
    "dataDir",
    "resolvConf",
    "delegate",
    "subnetFile",
    "runtimeConfig",
    "args",
    "cni",
    "ips",
    "mac",
    "portMappings",
    "hostPort",
    "containerPort",
    "protocol",
    "hostIP",
    "prevResult",
    "interfaces",
    "sandbox",
    "address",
    "interface",
    "dns",
    "nameservers",
    "snat",
    "capabilities",
    "cni.dev/valid-attachments",
    "containerID",
    "ifname",
    "version",
    "x",
];

const STRINGS: &[&str] = &[
    "",
    "1.0.0",
    "0.3.1",
    "0.4.0",
    "1.1.0",
    "9.9.9",
    "bridge",
    "host-local",
    "weft",
    "ptp",
    "tcp",
    "udp",
    "sctp",
    "10.0.0.0/24",
    "10.0.0.0/33",
    "10.0.0.1",
    "10.0.0.300",
    "fd00::/64",
    "fd00::1",
    "::/0",
    "0.0.0.0/0",
    "198.19.1.0/24",
    "aa:bb:cc:dd:ee:ff",
    "zz:zz",
    "eth0",
    "cni0",
    "/tmp/x",
    "a/b",
    "..",
    "ü–\u{0}",
    "-1",
    "10.0.0.5-10.0.0.9",
    "198.19.0.0/16",
    "4294967296",
];

fn random_value(rng: &mut Rng, depth: usize) -> Value {
    let kinds = if depth >= 4 { 5 } else { 7 };
    match rng.below(kinds) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 1),
        2 => match rng.below(5) {
            0 => json!(rng.next()),
            1 => json!(-(rng.below(70000) as i64)),
            2 => json!(rng.below(70000)),
            3 => json!(f64::from(rng.below(1000) as u32) / 7.0),
            _ => json!(1e300),
        },
        3 | 4 => {
            if rng.below(8) == 0 {
                json!("x".repeat(rng.below(5000)))
            } else {
                json!(rng.pick(STRINGS))
            }
        }
        5 => Value::Array((0..rng.below(4)).map(|_| random_value(rng, depth + 1)).collect()),
        _ => {
            let mut map = Map::new();
            for _ in 0..rng.below(7) {
                map.insert(rng.pick(KEYS).to_string(), random_value(rng, depth + 1));
            }
            Value::Object(map)
        }
    }
}

/// A config of the right overall shape with random values in places.
fn random_config(rng: &mut Rng) -> Value {
    let mut conf = json!({"cniVersion": "1.0.0", "name": "n", "type": "bridge",
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.0.0.0/24"}]]}});
    for _ in 0..1 + rng.below(5) {
        let value = random_value(rng, 1);
        let key = rng.pick(KEYS).to_string();
        let target = match rng.below(3) {
            0 => Some(&mut conf),
            1 => conf.get_mut("ipam"),
            _ => conf.pointer_mut("/ipam/ranges/0/0"),
        };
        if let Some(Value::Object(map)) = target {
            map.insert(key, value);
        }
    }
    conf
}

fn damage(rng: &mut Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(4) {
        if bytes.is_empty() {
            break;
        }
        let at = rng.below(bytes.len());
        match rng.below(3) {
            0 => bytes[at] = rng.next() as u8,
            1 => {
                bytes.remove(at);
            }
            _ => bytes.insert(at, *rng.pick(b"{}[]\",:0\\\x00\xff")),
        }
    }
    bytes
}

/// Every parser of the plugins, fed `stdin` (and `CNI_ARGS`).
fn parse_everything(stdin: &[u8], cni_args: &str) {
    let _ = decode_conf(stdin);
    let _ = BridgeConf::load(stdin);
    let _ = parse_plugin_conf::<PtpConf>(stdin);
    let _ = PortmapConf::load(stdin);
    let _ = crate::host_local::load(stdin);
    if let Ok(conf) = decode_conf(stdin) {
        let _ = crate::common::prev_result(&conf);
    }
    let value: Value = serde_json::from_slice(stdin).unwrap_or_default();
    let _ = CniResult::from_value(&value);
    let _ = CniResult::from_value(&value["prevResult"]);
    let env = |k: &str| match k {
        "CNI_CONTAINERID" => Some("c1".to_string()),
        "CNI_IFNAME" => Some("eth0".to_string()),
        "CNI_NETNS" => Some("/x".to_string()),
        "CNI_PATH" => Some("/x".to_string()),
        "CNI_ARGS" => Some(cni_args.to_string()),
        _ => None,
    };
    if let Ok(args) = CmdArgs::from_env(Command::Add, &env, stdin.to_vec()) {
        let _ = crate::host_local::requested_ips(&args, &value);
        let _ = crate::common::requested_mac(&args, &value);
    }
    let subnet = SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n");
    if let (Ok(meta), Ok(subnet)) = (MetaConf::load(stdin), subnet) {
        let rendered = meta.render(&subnet);
        let _ = meta.with_prev(rendered);
        if let Ok(saved) = parse_saved(stdin) {
            let _ = meta.with_prev(saved);
        }
    }
    let _ = parse_saved(stdin);
    let _ = SubnetEnv::parse(&String::from_utf8_lossy(stdin));
}

#[test]
fn no_config_or_state_panics_a_parser() {
    let valid: Vec<Vec<u8>> = [
        json!({"cniVersion": "1.0.0", "name": "n", "type": "bridge", "bridge": "cni0", "isGateway": true,
            "ipMasq": true, "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.0.0.0/24"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}, "args": {"cni": {"ips": ["10.0.0.5"], "mac": "02:00:00:00:00:01"}},
            "runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 8080, "protocol": "tcp"}]},
            "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0.1"}]}}),
        json!({"cniVersion": "1.0.0", "name": "n", "type": "weft", "delegate": {"bridge": "cni0"},
            "ipam": {"dataDir": "/tmp/x"}, "subnetFile": "/run/x"}),
    ]
    .iter()
    .map(|v| serde_json::to_vec(v).unwrap())
    .collect();
    let args = ["", "IP=10.0.0.9", "IP=10.0.0.9,fd00::9;MAC=02:00:00:00:00:02", "IP=", "IP=bad;=;;", "K8S=x=y"];
    for seed in 1..=3000u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let cni_args = *rng.pick(&args);
        let stdin = match rng.below(3) {
            0 => serde_json::to_vec(&random_value(&mut rng, 0)).unwrap(),
            1 => serde_json::to_vec(&random_config(&mut rng)).unwrap(),
            _ => {
                let base = rng.pick(&valid).clone();
                damage(&mut rng, base)
            }
        };
        let outcome = std::panic::catch_unwind(|| parse_everything(&stdin, cni_args));
        assert!(
            outcome.is_ok(),
            "seed {seed} panicked on {:?} with CNI_ARGS {cni_args:?}",
            String::from_utf8_lossy(&stdin)
        );
    }
}

#[test]
fn saved_delegate_configs_that_are_not_objects_are_errors() {
    for text in ["[1,2]", "null", "5", "\"bridge\"", "{\"type\"", "", "true"] {
        assert!(parse_saved(text.as_bytes()).is_err(), "{text}");
    }
    assert!(parse_saved(br#"{"type":"bridge"}"#).is_ok());
}
