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

/// What `weft lab check` probes.
#[derive(clap::Args)]
pub struct CheckOptions {
    #[arg(long, default_value = "weft", value_parser = super::validate_name)]
    pub name: String,
    /// Probe this many pod pairs picked at random instead of all of them (for big labs).
    #[arg(long)]
    pub pairs: Option<usize>,
    /// How many probes run at once.
    #[arg(long, default_value_t = 32)]
    pub parallel: usize,
}

/// The pairs to probe: all ordered pairs, or `sample` of them picked at random.
fn pairs(pods: usize, sample: Option<usize>) -> Vec<(usize, usize)> {
    let mut all: Vec<(usize, usize)> =
        (0..pods).flat_map(|a| (0..pods).filter(move |b| *b != a).map(move |b| (a, b))).collect();
    if let Some(n) = sample.filter(|n| *n < all.len()) {
        // A partial Fisher-Yates shuffle with the kernel's randomness.
        for i in 0..n {
            let r: [u8; 8] = weft_plugins::common::random_bytes();
            let j = i + (u64::from_le_bytes(r) % (all.len() - i) as u64) as usize;
            all.swap(i, j);
        }
        all.truncate(n);
        all.sort();
    }
    all
}

pub fn check(opts: &CheckOptions) -> Result<()> {
    let name = &opts.name;
    let lab = Lab::load(name)?.with_context(|| format!("no lab named {name}; start one with `weft lab up`"))?;
    if lab.pods.len() < 2 {
        bail!("lab {name} has {} pod(s); `weft lab up --pods N` makes more", lab.pods.len());
    }
    if opts.pairs == Some(0) {
        bail!("--pairs 0 probes nothing: give at least 1 (or leave it out for every pair)");
    }
    let todo = pairs(lab.pods.len(), opts.pairs);
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = lab.pods.iter().map(|p| serve(p, stop.clone())).collect::<Result<_>>()?;
    // Bounded parallel probes: workers take the next pair until none is left.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let outcomes: Vec<std::sync::Mutex<Option<Result<()>>>> =
        todo.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..opts.parallel.clamp(1, 256).min(todo.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some((a, b)) = todo.get(i) else { return };
                let outcome = probe(&lab.pods[*a], &lab.pods[*b]);
                if let Ok(mut slot) = outcomes[i].lock() {
                    *slot = Some(outcome);
                }
            });
        }
    });
    stop.store(true, Ordering::SeqCst);
    for s in servers {
        let _ = s.join();
    }
    let mut failures = Vec::new();
    let mut failed = std::collections::BTreeSet::new();
    for ((a, b), slot) in todo.iter().zip(&outcomes) {
        let outcome = slot.lock().ok().and_then(|mut s| s.take()).unwrap_or_else(|| Err(anyhow::anyhow!("not probed")));
        if let Err(e) = outcome {
            let (from, to) = (&lab.pods[*a], &lab.pods[*b]);
            failures.push(format!("{} -> {} ({}): {e:#}", from.name, to.name, to.address));
            failed.insert((*a, *b));
        }
    }
    if opts.pairs.is_none() && lab.pods.len() <= 12 {
        print_matrix(&lab, &failed);
    }
    if !failures.is_empty() {
        bail!("{} of {} pod pairs failed:\n{}", failures.len(), todo.len(), failures.join("\n"));
    }
    let of = if opts.pairs.is_some() {
        format!(" (a sample of {})", lab.pods.len() * (lab.pods.len() - 1))
    } else {
        String::new()
    };
    outln!("all {} pod pairs connected{of} ({} KiB each way)", todo.len(), PAYLOAD / 1024);
    Ok(())
}

fn print_matrix(lab: &Lab, failed: &std::collections::BTreeSet<(usize, usize)>) {
    let width = lab.pods.iter().map(|p| p.name.len()).max().unwrap_or(4);
    out!("{:width$} ", "from\\to");
    for to in &lab.pods {
        out!(" {:>width$}", to.name);
    }
    outln!();
    for (a, from) in lab.pods.iter().enumerate() {
        out!("{:width$} ", from.name);
        for b in 0..lab.pods.len() {
            let cell = if a == b {
                "-"
            } else if failed.contains(&(a, b)) {
                "FAIL"
            } else {
                "ok"
            };
            out!(" {cell:>width$}");
        }
        outln!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_pairs_or_a_sample_of_distinct_ones() {
        assert_eq!(pairs(3, None), [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]);
        let sample = pairs(100, Some(50));
        assert_eq!(sample.len(), 50);
        assert!(sample.windows(2).all(|w| w[0] < w[1]) && sample.iter().all(|(a, b)| a != b && *a < 100 && *b < 100));
        assert_eq!(pairs(3, Some(10)).len(), 6);
    }
}
