//! The plugin's environment: `CNI_*` variables, their validation (as libcni's skel does it) and
//! `CNI_ARGS` parsing.

use std::path::PathBuf;

use crate::error::{CniError, ErrorCode, Result};

/// The commands of spec 1.1.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }

    /// The variables this command cannot run without.
    fn required(self) -> &'static [&'static str] {
        match self {
            Command::Add | Command::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"],
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"],
            Command::Version | Command::Status | Command::Gc => &[],
        }
    }
}

/// Everything a plugin command gets from its environment and stdin.
#[derive(Debug, Clone)]
pub struct CmdArgs {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` as given (`K=V;K=V`).
    pub args: String,
    pub path: Vec<PathBuf>,
    pub stdin: Vec<u8>,
}

impl CmdArgs {
    /// Reads and validates the environment for `command`; `get` looks a variable up.
    pub fn from_env(command: Command, get: &dyn Fn(&str) -> Option<String>, stdin: Vec<u8>) -> Result<CmdArgs> {
        let missing: Vec<&str> =
            command.required().iter().copied().filter(|v| get(v).is_none_or(|s| s.is_empty())).collect();
        if !missing.is_empty() {
            return Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("required env variables [{}] missing", missing.join(",")),
            ));
        }
        let var = |name: &str| get(name).unwrap_or_default();
        let args = CmdArgs {
            command,
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
            path: split_path(&var("CNI_PATH")),
            stdin,
        };
        if matches!(command, Command::Add | Command::Del | Command::Check) {
            validate_container_id(&args.container_id)?;
            validate_ifname(&args.ifname)?;
        }
        Ok(args)
    }

    /// The value of `key` in `CNI_ARGS`, if present.
    pub fn arg(&self, key: &str) -> Option<String> {
        parse_cni_args(&self.args).ok()?.into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

pub fn split_path(path: &str) -> Vec<PathBuf> {
    path.split(':').filter(|p| !p.is_empty()).map(PathBuf::from).collect()
}

/// `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`, as the spec requires.
pub fn validate_container_id(id: &str) -> Result<()> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err(CniError::new(ErrorCode::InvalidEnvironment, "invalid characters in containerID")
            .with_details(id.to_string()));
    }
    Ok(())
}

/// A Linux interface name: 1 to 15 bytes, not `.` or `..`, no `/`, `:` or white space.
pub fn validate_ifname(name: &str) -> Result<()> {
    let err = |msg: &str| CniError::new(ErrorCode::InvalidEnvironment, msg.to_string());
    if name.is_empty() {
        return Err(err("interface name is empty"));
    }
    if name.len() > 15 {
        return Err(err("interface name is too long")
            .with_details("interface name should be less than 16 characters".to_string()));
    }
    if name == "." || name == ".." {
        return Err(err("interface name is . or .."));
    }
    if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err(err("interface name contains / or : or whitespace characters"));
    }
    Ok(())
}

/// Splits `K=V;K=V`. An item without `=` is an error, as in libcni.
pub fn parse_cni_args(args: &str) -> Result<Vec<(String, String)>> {
    args.split(';')
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| CniError::new(ErrorCode::InvalidEnvironment, format!("ARGS: invalid pair {item:?}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids() {
        assert!(validate_container_id("abc-1.2_3").is_ok());
        assert_eq!(validate_container_id("-abc").unwrap_err().code, 4);
        assert_eq!(validate_container_id("a b").unwrap_err().code, 4);
        assert_eq!(validate_container_id("").unwrap_err().code, 4);
    }

    #[test]
    fn ifnames() {
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("a/b").is_err());
        assert!(validate_ifname("abcdefghijklmnop").is_err());
        assert!(validate_ifname("..").is_err());
    }

    #[test]
    fn missing_env_lists_every_variable() {
        let env = |k: &str| (k == "CNI_PATH").then(|| "/x".to_string());
        let err = CmdArgs::from_env(Command::Add, &env, vec![]).unwrap_err();
        assert_eq!(err.code, 4);
        assert!(err.msg.contains("CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME"), "{}", err.msg);
    }

    #[test]
    fn cni_args() {
        let v = parse_cni_args("IgnoreUnknown=1;IP=10.0.0.5").unwrap();
        assert_eq!(v[1], ("IP".to_string(), "10.0.0.5".to_string()));
        assert!(parse_cni_args("novalue").is_err());
    }
}
