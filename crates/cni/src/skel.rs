//! The plugin skel: reads `CNI_COMMAND` and the rest of the environment, validates them and the
//! config's version, calls the plugin, and prints the result or the error JSON. Environment,
//! stdin, stdout and stderr are injected so tests can run a plugin in-process.

use std::io::{Read, Write};

use serde_json::{json, Value};

use crate::args::{CmdArgs, Command};
use crate::error::{CniError, ErrorCode, Result};
use crate::types::{CniResult, NetConf};
use crate::version::{self, SUPPORTED_VERSIONS};

/// What a plugin implements. ADD returns the result; the skel prints it in the request's version.
pub trait Plugin {
    /// The name shown in the about text and errors (`bridge`, `host-local`, ...).
    fn name(&self) -> &'static str;
    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult>;
    fn del(&self, args: &CmdArgs, conf: &NetConf) -> Result<()>;
    fn check(&self, args: &CmdArgs, conf: &NetConf) -> Result<()>;
    /// Whether the plugin works in `CNI_NETNS` (then naming its own namespace there is refused);
    /// an IPAM plugin never enters it.
    fn uses_netns(&self) -> bool {
        true
    }
    /// STATUS (1.1.0): ready unless the plugin knows better.
    fn status(&self, _args: &CmdArgs, _conf: &NetConf) -> Result<()> {
        Ok(())
    }
    /// GC (1.1.0): remove what belongs to attachments not in `cni.dev/valid-attachments`.
    fn gc(&self, _args: &CmdArgs, _conf: &NetConf, _valid: &[Attachment]) -> Result<()> {
        Ok(())
    }
}

/// One entry of `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    #[serde(rename = "ifname")]
    pub ifname: String,
}

/// The process' real I/O, for `main`.
pub struct Io<'a> {
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub stdin: &'a mut dyn Read,
    pub stdout: &'a mut dyn Write,
    pub stderr: &'a mut dyn Write,
}

/// Runs one plugin invocation and returns the process exit code.
pub fn run(plugin: &dyn Plugin, io: Io<'_>) -> i32 {
    let Io { env, stdin, stdout, stderr } = io;
    let Some(command) = env("CNI_COMMAND").filter(|c| !c.is_empty()) else {
        let _ = writeln!(stderr, "{}", about(plugin.name()));
        return 0;
    };
    match dispatch(plugin, &command, env, stdin) {
        Ok(out) => {
            if let Some(value) = out {
                let _ = writeln!(stdout, "{}", serde_json::to_string_pretty(&value).unwrap_or_default());
            }
            0
        }
        Err(err) => {
            let _ = writeln!(stdout, "{}", err.to_json());
            let _ = writeln!(stderr, "{}: {}", plugin.name(), err);
            1
        }
    }
}

/// The text printed when `CNI_COMMAND` is unset.
pub fn about(name: &str) -> String {
    format!(
        "weft {name} CNI plugin version {}\nCNI protocol versions supported: {}",
        env!("CARGO_PKG_VERSION"),
        SUPPORTED_VERSIONS.join(", ")
    )
}

fn dispatch(
    plugin: &dyn Plugin,
    command: &str,
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
) -> Result<Option<Value>> {
    let command = Command::parse(command)
        .ok_or_else(|| CniError::new(ErrorCode::InvalidEnvironment, format!("unknown CNI_COMMAND: {command}")))?;
    // Configs are a few hundred bytes: room for them up front saves the growing reads.
    let mut input = Vec::with_capacity(8192);
    stdin.read_to_end(&mut input).map_err(|e| CniError::io(format!("reading stdin: {e}")))?;
    if command == Command::Version {
        // The requested version when weft speaks it, else the latest one it does (never a
        // version it does not speak).
        let requested = serde_json::from_slice::<NetConf>(&input).map(|c| c.cni_version).unwrap_or_default();
        let version = if version::is_supported(&requested) { requested.as_str() } else { version::LATEST_VERSION };
        return Ok(Some(json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS})));
    }
    let args = CmdArgs::from_env(command, env, input)?;
    if plugin.uses_netns()
        && matches!(command, Command::Add | Command::Del | Command::Check)
        && is_own_netns(&args.netns)
    {
        return Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_NETNS {:?} is the namespace the plugin runs in, not a container's", args.netns),
        ));
    }
    let conf = decode_conf(&args.stdin)?;
    Ok(invoke(plugin, &args, &conf)?.map(|result| result.to_json_value(&conf.cni_version)))
}

/// Whether `path` is the network namespace this process is in (a runtime passing the host's
/// namespace as the container's would have the plugin rename and address the host's links).
pub fn is_own_netns(path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    if path.is_empty() {
        return false;
    }
    match (std::fs::metadata(path), std::fs::metadata("/proc/self/ns/net")) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Runs one command of `plugin` with already validated arguments and decoded config: the
/// version checks, then the call. ADD returns the result (in canonical form). Delegating
/// plugins use this to call weft's own plugins in-process.
pub fn invoke(plugin: &dyn Plugin, args: &CmdArgs, conf: &NetConf) -> Result<Option<CniResult>> {
    version::check(&conf.cni_version)?;
    let command = args.command;
    let require = |min: &str| -> Result<()> {
        if version::at_least(&conf.cni_version, min) {
            return Ok(());
        }
        Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!("config version does not allow {}", command.as_str()),
        ))
    };
    match command {
        Command::Add => plugin.add(args, conf).map(Some),
        Command::Del => plugin.del(args, conf).map(|()| None),
        Command::Check => {
            require("0.4.0")?;
            plugin.check(args, conf).map(|()| None)
        }
        Command::Status => {
            require("1.1.0")?;
            plugin.status(args, conf).map(|()| None)
        }
        Command::Gc => {
            require("1.1.0")?;
            let valid = valid_attachments(&args.stdin)?;
            plugin.gc(args, conf, &valid).map(|()| None)
        }
        Command::Version => Ok(None),
    }
}

/// Parses the shared keys of the config on stdin (code 6 when it is not JSON).
pub fn decode_conf(stdin: &[u8]) -> Result<NetConf> {
    serde_json::from_slice(stdin)
        .map_err(|e| CniError::new(ErrorCode::Decoding, format!("error unmarshall network config: {e}")))
}

/// Parses a plugin's own config type from stdin (code 7 when a key has the wrong type).
pub fn parse_plugin_conf<T: serde::de::DeserializeOwned>(stdin: &[u8]) -> Result<T> {
    serde_json::from_slice(stdin).map_err(|e| CniError::invalid_config(format!("failed to load netconf: {e}")))
}

fn valid_attachments(stdin: &[u8]) -> Result<Vec<Attachment>> {
    #[derive(serde::Deserialize)]
    struct Gc {
        #[serde(rename = "cni.dev/valid-attachments", default)]
        valid: Vec<Attachment>,
    }
    Ok(parse_plugin_conf::<Gc>(stdin)?.valid)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct Echo;
    impl Plugin for Echo {
        fn name(&self) -> &'static str {
            "echo"
        }
        fn add(&self, args: &CmdArgs, _conf: &NetConf) -> Result<CniResult> {
            Ok(CniResult {
                interfaces: vec![crate::Interface { name: args.ifname.clone(), ..Default::default() }],
                ..Default::default()
            })
        }
        fn del(&self, _: &CmdArgs, _: &NetConf) -> Result<()> {
            Ok(())
        }
        fn check(&self, _: &CmdArgs, _: &NetConf) -> Result<()> {
            Ok(())
        }
    }

    fn invoke(vars: &[(&str, &str)], stdin: &str) -> (i32, String, String) {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let env = move |k: &str| map.get(k).cloned();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run(&Echo, Io { env: &env, stdin: &mut stdin.as_bytes(), stdout: &mut out, stderr: &mut err });
        (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
    }

    const FULL: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    fn code_of(out: &str) -> u64 {
        serde_json::from_str::<Value>(out).unwrap()["code"].as_u64().unwrap()
    }

    #[test]
    fn add_prints_result_in_request_version() {
        let (code, out, _) = invoke(FULL, r#"{"cniVersion":"0.4.0","name":"n","type":"echo"}"#);
        assert_eq!(code, 0);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["interfaces"][0]["name"], "eth0");
    }

    #[test]
    fn error_codes() {
        assert_eq!(code_of(&invoke(FULL, "{bad").1), 6);
        assert_eq!(code_of(&invoke(FULL, r#"{"cniVersion":"9.9.9"}"#).1), 1);
        assert_eq!(code_of(&invoke(&FULL[..2], r#"{"cniVersion":"1.0.0"}"#).1), 4);
        let mut bad_cmd = FULL.to_vec();
        bad_cmd[0] = ("CNI_COMMAND", "FOO");
        assert_eq!(code_of(&invoke(&bad_cmd, "{}").1), 4);
        let mut check_old = FULL.to_vec();
        check_old[0] = ("CNI_COMMAND", "CHECK");
        assert_eq!(code_of(&invoke(&check_old, r#"{"cniVersion":"0.3.1"}"#).1), 1);
    }

    #[test]
    fn about_and_version() {
        let (code, out, err) = invoke(&[], "");
        assert_eq!((code, out.as_str()), (0, ""));
        assert!(err.contains("1.1.0"));
        let (_, out, _) = invoke(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), SUPPORTED_VERSIONS.len());
        for unsupported in [r#"{"cniVersion":"9.9.9"}"#, r#"{"cniVersion":"0.1.0"}"#, "{}", "garbage"] {
            let (code, out, _) = invoke(&[("CNI_COMMAND", "VERSION")], unsupported);
            let v: Value = serde_json::from_str(&out).unwrap();
            assert_eq!((code, v["cniVersion"].as_str()), (0, Some(crate::version::LATEST_VERSION)), "{unsupported}");
        }
    }

    #[test]
    fn the_plugins_own_namespace_is_refused_as_a_container_namespace() {
        let own = "/proc/self/ns/net";
        assert!(is_own_netns(own));
        assert!(!is_own_netns("/proc/1/ns/mnt") && !is_own_netns("") && !is_own_netns("/nonexistent"));
        for command in ["ADD", "DEL", "CHECK"] {
            let mut vars = FULL.to_vec();
            vars[0] = ("CNI_COMMAND", command);
            vars[2] = ("CNI_NETNS", own);
            let (code, out, _) = invoke(&vars, r#"{"cniVersion":"1.0.0","name":"n","type":"echo"}"#);
            assert_eq!((code, code_of(&out)), (1, 4), "{command}: {out}");
        }
    }
}
