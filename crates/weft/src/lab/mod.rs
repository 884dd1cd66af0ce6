//! `weft lab`: a whole cluster on one machine. Every node is a network namespace wired to an
//! isolated switch namespace (the underlay, 198.18.0.0/24), runs a real `weft agent`, and gets
//! pods through the real CNI chain (`weft` → bridge → host-local). A supervisor process stands in
//! for systemd or a DaemonSet and restarts an agent that dies within a second. Nothing touches
//! the machine's own network namespace.

mod build;
mod check;
mod down;
mod show;
mod supervise;
pub(crate) mod up;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub use check::{check, CheckOptions};
pub use down::down;
pub use show::show;
pub use supervise::supervise;
pub use up::{up, UpOptions};

/// Where labs keep their state.
pub const STATE_ROOT: &str = "/run/weft-lab";

/// The underlay every lab's nodes are on (each lab has its own switch).
pub const UNDERLAY: &str = "198.18.0.0/16";

/// An underlay address no lab ever gives out: for attaching an outside router or a probe.
pub const FREE_ADDRESS: &str = "198.18.255.254";

/// The longest lab name.
pub const MAX_NAME: usize = 24;

/// A lab name: 1 to [`MAX_NAME`] lowercase letters and digits, starting with a letter. Every
/// name the lab derives (`NAME-sw`, `NAME-node3`, `NAME-node3-pod1`, `/run/weft-lab/NAME`) is
/// then valid, and one lab's names can never be another's: no lab name contains the `-` that
/// separates them.
pub fn validate_name(name: &str) -> std::result::Result<String, String> {
    let ok = name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(name.to_string())
    } else {
        Err(format!(
            "{name:?} is not a lab name: use 1 to {MAX_NAME} lowercase letters and digits, starting with a letter \
             (e.g. weft, lab2)"
        ))
    }
}

/// What `up` was asked for, recorded so that a later `up` can say what differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub nodes: usize,
    pub pods: usize,
    pub backend: String,
    pub store: String,
    pub lease_ttl: u64,
    pub network: String,
    pub subnet_len: Option<u8>,
    pub direct_routing: bool,
    #[serde(default)]
    pub route_reflectors: usize,
    #[serde(default)]
    pub block_size: Option<u8>,
    #[serde(default)]
    pub peers: Vec<String>,
}

impl Recorded {
    /// `option: recorded -> asked` for each of `explicit` (the options given on the command
    /// line) that differs.
    pub fn differences(&self, asked: &Recorded, explicit: &[String]) -> Vec<String> {
        let fields: [(&str, String, String); 11] = [
            ("nodes", self.nodes.to_string(), asked.nodes.to_string()),
            ("pods", self.pods.to_string(), asked.pods.to_string()),
            ("backend", self.backend.clone(), asked.backend.clone()),
            ("store", self.store.clone(), asked.store.clone()),
            ("lease_ttl", format!("{}s", self.lease_ttl), format!("{}s", asked.lease_ttl)),
            ("network", self.network.clone(), asked.network.clone()),
            ("subnet_len", format!("{:?}", self.subnet_len), format!("{:?}", asked.subnet_len)),
            ("direct_routing", self.direct_routing.to_string(), asked.direct_routing.to_string()),
            ("route_reflectors", self.route_reflectors.to_string(), asked.route_reflectors.to_string()),
            ("block_size", format!("{:?}", self.block_size), format!("{:?}", asked.block_size)),
            ("peers", self.peers.join(" "), asked.peers.join(" ")),
        ];
        fields
            .into_iter()
            .filter(|(id, had, wants)| had != wants && explicit.iter().any(|e| e == id))
            .map(|(id, had, wants)| format!("--{} is {had}, asked {wants}", id.replace('_', "-")))
            .collect()
    }
}

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
    /// What `up` was asked for.
    #[serde(default)]
    pub options: Option<Recorded>,
    /// Set once `up` finished: a lab without it was interrupted half-way.
    #[serde(default)]
    pub complete: bool,
    /// The weft binary the lab runs (its path, so that a binary replaced in place is the one
    /// restarted agents run).
    #[serde(default)]
    pub exe: Option<PathBuf>,
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

    /// The udp forwarder's control socket on `node` (the agent's state directory).
    pub fn forwarder_socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("udp-forwarder.sock")
    }

    /// How many peers `node` forwards to: entries of its udp forwarder's table, or (kernel
    /// backends) its weft routes, one per peer.
    pub fn peers_programmed(&self, node: &NodeInfo, nl: &mut weft_dataplane::Netlink) -> Result<usize> {
        if self.backend == "udp" {
            let status = weft_agent::tun::status(&self.forwarder_socket(&node.name));
            return Ok(status.and_then(|s| s["peers"].as_array().map(Vec::len)).unwrap_or(0));
        }
        let routes = nl.routes().map_err(|e| anyhow::anyhow!("{e}"))?;
        // bgp: the blocks learned from peers (each holds one at least).
        let protocol = match self.backend.as_str() {
            "bgp" => weft_dataplane::route::RTPROT_WEFT_BGP,
            _ => weft_dataplane::route::RTPROT_WEFT,
        };
        Ok(routes.into_iter().filter(|r| r.protocol == protocol).count())
    }

    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir().join(node)
    }

    /// Every namespace the lab is made of.
    pub fn namespaces(&self) -> Vec<String> {
        let mut out = vec![self.switch_namespace.clone()];
        out.extend(self.nodes.iter().map(|n| n.namespace.clone()));
        out.extend(self.pods.iter().map(|p| p.namespace.clone()));
        out
    }

    /// The agent's pid as the supervisor last recorded it.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        std::fs::read_to_string(self.node_dir(node).join("agent.pid")).ok()?.trim().parse().ok()
    }

    /// The binary to run for the lab's processes.
    pub fn exe(&self) -> std::io::Result<PathBuf> {
        match &self.exe {
            Some(path) if path.exists() => Ok(path.clone()),
            _ => std::env::current_exe(),
        }
    }

    /// Whether `pid` is this lab's supervisor, alive.
    pub fn supervisor_alive(&self) -> bool {
        self.supervisor_pid.is_some_and(|pid| {
            alive(pid) && cmdline(pid).windows(4).any(|w| w == ["lab", "supervise", "--name", self.name.as_str()])
        })
    }

    /// Whether the recorded agent of `node` is alive and is that agent.
    pub fn agent_alive(&self, node: &str) -> bool {
        let dir = self.node_dir(node).display().to_string();
        self.agent_pid(node).is_some_and(|pid| alive(pid) && cmdline(pid).contains(&dir))
    }

    /// Whether the lab's own etcd is alive.
    pub fn etcd_alive(&self) -> bool {
        let data = self.dir().join("etcd").join("data").display().to_string();
        self.store.pid.is_some_and(|pid| alive(pid) && cmdline(pid).contains(&data))
    }
}

/// The namespace of a lab's switch, node and pod.
pub fn switch_namespace(lab: &str) -> String {
    format!("{lab}-sw")
}

pub fn node_namespace(lab: &str, node: &str) -> String {
    format!("{lab}-{node}")
}

/// Whether `ns` is a namespace name that lab `lab` makes: `LAB-sw`, `LAB-nodeN`, `LAB-nodeN-podM`.
pub fn is_lab_namespace(lab: &str, ns: &str) -> bool {
    let Some(rest) = ns.strip_prefix(lab).and_then(|r| r.strip_prefix('-')) else { return false };
    if rest == "sw" {
        return true;
    }
    let numbered = |s: &str, word: &str| {
        s.strip_prefix(word).is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
    };
    match rest.split_once('-') {
        None => numbered(rest, "node"),
        Some((node, pod)) => numbered(node, "node") && numbered(pod, "pod"),
    }
}

/// A process's command line, split.
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
        })
        .unwrap_or_default()
}

/// Holds the lab's lock: one `up` or `down` of a lab at a time. The lock file sits beside the
/// lab's directory (`/run/weft-lab/.NAME.lock`) and goes with the lab.
pub struct LabLock {
    file: std::fs::File,
    path: PathBuf,
}

impl LabLock {
    fn path(name: &str) -> PathBuf {
        Path::new(STATE_ROOT).join(format!(".{name}.lock"))
    }

    /// Takes the lock; `wait` says whether to wait for another holder or fail at once.
    pub fn take(name: &str, wait: bool) -> Result<Option<LabLock>> {
        use std::os::unix::fs::MetadataExt;
        let path = Self::path(name);
        loop {
            use std::os::unix::fs::OpenOptionsExt;
            let open = || std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&path);
            // The state root goes with the last lab: made again when missing.
            let file = match open() {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(STATE_ROOT).with_context(|| format!("creating {STATE_ROOT}"))?;
                    open()
                }
                other => other,
            }
            .with_context(|| format!("opening {}", path.display()))?;
            if wait {
                file.lock().with_context(|| format!("locking {}", path.display()))?;
            } else if file.try_lock().is_err() {
                return Ok(None);
            }
            // Removed by the holder before us (a `down`): take the current file.
            let same = std::fs::metadata(&path).is_ok_and(|m| file.metadata().is_ok_and(|h| h.ino() == m.ino()));
            if same {
                return Ok(Some(LabLock { file, path }));
            }
        }
    }

    /// The lab is gone: so is its lock file.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.file);
    }
}

/// Whether process `pid` is alive (a zombie, dead but not reaped, is not).
pub fn alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else { return false };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None).is_ok() && !is_zombie(pid)
}

/// Whether `pid` has exited and waits to be reaped (or is gone).
pub fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["weft", "a", "lab2", "abcdefghijklmnopqrstuvwx"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a.b", "a/b", "-a", "1lab", "Lab", "a-b", "abcdefghijklmnopqrstuvwxy", "é", ".."] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn namespaces_of_a_lab_are_its_own() {
        for ns in ["a-sw", "a-node1", "a-node12-pod3"] {
            assert!(is_lab_namespace("a", ns), "{ns}");
        }
        for ns in ["ab-sw", "a-nodex", "a-node", "a-node1-pod", "a-node1-pod1-x", "a", "a-", "b-node1", "a-sw2"] {
            assert!(!is_lab_namespace("a", ns), "{ns}");
        }
    }

    #[test]
    fn differences_name_explicit_options_only() {
        let had = Recorded {
            nodes: 3,
            pods: 2,
            backend: "vxlan".into(),
            store: "file".into(),
            lease_ttl: 60,
            network: "198.19.0.0/16".into(),
            subnet_len: None,
            direct_routing: false,
            route_reflectors: 0,
            block_size: None,
            peers: Vec::new(),
        };
        let asked = Recorded { nodes: 5, backend: "host-gw".into(), ..had.clone() };
        assert!(had.differences(&asked, &[]).is_empty());
        assert_eq!(had.differences(&asked, &["nodes".into()]), ["--nodes is 3, asked 5"]);
        assert_eq!(had.differences(&asked, &["nodes".into(), "backend".into()]).len(), 2);
    }
}
