//! Times ADD and DEL of the bridge + host-local chain for weft and the reference plugins in one
//! run, each in namespaces of its own: 100 containers one after another, 50 at once, and again
//! with 3000 existing reservations. Prints medians and the weft/reference ratio.
//! Run through `bench/cni-bench.sh` (needs root).
//!
//! The two implementations take turns in blocks of ten calls (sequential rows) and batch by
//! batch (parallel rows), the one going first alternating: on a shared machine whose speed
//! drifts by tens of percent within a minute, both sides then meet the same conditions.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weft_netns::NetNs;

const SEQ: usize = 100;
const PAR: usize = 50;
const PREFILLED: usize = 3000;
/// Parallel batches per side and run (the row is their median).
const PAR_ROUNDS: usize = 3;
/// Sequential calls per side before the other side takes its turn (`WEFT_BENCH_BLOCK` changes
/// it: 1 alternates call by call, 100 runs each side's phase in one go).
fn block() -> usize {
    std::env::var("WEFT_BENCH_BLOCK").ok().and_then(|b| b.parse().ok()).filter(|b| *b > 0).unwrap_or(10)
}

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

fn setup(guard: &mut Guard, label: &str, run: usize, bin: &Path, count: usize) -> Setup {
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
    // A data directory per run, all removed at the end: removing thousands of reservations
    // between runs would slow down file creation in the next run (ext4 without a journal, as
    // on this machine, skips recently deleted inodes one by one for a minute) for both sides,
    // which is not what a node with a journaled filesystem sees.
    let data = std::env::temp_dir().join(format!("{tag}{run}-ipam"));
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
        .env(weft_plugins::attachment_lock::LOCK_DIR_ENV, s.data.join("locks"))
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

/// One timed call: start the plugin in the node namespace, feed it the config, wait for it.
fn call(s: &Setup, command: &str, i: usize, conf: &str) -> Duration {
    s.node
        .run(|| {
            let t = Instant::now();
            check(spawn(s, command, i, conf).wait_with_output().expect("wait"), command);
            t.elapsed()
        })
        .expect("entering the node")
}

/// Waits (untimed) until veths retired by weft's DELs are deleted, so that its reaper's kernel
/// work does not slow down the next measurement, of either side.
fn wait_reaped(s: &Setup) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let links = s.node.run(|| weft_dataplane::Netlink::new().and_then(|mut nl| nl.links())).expect("node");
        let retired = |l: &weft_dataplane::Link| l.group == weft_plugins::teardown::RETIRED_GROUP;
        if !links.expect("listing links").iter().any(retired) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("veths retired by DEL were not deleted within 30 s: the reaper does not work");
}

/// Parallel: all at once; returns the wall time for the whole batch.
fn parallel(s: &Setup, command: &str, count: usize, conf: &str) -> Duration {
    s.node
        .run(|| {
            let t = Instant::now();
            let children: Vec<_> = (0..count).map(|i| spawn(s, command, i, conf)).collect();
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

/// The two sides, each with its node, containers and data directory.
struct Pair {
    weft: Setup,
    reference: Setup,
}

impl Pair {
    /// Runs `f` on both sides, `weft_first` deciding the order; returns (reference, weft).
    fn both<T>(&self, weft_first: bool, mut f: impl FnMut(&Setup, bool) -> T) -> (T, T) {
        if weft_first {
            let w = f(&self.weft, true);
            (f(&self.reference, false), w)
        } else {
            let r = f(&self.reference, false);
            (r, f(&self.weft, true))
        }
    }

    /// Every container of `count` through `command`, one after another, the sides taking turns
    /// in blocks of [`block`] calls (weft first in every other pair of blocks, ABBA): short
    /// enough that both meet the same machine, long enough that what one side leaves the kernel
    /// to finish (and the caches it leaves cold) lands mostly on its own calls.
    /// `run` picks the side that starts, alternating from one run to the next.
    fn sequential(
        &self,
        command: &str,
        count: usize,
        run: usize,
        conf: &(String, String),
    ) -> (Vec<Duration>, Vec<Duration>) {
        let (mut r, mut w) = (Vec::with_capacity(count), Vec::with_capacity(count));
        let size = block();
        for (block, start) in (0..count).step_by(size).enumerate() {
            let range = start..(start + size).min(count);
            let (rt, wt) = self.both((block + run).is_multiple_of(2), |s, is_weft| {
                let times: Vec<Duration> =
                    range.clone().map(|i| call(s, command, i, if is_weft { &conf.1 } else { &conf.0 })).collect();
                if is_weft && command == "DEL" {
                    wait_reaped(s);
                }
                times
            });
            r.extend(rt);
            w.extend(wt);
        }
        (r, w)
    }

    /// One batch of `count` at once per side.
    fn parallel(&self, command: &str, count: usize, weft_first: bool, conf: &(String, String)) -> (Duration, Duration) {
        self.both(weft_first, |s, is_weft| {
            let t = parallel(s, command, count, if is_weft { &conf.1 } else { &conf.0 });
            if is_weft && command == "DEL" {
                wait_reaped(s);
            }
            t
        })
    }
}

/// Lets the kernel finish tearing down the namespaces of the previous run (it does that in the
/// background, holding the same locks the plugins need).
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

fn measure(weft: &Path, reference: &Path, run: usize, data_dirs: &mut Guard) -> Vec<Row> {
    let mut guard = Guard(Vec::new(), Vec::new());
    let pair =
        Pair { weft: setup(&mut guard, "w", run, weft, SEQ), reference: setup(&mut guard, "r", run, reference, SEQ) };
    data_dirs.1.append(&mut guard.1);
    let conf = (conf(&pair.reference.data, "198.19.0.0/17"), conf(&pair.weft.data, "198.19.0.0/17"));
    let (r_add, w_add) = pair.sequential("ADD", SEQ, run, &conf);
    let (r_del, w_del) = pair.sequential("DEL", SEQ, run, &conf);
    // Batches of 50 at once, a few rounds (a single batch is at the mercy of one moment).
    let (mut r_par_add, mut w_par_add, mut r_par_del, mut w_par_del) = (vec![], vec![], vec![], vec![]);
    for round in 0..PAR_ROUNDS {
        let (r, w) = pair.parallel("ADD", PAR, (run + round).is_multiple_of(2), &conf);
        r_par_add.push(r);
        w_par_add.push(w);
        let (r, w) = pair.parallel("DEL", PAR, !(run + round).is_multiple_of(2), &conf);
        r_par_del.push(r);
        w_par_del.push(w);
    }
    let (r_par_add, w_par_add, r_par_del, w_par_del) =
        (median(r_par_add), median(w_par_add), median(r_par_del), median(w_par_del));
    // host-local with 3000 reservations already on disk.
    prefill(&pair.reference.data);
    prefill(&pair.weft.data);
    let (r_add_full, w_add_full) = pair.sequential("ADD", SEQ, run, &conf);
    let (r_del_full, w_del_full) = pair.sequential("DEL", SEQ, run, &conf);
    drop(guard);
    for (label, add, del, add_full) in
        [("reference", &r_add, &r_del, &r_add_full), ("weft", &w_add, &w_del, &w_add_full)]
    {
        spread(&format!("{label} ADD"), add);
        spread(&format!("{label} DEL"), del);
        spread(&format!("{label} ADD, {PREFILLED} reservations"), add_full);
    }
    let row = |name: String, reference: Duration, weft: Duration| Row { name, reference, weft };
    vec![
        row("ADD, sequential (median per call)".into(), median(r_add), median(w_add)),
        row("DEL, sequential (median per call)".into(), median(r_del), median(w_del)),
        row(format!("ADD, {PAR} in parallel (wall time, median of {PAR_ROUNDS})"), r_par_add, w_par_add),
        row(format!("DEL, {PAR} in parallel (wall time, median of {PAR_ROUNDS})"), r_par_del, w_par_del),
        row(format!("ADD with {PREFILLED} reservations (median)"), median(r_add_full), median(w_add_full)),
        row(format!("DEL with {PREFILLED} reservations (median)"), median(r_del_full), median(w_del_full)),
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
    let mut data_dirs = Guard(Vec::new(), Vec::new());
    for run in 0..runs {
        if run > 0 {
            settle();
        }
        eprintln!("run {}/{runs} ...", run + 1);
        all.push(measure(&weft, &reference, run, &mut data_dirs));
    }
    println!("| measurement | reference (ms) | weft (ms) | weft/reference |");
    println!("|---|---:|---:|---:|");
    for i in 0..all[0].len() {
        let r = median(all.iter().map(|rows| rows[i].reference).collect());
        let w = median(all.iter().map(|rows| rows[i].weft).collect());
        println!("| {} | {:.2} | {:.2} | {:.3} |", all[0][i].name, ms(r), ms(w), w.as_secs_f64() / r.as_secs_f64());
    }
}
