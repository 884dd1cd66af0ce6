//! The namespace test harness: every test makes its own uniquely named namespaces (a "node" that
//! stands in for the host, and containers), runs the real plugin binaries inside them, and
//! removes everything in `Drop` guards, also when the test fails.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use weft_netns::NetNs;

pub const REFERENCE_DIR: &str = "/usr/lib/cni";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique short tag for names: process id and a counter (namespace and link names stay short).
pub fn unique(label: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("wt{}{n}{label}", std::process::id() % 100_000)
}

pub fn require_root() {
    assert!(nix::unistd::geteuid().is_root(), "these tests work on the real kernel and need root");
}

/// A named namespace deleted on drop.
pub struct Ns {
    pub name: String,
    pub handle: NetNs,
}

impl Ns {
    pub fn new(label: &str) -> Ns {
        require_root();
        let name = unique(label);
        let handle = weft_netns::create_named(&name).expect("creating a test namespace");
        let ns = Ns { name, handle };
        ns.sh(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        weft_netns::named_path(&self.name).display().to_string()
    }

    /// Runs a command inside the namespace (only for observing or for test traffic); panics on
    /// failure and returns stdout.
    pub fn sh(&self, argv: &[&str]) -> String {
        let out = self.try_sh(argv);
        assert!(out.0, "{argv:?} in {} failed: {}", self.name, out.2);
        out.1
    }

    /// Runs a command inside the namespace: (success, stdout, stderr).
    pub fn try_sh(&self, argv: &[&str]) -> (bool, String, String) {
        let out = self
            .handle
            .run(|| Command::new(argv[0]).args(&argv[1..]).stdin(Stdio::null()).output())
            .expect("entering the namespace")
            .unwrap_or_else(|e| panic!("running {argv:?}: {e}"));
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    /// `ip -j ...` parsed.
    pub fn ip_json(&self, args: &[&str]) -> Value {
        let mut argv = vec!["ip", "-j"];
        argv.extend_from_slice(args);
        let text = self.sh(&argv);
        serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text }).expect("ip -j output")
    }

    /// The link names in the namespace.
    pub fn links(&self) -> Vec<String> {
        self.ip_json(&["link", "show"])
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_string())
            .collect()
    }

    /// `addr/prefix` of every global address on `dev`.
    pub fn addrs(&self, dev: &str) -> Vec<String> {
        let v = self.ip_json(&["addr", "show", "dev", dev]);
        let mut out: Vec<String> = v[0]["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["scope"] == "global")
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect();
        out.sort();
        out
    }

    /// Routes as `dst via gw dev` strings, both families, kernel-made routes included.
    pub fn routes(&self) -> Vec<String> {
        let mut out = Vec::new();
        for fam in ["-4", "-6"] {
            for r in self.ip_json(&[fam, "route", "show"]).as_array().unwrap() {
                let dst = r["dst"].as_str().unwrap_or("");
                if dst.starts_with("fe80") || r["dev"] == "lo" {
                    continue;
                }
                let gw = r["gateway"].as_str().map(|g| format!(" via {g}")).unwrap_or_default();
                out.push(format!("{dst}{gw} dev {}", r["dev"].as_str().unwrap_or("")));
            }
        }
        out.sort();
        out
    }

    /// The nftables ruleset of the namespace (text).
    pub fn nft(&self) -> String {
        self.sh(&["nft", "list", "ruleset"])
    }

    /// The iptables nat rules of the namespace (text without the timestamped comments), for
    /// the reference plugins.
    pub fn iptables_nat(&self) -> String {
        self.try_sh(&["iptables-save", "-t", "nat"])
            .1
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = weft_netns::delete_named(&self.name);
    }
}

/// A temporary directory removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(label: &str) -> Dir {
        let path = std::env::temp_dir().join(unique(label));
        std::fs::create_dir_all(&path).unwrap();
        Dir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The weft binary under test.
pub fn weft_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_weft"))
}

pub use weft_plugins::attachment_lock::LOCK_DIR_ENV;

/// Where the plugins of a test's bin directory keep their lock files: inside it, so they go
/// with it.
pub fn lock_dir_of(bin_dir: &Path) -> PathBuf {
    bin_dir.join(".locks")
}

/// A libcni-style runner over `bin`, caching in `cache`, whose plugins keep their lock files in
/// the test's bin directory.
pub fn runner(bin: &Path, cache: &Path) -> weft_cni::runner::Runner {
    let mut runner = weft_cni::runner::Runner::new(vec![bin.to_path_buf()], cache);
    runner.env.push((LOCK_DIR_ENV.to_string(), lock_dir_of(bin).display().to_string()));
    runner
}

/// A CNI bin directory with weft's plugins (symlinks to the binary under test).
pub fn weft_plugin_dir() -> Dir {
    let dir = Dir::new("bin");
    for name in weft_plugins::PLUGIN_NAMES {
        std::os::unix::fs::symlink(weft_bin(), dir.0.join(name)).unwrap();
    }
    dir
}

pub fn reference_available() -> bool {
    Path::new(REFERENCE_DIR).join("bridge").exists()
}

/// One plugin invocation's outcome.
#[derive(Debug)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("plugin output is not JSON ({e}): {self:?}"))
    }

    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "plugin failed: {self:?}");
        self
    }

    pub fn error_code(&self) -> u64 {
        assert_ne!(self.code, 0, "plugin succeeded but should have failed: {self:?}");
        self.json()["code"].as_u64().unwrap_or_else(|| panic!("no code in {self:?}"))
    }
}

/// Runs `dir/plugin` with `env` and `stdin`, as a process inside `node` (its "host").
pub fn exec_in(node: &Ns, dir: &Path, plugin: &str, env: &[(&str, &str)], stdin: &str) -> Outcome {
    let binary = dir.join(plugin);
    let out = node
        .handle
        .run(|| {
            let mut child = Command::new(&binary)
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env(LOCK_DIR_ENV, lock_dir_of(dir))
                .envs(env.iter().copied())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawning plugin");
            let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
            child.wait_with_output().expect("waiting for plugin")
        })
        .expect("entering the node namespace");
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// The usual CNI environment for a command on one attachment.
pub struct Call<'a> {
    pub dir: &'a Path,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
}

impl<'a> Call<'a> {
    pub fn new(dir: &'a Path, container_id: &str, netns: &str) -> Self {
        Call { dir, container_id: container_id.into(), netns: netns.into(), ifname: "eth0".into(), args: String::new() }
    }

    pub fn run(&self, node: &Ns, plugin: &str, command: &str, stdin: &str) -> Outcome {
        let path = self.dir.display().to_string();
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", self.container_id.as_str()),
            ("CNI_NETNS", self.netns.as_str()),
            ("CNI_IFNAME", self.ifname.as_str()),
            ("CNI_ARGS", self.args.as_str()),
            ("CNI_PATH", path.as_str()),
        ];
        exec_in(node, self.dir, plugin, &env, stdin)
    }
}

/// Files (reservations etc.) in an IPAM data directory of a network.
pub fn ipam_files(data_dir: &Path, network: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data_dir.join(network))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Addresses reserved in an IPAM data directory.
pub fn reservations(data_dir: &Path, network: &str) -> Vec<String> {
    ipam_files(data_dir, network).into_iter().filter(|n| n.parse::<std::net::IpAddr>().is_ok()).collect()
}

/// A TCP server in a namespace that answers every connection with `reply` until dropped.
pub struct TcpServer {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpServer {
    pub fn start(ns: &Ns, addr: &str, port: u16, reply: &str) -> TcpServer {
        let bind: std::net::SocketAddr = format!("{}:{port}", bracket(addr)).parse().unwrap();
        let listener = ns.handle.run(|| std::net::TcpListener::bind(bind)).unwrap().expect("bind");
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, reply) = (stop.clone(), reply.to_string());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        let _ = conn.write_all(format!("{reply} to {}", peer.ip()).as_bytes());
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        });
        TcpServer { port, stop, thread: Some(thread) }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn bracket(addr: &str) -> String {
    if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr.to_string()
    }
}

/// Connects from `ns` to `addr:port` and returns what the server said (Err on failure).
pub fn tcp_get(ns: &Ns, addr: &str, port: u16) -> Result<String, String> {
    use std::io::Read;
    let target: std::net::SocketAddr = format!("{}:{port}", bracket(addr)).parse().unwrap();
    ns.handle
        .run(|| {
            let mut conn = std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_secs(2))
                .map_err(|e| format!("connect {target}: {e}"))?;
            conn.set_read_timeout(Some(std::time::Duration::from_secs(2))).map_err(|e| e.to_string())?;
            let mut text = String::new();
            conn.read_to_string(&mut text).map_err(|e| format!("read from {target}: {e}"))?;
            Ok(text)
        })
        .unwrap()
}

/// Connects two namespaces with a veth pair and addresses (test topology, not product code).
pub fn wire(a: &Ns, a_addr: &str, b: &Ns, b_addr: &str) {
    let (ea, eb) = (unique("va"), unique("vb"));
    a.sh(&["ip", "link", "add", &ea, "type", "veth", "peer", "name", &eb, "netns", &b.name]);
    a.sh(&["ip", "addr", "add", a_addr, "dev", &ea]);
    a.sh(&["ip", "link", "set", &ea, "up"]);
    b.sh(&["ip", "addr", "add", b_addr, "dev", &eb]);
    b.sh(&["ip", "link", "set", &eb, "up"]);
}

/// Polls `cond` for up to 5 s (work the plugins hand to a detached reaper, such as deleting a
/// retired veth, finishes shortly after the plugin returns).
pub fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "not within 5 s: {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The link group DELs put retired host veths in, as `ip` prints it.
pub fn retired_group() -> String {
    weft_plugins::teardown::RETIRED_GROUP.to_string()
}

/// The links of `ns` that a DEL retired and no reaper has deleted yet: renamed container ends
/// and host ends in the retired group.
pub fn retired_links(ns: &Ns) -> Vec<String> {
    ns.ip_json(&["link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["group"] == retired_group().as_str() || l["ifname"].as_str().unwrap().starts_with("wdel"))
        .map(|l| l["ifname"].as_str().unwrap().to_string())
        .collect()
}

/// Asserts that no veth retired by a DEL is left in `ns` (within the reaper's time).
pub fn assert_reaped(ns: &Ns) {
    eventually(&format!("retired veths deleted in {}", ns.name), || retired_links(ns).is_empty());
}

/// Asserts that the host veth `veth` is retired (down, in the retired group) or already gone.
pub fn assert_retired(ns: &Ns, veth: &str) {
    let links = ns.ip_json(&["link", "show"]);
    if let Some(link) = links.as_array().unwrap().iter().find(|l| l["ifname"] == veth) {
        assert_eq!(link["group"], retired_group().as_str(), "{veth} not retired: {link}");
        assert!(!link["flags"].as_array().unwrap().iter().any(|f| f == "UP"), "{veth} still up: {link}");
    }
}

/// An etcd on loopback (free ports), killed and its data removed when dropped.
pub struct LoopbackEtcd {
    child: std::process::Child,
    pub url: String,
    _dir: Dir,
}

impl LoopbackEtcd {
    pub fn start() -> LoopbackEtcd {
        let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (client, peer) = (format!("http://127.0.0.1:{}", port()), format!("http://127.0.0.1:{}", port()));
        let dir = Dir::new("etcd");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("t={peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (apt-get install etcd-server)");
        let etcd = LoopbackEtcd { child, url: client, _dir: dir };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while !etcd.ctl(&["endpoint", "health"]).status.success() {
            assert!(std::time::Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        etcd
    }

    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new("etcdctl").env("ETCDCTL_API", "3").args(["--endpoints", &self.url]).args(args).output().unwrap()
    }
}

impl Drop for LoopbackEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
