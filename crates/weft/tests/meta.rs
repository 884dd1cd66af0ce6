//! The `weft` meta plugin: subnet file in, bridge + host-local out; saved per (container,
//! ifname); DEL releases the address also when the saved config is gone; STATUS follows the
//! agent's readiness.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};

struct Fixture {
    node: Ns,
    cont: Ns,
    bin: Dir,
    state: Dir,
    bridge: String,
}

impl Fixture {
    fn new() -> Fixture {
        let f = Fixture {
            node: Ns::new("n"),
            cont: Ns::new("c"),
            bin: weft_plugin_dir(),
            state: Dir::new("meta"),
            bridge: unique("br"),
        };
        f.write_subnet_env(true);
        f
    }

    fn subnet_file(&self) -> std::path::PathBuf {
        self.state.path().join("run/subnet.env")
    }

    fn write_subnet_env(&self, ipmasq: bool) {
        std::fs::create_dir_all(self.subnet_file().parent().unwrap()).unwrap();
        std::fs::write(
            self.subnet_file(),
            format!("FLANNEL_NETWORK=198.19.0.0/16\nFLANNEL_SUBNET=198.19.7.1/24\nFLANNEL_MTU=1410\nFLANNEL_IPMASQ={ipmasq}\n"),
        )
        .unwrap();
    }

    fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version, "name": "podnet", "type": "weft",
            "subnetFile": self.subnet_file(), "dataDir": self.state.path().join("saved"),
            "ipam": {"dataDir": self.state.path().join("ipam")},
            "delegate": {"bridge": self.bridge, "isDefaultGateway": true, "hairpinMode": true}
        })
    }

    fn call(&self, id: &str) -> Call<'_> {
        Call::new(self.bin.path(), id, &self.cont.path())
    }

    fn reservations(&self) -> Vec<String> {
        reservations(&self.state.path().join("ipam"), "podnet")
    }
}

#[test]
fn add_check_del_through_the_subnet_file() {
    let f = Fixture::new();
    let conf = f.conf("1.0.0");
    let result = f.call("m1").run(&f.node, "weft", "ADD", &conf.to_string()).ok().json();
    assert_eq!(result["ips"][0]["address"], "198.19.7.2/24");
    assert_eq!(result["ips"][0]["gateway"], "198.19.7.1");
    let routes = f.cont.routes();
    assert!(routes.contains(&"198.19.0.0/16 via 198.19.7.1 dev eth0".to_string()), "{routes:?}");
    assert!(routes.contains(&"default via 198.19.7.1 dev eth0".to_string()), "{routes:?}");
    assert_eq!(f.cont.ip_json(&["link", "show", "eth0"])[0]["mtu"], 1410);
    assert_eq!(f.node.addrs(&f.bridge), ["198.19.7.1/24"]);
    // The agent masquerades (FLANNEL_IPMASQ=true), so the bridge must not.
    assert!(!f.node.nft().contains("masq podnet"));
    let saved: Value = serde_json::from_slice(&std::fs::read(f.state.path().join("saved/m1@eth0")).unwrap()).unwrap();
    assert_eq!(saved["type"], "bridge");
    assert_eq!(saved["ipMasq"], false);
    assert_eq!(saved["ipam"]["ranges"], json!([[{"subnet": "198.19.7.0/24"}]]));

    let mut with_prev = conf.clone();
    with_prev["prevResult"] = result.clone();
    f.call("m1").run(&f.node, "weft", "CHECK", &with_prev.to_string()).ok();
    f.call("m1").run(&f.node, "weft", "DEL", &with_prev.to_string()).ok();
    assert!(f.reservations().is_empty());
    assert!(!f.state.path().join("saved/m1@eth0").exists());
    assert!(!f.cont.links().contains(&"eth0".to_string()));
    f.call("m1").run(&f.node, "weft", "DEL", &conf.to_string()).ok();
}

#[test]
fn del_without_saved_config_still_releases() {
    let f = Fixture::new();
    f.write_subnet_env(false);
    let conf = f.conf("1.0.0");
    f.call("m2").run(&f.node, "weft", "ADD", &conf.to_string()).ok();
    // FLANNEL_IPMASQ=false: the bridge masquerades instead.
    assert!(f.node.nft().contains("masq podnet/m2/eth0"));
    std::fs::remove_file(f.state.path().join("saved/m2@eth0")).unwrap();
    assert_eq!(f.reservations().len(), 1);
    f.call("m2").run(&f.node, "weft", "DEL", &conf.to_string()).ok();
    assert!(f.reservations().is_empty(), "address leaked without the saved config");
    assert!(!f.node.nft().contains("masq podnet/m2/eth0"));
}

#[test]
fn two_interfaces_of_one_container_do_not_collide() {
    let f = Fixture::new();
    let conf = f.conf("1.0.0");
    let mut second = f.call("m3");
    second.ifname = "net1".into();
    f.call("m3").run(&f.node, "weft", "ADD", &conf.to_string()).ok();
    second.run(&f.node, "weft", "ADD", &conf.to_string()).ok();
    assert_eq!(f.reservations().len(), 2);
    second.run(&f.node, "weft", "DEL", &conf.to_string()).ok();
    assert_eq!(f.reservations().len(), 1);
    assert!(f.cont.links().contains(&"eth0".to_string()));
    f.call("m3").run(&f.node, "weft", "DEL", &conf.to_string()).ok();
    assert!(f.reservations().is_empty());
}

#[test]
fn status_and_add_follow_agent_readiness() {
    let f = Fixture::new();
    let conf = f.conf("1.1.0");
    f.call("s").run(&f.node, "weft", "STATUS", &conf.to_string()).ok();
    std::fs::remove_file(f.subnet_file()).unwrap();
    assert_eq!(f.call("s").run(&f.node, "weft", "STATUS", &conf.to_string()).error_code(), 50);
    let before = f.node.links();
    assert_eq!(f.call("m4").run(&f.node, "weft", "ADD", &conf.to_string()).error_code(), 11);
    assert_eq!(f.node.links(), before);
    assert!(!f.cont.links().contains(&"eth0".to_string()));
    // Neither a saved config nor a subnet file: DEL still succeeds.
    f.call("m4").run(&f.node, "weft", "DEL", &conf.to_string()).ok();
}

/// A saved delegate config that is JSON but not an object (or not JSON): CHECK answers with a
/// CNI error instead of aborting, DEL derives the config from the subnet file and releases the
/// address.
#[test]
fn a_damaged_saved_config_is_an_error_not_a_crash() {
    let f = Fixture::new();
    let conf = f.conf("1.0.0");
    let damage = [
        "[1,2]",
        "null",
        "\"bridge\"",
        "{\"type\":",
        "{}",
        "{\"type\":5}",
        "{\"type\":\"weft\"}",
        "{\"type\":\"doesnotexist\"}",
        "{\"type\":\"bridge\",\"bridge\":\"x\",\"ipam\":\"garbage\"}",
    ];
    for (i, damaged) in damage.iter().enumerate() {
        let id = format!("bad{i}");
        let result = f.call(&id).run(&f.node, "weft", "ADD", &conf.to_string()).ok().json();
        std::fs::write(f.state.path().join(format!("saved/{id}@eth0")), damaged).unwrap();
        let mut with_prev = conf.clone();
        with_prev["prevResult"] = result;
        let check = f.call(&id).run(&f.node, "weft", "CHECK", &with_prev.to_string());
        assert_eq!(check.error_code(), 6, "{damaged}: {check:?}");
        assert!(check.json()["msg"].as_str().unwrap().contains("damaged"), "{check:?}");
        f.call(&id).run(&f.node, "weft", "DEL", &with_prev.to_string()).ok();
        assert!(f.reservations().is_empty(), "{damaged}: address leaked");
        assert!(!f.state.path().join(format!("saved/{id}@eth0")).exists());
    }
}

/// A delegate of type `weft` would call the plugin itself (it waited on its own lock for good):
/// refused at once, before anything is made or saved.
#[test]
fn the_meta_plugin_does_not_delegate_to_itself() {
    let f = Fixture::new();
    let mut conf = f.conf("1.0.0");
    conf["delegate"]["type"] = serde_json::json!("weft");
    let mut through_ipam = f.conf("1.0.0");
    through_ipam["ipam"]["type"] = serde_json::json!("weft");
    let add = f.call("self2").run(&f.node, "weft", "ADD", &through_ipam.to_string());
    assert_eq!(add.error_code(), 7, "{add:?}");
    assert!(add.json()["msg"].as_str().unwrap().contains("not an IPAM plugin"), "{add:?}");
    for command in ["ADD", "DEL"] {
        let started = std::time::Instant::now();
        let out = f.call("self1").run(&f.node, "weft", command, &conf.to_string());
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{command} hung");
        assert_eq!(out.error_code(), 7, "{command}: {out:?}");
        assert!(out.json()["msg"].as_str().unwrap().contains("cannot delegate to itself"), "{out:?}");
    }
    assert!(!f.state.path().join("saved/self1@eth0").exists());
    assert!(f.reservations().is_empty());
}
