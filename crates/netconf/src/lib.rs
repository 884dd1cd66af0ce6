//! The two files that tie a node together, in flannel's formats so a weft node and a flannel
//! node can share a cluster:
//! - `net-conf.json` ([`NetworkConfig`]): the cluster network, subnet sizes, backend;
//! - `subnet.env` ([`SubnetEnv`]): what the node agent leased, read by the `weft` CNI plugin.

mod network;
mod subnet_env;

pub use network::{invalid_option, Backend, NetworkConfig, Options, BGP};
pub use subnet_env::{Routed, SubnetEnv};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid network config: {0}")]
    Invalid(String),
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: String, source: std::io::Error },
}

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;
