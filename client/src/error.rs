//! The typed errors of the SDK: what a command call or [`ClientBuilder::start`] can fail
//! with.
//!
//! [`ClientBuilder::start`]: crate::ClientBuilder::start

use std::time::Duration;

use herald_protocol::codes::ErrorCode;
use herald_protocol::frame::ErrorBody;

/// Why a command (`subscribe`, `unsubscribe`, `publish`, `presence`) or the start of a
/// client failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The server answered with an error reply (`forbidden`, `bad_request`,
    /// `rate_limited`, `unavailable`, …). [`Error::code`] gives the code.
    #[error("server refused ({}): {}", .0.code.as_str(), .0.message)]
    Server(ErrorBody),
    /// No answer within the request timeout. For `subscribe`, the channel stays
    /// remembered: it is subscribed as soon as a connection allows, and
    /// [`Event::Subscribed`](crate::Event::Subscribed) says when.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection broke after a `publish` was sent and before its reply: it may or
    /// may not have been published. The SDK never resends a publish on its own.
    #[error("connection lost before the reply; the command may or may not have taken effect")]
    ConnectionLost,
    /// The client has stopped (closed by the application, all handles dropped, or a
    /// close code that forbids reconnecting; see [`StopReason`](crate::StopReason)).
    #[error("the client has stopped")]
    Closed,
    /// `subscribe` to a channel the client already follows (or is subscribing to).
    #[error("already subscribed to {0}")]
    AlreadySubscribed(String),
    /// `unsubscribe` was called before the server confirmed this `subscribe`, or the
    /// server removed the channel meanwhile (an `unsubscribed` frame).
    #[error("subscription to {0} cancelled before it was confirmed")]
    Cancelled(String),
    /// The channel name is not valid (checked locally, before anything is sent).
    #[error("invalid channel name {channel:?}: {reason}")]
    InvalidChannel {
        /// The name given.
        channel: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The data to publish could not be encoded as JSON.
    #[error("cannot encode data as JSON: {0}")]
    Encode(String),
    /// The server's reply did not have the expected shape.
    #[error("unexpected reply from the server: {0}")]
    Protocol(String),
    /// The builder's settings are not usable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An ephemeral publish while no session is up: it is not queued for the next
    /// connection (a typing indicator sent late is worse than none), so it was not sent.
    #[error("not connected; ephemeral messages are not queued")]
    NotConnected,
}

impl Error {
    /// The protocol error code, when the server refused the command.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server(body) => Some(body.code),
            _ => None,
        }
    }
}
