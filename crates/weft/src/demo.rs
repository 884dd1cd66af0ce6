//! `weft demo`: two containers on a weft bridge, in namespaces made for the demo. A "node"
//! namespace stands in for the host, so nothing touches the machine's own network; everything
//! the demo makes is removed when it ends, also on failure.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use weft_cni::runner::{ConfList, Runner, RuntimeConf};
use weft_netns::NetNs;

/// Named namespaces that are deleted when dropped.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = weft_netns::delete_named(name);
        }
    }
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn plugin_dir(root: &Path) -> Result<PathBuf> {
    let dir = root.join("bin");
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?;
    for name in weft_plugins::PLUGIN_NAMES {
        std::os::unix::fs::symlink(&exe, dir.join(name))?;
    }
    Ok(dir)
}

pub fn run() -> Result<()> {
    let tag = std::process::id();
    let names =
        Namespaces(vec![format!("weft-demo-{tag}-node"), format!("weft-demo-{tag}-a"), format!("weft-demo-{tag}-b")]);
    let root = TempDir(std::env::temp_dir().join(format!("weft-demo-{tag}")));
    std::fs::create_dir_all(&root.0)?;
    let node = weft_netns::create_named(&names.0[0]).context("creating the node namespace (are you root?)")?;
    for name in &names.0[1..] {
        weft_netns::create_named(name)?;
    }
    let mut runner = Runner::new(vec![plugin_dir(&root.0)?], root.0.join("cache"));
    runner.env.push((weft_plugins::attachment_lock::LOCK_DIR_ENV.into(), root.0.join("locks").display().to_string()));
    let list = ConfList::from_bytes(
        json!({
            "cniVersion": "1.0.0",
            "name": "demo",
            "plugins": [
                {"type": "bridge", "bridge": "weft-demo0", "isGateway": true, "ipMasq": true,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.19.10.0/24"}]],
                          "dataDir": root.0.join("ipam")}},
                {"type": "loopback"}
            ]
        })
        .to_string()
        .as_bytes(),
    )?;
    outln!("node namespace {} stands in for the host; the conflist:", names.0[0]);
    outln!("{}\n", serde_json::to_string_pretty(&list.plugins)?);

    let mut addresses = Vec::new();
    for (i, ns) in names.0[1..].iter().enumerate() {
        let rt = RuntimeConf {
            container_id: format!("demo-{tag}-{i}"),
            netns: weft_netns::named_path(ns).display().to_string(),
            ifname: "eth0".into(),
            ..Default::default()
        };
        let result = node.run(|| runner.add(&list, &rt))?.map_err(|e| anyhow::anyhow!("ADD {ns}: {e}"))?;
        let ip = result.ips.first().context("no address in the result")?.address;
        outln!("container {ns}: eth0 {ip} via {:?}", result.ips[0].gateway.map(|g| g.to_string()).unwrap_or_default());
        addresses.push((rt, ip.addr()));
    }

    let (a, b) = (NetNs::open(weft_netns::named_path(&names.0[1]))?, NetNs::open(weft_netns::named_path(&names.0[2]))?);
    let reply = talk(&a, &b, addresses[1].1)?;
    outln!("\n{} -> {}:8080 over TCP: {reply:?}", addresses[0].1, addresses[1].1);

    for (rt, ip) in &addresses {
        node.run(|| runner.del(&list, rt))?.map_err(|e| anyhow::anyhow!("DEL {}: {e}", rt.container_id))?;
        outln!("released {ip} (container {})", rt.container_id);
    }
    let left = std::fs::read_dir(root.0.join("ipam/demo"))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.parse::<IpAddr>().is_ok())
        .count();
    outln!("reservations left: {left}; removing the demo namespaces");
    Ok(())
}

/// A TCP echo from a listener in `server` to a client in `client`.
fn talk(client: &NetNs, server: &NetNs, server_ip: IpAddr) -> Result<String> {
    let addr = SocketAddr::new(server_ip, 8080);
    let listener = server.run(|| TcpListener::bind(addr))??;
    let serve = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut conn, peer) = listener.accept()?;
        conn.write_all(format!("hello {}, this is {}", peer.ip(), addr.ip()).as_bytes())
    });
    let text = client.run(|| -> std::io::Result<String> {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        Ok(text)
    })??;
    serve.join().map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    Ok(text)
}
