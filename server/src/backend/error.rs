//! What can go wrong in the backend, as a caller branches on it.

/// Failures of the broker.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The broker cannot be reached now (connection down, timeout); retry later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker answered something unexpected.
    #[error("broker error: {0}")]
    Internal(String),
}
