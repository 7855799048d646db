//! Pub/sub routing between nodes: which node hears which channel, and the one-way
//! stream of events the backend hands the node. Nothing here is stored.
//!
//! What the backend receives reaches the node as a stream of [`BackendEvent`]s, taken
//! once with [`Routing::events`] and consumed by the node's one ordered consumer
//! (`events.rs`): the backend never calls into the node.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use super::error::BackendError;
use super::streams::Publication;
use super::users::UserCommand;

/// What a broker tells the node, in the order it happened: one direction, broker →
/// hub. The hub consumes the stream ([`crate::hub::Hub::consume`]); the broker holds
/// only the sending side, so nothing points back from the broker to the hub.
#[derive(Debug)]
pub enum BackendEvent {
    /// A publication on a channel this node subscribed to, in the order the broker
    /// received them (per channel: offset order, as the broker numbered them).
    Publication {
        /// The channel.
        channel: Arc<str>,
        /// The publication.
        publication: Publication,
    },
    /// The broker's subscriptions were re-established after a connection loss (or its
    /// reader lagged), and messages may have been missed meanwhile: check the
    /// continuity of every channel.
    Resubscribed,
    /// A command of the server API for the sessions of `user` on this node; the hub
    /// answers on `reply` with how many local sessions it affected.
    UserCommand {
        /// The user.
        user: String,
        /// The command.
        command: UserCommand,
        /// Gets the count of affected local sessions.
        reply: oneshot::Sender<u64>,
    },
    /// An ephemeral message on a channel this node subscribed to (see
    /// [`Self::publish_ephemeral`]): no offset, nothing to check continuity against.
    Ephemeral {
        /// The channel.
        channel: Arc<str>,
        /// The message.
        message: Ephemeral,
    },
}

/// The receiving side of a broker's event stream.
///
/// Bounded ([`EVENT_BUFFER`]), so that a hub that falls behind pushes back instead of
/// growing a queue: the Redis reader then waits, fred's buffer between the subscriber
/// connection and the reader (`HERALD_REDIS_SUBSCRIBER_BUFFER`) overflows, and the lag
/// is detected and repaired from history; the memory backend's publishers wait
/// for room before they number their message. The hub only decides and queues per event
/// (no I/O, no waiting), so the stream normally drains as fast as it fills.
pub type BackendEvents = mpsc::Receiver<BackendEvent>;

/// An ephemeral message as the broker routes it: no offset, no epoch, never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ephemeral {
    /// The published value as JSON text (validated on the way in).
    pub data: Arc<str>,
    /// Who published it, as in [`Publication::from`].
    pub from: Option<Arc<str>>,
}

/// The sending side of a broker's event stream (see [`BackendEvents`]).
pub type BackendEventSender = mpsc::Sender<BackendEvent>;

/// Events a broker's stream holds at most before its sender waits.
pub const EVENT_BUFFER: usize = 1024;

/// A new event stream of [`EVENT_BUFFER`] events.
pub fn event_stream() -> (BackendEventSender, BackendEvents) {
    mpsc::channel(EVENT_BUFFER)
}

/// A future that resolves when a subscription request was applied by the broker.
pub type SubscribeAck = BoxFuture<'static, Result<(), BackendError>>;

/// Routing publications between the nodes that subscribed to a channel, and
/// ephemeral messages that nothing stores.
#[async_trait::async_trait]
pub trait Routing: Send + Sync + 'static {
    /// Takes the broker's event stream: publications of subscribed channels,
    /// resubscribes and user commands. `Some` once; later calls answer `None`. Events
    /// that happen before it is taken wait in the stream.
    fn events(&self) -> Option<BackendEvents>;

    /// Subscribes this node to `channel`. The request is queued when this method is
    /// called, not when the future is polled, so requests made in order (the hub makes
    /// them under its lock) are applied in that order. The future resolves once
    /// publications of the channel are being delivered.
    fn subscribe(&self, channel: &str) -> SubscribeAck;

    /// Unsubscribes this node from `channel`; queued in order like [`Self::subscribe`].
    fn unsubscribe(&self, channel: &str);

    /// Routes an ephemeral message to the nodes subscribed to `channel` now, and to
    /// nobody else: no offset, nothing stored, nothing created (no key, no stream), so
    /// the channel's offsets, history and continuity never see it. Delivery is best
    /// effort: a node that is not subscribed at that moment, or that misses it during
    /// a reconnect, never gets it. `from` is checked by the caller, as for `publish`.
    async fn publish_ephemeral(
        &self,
        channel: &str,
        data: &str,
        from: Option<&str>,
    ) -> Result<(), BackendError>;
}
