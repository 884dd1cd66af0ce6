//! `weft lab down`: removes everything a lab of that name ever made, from whatever state it is
//! in — a complete lab, one whose `up` was interrupted or killed, one whose state file is gone or
//! damaged. What belongs to lab NAME is found on the machine, not only in its state file:
//!
//! - processes: its supervisor (`weft lab supervise --name NAME`), and every process whose command
//!   line names its state directory (agents, its etcd) or that lives in one of its namespaces;
//! - namespaces: `NAME-sw`, `NAME-nodeN`, `NAME-nodeN-podM` in `/run/netns` (lab names contain no
//!   `-`, so no other lab's namespace matches);
//! - files: `/run/weft-lab/NAME`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::{is_lab_namespace, Lab};

/// Removes every namespace, process and file of the lab; a lab that is not there is fine. An
/// `up` of the lab at work is waited for (an interrupted one removes what it made itself).
pub fn down(name: &str) -> Result<()> {
    let lock = match super::LabLock::take(name, false)? {
        Some(lock) => lock,
        None => {
            eprintln!("lab {name}: waiting for the `weft lab up` at work to finish");
            super::LabLock::take(name, true)?.context("locking the lab")?
        }
    };
    let found = remove(name)?;
    lock.remove();
    // The last lab gone: so is the state root (it stays while another lab has anything there).
    let _ = std::fs::remove_dir(super::STATE_ROOT);
    if found {
        outln!("lab {name} is down");
    } else {
        outln!("no lab named {name}");
    }
    Ok(())
}

/// What `down` does, quietly: whether there was anything of the lab.
pub fn remove(name: &str) -> Result<bool> {
    let dir = Lab::state_dir(name);
    let namespaces = lab_namespaces(name);
    let mut found = dir.exists() || !namespaces.is_empty();
    // The supervisor first (it restarts agents), then everything else of the lab.
    let state = format!("{}/", dir.display());
    let inodes: Vec<u64> = namespaces
        .iter()
        .filter_map(|ns| std::fs::metadata(weft_netns::named_path(ns)).ok())
        .map(|m| m.ino())
        .collect();
    for round in 0..2 {
        for pid in processes() {
            let Some(cmdline) = cmdline(pid) else { continue };
            let supervisor = cmdline.windows(4).any(|w| w == ["lab", "supervise", "--name", name]);
            let ours = supervisor
                || (round == 1 && cmdline.iter().any(|a| a.contains(&state)))
                || (round == 1 && netns_inode(pid).is_some_and(|i| inodes.contains(&i)));
            if ours && pid != std::process::id() {
                found = true;
                kill(pid);
            }
        }
    }
    let mut errors = Vec::new();
    for ns in &namespaces {
        if let Err(e) = weft_netns::delete_named(ns) {
            errors.push(e.to_string());
        }
    }
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            errors.push(format!("removing {}: {e}", dir.display()));
        }
    }
    if !errors.is_empty() {
        bail!("lab {name}: {}", errors.join("; "));
    }
    Ok(found)
}

/// The lab's namespaces that exist (also half-made ones: a file not yet bound to a namespace).
fn lab_namespaces(name: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(weft_netns::named_path("")) else { return Vec::new() };
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|ns| is_lab_namespace(name, ns))
        .collect();
    out.sort();
    out
}

fn processes() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

fn cmdline(pid: u32) -> Option<Vec<String>> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(bytes.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
}

fn netns_inode(pid: u32) -> Option<u64> {
    Some(std::fs::metadata(Path::new("/proc").join(pid.to_string()).join("ns/net")).ok()?.ino())
}

/// SIGKILL, then waits until the process is gone (or a zombie).
pub(super) fn kill(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        // Reaped by whoever is its parent; wait until it is gone so its namespace can go too.
        for _ in 0..200 {
            if nix::sys::signal::kill(pid, None).is_err() || super::is_zombie(pid.as_raw().unsigned_abs()) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
