//! What the application sees: the [`Event`] stream's items, the connection [`State`] and
//! the values commands resolve with.

use std::time::Duration;

use herald_protocol::frame::ErrorBody;
use herald_protocol::StreamPosition;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

/// One item of the client's event stream, in the order things happened.
#[derive(Debug, Clone)]
pub enum Event {
    /// A session is up: `welcome` arrived. Every remembered channel follows as
    /// [`Event::Subscribed`] (or [`Event::SubscribeFailed`]).
    Connected(Connected),
    /// A session ended or a connection attempt failed. The client retries by itself
    /// after `retry_in`, unless an [`Event::Stopped`] follows.
    Disconnected(Disconnected),
    /// A channel is live on the current session (after `subscribe`, or at every
    /// `welcome` for each remembered channel, the personal channel included, or when
    /// the server added it: a `subscribed` frame, [`Subscription::by_server`]).
    Subscribed(Subscription),
    /// The server removed a channel from the session (a `unsubscribed` frame: the
    /// server API, or a refreshed token that no longer allows it). The client no longer
    /// follows it.
    Unsubscribed {
        /// The channel.
        channel: String,
        /// The server's reason: `server` (the server API) or `permissions` (the
        /// refreshed token no longer allows the channel); other values may come.
        reason: String,
    },
    /// The server refused a remembered channel (at `welcome` or in a `subscribe`
    /// reply); the client no longer follows it.
    SubscribeFailed {
        /// The channel.
        channel: String,
        /// The server's error.
        error: ErrorBody,
    },
    /// A message, exactly once and in offset order per channel.
    Message(Message),
    /// An ephemeral message (typing indicators, "is viewing" markers): no offset, not
    /// stored, never recovered, and outside the channel's ordering and deduplication.
    /// It arrives only while the channel is live on a session; one sent during a
    /// reconnect is simply lost. See [`Client::publish_ephemeral`](crate::Client::publish_ephemeral).
    Ephemeral(EphemeralMessage),
    /// Continuity on a channel was lost: reload its state from the application, then
    /// keep reading. Messages continue after `position`.
    Resync(Resync),
    /// The client stopped and will not reconnect; this is the last event.
    Stopped(StopReason),
}

/// A message on a channel.
#[derive(Debug, Clone)]
pub struct Message {
    /// The channel.
    pub channel: String,
    /// The message's offset in the channel (1, 2, 3 … without gaps within an epoch).
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: String,
    /// Who published it: the publisher's user id, set by the server, when it came from
    /// a client socket; for a server API publish, what the backend gave (often
    /// nothing). `None` means the application's server sent it: no client can set it.
    pub from: Option<String>,
    /// The published JSON value, as sent by the publisher.
    pub data: Box<RawValue>,
}

impl Message {
    /// The message's position, to store and resume from (see
    /// [`Client::subscribe_from`](crate::Client::subscribe_from)).
    pub fn position(&self) -> StreamPosition {
        StreamPosition::new(self.offset, self.epoch.clone())
    }

    /// Decodes the data into a type.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.data.get())
    }
}

/// An ephemeral message on a channel: the payload of [`Event::Ephemeral`].
#[derive(Debug, Clone)]
pub struct EphemeralMessage {
    /// The channel.
    pub channel: String,
    /// Who published it, as in [`Message::from`]: set by the server for a client
    /// publish, so it cannot be forged by another client.
    pub from: Option<String>,
    /// The published JSON value.
    pub data: Box<RawValue>,
}

impl EphemeralMessage {
    /// Decodes the data into a type.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.data.get())
    }
}

/// A confirmed subscription: the answer to `subscribe`, and the payload of
/// [`Event::Subscribed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The channel.
    pub channel: String,
    /// The channel's current position on the server. With `recovered`, the missed
    /// messages up to it follow.
    pub position: StreamPosition,
    /// Whether the client asked to continue from a position it had (a resume after a
    /// reconnect, or [`Client::subscribe_from`](crate::Client::subscribe_from)).
    pub resumed: bool,
    /// Whether every message after that position is delivered. `resumed && !recovered`
    /// means messages were lost to this client; an [`Event::Resync`] says so too.
    pub recovered: bool,
    /// Whether the server added the channel to the session (`POST
    /// /v1/users/{user}/subscribe`) rather than this client's `subscribe` or resume.
    /// Messages after `position` follow. Such a channel is then followed like any
    /// other: resumed after a reconnect, where the token decides whether it is still
    /// allowed ([`Event::SubscribeFailed`] if not).
    pub by_server: bool,
}

/// Details of [`Event::Connected`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connected {
    /// The WebSocket URL connected to.
    pub url: String,
    /// The node's id.
    pub node: String,
    /// This session's id.
    pub session: String,
    /// The authenticated user (the token's `sub`).
    pub user: String,
    /// The server's heartbeat interval; no frame for twice this means a dead connection.
    pub heartbeat: Duration,
    /// Whether this session is on another node than the previous session (false for
    /// the first one).
    pub node_changed: bool,
}

/// Details of [`Event::Disconnected`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnected {
    /// The URL of the connection (`None` when no URL could be found).
    pub url: Option<String>,
    /// What happened.
    pub reason: DisconnectReason,
    /// When the client tries again (`None`: it stops; [`Event::Stopped`] follows).
    pub retry_in: Option<Duration>,
}

/// Why a connection ended or could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The server closed the WebSocket with this code (see
    /// [`CloseCode`](herald_protocol::codes::CloseCode)).
    Closed {
        /// The close code.
        code: u16,
        /// The close reason text.
        reason: String,
    },
    /// No frame from the server for twice the heartbeat interval.
    HeartbeatTimeout,
    /// The connection broke without a close frame.
    ConnectionLost(String),
    /// TCP, WebSocket handshake or `hello` → `welcome` failed or took too long.
    ConnectFailed(String),
    /// The TLS handshake of a `wss://` URL, or of every `https://` `/v1/connect` that
    /// was tried, failed: most often a server certificate the client does not trust
    /// (unknown CA, expired, issued for another name). The message is rustls's reason.
    /// The client keeps retrying with backoff, always with TLS and never falling back
    /// to plaintext, so a fixed certificate is picked up without a restart.
    Tls(String),
    /// No endpoint gave a URL (every `/v1/connect` failed).
    NoEndpoint(String),
    /// The token callback failed.
    Token(String),
}

/// Details of [`Event::Resync`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resync {
    /// The channel.
    pub channel: String,
    /// The new position: messages continue after it.
    pub position: StreamPosition,
    /// How the loss was noticed.
    pub cause: ResyncCause,
}

/// How a loss of continuity was noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncCause {
    /// The server sent `resync`.
    Server,
    /// A resume or `subscribe_from` answered `recovered: false`.
    NotRecovered,
    /// A message skipped offsets or changed epoch without notice (should not happen
    /// with a conforming server).
    Gap,
}

/// Why the client stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// [`Client::close`](crate::Client::close) was called or every `Client` was dropped.
    ClientClosed,
    /// The server closed with a code that forbids reconnecting on its own (1009 frame
    /// too large, 4400 bad request, 4403 forbidden).
    Rejected {
        /// The close code.
        code: u16,
        /// The close reason text.
        reason: String,
    },
    /// The server refused the token (4401) and no token callback can give a new one.
    Unauthorized,
    /// The backend removed the user (close 4410, `POST /v1/users/{user}/disconnect`
    /// with `"reconnect": false`): the client must not reconnect on its own. Start a
    /// new client when the application decides the user may come back.
    Kicked {
        /// The close reason text (`kicked`).
        reason: String,
    },
}

/// The connection state, as [`Client::state`](crate::Client::state) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Finding a node, connecting, or waiting for `welcome`.
    Connecting,
    /// A session is up on this node.
    Connected {
        /// The node's id.
        node: String,
    },
    /// Waiting before the next attempt.
    Reconnecting,
    /// Stopped for good.
    Stopped(StopReason),
}
