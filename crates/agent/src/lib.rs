//! The node agent (flanneld's job). [`backend`] turns (own lease, peer leases) into the routes,
//! neighbours and FDB entries that should exist — a pure function; [`reconcile`] makes the
//! kernel hold exactly that, touching only weft's objects; [`vtep`] keeps the VXLAN device;
//! [`firewall`] the masquerade and forward rules; [`agent`] runs the loop.

pub mod agent;
pub mod backend;
pub mod firewall;
pub mod http;
pub mod log;
pub mod reconcile;
pub mod renewer;
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
