//! `weft`, the meta plugin (flannel's CNI plugin): reads the subnet file the node agent writes,
//! renders the delegate config (bridge + host-local in the node's subnet, a route to the cluster
//! network, the agent's MTU, masquerade only when the agent does not), saves it per
//! (container, interface) and delegates.
//!
//! Compared with flannel's plugin: the saved config is keyed by container *and* interface, so
//! two interfaces of one container do not collide; DEL without a saved config derives it from the
//! current subnet file so the address is still released; STATUS answers 50 until the agent is
//! ready.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Map, Value};
use weft_cni::args::{CmdArgs, Command};
use weft_cni::skel::{parse_plugin_conf, Attachment, Plugin};
use weft_cni::{CniError, CniResult, ErrorCode, NetConf};
use weft_netconf::SubnetEnv;

use crate::attachment_lock::AttachmentLock;
use crate::delegate;

pub const DEFAULT_SUBNET_FILE: &str = "/run/weft/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/weft";

pub struct Meta;

#[derive(Debug, Deserialize)]
pub(crate) struct MetaConf {
    #[serde(default)]
    name: String,
    #[serde(rename = "cniVersion", default)]
    cni_version: String,
    #[serde(rename = "subnetFile", default)]
    subnet_file: Option<PathBuf>,
    #[serde(rename = "dataDir", default)]
    data_dir: Option<PathBuf>,
    #[serde(default)]
    delegate: Option<Map<String, Value>>,
    #[serde(default)]
    ipam: Option<Map<String, Value>>,
    #[serde(rename = "runtimeConfig", default)]
    runtime_config: Option<Value>,
    #[serde(default)]
    args: Option<Value>,
    #[serde(rename = "prevResult", default)]
    prev_result: Option<Value>,
}

impl MetaConf {
    pub(crate) fn load(stdin: &[u8]) -> Result<MetaConf, CniError> {
        let conf: MetaConf = parse_plugin_conf(stdin)?;
        if conf.name.is_empty() {
            return Err(CniError::invalid_config("the network config has no name"));
        }
        Ok(conf)
    }

    fn subnet_file(&self) -> &Path {
        self.subnet_file.as_deref().unwrap_or(Path::new(DEFAULT_SUBNET_FILE))
    }

    fn data_dir(&self) -> &Path {
        self.data_dir.as_deref().unwrap_or(Path::new(DEFAULT_DATA_DIR))
    }

    fn saved_path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.data_dir().join(format!("{container_id}@{ifname}"))
    }

    /// The subnet file, or code 11 (try again later): the agent has not leased a subnet yet.
    fn subnet_env(&self) -> Result<SubnetEnv, CniError> {
        SubnetEnv::read(self.subnet_file()).map_err(|e| {
            CniError::new(ErrorCode::TryAgainLater, format!("the weft agent is not ready on this node: {e}"))
        })
    }

    /// The delegate config for this node's subnet.
    pub(crate) fn render(&self, env: &SubnetEnv) -> Map<String, Value> {
        if let Some(routed) = &env.routed {
            return self.render_routed(env, routed);
        }
        let mut d = self.delegate.clone().unwrap_or_default();
        d.entry("type").or_insert_with(|| json!("bridge"));
        d.insert("name".into(), json!(self.name));
        d.insert("cniVersion".into(), json!(self.cni_version));
        if d.get("type").is_some_and(|t| t == "bridge") {
            d.entry("isGateway").or_insert(json!(true));
            d.entry("ipMasq").or_insert(json!(!env.ipmasq));
            d.entry("mtu").or_insert(json!(env.mtu));
        }
        let mut ipam = self.ipam.clone().unwrap_or_default();
        ipam.entry("type").or_insert_with(|| json!("host-local"));
        let mut ranges = vec![json!([{"subnet": env.subnet_network().to_string()}])];
        let mut routes = vec![json!({"dst": env.network.to_string()})];
        if let (Some(net6), Some(sub6)) = (env.ipv6_network, env.ipv6_subnet) {
            ranges.push(json!([{"subnet": sub6.trunc().to_string()}]));
            routes.push(json!({"dst": net6.to_string()}));
        }
        ipam.insert("ranges".into(), json!(ranges));
        if let Some(extra) = ipam.get("routes").and_then(Value::as_array) {
            routes.extend(extra.iter().filter(|r| !routes.contains(r)).cloned().collect::<Vec<_>>());
        }
        ipam.insert("routes".into(), json!(routes));
        d.insert("ipam".into(), Value::Object(ipam));
        for (key, value) in [("runtimeConfig", &self.runtime_config), ("args", &self.args)] {
            if let Some(v) = value {
                d.insert(key.into(), v.clone());
            }
        }
        d
    }

    /// Routed mode (the agent runs the `bgp` backend): the `routed` plugin, and host-local over
    /// every block the node holds, its reservations where the agent counts them (a block's
    /// first address is host-local's gateway and never given out; the last one is, as pods
    /// have host prefixes).
    fn render_routed(&self, env: &SubnetEnv, routed: &weft_netconf::Routed) -> Map<String, Value> {
        let mut d = self.delegate.clone().unwrap_or_default();
        // A delegate written for the bridge (flannel's defaults) keeps only what routed reads.
        d.retain(|k, _| !BRIDGE_ONLY.contains(&k.as_str()));
        d.insert("type".into(), json!("routed"));
        d.insert("name".into(), json!(self.name));
        d.insert("cniVersion".into(), json!(self.cni_version));
        d.entry("mtu").or_insert(json!(env.mtu));
        let ranges: Vec<Value> = routed
            .blocks
            .iter()
            .map(|b| {
                let start = std::net::Ipv4Addr::from(u32::from(b.network()) + 1);
                json!({"subnet": b.to_string(), "gateway": b.network().to_string(),
                       "rangeStart": start.to_string(), "rangeEnd": b.broadcast().to_string()})
            })
            .collect();
        let mut ipam = Map::new();
        ipam.insert("type".into(), json!("host-local"));
        ipam.insert("dataDir".into(), json!(routed.ipam_dir));
        ipam.insert("ranges".into(), json!([ranges]));
        if let Some(routes) = self.ipam.as_ref().and_then(|i| i.get("routes")) {
            ipam.insert("routes".into(), routes.clone());
        }
        d.insert("ipam".into(), Value::Object(ipam));
        for (key, value) in [("runtimeConfig", &self.runtime_config), ("args", &self.args)] {
            if let Some(v) = value {
                d.insert(key.into(), v.clone());
            }
        }
        d
    }

    /// The saved delegate config of the attachment (also flannel's file, keyed by container ID
    /// only, for nodes that ran flannel before): `None` when there is none, an error when it is
    /// not a JSON object.
    fn saved(&self, args: &CmdArgs) -> Result<Option<Map<String, Value>>, CniError> {
        let paths = [self.saved_path(&args.container_id, &args.ifname), self.data_dir().join(&args.container_id)];
        let Some((path, bytes)) = paths.iter().find_map(|p| Some((p, std::fs::read(p).ok()?))) else {
            return Ok(None);
        };
        parse_saved(&bytes)
            .and_then(|map| {
                let delegate = Value::Object(map.clone());
                let kind = delegate_type(&delegate).map_err(|e| e.msg)?;
                // A delegate that cannot run, or would release nothing, is no use to DEL.
                weft_cni::exec::find_in_path(&kind, &args.path).map_err(|e| e.msg)?;
                match delegate.get("ipam") {
                    None => {}
                    Some(Value::Object(ipam)) if ipam.get("type").is_some_and(Value::is_string) => {}
                    Some(other) => return Err(format!("its ipam is not a plugin config: {other}")),
                }
                Ok(map)
            })
            .map(Some)
            .map_err(|e| {
                CniError::new(
                    ErrorCode::Decoding,
                    format!("the saved delegate config {} is damaged: {e}", path.display()),
                )
            })
    }

    pub(crate) fn with_prev(&self, mut delegate: Map<String, Value>) -> Value {
        if let Some(prev) = &self.prev_result {
            delegate.insert("prevResult".into(), prev.clone());
        }
        Value::Object(delegate)
    }
}

/// Delegate keys of the bridge plugin that mean nothing to `routed`.
const BRIDGE_ONLY: &[&str] = &[
    "bridge",
    "isGateway",
    "isDefaultGateway",
    "forceAddress",
    "ipMasq",
    "hairpinMode",
    "promiscMode",
    "vlan",
    "vlanTrunk",
    "preserveDefaultVlan",
    "macspoofchk",
    "enabledad",
    "disableContainerInterface",
];

/// Routed mode with no free address in this node's blocks: the network is used up (the agent
/// found no block to claim), or the agent has not claimed the next block yet.
fn no_block(env: &SubnetEnv) -> CniError {
    let held = env.routed.as_ref().map_or(0, |r| r.blocks.len());
    if env.routed.as_ref().is_some_and(|r| r.exhausted) {
        CniError::internal(format!(
            "the pod network {} is exhausted: every block is held, and this node's {held} are full \
             (free addresses on other nodes are not lent; make the Network larger or remove pods)",
            env.network
        ))
    } else {
        CniError::new(
            ErrorCode::TryAgainLater,
            format!("this node's {held} address blocks are full; the weft agent is claiming another one: try again"),
        )
    }
}

/// A saved delegate config: a JSON object.
pub(crate) fn parse_saved(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice(bytes).map_err(|e| e.to_string())? {
        Value::Object(map) => Ok(map),
        other => Err(format!("not a JSON object but {}", kind_of(&other))),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The delegate's plugin type: a name, and not this plugin's (it would call itself).
fn delegate_type(delegate: &Value) -> Result<String, CniError> {
    match delegate.get("type").and_then(Value::as_str) {
        Some("weft") => {
            Err(CniError::invalid_config("the weft plugin cannot delegate to itself (delegate type \"weft\")"))
        }
        Some(t) if !t.is_empty() && !t.contains('/') => Ok(t.to_string()),
        _ => Err(CniError::invalid_config("the delegate config has no plugin type")),
    }
}

fn to_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn save(path: &Path, delegate: &Value) -> Result<(), CniError> {
    let io = |e: std::io::Error| CniError::io(format!("saving the delegate config {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = tmp_path(path);
    std::fs::write(&tmp, to_bytes(delegate)).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn tmp_path(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.tmp", path.display()))
}

/// Removes a saved config and the temporary file an ADD killed while saving it may have left.
fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(tmp_path(path));
}

impl Plugin for Meta {
    fn name(&self) -> &'static str {
        "weft"
    }

    fn add(&self, args: &CmdArgs, _conf: &NetConf) -> Result<CniResult, CniError> {
        let conf = MetaConf::load(&args.stdin)?;
        let _lock = AttachmentLock::take(self.name(), &conf.name, args)?;
        let env = conf.subnet_env()?;
        if env.routed.as_ref().is_some_and(|r| r.blocks.is_empty()) {
            return Err(no_block(&env));
        }
        let delegate = Value::Object(conf.render(&env));
        delegate_type(&delegate)?;
        let path = conf.saved_path(&args.container_id, &args.ifname);
        save(&path, &delegate)?;
        // A failed ADD is followed by the runtime's DEL, which finds the saved config.
        delegate::run(&delegate_type(&delegate)?, Command::Add, args, &to_bytes(&delegate))
            .map_err(|e| match &env.routed {
                Some(_) if e.msg.contains("no IP addresses available") => no_block(&env),
                _ => e,
            })?
            .ok_or_else(|| CniError::internal("the delegate returned no result"))
    }

    fn del(&self, args: &CmdArgs, _conf: &NetConf) -> Result<(), CniError> {
        let conf = MetaConf::load(&args.stdin)?;
        let lock = AttachmentLock::take(self.name(), &conf.name, args)?;
        let saved = conf.saved(args).unwrap_or_else(|e| {
            eprintln!("weft: {}; deriving the delegate config from the subnet file", e.msg);
            None
        });
        let delegate = match saved {
            Some(saved) => saved,
            // No saved config (lost, damaged or never written): the current subnet file still
            // says which network and subnet host-local used, so the address is released all
            // the same.
            None => match conf.subnet_env() {
                Ok(env) => conf.render(&env),
                Err(_) => {
                    eprintln!("weft: no saved config and no subnet file for {}; nothing to release", args.container_id);
                    remove(&conf.saved_path(&args.container_id, &args.ifname));
                    lock.remove();
                    return Ok(());
                }
            },
        };
        let delegate = conf.with_prev(delegate);
        delegate::run(&delegate_type(&delegate)?, Command::Del, args, &to_bytes(&delegate))?;
        remove(&conf.saved_path(&args.container_id, &args.ifname));
        remove(&conf.data_dir().join(&args.container_id));
        lock.remove();
        Ok(())
    }

    fn check(&self, args: &CmdArgs, _conf: &NetConf) -> Result<(), CniError> {
        let conf = MetaConf::load(&args.stdin)?;
        let _lock = AttachmentLock::take(self.name(), &conf.name, args)?;
        let saved =
            conf.saved(args)?.ok_or_else(|| CniError::internal("no saved delegate config for this attachment"))?;
        let delegate = conf.with_prev(saved);
        delegate::run(&delegate_type(&delegate)?, Command::Check, args, &to_bytes(&delegate)).map(drop)
    }

    fn status(&self, args: &CmdArgs, _conf: &NetConf) -> Result<(), CniError> {
        let conf = MetaConf::load(&args.stdin)?;
        SubnetEnv::read(conf.subnet_file())
            .map(drop)
            .map_err(|e| CniError::new(ErrorCode::NotAvailable, format!("the weft agent is not ready: {e}")))
    }

    fn gc(&self, args: &CmdArgs, _conf: &NetConf, valid: &[Attachment]) -> Result<(), CniError> {
        let conf = MetaConf::load(&args.stdin)?;
        crate::attachment_lock::gc(self.name(), &conf.name, valid);
        let is_valid = |name: &str| valid.iter().any(|a| name == format!("{}@{}", a.container_id, a.ifname));
        if let Ok(entries) = std::fs::read_dir(conf.data_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if name.contains('@') && !is_valid(name.strip_suffix(".tmp").unwrap_or(&name)) {
                    remove(&entry.path());
                }
            }
        }
        let env = conf.subnet_env()?;
        let mut delegate = conf.render(&env);
        delegate.insert("cni.dev/valid-attachments".into(), serde_json::to_value(valid).unwrap_or_default());
        let delegate = Value::Object(delegate);
        delegate::run(&delegate_type(&delegate)?, Command::Gc, args, &to_bytes(&delegate)).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Routed mode: `routed` over host-local on every block the node holds (a block's first
    /// address kept as host-local's gateway, its last given out), reservations where the agent
    /// counts them, the bridge's keys dropped.
    #[test]
    fn routed_mode_renders_routed_over_every_block() {
        let conf = MetaConf::load(
            br#"{"cniVersion": "1.0.0", "name": "lab", "type": "weft",
                 "delegate": {"bridge": "cni0", "hairpinMode": true, "isDefaultGateway": true}}"#,
        )
        .unwrap();
        let env = SubnetEnv::parse(
            "FLANNEL_NETWORK=198.19.0.0/16\nFLANNEL_SUBNET=198.19.0.1/26\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n\
             WEFT_ROUTED=true\nWEFT_BLOCKS=198.19.0.0/26,198.19.7.64/26\nWEFT_IPAM_DIR=/run/weft/ipam\n",
        )
        .unwrap();
        let d = Value::Object(conf.render(&env));
        assert_eq!(d["type"], "routed");
        assert_eq!(d["mtu"], 1450);
        assert!(d.get("bridge").is_none() && d.get("hairpinMode").is_none() && d.get("isDefaultGateway").is_none());
        assert_eq!(d["ipam"]["type"], "host-local");
        assert_eq!(d["ipam"]["dataDir"], "/run/weft/ipam");
        assert_eq!(
            d["ipam"]["ranges"],
            json!([[
                {"subnet": "198.19.0.0/26", "gateway": "198.19.0.0", "rangeStart": "198.19.0.1", "rangeEnd": "198.19.0.63"},
                {"subnet": "198.19.7.64/26", "gateway": "198.19.7.64", "rangeStart": "198.19.7.65", "rangeEnd": "198.19.7.127"}
            ]])
        );
    }
}
