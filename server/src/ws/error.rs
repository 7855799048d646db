//! Errors of a client command, as reply errors.
//!
//! The conversions are pure: a backend failure becomes a fixed, generic reply (the
//! backend's own text names addresses and internals no client should see), and the
//! detail travels along in `cause` to be logged once, where the reply is written.

use herald_protocol::codes::ErrorCode;

use crate::backend::error::BackendError;
use crate::publish::PublishError;

/// A command's error reply, with the backend failure behind it (for the log).
#[derive(Debug)]
pub(super) struct CommandError {
    /// The reply's error code.
    pub(super) code: ErrorCode,
    /// The reply's message, for the client.
    pub(super) message: String,
    /// The backend failure behind it, never shown to the client.
    pub(super) cause: Option<BackendError>,
}

impl CommandError {
    /// An error reply with nothing behind it to log (a bad argument, a refusal).
    pub(super) fn new(code: ErrorCode, message: String) -> Self {
        Self {
            code,
            message,
            cause: None,
        }
    }

    /// Logs the backend failure behind the reply, if any: the one place it is logged.
    pub(super) fn log(&self, what: &str) {
        if let Some(cause) = &self.cause {
            tracing::warn!(error = %cause, "{what}: backend error");
        }
    }
}

impl From<BackendError> for CommandError {
    fn from(e: BackendError) -> Self {
        let (code, message) = match e {
            BackendError::Unavailable(_) => {
                (ErrorCode::Unavailable, "broker unavailable; try again")
            }
            BackendError::Internal(_) => (ErrorCode::Internal, "internal error"),
        };
        Self {
            code,
            message: message.into(),
            cause: Some(e),
        }
    }
}

impl From<PublishError> for CommandError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::Backend(e) => e.into(),
        }
    }
}
