//! Times ADD and DEL of the bridge + host-local chain for weft and the reference plugins in one
//! run, each in namespaces of its own: 100 containers one after another, 50 at once, and again
//! with 3000 existing reservations. Prints medians and the weft/reference ratio.
//! Run through `bench/cni-bench.sh` (needs root).

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weft_netns::NetNs;

const SEQ: usize = 100;
const PAR: usize = 50;
const PREFILLED: usize = 3000;

struct Guard(Vec<String>, Vec<PathBuf>);

impl Drop for Guard {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = weft_netns::delete_named(n);
        }
        for d in &self.1 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

struct Setup {
    node: NetNs,
    conts: Vec<String>,
    data: PathBuf,
    bin: PathBuf,
}

fn ns(guard: &mut Guard, name: String) -> NetNs {
    let handle = weft_netns::create_named(&name).expect("creating a namespace (root?)");
    guard.0.push(name);
    handle
}

fn setup(guard: &mut Guard, label: &str, bin: &Path, count: usize) -> Setup {
    let prefix = std::env::var("WEFT_BENCH_PREFIX").unwrap_or_else(|_| format!("wb{}", std::process::id() % 10000));
    let tag = format!("{prefix}{label}");
    let node = ns(guard, format!("{tag}n"));
    let conts: Vec<String> = (0..count)
        .map(|i| {
            let name = format!("{tag}c{i}");
            ns(guard, name.clone());
            name
        })
        .collect();
    let data = std::env::temp_dir().join(format!("{tag}-ipam"));
    guard.1.push(data.clone());
    Setup { node, conts, data, bin: bin.to_path_buf() }
}

fn conf(data: &Path, subnet: &str) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"bench","type":"bridge","bridge":"bench0","isGateway":true,
            "ipam":{{"type":"host-local","dataDir":"{}","ranges":[[{{"subnet":"{subnet}"}}]]}}}}"#,
        data.display()
    )
}

fn spawn(s: &Setup, command: &str, i: usize, conf: &str) -> std::process::Child {
    let mut child = Command::new(s.bin.join("bridge"))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("bench{i}"))
        .env("CNI_NETNS", weft_netns::named_path(&s.conts[i]))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &s.bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the plugin");
    child.stdin.take().map(|mut w| w.write_all(conf.as_bytes()));
    child
}

fn check(out: std::process::Output, what: &str) {
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stdout));
}

/// Sequential: each call timed on its own.
fn sequential(s: &Setup, command: &str, conf: &str) -> Vec<Duration> {
    s.node
        .run(|| {
            (0..s.conts.len())
                .map(|i| {
                    let t = Instant::now();
                    check(spawn(s, command, i, conf).wait_with_output().expect("wait"), command);
                    t.elapsed()
                })
                .collect()
        })
        .expect("entering the node")
}

/// Waits (untimed) until veths retired by DELs are deleted, so that the reapers' kernel work does
/// not slow down the next measurement.
fn wait_reaped(s: &Setup) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let links = s.node.run(|| weft_dataplane::Netlink::new().and_then(|mut nl| nl.links())).expect("node");
        if !links.expect("listing links").iter().any(|l| l.name.starts_with("wdel")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("veths retired by DEL were not deleted within 30 s: the reaper does not work");
}

/// Parallel: all at once; returns the wall time for the whole batch.
fn parallel(s: &Setup, command: &str, conf: &str) -> Duration {
    s.node
        .run(|| {
            let t = Instant::now();
            let children: Vec<_> = (0..s.conts.len()).map(|i| spawn(s, command, i, conf)).collect();
            for c in children {
                check(c.wait_with_output().expect("wait"), command);
            }
            t.elapsed()
        })
        .expect("entering the node")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn prefill(data: &Path) {
    let dir = data.join("bench");
    std::fs::create_dir_all(&dir).expect("creating the data dir");
    for i in 0..PREFILLED {
        let ip = format!("198.19.{}.{}", 20 + i / 250, 2 + i % 250);
        std::fs::write(dir.join(ip), format!("old{i}\r\neth0")).expect("writing a reservation");
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Row {
    name: String,
    reference: Duration,
    weft: Duration,
}

/// One implementation's timings.
struct Timings {
    add: Vec<Duration>,
    del: Vec<Duration>,
    par_add: Duration,
    par_del: Duration,
    add_full: Vec<Duration>,
    del_full: Vec<Duration>,
}

fn time_one(label: &str, bin: &Path) -> Timings {
    let mut guard = Guard(Vec::new(), Vec::new());
    let s = setup(&mut guard, label, bin, SEQ);
    let c = conf(&s.data, "198.19.0.0/17");
    let add = sequential(&s, "ADD", &c);
    let del = sequential(&s, "DEL", &c);
    wait_reaped(&s);
    let par = Setup { node: s.node, conts: s.conts[..PAR].to_vec(), data: s.data.clone(), bin: s.bin.clone() };
    let par_add = parallel(&par, "ADD", &c);
    let par_del = parallel(&par, "DEL", &c);
    wait_reaped(&par);
    // host-local with 3000 reservations already on disk.
    prefill(&par.data);
    let full = Setup { node: par.node, conts: s.conts.clone(), data: par.data.clone(), bin: par.bin.clone() };
    let add_full = sequential(&full, "ADD", &c);
    let del_full = sequential(&full, "DEL", &c);
    Timings { add, del, par_add, par_del, add_full, del_full }
}

/// Lets the kernel finish tearing down the namespaces of the previous measurement (it does that
/// in the background, holding the same locks the plugins need).
fn settle() {
    std::thread::sleep(Duration::from_secs(10));
}

/// Prints the spread of one series (min, p10, p50, p90, max) to stderr.
fn spread(label: &str, v: &[Duration]) {
    let mut v = v.to_vec();
    v.sort();
    let at = |q: f64| ms(v[((v.len() - 1) as f64 * q) as usize]);
    eprintln!(
        "  {label}: min {:.2} p10 {:.2} p50 {:.2} p90 {:.2} max {:.2} ms",
        at(0.0),
        at(0.1),
        at(0.5),
        at(0.9),
        at(1.0)
    );
}

fn measure(weft: &Path, reference: &Path, weft_first: bool) -> Vec<Row> {
    let (r, w) = if weft_first {
        let w = time_one("w", weft);
        settle();
        (time_one("r", reference), w)
    } else {
        let r = time_one("r", reference);
        settle();
        (r, time_one("w", weft))
    };
    settle();
    for (label, t) in [("reference", &r), ("weft", &w)] {
        spread(&format!("{label} ADD"), &t.add);
        spread(&format!("{label} DEL"), &t.del);
        spread(&format!("{label} ADD, {PREFILLED} reservations"), &t.add_full);
    }
    let row = |name: String, reference: Duration, weft: Duration| Row { name, reference, weft };
    vec![
        row("ADD, sequential (median per call)".into(), median(r.add), median(w.add)),
        row("DEL, sequential (median per call)".into(), median(r.del), median(w.del)),
        row(format!("ADD, {PAR} in parallel (wall time)"), r.par_add, w.par_add),
        row(format!("DEL, {PAR} in parallel (wall time)"), r.par_del, w.par_del),
        row(format!("ADD with {PREFILLED} reservations (median)"), median(r.add_full), median(w.add_full)),
        row(format!("DEL with {PREFILLED} reservations (median)"), median(r.del_full), median(w.del_full)),
    ]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut weft = None;
    let mut reference = PathBuf::from("/usr/lib/cni");
    let mut runs = 1;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--weft" => weft = args.next().map(PathBuf::from),
            "--reference" => reference = args.next().map(PathBuf::from).unwrap_or(reference),
            "--runs" => runs = args.next().and_then(|r| r.parse().ok()).unwrap_or(1),
            other => panic!("unknown argument {other}; usage: cni_bench --weft DIR [--reference DIR] [--runs N]"),
        }
    }
    let weft = weft.expect("--weft DIR (a CNI bin dir with weft's plugins)");
    let mut all: Vec<Vec<Row>> = Vec::new();
    for run in 0..runs {
        eprintln!("run {}/{runs} ...", run + 1);
        // Alternate which one goes first, so neither always runs on a warmer (or busier) kernel.
        all.push(measure(&weft, &reference, run % 2 == 1));
    }
    println!("| measurement | reference (ms) | weft (ms) | weft/reference |");
    println!("|---|---:|---:|---:|");
    for i in 0..all[0].len() {
        let r = median(all.iter().map(|rows| rows[i].reference).collect());
        let w = median(all.iter().map(|rows| rows[i].weft).collect());
        println!("| {} | {:.2} | {:.2} | {:.3} |", all[0][i].name, ms(r), ms(w), w.as_secs_f64() / r.as_secs_f64());
    }
}
