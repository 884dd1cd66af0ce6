//! portmap chained after bridge: published ports answer from outside the node, from another pod,
//! from the pod itself (hairpin) and from the node's 127.0.0.1; a re-ADD replaces its rules, DEL
//! and GC remove exactly them.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use weft_cni::runner::{ConfList, RuntimeConf};

fn conflist(bridge: &str, data: &std::path::Path) -> ConfList {
    ConfList::from_bytes(
        json!({
            "cniVersion": "1.1.0",
            "name": "pmnet",
            "plugins": [
                {"type": "bridge", "bridge": bridge, "isDefaultGateway": true, "hairpinMode": true,
                 "ipam": {"type": "host-local", "dataDir": data, "ranges": [[{"subnet": "198.19.30.0/24"}]]}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
        .to_string()
        .as_bytes(),
    )
    .unwrap()
}

fn rt(id: &str, ns: &Ns, mappings: Value) -> RuntimeConf {
    let mut rt = RuntimeConf { container_id: id.into(), netns: ns.path(), ifname: "eth0".into(), ..Default::default() };
    rt.capability_args.insert("portMappings".into(), mappings);
    rt
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn published_ports_answer_from_everywhere() {
    let node = Ns::new("n");
    let ext = Ns::new("x");
    let pod = Ns::new("p");
    let other = Ns::new("o");
    wire(&node, "198.18.30.1/24", &ext, "198.18.30.2/24");
    let bin = weft_plugin_dir();
    let data = Dir::new("ipam");
    let cache = Dir::new("cache");
    let runner = runner(bin.path(), cache.path());
    let list = conflist(&unique("br"), data.path());
    let pod_rt = rt("web", &pod, json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]));
    let result = node.handle.run(|| runner.add(&list, &pod_rt)).unwrap().unwrap();
    let pod_ip = result.ips[0].address.addr().to_string();
    let other_rt = rt("client", &other, json!([]));
    node.handle.run(|| runner.add(&list, &other_rt)).unwrap().unwrap();
    let _server = TcpServer::start(&pod, &pod_ip, 80, "web");

    let from_ext = tcp_get(&ext, "198.18.30.1", 8080).expect("from outside the node");
    assert_eq!(from_ext, "web to 198.18.30.2");
    let from_other = tcp_get(&other, "198.18.30.1", 8080).expect("from another pod");
    assert!(from_other.starts_with("web to 198.19.30."), "{from_other}");
    let hairpin = tcp_get(&pod, "198.18.30.1", 8080).expect("hairpin: the pod to its own host port");
    assert!(hairpin.starts_with("web"), "{hairpin}");
    let local = tcp_get(&node, "127.0.0.1", 8080).expect("from the node's 127.0.0.1");
    assert!(local.starts_with("web"), "{local}");
    node.handle.run(|| runner.check(&list, &pod_rt)).unwrap().unwrap();

    node.handle.run(|| runner.del(&list, &pod_rt)).unwrap().unwrap();
    let rules = node.nft();
    assert_eq!(count(&rules, "hostport pmnet/web/eth0"), 0, "{rules}");
    assert!(tcp_get(&ext, "198.18.30.1", 8080).is_err(), "port still published after DEL");
    node.handle.run(|| runner.del(&list, &pod_rt)).unwrap().unwrap();
    node.handle.run(|| runner.del(&list, &other_rt)).unwrap().unwrap();
}

#[test]
fn re_add_replaces_and_host_ip_restricts() {
    let node = Ns::new("n");
    let ext = Ns::new("x");
    let pod = Ns::new("p");
    wire(&node, "198.18.31.1/24", &ext, "198.18.31.2/24");
    node.sh(&["ip", "addr", "add", "198.18.32.1/24", "dev", "lo"]);
    let bin = weft_plugin_dir();
    let data = Dir::new("ipam");
    let list = conflist(&unique("br"), data.path());
    let prev = node
        .handle
        .run(|| runner(bin.path(), Dir::new("c").path()).add(&list, &rt("db", &pod, json!([]))))
        .unwrap()
        .unwrap();
    let portmap = |mappings: Value, command: &str| {
        let mut conf = list.plugins[1].clone();
        conf["cniVersion"] = json!("1.1.0");
        conf["name"] = json!("pmnet");
        conf["runtimeConfig"] = json!({"portMappings": mappings});
        conf["prevResult"] = prev.to_json_value("1.1.0");
        Call::new(bin.path(), "db", &pod.path()).run(&node, "portmap", command, &conf.to_string())
    };
    portmap(json!([{"hostPort": 5432, "containerPort": 5432, "protocol": "tcp"}]), "ADD").ok();
    portmap(json!([{"hostPort": 6543, "containerPort": 5432, "protocol": "tcp", "hostIP": "198.18.32.1"}]), "ADD").ok();
    let rules = node.nft();
    assert!(!rules.contains("5432 dnat"), "old mapping stacked: {rules}");
    assert_eq!(count(&rules, "dport 6543"), 2, "{rules}"); // prerouting and output
    assert!(rules.contains("ip daddr 198.18.32.1 tcp dport 6543"), "{rules}");
    portmap(json!([{"hostPort": 6543, "containerPort": 5432, "protocol": "tcp", "hostIP": "198.18.32.1"}]), "CHECK")
        .ok();
    portmap(json!([]), "DEL").ok();
    assert!(!node.nft().contains("hostport pmnet/db/eth0"));
    portmap(json!([]), "DEL").ok();
}

#[test]
fn gc_keeps_only_valid_attachments() {
    let node = Ns::new("n");
    let a = Ns::new("a");
    let b = Ns::new("b");
    let bin = weft_plugin_dir();
    let data = Dir::new("ipam");
    let cache = Dir::new("cache");
    let runner = runner(bin.path(), cache.path());
    let list = conflist(&unique("br"), data.path());
    let m = json!([{"hostPort": 9000, "containerPort": 90}]);
    node.handle.run(|| runner.add(&list, &rt("a1", &a, m.clone()))).unwrap().unwrap();
    node.handle
        .run(|| runner.add(&list, &rt("b1", &b, json!([{"hostPort": 9001, "containerPort": 90}]))))
        .unwrap()
        .unwrap();
    let valid = [weft_cni::skel::Attachment { container_id: "a1".into(), ifname: "eth0".into() }];
    node.handle.run(|| runner.gc(&list, &valid)).unwrap().unwrap();
    let rules = node.nft();
    assert!(rules.contains("hostport pmnet/a1/eth0") && !rules.contains("hostport pmnet/b1/eth0"), "{rules}");
    assert_eq!(reservations(data.path(), "pmnet").len(), 1);
}
