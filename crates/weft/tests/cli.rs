//! The CLI: `weft cni install` and the plugins reached through its links.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

fn install(dir: &std::path::Path, force: bool) -> std::process::Output {
    let mut cmd = Command::new(weft_bin());
    cmd.args(["cni", "install", "--dir"]).arg(dir);
    if force {
        cmd.arg("--force");
    }
    cmd.output().unwrap()
}

#[test]
fn install_lays_down_plugins_and_respects_foreign_files() {
    let dir = Dir::new("install");
    assert!(install(dir.path(), false).status.success());
    for name in ["bridge", "host-local", "portmap", "loopback", "ptp"] {
        assert_eq!(std::fs::read_link(dir.path().join(name)).unwrap(), std::path::Path::new("weft"));
        let out = Command::new(dir.path().join(name)).env("CNI_COMMAND", "VERSION").output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("1.1.0"), "{name}: {out:?}");
    }
    // The binary called as `weft` by a runtime is the meta plugin.
    let out = Command::new(dir.path().join("weft")).env("CNI_COMMAND", "VERSION").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("supportedVersions"));
    // Installing again over weft's own files is fine.
    assert!(install(dir.path(), false).status.success());
    // Another vendor's plugin is not replaced without --force.
    std::fs::remove_file(dir.path().join("bridge")).unwrap();
    std::fs::write(dir.path().join("bridge"), "#!/bin/sh\necho other vendor\n").unwrap();
    let refused = install(dir.path(), false);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not weft's"), "{refused:?}");
    assert_eq!(std::fs::read_to_string(dir.path().join("bridge")).unwrap(), "#!/bin/sh\necho other vendor\n");
    assert!(install(dir.path(), true).status.success());
    assert!(std::fs::read_link(dir.path().join("bridge")).is_ok());
}

#[test]
fn unknown_plugin_and_help() {
    let out = Command::new(weft_bin()).args(["plugin", "nope"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("weft provides"));
    let help = Command::new(weft_bin()).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("cni"));
}

#[test]
fn subcommands_win_over_an_inherited_cni_command() {
    // A process started by a plugin (the DEL reaper) inherits CNI_COMMAND: with arguments, the
    // binary named `weft` is still the CLI, not the meta plugin.
    let out = Command::new(weft_bin()).args(["cni", "list"]).env("CNI_COMMAND", "DEL").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("host-local"));
}

/// Output into a pipe nobody reads any more (`weft cni list | head -0`) ends quietly: no panic.
#[test]
fn a_closed_pipe_ends_output_quietly() {
    use std::os::fd::OwnedFd;
    let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
    drop(read);
    let out = std::process::Command::new(common::weft_bin())
        .args(["cni", "list"])
        .stdout(std::process::Stdio::from(write))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

/// Durations an agent cannot run with are refused up front (they used to spin the loop or
/// overflow the expiry time).
#[test]
fn durations_out_of_range_are_refused() {
    for args in [
        vec!["agent", "--lease-ttl", "0"],
        vec!["agent", "--lease-ttl", "5s"],
        vec!["agent", "--lease-ttl", "18446744073709551615h"],
        vec!["agent", "--lease-ttl", "999999999h"],
        vec!["agent", "--resync", "0s"],
        vec!["agent", "--resync", "500ms"],
        vec!["lab", "up", "--lease-ttl", "0"],
    ] {
        let out = Command::new(weft_bin()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("must be between") || err.contains("too long"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
