//! `weft lab`: a whole cluster on one machine. Every node is a network namespace wired to an
//! isolated switch namespace (the underlay, 198.18.0.0/24), runs a real `weft agent`, and gets
//! pods through the real CNI chain (`weft` → bridge → host-local). A supervisor process stands in
//! for systemd or a DaemonSet and restarts an agent that dies within a second. Nothing touches
//! the machine's own network namespace.

mod check;
mod show;
mod supervise;
pub(crate) mod up;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub use check::check;
pub use show::show;
pub use supervise::supervise;
pub use up::{down, up, UpOptions};

/// Where labs keep their state.
pub const STATE_ROOT: &str = "/run/weft-lab";

/// A lab as recorded in `lab.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lab {
    pub name: String,
    pub backend: String,
    pub network: String,
    pub switch_namespace: String,
    pub store: StoreInfo,
    pub supervisor_pid: Option<u32>,
    /// The agents' lease TTL, in seconds.
    #[serde(default = "default_ttl")]
    pub lease_ttl: u64,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreInfo {
    pub kind: String,
    pub endpoint: String,
    pub namespace: Option<String>,
    /// The etcd the lab runs, if it runs one.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Where the nodes reach the store, when that differs from `endpoint` (an etcd outside the
    /// lab, reached through the supervisor's relay on the underlay).
    #[serde(default)]
    pub node_endpoint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub namespace: String,
    pub address: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodInfo {
    pub name: String,
    pub node: String,
    pub namespace: String,
    pub address: String,
}

fn default_ttl() -> u64 {
    24 * 3600
}

impl Lab {
    pub fn state_dir(name: &str) -> PathBuf {
        Path::new(STATE_ROOT).join(name)
    }

    pub fn load(name: &str) -> Result<Option<Lab>> {
        let path = Self::state_dir(name).join("lab.json");
        match std::fs::read(&path) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self) -> Result<()> {
        let dir = Self::state_dir(&self.name);
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join("lab.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, dir.join("lab.json"))?;
        Ok(())
    }

    pub fn dir(&self) -> PathBuf {
        Self::state_dir(&self.name)
    }

    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir().join(node)
    }

    /// The agent's pid as the supervisor last recorded it.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        std::fs::read_to_string(self.node_dir(node).join("agent.pid")).ok()?.trim().parse().ok()
    }
}

/// Whether process `pid` is alive.
pub fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}
