//! What can go wrong in the backend, in the kinds a caller branches on. The detail
//! (the driver's own message) is kept for the log; callers answer clients with a
//! generic text per kind, since the detail may name addresses and internals.

/// Failures of the backend.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The backend cannot be reached now (connection down, failing over, loading, or
    /// no answer within the command timeout, so a write may or may not have been
    /// applied); retry later, and only what is safe to repeat.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The backend answered something unexpected (a bug, or a store that was changed
    /// behind the node's back): retrying will not help.
    #[error("backend error: {0}")]
    Internal(String),
}
