//! Differential tests against the reference plugins (Debian's containernetworking-plugins in
//! /usr/lib/cni): for a corpus of configs both get their own node and container namespaces and
//! must produce the same result JSON (apart from MACs and random names), the same addresses,
//! routes and links in the container, the same bridge on the node, the same cleanup on DEL, and
//! the same error codes for the same bad inputs.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

/// One side of a comparison: its own node, container and IPAM directory.
struct Side {
    node: Ns,
    cont: Ns,
    data: Dir,
}

impl Side {
    fn new() -> Side {
        Side { node: Ns::new("n"), cont: Ns::new("c"), data: Dir::new("ipam") }
    }

    /// The config with this side's dataDir.
    fn conf(&self, template: &Value) -> Value {
        let mut c = template.clone();
        if c["ipam"].get("type").is_some() {
            c["ipam"]["dataDir"] = json!(self.data.path());
        }
        for p in c["plugins"].as_array_mut().into_iter().flatten() {
            if p["ipam"].get("type").is_some() {
                p["ipam"]["dataDir"] = json!(self.data.path());
            }
        }
        c
    }

    fn call<'a>(&self, dir: &'a Path, args: &str) -> Call<'a> {
        let mut call = Call::new(dir, "diff1", &self.cont.path());
        call.args = args.into();
        call
    }

    /// What the kernel holds for the attachment, in comparable form.
    fn state(&self, bridge: Option<&str>) -> Value {
        let links = if self.cont.links().contains(&"eth0".to_string()) {
            self.cont.ip_json(&["link", "show", "eth0"])
        } else {
            json!([{}])
        };
        let link = &links[0];
        let mut state = json!({
            "container_addrs": if link.get("ifname").is_some() { json!(self.cont.addrs("eth0")) } else { json!([]) },
            "container_routes": self.cont.routes(),
            "container_mtu": link["mtu"],
            "container_up": link["flags"].as_array().is_some_and(|f| f.contains(&json!("UP"))),
            "lo_up": self.cont.ip_json(&["link", "show", "lo"])[0]["flags"].as_array().is_some_and(|f| f.contains(&json!("UP"))),
        });
        if let Some(br) = bridge {
            let b = &self.node.ip_json(&["-d", "link", "show", br])[0];
            state["bridge_addrs"] = json!(self.node.addrs(br));
            state["bridge_mtu"] = b["mtu"].clone();
            state["bridge_promisc"] = json!(b["flags"].as_array().is_some_and(|f| f.contains(&json!("PROMISC"))));
            let ports: Vec<Value> = self
                .node
                .ip_json(&["-d", "link", "show", "master", br])
                .as_array()
                .unwrap()
                .iter()
                .map(|p| json!({"mtu": p["mtu"], "hairpin": p["linkinfo"]["info_slave_data"]["hairpin"]}))
                .collect();
            state["bridge_ports"] = json!(ports);
        }
        state
    }
}

/// Replaces what legitimately differs (MACs, random veth names, namespace paths).
fn normalize(mut v: Value, side: &Side) -> Value {
    if let Some(ifaces) = v["interfaces"].as_array_mut() {
        for i in ifaces {
            if i.get("mac").is_some() {
                i["mac"] = json!("MAC");
            }
            if i["name"].as_str().is_some_and(|n| n.starts_with("veth")) {
                i["name"] = json!("VETH");
            }
            if i["sandbox"] == side.cont.path() {
                i["sandbox"] = json!("NETNS");
            }
        }
    }
    v
}

fn run_add(side: &Side, dir: &Path, plugin: &str, conf: &Value, args: &str) -> Outcome {
    side.call(dir, args).run(&side.node, plugin, "ADD", &conf.to_string())
}

/// Runs ADD, CHECK and DEL of `template` through both implementations and compares them.
fn compare(case: &str, plugin: &str, template: Value, args: &str, bridge: Option<&str>) {
    assert!(reference_available(), "the reference plugins are needed in {REFERENCE_DIR}");
    let weft_dir = weft_plugin_dir();
    let ref_dir = Path::new(REFERENCE_DIR);
    let (r, w) = (Side::new(), Side::new());
    let (rconf, wconf) = (r.conf(&template), w.conf(&template));
    let rout = run_add(&r, ref_dir, plugin, &rconf, args);
    let wout = run_add(&w, weft_dir.path(), plugin, &wconf, args);
    assert_eq!(rout.code, 0, "{case}: reference ADD failed: {rout:?}");
    assert_eq!(wout.code, 0, "{case}: weft ADD failed: {wout:?}");
    let (rres, wres) = (rout.json(), wout.json());
    assert_eq!(normalize(wres.clone(), &w), normalize(rres.clone(), &r), "{case}: results differ");
    assert_eq!(w.state(bridge), r.state(bridge), "{case}: kernel state differs");

    for (side, dir, conf, res) in [(&r, ref_dir, &rconf, &rres), (&w, weft_dir.path(), &wconf, &wres)] {
        let mut with_prev = conf.clone();
        with_prev["prevResult"] = res.clone();
        // The reference's CHECK fails on its own work in several cases (routes without a
        // gateway, L2-only, IPv4-only portmap): only weft's CHECK is held to passing.
        if template["cniVersion"] != "0.3.1" && dir != ref_dir {
            let check = side.call(dir, args).run(&side.node, plugin, "CHECK", &with_prev.to_string());
            assert_eq!(check.code, 0, "{case}: CHECK failed: {check:?}");
        }
        side.call(dir, args).run(&side.node, plugin, "DEL", &with_prev.to_string()).ok();
        assert!(reservations(side.data.path(), "diffnet").is_empty(), "{case}: reservation left by {}", dir.display());
        assert!(!side.cont.links().contains(&"eth0".to_string()) || plugin == "loopback");
    }
}

fn bridge_conf(version: &str, extra: Value) -> Value {
    let mut c = json!({
        "cniVersion": version, "name": "diffnet", "type": "bridge", "bridge": "diffbr0",
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.19.60.0/24"}]]}
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

#[test]
fn bridge_gateway() {
    compare("gateway", "bridge", bridge_conf("1.0.0", json!({"isGateway": true})), "", Some("diffbr0"));
}

#[test]
fn bridge_default_gateway_and_routes() {
    let mut c = bridge_conf("1.0.0", json!({"isDefaultGateway": true}));
    c["ipam"]["routes"] = json!([{"dst": "198.18.0.0/16"}, {"dst": "203.0.113.0/24", "gw": "198.19.60.254"}]);
    compare("default gateway", "bridge", c, "", Some("diffbr0"));
}

#[test]
fn bridge_mtu_hairpin_promisc() {
    compare(
        "mtu+hairpin",
        "bridge",
        bridge_conf("1.0.0", json!({"mtu": 1300, "hairpinMode": true, "isGateway": true})),
        "",
        Some("diffbr0"),
    );
    compare("promisc", "bridge", bridge_conf("1.0.0", json!({"promiscMode": true})), "", Some("diffbr0"));
}

#[test]
fn bridge_dual_stack() {
    let mut c = bridge_conf("1.0.0", json!({"isDefaultGateway": true}));
    c["ipam"]["ranges"] = json!([[{"subnet": "198.19.61.0/24"}], [{"subnet": "fd00:61::/64"}]]);
    compare("dual stack", "bridge", c, "", Some("diffbr0"));
}

#[test]
fn bridge_range_start_end_gateway() {
    let mut c = bridge_conf("1.0.0", json!({"isGateway": true}));
    c["ipam"]["ranges"] = json!([[{"subnet": "198.19.62.0/24", "rangeStart": "198.19.62.100",
                                   "rangeEnd": "198.19.62.110", "gateway": "198.19.62.254"}]]);
    compare("rangeStart/End", "bridge", c, "", Some("diffbr0"));
}

#[test]
fn bridge_requested_ip() {
    compare(
        "requested IP",
        "bridge",
        bridge_conf("1.0.0", json!({"isGateway": true})),
        "IgnoreUnknown=1;IP=198.19.60.77",
        Some("diffbr0"),
    );
}

#[test]
fn bridge_l2_only() {
    let c = json!({"cniVersion": "1.0.0", "name": "diffnet", "type": "bridge", "bridge": "diffbr0", "ipam": {}});
    compare("L2 only", "bridge", c, "", Some("diffbr0"));
}

#[test]
fn bridge_older_versions() {
    compare("0.4.0", "bridge", bridge_conf("0.4.0", json!({"isDefaultGateway": true})), "", Some("diffbr0"));
    compare("0.3.1", "bridge", bridge_conf("0.3.1", json!({"isGateway": true})), "", Some("diffbr0"));
}

#[test]
fn ptp_same_as_reference() {
    let c = json!({"cniVersion": "1.0.0", "name": "diffnet", "type": "ptp", "mtu": 1400,
                   "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.19.63.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}});
    compare("ptp", "ptp", c, "", None);
}

#[test]
fn portmap_chain_same_result_and_ports_answer() {
    assert!(reference_available(), "the reference plugins are needed in {REFERENCE_DIR}");
    let weft_dir = weft_plugin_dir();
    for dir in [Path::new(REFERENCE_DIR), weft_dir.path()] {
        let side = Side::new();
        let ext = Ns::new("x");
        wire(&side.node, "198.18.64.1/24", &ext, "198.18.64.2/24");
        let cache = Dir::new("cache");
        let list = side.conf(&json!({
            "cniVersion": "1.0.0", "name": "diffnet",
            "plugins": [
                {"type": "bridge", "bridge": "diffbr0", "isDefaultGateway": true, "hairpinMode": true,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.19.64.0/24"}]]}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        }));
        let list = weft_cni::runner::ConfList::from_bytes(list.to_string().as_bytes()).unwrap();
        let runner = runner(dir, cache.path());
        let mut rt = weft_cni::runner::RuntimeConf {
            container_id: "pm1".into(),
            netns: side.cont.path(),
            ifname: "eth0".into(),
            ..Default::default()
        };
        rt.capability_args
            .insert("portMappings".into(), json!([{"hostPort": 8443, "containerPort": 443, "protocol": "tcp"}]));
        let result = side.node.handle.run(|| runner.add(&list, &rt)).unwrap().unwrap();
        assert_eq!(result.ips[0].address.to_string(), "198.19.64.2/24", "{}", dir.display());
        let _server = TcpServer::start(&side.cont, "198.19.64.2", 443, "tls");
        assert_eq!(tcp_get(&ext, "198.18.64.1", 8443).unwrap(), "tls to 198.18.64.2", "{}", dir.display());
        if dir != Path::new(REFERENCE_DIR) {
            // The reference's CHECK fails here on its own ADD (it looks for IPv6 chains).
            side.node.handle.run(|| runner.check(&list, &rt)).unwrap().unwrap();
        }
        side.node.handle.run(|| runner.del(&list, &rt)).unwrap().unwrap();
        assert!(tcp_get(&ext, "198.18.64.1", 8443).is_err(), "{}: port still published", dir.display());
    }
}

#[test]
fn loopback_same_as_reference() {
    compare("loopback", "loopback", json!({"cniVersion": "1.0.0", "name": "diffnet", "type": "loopback"}), "", None);
}

/// Bad inputs: both implementations answer with the same error code, and neither changes
/// anything on the node.
#[test]
fn bad_inputs_same_error_codes_nothing_changed() {
    assert!(reference_available(), "the reference plugins are needed in {REFERENCE_DIR}");
    let weft_dir = weft_plugin_dir();
    let good = bridge_conf("1.0.0", json!({"isGateway": true, "ipMasq": true}));
    let not_ns = Dir::new("notns");
    /// A case: its name, the config on stdin, environment overrides (empty value: unset).
    type Case<'a> = (&'a str, String, Vec<(&'a str, String)>);
    let cases: Vec<Case> = vec![
        ("malformed JSON", "{\"cniVersion\": ".into(), vec![]),
        ("unsupported version", bridge_conf("9.9.9", json!({})).to_string(), vec![]),
        ("missing CNI_NETNS", good.to_string(), vec![("CNI_NETNS", String::new())]),
        ("missing CNI_CONTAINERID", good.to_string(), vec![("CNI_CONTAINERID", String::new())]),
        ("invalid container id", good.to_string(), vec![("CNI_CONTAINERID", "bad id!".into())]),
        ("interface name too long", good.to_string(), vec![("CNI_IFNAME", "a-very-long-ifname".into())]),
        ("interface name with slash", good.to_string(), vec![("CNI_IFNAME", "eth/0".into())]),
        ("netns path not a namespace", good.to_string(), vec![("CNI_NETNS", not_ns.path().display().to_string())]),
        ("netns path missing", good.to_string(), vec![("CNI_NETNS", "/var/run/netns/wt-missing".into())]),
        ("interface name taken", good.to_string(), vec![("CNI_IFNAME", "lo".into())]),
    ];
    for (case, stdin, overrides) in cases {
        let mut codes = Vec::new();
        for dir in [Path::new(REFERENCE_DIR), weft_dir.path()] {
            let side = Side::new();
            let stdin = stdin.replace(
                "\"type\":\"host-local\"",
                &format!("\"type\":\"host-local\",\"dataDir\":{:?}", side.data.path()),
            );
            let before = (side.node.links(), side.node.nft(), side.node.iptables_nat());
            let path = dir.display().to_string();
            let netns = side.cont.path();
            let mut env: Vec<(&str, String)> = vec![
                ("CNI_COMMAND", "ADD".into()),
                ("CNI_CONTAINERID", "bad1".into()),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", "eth0".into()),
                ("CNI_PATH", path),
            ];
            for (k, v) in &overrides {
                env.retain(|(ek, _)| ek != k);
                if !v.is_empty() {
                    env.push((k, v.clone()));
                }
            }
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let out = exec_in(&side.node, dir, "bridge", &env, &stdin);
            codes.push(out.error_code());
            let after = (side.node.links(), side.node.nft(), side.node.iptables_nat());
            if dir != Path::new(REFERENCE_DIR) {
                assert_eq!(after, before, "{case}: weft changed the node");
                assert!(reservations(side.data.path(), "diffnet").is_empty(), "{case}: weft reserved an address");
            }
        }
        assert_eq!(codes[1], codes[0], "{case}: weft answered {} where the reference answered {}", codes[1], codes[0]);
    }
}
