//! CNI errors: the spec's well-known codes and the error JSON a plugin prints on stdout.

use serde::{Deserialize, Serialize};

/// The error codes defined by the CNI spec (plus libcni's 999 for errors without a better code,
/// which the reference plugins use for most runtime failures).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decoding = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    NotAvailable = 50,
    LimitedConnectivity = 51,
    Internal = 999,
}

/// A CNI error as printed on stdout: `{"cniVersion", "code", "msg", "details"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    #[serde(rename = "cniVersion", default, skip_serializing_if = "String::is_empty")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self { cni_version: String::new(), code: code as u32, msg: msg.into(), details: String::new() }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// An error without a spec code (libcni's "internal" 999), as the reference plugins report
    /// kernel and runtime failures.
    pub fn internal(msg: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::Internal, msg.to_string())
    }

    pub fn invalid_config(msg: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::InvalidConfig, msg.to_string())
    }

    pub fn io(msg: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::Io, msg.to_string())
    }

    pub fn to_json(&self) -> String {
        // Serializing a struct of strings and an integer cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_else(|_| format!("{{\"code\":{}}}", self.code))
    }
}

pub type Result<T, E = CniError> = std::result::Result<T, E>;
