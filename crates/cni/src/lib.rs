//! The CNI protocol (spec 1.1.0) as a library: what a plugin reads (environment, config on stdin),
//! what it writes (results in the request's version, error JSON), the skel that dispatches a
//! plugin's commands, delegate execution through `CNI_PATH`, and a runtime-side runner that does
//! what libcni does (conflists, `prevResult` chaining, result cache, GC).
//!
//! Nothing here touches the kernel and nothing here starts an async runtime: plugin processes are
//! short-lived and their start-up time is part of every pod's start.

pub mod args;
pub mod error;
pub mod exec;
pub mod runner;
pub mod skel;
pub mod types;
pub mod version;

pub use error::{CniError, ErrorCode};
pub use types::{CniResult, Dns, Interface, IpConfig, NetConf, Route};
pub use version::{LATEST_VERSION, SUPPORTED_VERSIONS};
