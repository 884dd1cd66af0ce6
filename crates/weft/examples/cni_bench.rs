//! Times ADD and DEL of the bridge + host-local chain for weft and the reference plugins in one
//! run, each in namespaces of its own: 100 containers one after another, 50 at once, and again
//! with 3000 existing reservations. Prints medians and the weft/reference ratio.
//! Run through `bench/cni-bench.sh` (needs root).

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
    let tag = format!("wb{}{label}", std::process::id() % 10000);
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

fn measure(weft: &Path, reference: &Path) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut results: Vec<(Vec<Duration>, Vec<Duration>, Duration, Duration, Vec<Duration>, Vec<Duration>)> = Vec::new();
    for (label, bin) in [("r", reference), ("w", weft)] {
        let mut guard = Guard(Vec::new(), Vec::new());
        let s = setup(&mut guard, label, bin, SEQ);
        let c = conf(&s.data, "198.19.0.0/17");
        let add = sequential(&s, "ADD", &c);
        let del = sequential(&s, "DEL", &c);
        let par = Setup { node: s.node, conts: s.conts[..PAR].to_vec(), data: s.data.clone(), bin: s.bin.clone() };
        let padd = parallel(&par, "ADD", &c);
        let pdel = parallel(&par, "DEL", &c);
        // host-local with 3000 reservations already on disk.
        prefill(&par.data);
        let c3 = c.clone();
        let full = Setup { node: par.node, conts: s.conts.clone(), data: par.data.clone(), bin: par.bin.clone() };
        let add3 = sequential(&full, "ADD", &c3);
        let del3 = sequential(&full, "DEL", &c3);
        results.push((add, del, padd, pdel, add3, del3));
    }
    let (r, w) = (&results[0], &results[1]);
    let push = |rows: &mut Vec<Row>, name: &str, reference: Duration, weft: Duration| {
        rows.push(Row { name: name.into(), reference, weft })
    };
    push(&mut rows, "ADD, sequential (median per call)", median(r.0.clone()), median(w.0.clone()));
    push(&mut rows, "DEL, sequential (median per call)", median(r.1.clone()), median(w.1.clone()));
    push(&mut rows, &format!("ADD, {PAR} in parallel (wall time)"), r.2, w.2);
    push(&mut rows, &format!("DEL, {PAR} in parallel (wall time)"), r.3, w.3);
    push(&mut rows, &format!("ADD with {PREFILLED} reservations (median)"), median(r.4.clone()), median(w.4.clone()));
    push(&mut rows, &format!("DEL with {PREFILLED} reservations (median)"), median(r.5.clone()), median(w.5.clone()));
    rows
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
        all.push(measure(&weft, &reference));
    }
    println!("| measurement | reference (ms) | weft (ms) | weft/reference |");
    println!("|---|---:|---:|---:|");
    for i in 0..all[0].len() {
        let r = median(all.iter().map(|rows| rows[i].reference).collect());
        let w = median(all.iter().map(|rows| rows[i].weft).collect());
        println!("| {} | {:.2} | {:.2} | {:.3} |", all[0][i].name, ms(r), ms(w), w.as_secs_f64() / r.as_secs_f64());
    }
}
