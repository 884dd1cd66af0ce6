//! The node agent (flanneld's job).
//!
//! - [`core`]: the decisions, a pure function of (state, event) → actions;
//! - [`backend`]: the backend contract and its implementations (`vxlan`, `host-gw`), registered
//!   by name: what a backend publishes and the kernel state that reaches its peers;
//! - [`model`]: desired kernel state with owners, and the pure plan (current, desired) →
//!   operations;
//! - [`exec`]: the thin executor and the [`exec::Kernel`] interface (netlink, nftables, the
//!   subnet file; a fake in tests); [`vtep`] and [`firewall`] are parts of the real one;
//! - [`agent`]: start-up and the event loop; [`renewer`] keeps the lease on its own thread;
//!   [`http`] serves health and metrics; [`log`] sets up logging.

pub mod agent;
pub mod backend;
pub mod bgp_sink;
pub mod core;
pub mod exec;
pub mod firewall;
pub mod http;
pub mod log;
pub mod model;
pub mod renewer;
pub mod routed;
pub mod tun;
pub mod vtep;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Lease(#[from] weft_lease::LeaseError),
    #[error(transparent)]
    Netconf(#[from] weft_netconf::ConfigError),
    #[error("{context}: {source}")]
    Kernel { context: String, source: weft_dataplane::DataplaneError },
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// Wraps a dataplane error with what the agent was doing.
pub fn kernel(context: impl Into<String>) -> impl FnOnce(weft_dataplane::DataplaneError) -> AgentError {
    let context = context.into();
    move |source| AgentError::Kernel { context, source }
}
