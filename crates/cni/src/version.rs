//! Spec versions: which ones weft speaks, the check a plugin makes (an exact string match, as
//! libcni does), and result conversion between 0.3.x/0.4.0 and 1.x shapes.

use serde_json::{json, Value};

use crate::error::{CniError, ErrorCode, Result};
use crate::types::CniResult;

/// Every spec version weft's plugins accept, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST_VERSION: &str = "1.1.0";

pub fn is_supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// The error a plugin returns for a config version it does not speak.
pub fn check(version: &str) -> Result<()> {
    if is_supported(version) {
        return Ok(());
    }
    Err(CniError::new(ErrorCode::IncompatibleVersion, "incompatible CNI versions")
        .with_details(format!("config is {version:?}, plugin supports {:?}", SUPPORTED_VERSIONS)))
}

/// Whether `version` is a 0.x version, whose results carry `"version"` in every `ips[]` entry.
fn is_legacy(version: &str) -> bool {
    version.starts_with("0.")
}

/// Compares two dotted versions numerically (`"0.4.0" < "1.0.0"`).
pub fn at_least(version: &str, min: &str) -> bool {
    let parse = |v: &str| v.split('.').map(|p| p.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>();
    parse(version) >= parse(min)
}

impl CniResult {
    /// Parses a result (or `prevResult`) of any supported version into the canonical shape.
    pub fn from_value(value: &Value) -> Result<CniResult> {
        let version = value.get("cniVersion").and_then(Value::as_str).unwrap_or_default();
        if !version.is_empty() && !is_supported(version) {
            return Err(CniError::new(ErrorCode::IncompatibleVersion, "unsupported prevResult version")
                .with_details(version.to_string()));
        }
        // 0.3.x/0.4.0 differ from 1.x only by `version` inside ips[], which serde ignores.
        serde_json::from_value(value.clone())
            .map_err(|e| CniError::new(ErrorCode::Decoding, format!("failed to parse result: {e}")))
    }

    /// The result as printed for a request of `version`.
    pub fn to_json_value(&self, version: &str) -> Value {
        let out = CniResult { cni_version: version.to_string(), ..self.clone() };
        let mut value = serde_json::to_value(&out).unwrap_or_else(|_| json!({}));
        if is_legacy(version) {
            if let Some(ips) = value.get_mut("ips").and_then(Value::as_array_mut) {
                for ip in ips {
                    let family = if ip["address"].as_str().is_some_and(|a| a.contains(':')) { "6" } else { "4" };
                    if let Some(obj) = ip.as_object_mut() {
                        let mut ordered = serde_json::Map::new();
                        ordered.insert("version".into(), json!(family));
                        ordered.extend(std::mem::take(obj));
                        *obj = ordered;
                    }
                }
            }
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_results_gain_ip_version() {
        let r: CniResult = serde_json::from_value(json!({
            "cniVersion": "1.0.0",
            "ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0.1", "interface": 0},
                    {"address": "fd00::2/64"}],
        }))
        .unwrap();
        let v = r.to_json_value("0.4.0");
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["ips"][0]["version"], "4");
        assert_eq!(v["ips"][1]["version"], "6");
        let v1 = r.to_json_value("1.0.0");
        assert!(v1["ips"][0].get("version").is_none());
        assert_eq!(v1["dns"], json!({}));
    }

    #[test]
    fn parses_legacy_prev_result() {
        let r = CniResult::from_value(&json!({
            "cniVersion": "0.3.1",
            "interfaces": [{"name": "eth0", "sandbox": "/x"}],
            "ips": [{"version": "4", "address": "10.0.0.2/24", "interface": 0}],
        }))
        .unwrap();
        assert_eq!(r.ips[0].address.to_string(), "10.0.0.2/24");
        assert_eq!(r.container_interface("eth0"), Some(0));
    }

    #[test]
    fn version_check_is_exact() {
        assert!(check("1.0.0").is_ok());
        assert_eq!(check("1.0").unwrap_err().code, 1);
        assert_eq!(check("0.2.0").unwrap_err().code, 1);
        assert!(at_least("1.1.0", "1.0.0") && !at_least("0.4.0", "1.0.0"));
    }
}
