//! Dataplane errors, each naming the operation and the object it was applied to.

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("{op} {object}: {source}")]
    Netlink { op: &'static str, object: String, source: std::io::Error },
    #[error("netlink: {0}")]
    Protocol(String),
    #[error(transparent)]
    Netns(#[from] weft_netns::NetnsError),
    #[error("sysctl {key}: {source}")]
    Sysctl { key: String, source: std::io::Error },
    #[error("nftables {op}: {detail}")]
    Nft { op: &'static str, detail: String },
    #[error("link {0:?} not found")]
    LinkNotFound(String),
}

impl DataplaneError {
    /// The errno of a failed netlink request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            DataplaneError::Netlink { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The object was already gone (teardown treats this as success).
    pub fn is_not_found(&self) -> bool {
        matches!(self, DataplaneError::LinkNotFound(_))
            || matches!(self.errno(), Some(libc::ENODEV | libc::ENOENT | libc::ESRCH | libc::EADDRNOTAVAIL))
    }

    /// The object existed already.
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }
}

pub type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// Maps "not found" to `Ok(())`, for idempotent teardown.
pub fn ignore_not_found(result: Result<()>) -> Result<()> {
    match result {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    }
}
