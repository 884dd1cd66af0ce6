//! End to end with a real container runtime: podman (CNI backend, runc) runs two containers on a
//! weft conflist (bridge + host-local + portmap + loopback) inside a test namespace. Each gets
//! an address, they reach each other, a published port answers, and removing the containers
//! releases every address, veth and rule.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::json;

/// podman confined to a test namespace and a temporary directory; removes its containers,
/// mounts and files on drop.
struct Podman<'a> {
    node: &'a Ns,
    root: &'a Path,
}

impl Podman<'_> {
    fn cmd(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.node.path()))
            .arg("podman")
            .arg("--root")
            .arg(self.root.join("storage"))
            .arg("--runroot")
            .arg(self.root.join("run"))
            .args(args)
            .env("CONTAINERS_CONF", self.root.join("containers.conf"))
            .env(LOCK_DIR_ENV, self.root.join("cni-locks"))
            .output()
            .expect("running podman (apt-get install podman runc)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.cmd(args);
        assert!(ok, "podman {args:?} failed: {err}");
        out
    }

    fn run(&self, name: &str, extra: &[&str], command: &[&str]) {
        let rootfs = self.root.join("rootfs").display().to_string();
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "weftnet",
            "--runtime",
            "runc",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--rootfs", &rootfs]);
        args.extend_from_slice(command);
        self.ok(&args);
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        let _ = self.cmd(&["rm", "-f", "-a", "-t", "0"]);
        let prefix = self.root.display().to_string();
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mut points: Vec<&str> =
            mounts.lines().filter_map(|l| l.split(' ').nth(1)).filter(|m| m.starts_with(&prefix)).collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// The container's network: `main` (bridge or routed, with its IPAM), portmap and loopback.
fn prepare(root: &Path, plugins: &Path, main: serde_json::Value) {
    let rootfs = root.join("rootfs/bin");
    std::fs::create_dir_all(&rootfs).unwrap();
    std::fs::copy("/usr/bin/busybox", rootfs.join("busybox")).expect("busybox (apt-get install busybox-static)");
    for tool in ["sh", "nc", "sleep", "echo", "ip"] {
        std::os::unix::fs::symlink("busybox", rootfs.join(tool)).unwrap();
    }
    let netd = root.join("net.d");
    std::fs::create_dir_all(&netd).unwrap();
    std::fs::write(
        root.join("containers.conf"),
        format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\nnetwork_config_dir = \"{}\"\n\n[engine]\nruntime = \"runc\"\nevents_logger = \"file\"\ncgroup_manager = \"cgroupfs\"\n",
            plugins.display(),
            netd.display()
        ),
    )
    .unwrap();
    let conflist = json!({
        "cniVersion": "1.0.0", "name": "weftnet",
        "plugins": [
            main,
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "loopback"}
        ]
    });
    std::fs::write(netd.join("weftnet.conflist"), conflist.to_string()).unwrap();
}

#[test]
fn podman_runs_two_containers_on_weft() {
    // podman runs the plugins with an environment of its own: their lock files go to the
    // default directory, removed again below if this test made it.
    let _locks = DefaultLockDir::watch();
    let node = Ns::new("n");
    let plugins = weft_plugin_dir();
    let root = Dir::new("podman");
    let ipam = Dir::new("ipam");
    let bridge = unique("br");
    let main = json!({"type": "bridge", "bridge": bridge, "isDefaultGateway": true, "ipMasq": true, "hairpinMode": true,
                      "ipam": {"type": "host-local", "dataDir": ipam.path(), "ranges": [[{"subnet": "198.19.80.0/24"}]]}});
    prepare(root.path(), plugins.path(), main);
    let podman = Podman { node: &node, root: root.path() };

    podman.run("web", &["-p", "8080:80"], &["sh", "-c", "while true; do echo hello from web | nc -l -p 80; done"]);
    podman.run("client", &[], &["sleep", "600"]);
    let ip_of =
        |name: &str| podman.ok(&["inspect", name, "--format", "{{.NetworkSettings.Networks.weftnet.IPAddress}}"]);
    let (web_ip, client_ip) = (ip_of("web"), ip_of("client"));
    assert!(web_ip.starts_with("198.19.80.") && client_ip.starts_with("198.19.80."), "{web_ip} {client_ip}");
    assert_ne!(web_ip, client_ip);

    // Container to container over the bridge.
    let reply = podman.ok(&["exec", "client", "sh", "-c", &format!("nc {web_ip} 80 </dev/null")]);
    assert_eq!(reply, "hello from web");
    // The published port, from the node and from the other container through the node.
    let from_node = tcp_get(&node, "127.0.0.1", 8080).expect("published port from the node");
    assert_eq!(from_node.trim(), "hello from web");
    let via_gateway = podman.ok(&["exec", "client", "sh", "-c", "nc 198.19.80.1 8080 </dev/null"]);
    assert_eq!(via_gateway, "hello from web");
    assert_eq!(reservations(ipam.path(), "weftnet").len(), 2);
    assert!(node.nft().contains("hostport weftnet/"));

    podman.ok(&["rm", "-f", "-t", "0", "web", "client"]);
    assert!(reservations(ipam.path(), "weftnet").is_empty(), "addresses not released");
    eventually("veths removed", || node.ip_json(&["link", "show", "master", &bridge]).as_array().unwrap().is_empty());
    assert_reaped(&node);
    let rules = node.nft();
    assert!(!rules.contains("weftnet/"), "rules left: {rules}");
}

#[test]
fn podman_runs_two_containers_on_routed_pods() {
    let _locks = DefaultLockDir::watch();
    let node = Ns::new("n");
    let plugins = weft_plugin_dir();
    let root = Dir::new("podman");
    let ipam = Dir::new("ipam");
    let main = json!({"type": "routed", "mtu": 1400,
                      "ipam": {"type": "host-local", "dataDir": ipam.path(), "ranges": [[{"subnet": "198.19.81.0/26"}]]}});
    prepare(root.path(), plugins.path(), main);
    let podman = Podman { node: &node, root: root.path() };

    podman.run("web", &[], &["sh", "-c", "while true; do echo hello from web | nc -l -p 80; done"]);
    podman.run("client", &[], &["sleep", "600"]);
    let ip_of =
        |name: &str| podman.ok(&["inspect", name, "--format", "{{.NetworkSettings.Networks.weftnet.IPAddress}}"]);
    let (web_ip, client_ip) = (ip_of("web"), ip_of("client"));
    assert!(web_ip.starts_with("198.19.81.") && client_ip.starts_with("198.19.81."), "{web_ip} {client_ip}");
    // No bridge: each pod is a /32 route on the node, through its own veth.
    let pod_routes: Vec<String> = node.sh(&["ip", "route", "show", "proto", "201"]).lines().map(String::from).collect();
    assert_eq!(pod_routes.len(), 2, "{pod_routes:?}");
    assert!(!node.sh(&["ip", "-d", "link"]).contains("bridge "), "a bridge on a routed node");
    let reply = podman.ok(&["exec", "client", "sh", "-c", &format!("nc {web_ip} 80 </dev/null")]);
    assert_eq!(reply, "hello from web");
    let inside = podman.ok(&["exec", "client", "sh", "-c", "ip route; ip addr show eth0"]);
    assert!(inside.contains("default via 169.254.1.1 dev eth0"), "{inside}");
    assert!(inside.contains(&format!("inet {client_ip}/32")), "{inside}");

    podman.ok(&["rm", "-f", "-t", "0", "web", "client"]);
    assert!(reservations(ipam.path(), "weftnet").is_empty(), "addresses not released");
    eventually("pod routes removed", || node.sh(&["ip", "route", "show", "proto", "201"]).trim().is_empty());
    assert_reaped(&node);
}

/// Removes the plugins' default lock directory on drop if it did not exist before (it is empty
/// then: every DEL removes its attachment's lock file).
struct DefaultLockDir(bool);

impl DefaultLockDir {
    fn watch() -> DefaultLockDir {
        DefaultLockDir(Path::new(weft_plugins::attachment_lock::LOCK_DIR).exists())
    }
}

impl Drop for DefaultLockDir {
    fn drop(&mut self) {
        if !self.0 {
            let dir = Path::new(weft_plugins::attachment_lock::LOCK_DIR);
            // A reaper may still hold its lock file for a moment after the last DEL.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = std::fs::remove_dir(dir);
            if let Some(parent) = dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}
