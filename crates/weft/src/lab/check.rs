//! `weft lab check`: every pod talks to every other pod over TCP with 64 KiB each way (full-size
//! segments, which catch MTU mistakes), and the result is printed as a matrix.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use weft_netns::NetNs;

use super::{Lab, PodInfo};

const PORT: u16 = 7777;
const PAYLOAD: usize = 64 * 1024;

fn serve(pod: &PodInfo, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>> {
    let ns = NetNs::open(weft_netns::named_path(&pod.namespace))?;
    let addr: SocketAddr = format!("{}:{PORT}", pod.address).parse()?;
    let listener = ns.run(|| TcpListener::bind(addr))?.with_context(|| format!("listening in {}", pod.name))?;
    listener.set_nonblocking(true)?;
    Ok(std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    std::thread::spawn(move || {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut buf = vec![0u8; PAYLOAD];
                        if conn.read_exact(&mut buf).is_ok() {
                            let _ = conn.write_all(&buf);
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }))
}

fn probe(from: &PodInfo, to: &PodInfo) -> Result<()> {
    let ns = NetNs::open(weft_netns::named_path(&from.namespace))?;
    let addr: SocketAddr = format!("{}:{PORT}", to.address).parse()?;
    ns.run(|| -> std::io::Result<()> {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.set_write_timeout(Some(Duration::from_secs(5)))?;
        let data: Vec<u8> = (0..PAYLOAD).map(|i| (i % 251) as u8).collect();
        conn.write_all(&data)?;
        let mut back = vec![0u8; PAYLOAD];
        conn.read_exact(&mut back)?;
        if back != data {
            return Err(std::io::Error::other("the echo differs"));
        }
        Ok(())
    })??;
    Ok(())
}

pub fn check(name: &str) -> Result<()> {
    let lab = Lab::load(name)?.with_context(|| format!("no lab named {name}; start one with `weft lab up`"))?;
    if lab.pods.len() < 2 {
        bail!("lab {name} has {} pod(s); `weft lab up --pods N` makes more", lab.pods.len());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = lab.pods.iter().map(|p| serve(p, stop.clone())).collect::<Result<_>>()?;
    let width = lab.pods.iter().map(|p| p.name.len()).max().unwrap_or(4);
    out!("{:width$} ", "from\\to");
    for to in &lab.pods {
        out!(" {:>width$}", to.name);
    }
    outln!();
    let mut failures = Vec::new();
    for from in &lab.pods {
        out!("{:width$} ", from.name);
        for to in &lab.pods {
            let cell = if from.name == to.name {
                "-".to_string()
            } else {
                match probe(from, to) {
                    Ok(()) => "ok".to_string(),
                    Err(e) => {
                        failures.push(format!("{} -> {} ({}): {e:#}", from.name, to.name, to.address));
                        "FAIL".to_string()
                    }
                }
            };
            out!(" {cell:>width$}");
        }
        outln!();
    }
    stop.store(true, Ordering::SeqCst);
    for s in servers {
        let _ = s.join();
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} pod pairs failed:\n{}",
            failures.len(),
            lab.pods.len() * (lab.pods.len() - 1),
            failures.join("\n")
        );
    }
    outln!("all {} pod pairs connected ({} KiB each way)", lab.pods.len() * (lab.pods.len() - 1), PAYLOAD / 1024);
    Ok(())
}
