//! The runtime side of CNI, as libcni does it: load a conflist, run ADD through the chain passing
//! each plugin's result as the next one's `prevResult`, cache the final result, run DEL in
//! reverse and CHECK with the cached result, and GC with the attachments that are still valid.
//! The lab and the tests drive plugins through this, exactly as a container runtime would.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::args::Command;
use crate::error::{CniError, ErrorCode, Result};
use crate::exec::{exec_plugin, find_in_path};
use crate::skel::Attachment;
use crate::types::CniResult;
use crate::version;

/// A network configuration list (`*.conflist`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfList {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    pub plugins: Vec<Value>,
    #[serde(rename = "disableCheck", default)]
    pub disable_check: bool,
    #[serde(rename = "disableGC", default)]
    pub disable_gc: bool,
}

impl ConfList {
    pub fn from_bytes(bytes: &[u8]) -> Result<ConfList> {
        let list: ConfList = serde_json::from_slice(bytes)
            .map_err(|e| CniError::new(ErrorCode::Decoding, format!("parsing conflist: {e}")))?;
        if list.name.is_empty() {
            return Err(CniError::invalid_config("conflist has no name"));
        }
        if list.plugins.is_empty() {
            return Err(CniError::invalid_config("conflist has no plugins"));
        }
        version::check(&list.cni_version)?;
        Ok(list)
    }

    pub fn load(path: &Path) -> Result<ConfList> {
        let bytes = std::fs::read(path).map_err(|e| CniError::io(format!("reading {}: {e}", path.display())))?;
        Self::from_bytes(&bytes)
    }

    fn plugin_type(plugin: &Value) -> Result<&str> {
        plugin.get("type").and_then(Value::as_str).ok_or_else(|| CniError::invalid_config("plugin without a type"))
    }
}

/// What the runtime knows about one attachment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RuntimeConf {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` pairs.
    pub args: Vec<(String, String)>,
    /// Capability arguments (`portMappings`, `ips`, `mac`, ...), given to plugins that declare them.
    pub capability_args: Map<String, Value>,
}

/// Runs plugin chains, caching results under `cache_dir` like libcni's `/var/lib/cni`.
#[derive(Debug, Clone)]
pub struct Runner {
    pub path: Vec<PathBuf>,
    pub cache_dir: PathBuf,
    /// More environment for the plugins (besides the runner's own and the `CNI_*` variables).
    pub env: Vec<(String, String)>,
}

#[derive(Serialize, Deserialize)]
struct CacheEntry {
    kind: String,
    #[serde(rename = "containerId")]
    container_id: String,
    #[serde(rename = "ifName")]
    ifname: String,
    #[serde(rename = "networkName")]
    network: String,
    #[serde(rename = "capabilityArgs", default)]
    capability_args: Map<String, Value>,
    result: Value,
}

impl Runner {
    pub fn new(path: Vec<PathBuf>, cache_dir: impl Into<PathBuf>) -> Self {
        Self { path, cache_dir: cache_dir.into(), env: Vec::new() }
    }

    /// ADD through the whole chain; the final result is cached and returned. As with libcni, a
    /// failed ADD is not undone here: the caller runs DEL.
    pub fn add(&self, list: &ConfList, rt: &RuntimeConf) -> Result<CniResult> {
        let mut prev: Option<Value> = None;
        for plugin in &list.plugins {
            let stdin = self.build_config(list, plugin, prev.as_ref(), rt)?;
            let out = self.exec(plugin, Command::Add, rt, &stdin)?;
            let value = out.ok_or_else(|| CniError::internal("plugin returned no result on ADD"))?;
            let result = CniResult::from_value(&value)?;
            prev = Some(result.to_json_value(&list.cni_version));
        }
        let result = CniResult::from_value(prev.as_ref().unwrap_or(&json!({})))?;
        self.write_cache(list, rt, &result)?;
        Ok(result)
    }

    /// DEL through the chain in reverse, with the cached result as `prevResult`; removes the cache.
    pub fn del(&self, list: &ConfList, rt: &RuntimeConf) -> Result<()> {
        let cached = self.cached_result(&list.name, rt);
        let prev = cached.map(|r| r.to_json_value(&list.cni_version));
        for plugin in list.plugins.iter().rev() {
            let stdin = self.build_config(list, plugin, prev.as_ref(), rt)?;
            self.exec(plugin, Command::Del, rt, &stdin)?;
        }
        match std::fs::remove_file(self.cache_path(&list.name, rt)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CniError::io(format!("removing cache: {e}"))),
            _ => Ok(()),
        }
    }

    /// CHECK through the chain with the cached result.
    pub fn check(&self, list: &ConfList, rt: &RuntimeConf) -> Result<()> {
        if list.disable_check {
            return Ok(());
        }
        let cached = self
            .cached_result(&list.name, rt)
            .ok_or_else(|| CniError::internal("no cached result for this attachment"))?;
        let prev = cached.to_json_value(&list.cni_version);
        for plugin in &list.plugins {
            let stdin = self.build_config(list, plugin, Some(&prev), rt)?;
            self.exec(plugin, Command::Check, rt, &stdin)?;
        }
        Ok(())
    }

    /// GC: every plugin removes what belongs to attachments not listed in `valid`.
    pub fn gc(&self, list: &ConfList, valid: &[Attachment]) -> Result<()> {
        if list.disable_gc {
            return Ok(());
        }
        let rt = RuntimeConf::default();
        for plugin in &list.plugins {
            let mut conf = self.base_config(list, plugin)?;
            conf.insert("cni.dev/valid-attachments".into(), serde_json::to_value(valid).unwrap_or_default());
            let stdin = serde_json::to_vec(&conf).map_err(|e| CniError::internal(e.to_string()))?;
            self.exec(plugin, Command::Gc, &rt, &stdin)?;
        }
        Ok(())
    }

    /// STATUS: the first plugin that is not ready answers for the network.
    pub fn status(&self, list: &ConfList) -> Result<()> {
        let rt = RuntimeConf::default();
        for plugin in &list.plugins {
            let stdin = serde_json::to_vec(&self.base_config(list, plugin)?).unwrap_or_default();
            self.exec(plugin, Command::Status, &rt, &stdin)?;
        }
        Ok(())
    }

    /// The result cached by the last successful ADD of this attachment.
    pub fn cached_result(&self, network: &str, rt: &RuntimeConf) -> Option<CniResult> {
        let bytes = std::fs::read(self.cache_path(network, rt)).ok()?;
        let entry: CacheEntry = serde_json::from_slice(&bytes).ok()?;
        CniResult::from_value(&entry.result).ok()
    }

    fn cache_path(&self, network: &str, rt: &RuntimeConf) -> PathBuf {
        self.cache_dir.join("results").join(format!("{network}-{}-{}", rt.container_id, rt.ifname))
    }

    fn write_cache(&self, list: &ConfList, rt: &RuntimeConf, result: &CniResult) -> Result<()> {
        let entry = CacheEntry {
            kind: "cniCacheV1".into(),
            container_id: rt.container_id.clone(),
            ifname: rt.ifname.clone(),
            network: list.name.clone(),
            capability_args: rt.capability_args.clone(),
            result: result.to_json_value(&list.cni_version),
        };
        let path = self.cache_path(&list.name, rt);
        let io = |e: std::io::Error| CniError::io(format!("writing cache {}: {e}", path.display()));
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/"))).map_err(io)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&entry).unwrap_or_default()).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    fn base_config(&self, list: &ConfList, plugin: &Value) -> Result<Map<String, Value>> {
        let mut conf =
            plugin.as_object().cloned().ok_or_else(|| CniError::invalid_config("plugin is not an object"))?;
        conf.insert("cniVersion".into(), json!(list.cni_version));
        conf.insert("name".into(), json!(list.name));
        Ok(conf)
    }

    /// The config a plugin gets: its own keys, the list's name and version, `prevResult`, and
    /// `runtimeConfig` with the capabilities it declares.
    fn build_config(&self, list: &ConfList, plugin: &Value, prev: Option<&Value>, rt: &RuntimeConf) -> Result<Vec<u8>> {
        let mut conf = self.base_config(list, plugin)?;
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.clone());
        }
        let caps = plugin.get("capabilities").and_then(Value::as_object);
        let runtime: Map<String, Value> = rt
            .capability_args
            .iter()
            .filter(|(k, _)| caps.and_then(|c| c.get(*k)).and_then(Value::as_bool).unwrap_or(false))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !runtime.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(runtime));
        }
        serde_json::to_vec(&conf).map_err(|e| CniError::internal(e.to_string()))
    }

    fn exec(&self, plugin: &Value, command: Command, rt: &RuntimeConf, stdin: &[u8]) -> Result<Option<Value>> {
        let binary = find_in_path(ConfList::plugin_type(plugin)?, &self.path)?;
        let args: Vec<String> = rt.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let args = args.join(";");
        let path = std::env::join_paths(&self.path).map_err(|e| CniError::internal(e.to_string()))?;
        let path = path.to_string_lossy();
        let mut env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        env.extend([
            ("CNI_CONTAINERID", rt.container_id.as_str()),
            ("CNI_NETNS", rt.netns.as_str()),
            ("CNI_IFNAME", rt.ifname.as_str()),
            ("CNI_ARGS", args.as_str()),
            ("CNI_PATH", path.as_ref()),
        ]);
        exec_plugin(&binary, command, &env, stdin)
    }
}
