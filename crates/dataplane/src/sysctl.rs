//! Sysctls through `/proc/sys` of the calling thread's namespace (net.* keys are per namespace:
//! run these inside [`weft_netns::NetNs::run`] for another namespace).

use crate::error::{DataplaneError, Result};

fn path(key: &str) -> String {
    format!("/proc/sys/{}", key.trim_start_matches('/'))
}

/// Reads `key`, given in path form (`net/ipv4/ip_forward`, so that interface names with dots work).
pub fn get(key: &str) -> Result<String> {
    std::fs::read_to_string(path(key))
        .map(|v| v.trim().to_string())
        .map_err(|source| DataplaneError::Sysctl { key: key.to_string(), source })
}

/// Sets `key` to `value` unless it already holds it (`sysctl -w`).
pub fn set(key: &str, value: &str) -> Result<()> {
    if get(key).is_ok_and(|v| v == value) {
        return Ok(());
    }
    std::fs::write(path(key), value).map_err(|source| DataplaneError::Sysctl { key: key.to_string(), source })
}
