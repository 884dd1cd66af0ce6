//! Executing a plugin binary: finding it in `CNI_PATH`, passing the environment and config,
//! and turning its output (a result or the error JSON) back into values.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};

use serde_json::Value;

use crate::args::Command;
use crate::error::{CniError, ErrorCode, Result};
use crate::types::CniResult;

/// Finds `plugin` (a plugin's `type`) in the directories of `path`.
pub fn find_in_path(plugin: &str, path: &[PathBuf]) -> Result<PathBuf> {
    if plugin.is_empty() || plugin.contains('/') {
        return Err(CniError::invalid_config(format!("invalid plugin type {plugin:?}")));
    }
    path.iter().map(|dir| dir.join(plugin)).find(|p| p.is_file()).ok_or_else(|| {
        let dirs: Vec<String> = path.iter().map(|p| p.display().to_string()).collect();
        CniError::internal(format!("failed to find plugin {plugin:?} in path [{}]", dirs.join(" ")))
    })
}

/// Runs `binary` for `command` with `stdin` as its config. `env` is added to (and overrides) the
/// current environment; the result is the plugin's stdout parsed as JSON (None when empty).
pub fn exec_plugin(binary: &Path, command: Command, env: &[(&str, &str)], stdin: &[u8]) -> Result<Option<Value>> {
    let mut child = Process::new(binary)
        .env("CNI_COMMAND", command.as_str())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| CniError::internal(format!("executing {}: {e}", binary.display())))?;
    if let Some(mut input) = child.stdin.take() {
        // A plugin that exits without reading stdin closes the pipe; its exit status tells.
        let _ = input.write_all(stdin);
    }
    let output = child.wait_with_output().map_err(|e| CniError::internal(format!("waiting for plugin: {e}")))?;
    if !output.status.success() {
        return Err(serde_json::from_slice::<CniError>(&output.stdout).unwrap_or_else(|_| {
            CniError::internal(format!(
                "plugin {} failed ({}): {}",
                binary.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout).trim()
            ))
        }));
    }
    if output.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&output.stdout)
        .map(Some)
        .map_err(|e| CniError::new(ErrorCode::Decoding, format!("decoding plugin output: {e}")))
}

/// A plugin delegating to another (bridge to its IPAM, the meta plugin to bridge): the same
/// environment with `CNI_COMMAND` set, the delegate found in `CNI_PATH`.
pub fn delegate(plugin: &str, command: Command, path: &[PathBuf], stdin: &[u8]) -> Result<Option<CniResult>> {
    let binary = find_in_path(plugin, path)?;
    match exec_plugin(&binary, command, &[], stdin)? {
        Some(value) if command == Command::Add => CniResult::from_value(&value).map(Some),
        _ => Ok(None),
    }
}
