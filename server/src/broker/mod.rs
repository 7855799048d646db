//! The broker: what every node of a cluster shares.
//!
//! A broker numbers the messages of each channel (offsets without gaps, an epoch that
//! changes when history is lost), keeps a short history, routes publications to the
//! nodes that subscribed to a channel, and holds presence and the node registry.
//! Only a publish stores anything about a channel's stream; reading a channel that has
//! no stored state answers `(0, EMPTY_EPOCH)` and stores nothing, so that subscribing
//! to ever new names cannot grow the broker (see [`herald_protocol::same_stream`] for
//! why offset 0 needs no epoch).
//! What a broker receives reaches the node as a stream of [`BrokerEvent`]s, taken once
//! with [`Broker::events`] and consumed by the hub: the broker never calls into the hub.
//! [`memory::MemoryBroker`] serves a single node; [`redis::RedisBroker`] a cluster. The
//! rest of the server sees only the [`Broker`] trait, so changing the broker changes
//! nothing outside this module.

pub mod memory;
pub mod redis;
pub mod webhook;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use herald_protocol::StreamPosition;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::receipts::ReceiptStore;

/// One published message as the broker numbered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// Offset in the channel, from 1, without gaps within an epoch.
    pub offset: u64,
    /// The channel's epoch when it was published.
    pub epoch: Arc<str>,
    /// The published value as JSON text (validated on the way in, never re-encoded).
    pub data: Arc<str>,
    /// Who published it: the publisher's user id for a socket publish (set by the
    /// server), what the backend gave for an API publish, `None` when nobody said.
    /// Stored with the message, so recovered messages carry it too.
    pub from: Option<Arc<str>>,
}

/// A slice of a channel's history and where the channel stands now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// The channel's latest offset and epoch.
    pub position: StreamPosition,
    /// Retained publications after the requested offset, in offset order.
    pub publications: Vec<Publication>,
}

/// A node as the registry knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node id.
    pub id: String,
    /// WebSocket URL clients use to reach the node directly.
    pub url: String,
    /// Open client connections.
    pub connections: u64,
    /// Whether the node is draining (it then leaves the registry at once).
    pub draining: bool,
    /// The node's load at its last heartbeat, for the dashboard (`/admin`). Flattened:
    /// `/v1/nodes` shows these as extra fields of each node; an entry written by a node
    /// that predates them reads as zeros.
    #[serde(flatten)]
    pub stats: NodeStats,
}

/// Load figures of one node, sampled at each registry heartbeat. Counters are totals
/// since the node started; rates are for the reader to compute from two samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeStats {
    /// When the figures were taken (the node's clock, Unix ms): the time base of rates.
    pub sampled_at_ms: u64,
    /// Channel subscriptions of the node's sessions, each session's personal channel
    /// included (a session in 3 rooms counts 4).
    pub subscriptions: u64,
    /// Distinct channels the node is subscribed to at the broker.
    pub channels: u64,
    /// Resident memory of the process, in bytes.
    pub rss_bytes: u64,
    /// CPU time the process used (user + system), in seconds.
    pub cpu_seconds: f64,
    /// Open file descriptors of the process (sockets included).
    pub open_fds: u64,
    /// `herald_messages_published_total`: messages published through this node.
    pub messages_published_total: u64,
    /// `herald_messages_delivered_total`: message frames written to this node's clients.
    pub messages_delivered_total: u64,
}

/// Presence of a channel split by node: user → node id → connections (never 0).
pub type NodePresence = BTreeMap<String, BTreeMap<String, u32>>;

/// A change of one user's connection count in one channel on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    /// The channel.
    pub channel: String,
    /// The user.
    pub user: String,
    /// The user's connections to the channel on this node now; 0 removes the entry.
    pub connections: u32,
}

/// A command of the server API for every session of one user, on every node
/// (`POST /v1/users/{user}/…`). It travels through the broker to each node's hub, which
/// applies it to the user's local sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum UserCommand {
    /// Close every session: with 4401 when `reconnect` (get a new token), else 4410.
    Disconnect {
        /// Whether the client may reconnect on its own.
        reconnect: bool,
    },
    /// Join the channel (server-granted: the token's patterns are not asked).
    Subscribe {
        /// The channel.
        channel: String,
    },
    /// Leave the channel.
    Unsubscribe {
        /// The channel.
        channel: String,
    },
    /// Tokens of the user issued before `before` (unix seconds) are refused from now on;
    /// sessions holding one are closed with 4401.
    Revoke {
        /// Unix seconds.
        before: u64,
        /// Unix seconds after which the revocation is forgotten: by then every token it
        /// refuses has expired (see `auth::TokenVerifier`'s lifetime bound).
        until: u64,
    },
}

/// A revocation as the broker stores it: tokens of `user` issued before `before` are
/// refused until `until` (both unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The user.
    pub user: String,
    /// Tokens issued before this are refused.
    pub before: u64,
    /// Kept until then.
    pub until: u64,
}

/// Tunables every broker needs; they come from the node's configuration.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Messages kept per channel.
    pub history_size: usize,
    /// How long a message stays in history.
    pub history_ttl: Duration,
    /// How long a channel's offset and epoch outlive its last publish. Longer than the
    /// history, so that an idle channel keeps its epoch and idle subscribers need no resync.
    pub meta_ttl: Duration,
    /// A node that has not refreshed its registry entry for this long is dead.
    pub node_ttl: Duration,
    /// Presence entries not refreshed for this long expire.
    pub presence_ttl: Duration,
    /// Publications the Redis subscriber connection may hold for the reader before it
    /// drops the oldest (a lag, repaired from history). Unused by the memory broker.
    pub subscriber_buffer: usize,
    /// Replicas that must acknowledge a publish (Redis `WAIT`) before it counts as done;
    /// 0: none. Unused by the memory broker.
    pub wait_replicas: u32,
    /// How long a publish waits for `wait_replicas`.
    pub wait_timeout: Duration,
}

/// Failures of the broker.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The broker cannot be reached now (connection down, timeout); retry later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker answered something unexpected.
    #[error("broker error: {0}")]
    Internal(String),
}

/// One message of [`Broker::publish_batch`]: what [`Broker::publish`] takes.
#[derive(Debug, Clone, Copy)]
pub struct BatchMessage<'a> {
    /// The channel.
    pub channel: &'a str,
    /// The data (JSON text).
    pub data: &'a str,
    /// The publisher (a valid user id, checked by the caller).
    pub from: Option<&'a str>,
}

/// What a broker tells the node, in the order it happened: one direction, broker →
/// hub. The hub consumes the stream ([`crate::hub::Hub::consume`]); the broker holds
/// only the sending side, so nothing points back from the broker to the hub.
#[derive(Debug)]
pub enum BrokerEvent {
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
    /// [`Broker::publish_ephemeral`]): no offset, nothing to check continuity against.
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
/// is detected and repaired from history as before; the memory broker's publishers wait
/// for room before they number their message. The hub only decides and queues per event
/// (no I/O, no waiting), so the stream normally drains as fast as it fills.
pub type BrokerEvents = mpsc::Receiver<BrokerEvent>;

/// An ephemeral message as the broker routes it: no offset, no epoch, never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ephemeral {
    /// The published value as JSON text (validated on the way in).
    pub data: Arc<str>,
    /// Who published it, as in [`Publication::from`].
    pub from: Option<Arc<str>>,
}

/// The sending side of a broker's event stream (see [`BrokerEvents`]).
pub type BrokerEventSender = mpsc::Sender<BrokerEvent>;

/// Events a broker's stream holds at most before its sender waits.
pub const EVENT_BUFFER: usize = 1024;

/// A new event stream of [`EVENT_BUFFER`] events.
pub fn event_stream() -> (BrokerEventSender, BrokerEvents) {
    mpsc::channel(EVENT_BUFFER)
}

/// A future that resolves when a subscription request was applied by the broker.
pub type SubscribeAck = BoxFuture<'static, Result<(), BrokerError>>;

/// The broker interface: streams with offsets and history, per-node routing, presence
/// and the node registry; and delivery receipts ([`ReceiptStore`], a supertrait kept
/// in its own module and files).
#[async_trait]
pub trait Broker: ReceiptStore + Send + Sync + 'static {
    /// Takes the broker's event stream: publications of subscribed channels,
    /// resubscribes and user commands. `Some` once; later calls answer `None`. Events
    /// that happen before it is taken wait in the stream.
    fn events(&self) -> Option<BrokerEvents>;

    /// Publishes `data` (JSON text) to `channel` as one atomic step: the next offset,
    /// appended to history, routed to subscribed nodes. Returns the message's position.
    /// `from` (a valid user id, checked by the caller) is stored with the message.
    ///
    /// A publish is the only call that creates a channel's state: the first one (or the
    /// first after the state expired or was lost) starts a fresh random epoch.
    async fn publish(
        &self,
        channel: &str,
        data: &str,
        from: Option<&str>,
    ) -> Result<StreamPosition, BrokerError>;

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
    ) -> Result<(), BrokerError>;

    /// Publishes several messages, each as [`Broker::publish`] would, and answers each
    /// in the order given. Messages to one channel get their offsets in the order
    /// given; different channels are independent, and one may fail while another
    /// succeeds.
    ///
    /// The default publishes each channel's messages one after the other and the
    /// channels concurrently. The Redis broker sends one script call per cluster slot.
    async fn publish_batch(
        &self,
        messages: &[BatchMessage<'_>],
    ) -> Vec<Result<StreamPosition, BrokerError>> {
        let mut by_channel: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, m) in messages.iter().enumerate() {
            by_channel.entry(m.channel).or_default().push(i);
        }
        let lanes = by_channel.into_values().map(|indexes| async move {
            let mut out = Vec::with_capacity(indexes.len());
            for i in indexes {
                let m = &messages[i];
                out.push((i, self.publish(m.channel, m.data, m.from).await));
            }
            out
        });
        let mut results: Vec<Option<Result<StreamPosition, BrokerError>>> =
            messages.iter().map(|_| None).collect();
        for (i, result) in futures_util::future::join_all(lanes)
            .await
            .into_iter()
            .flatten()
        {
            results[i] = Some(result);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(BrokerError::Internal("no publish answer".into()))))
            .collect()
    }

    /// Subscribes this node to `channel`. The request is queued when this method is
    /// called, not when the future is polled, so requests made in order (the hub makes
    /// them under its lock) are applied in that order. The future resolves once
    /// publications of the channel are being delivered.
    fn subscribe(&self, channel: &str) -> SubscribeAck;

    /// Unsubscribes this node from `channel`; queued in order like [`Broker::subscribe`].
    fn unsubscribe(&self, channel: &str);

    /// Retained publications with offset greater than `since`, at most `limit`, oldest
    /// first, and the channel's current position. A channel without stored state reads
    /// as `(0, EMPTY_EPOCH)` with nothing retained, and the read stores nothing: a
    /// client subscribing to endless new names must not grow the broker.
    async fn history(
        &self,
        channel: &str,
        since: u64,
        limit: usize,
    ) -> Result<History, BrokerError>;

    /// The channel's current position; `(0, EMPTY_EPOCH)` for a channel without stored
    /// state, which this read does not create (see [`Broker::history`]).
    async fn position(&self, channel: &str) -> Result<StreamPosition, BrokerError>;

    /// Applies presence changes made on node `node`.
    async fn presence_update(
        &self,
        node: &str,
        changes: &[PresenceChange],
    ) -> Result<(), BrokerError>;

    /// Keeps node `node`'s presence in these channels from expiring.
    async fn presence_refresh(&self, node: &str, channels: &[String]) -> Result<(), BrokerError>;

    /// Users present in a channel with their connection counts, over all live nodes.
    async fn presence(&self, channel: &str) -> Result<BTreeMap<String, u32>, BrokerError>;

    /// Users present in a channel per live node: user → node id → connections.
    async fn presence_by_node(&self, channel: &str) -> Result<NodePresence, BrokerError>;

    /// Adds or refreshes a node in the registry.
    async fn register_node(&self, info: &NodeInfo) -> Result<(), BrokerError>;

    /// Removes a node from the registry at once (draining or stopping).
    async fn unregister_node(&self, id: &str) -> Result<(), BrokerError>;

    /// Live nodes.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError>;

    /// Sends `command` to the sessions of `user` on every live node and returns how many
    /// sessions it affected in total. A [`UserCommand::Revoke`] is stored first, so that
    /// nodes refuse the revoked tokens at hello too. Nodes that do not answer within a
    /// short time are not counted.
    async fn user_command(&self, user: &str, command: &UserCommand) -> Result<u64, BrokerError>;

    /// Every stored revocation that is still in force (a node loads them at start and
    /// after a broker reconnect, when it may have missed a command).
    async fn revocations(&self) -> Result<Vec<Revocation>, BrokerError>;

    /// The cluster's webhook state and event log ([`webhook`]) with these settings. The
    /// node calls it once, when webhooks are configured; anything may append events
    /// through it ([`webhook::WebhookStore::append`]).
    fn webhooks(&self, settings: webhook::WebhookStoreSettings) -> Arc<dyn webhook::WebhookStore>;

    /// Whether the broker is connected and delivering; `/readyz` reports it.
    fn is_healthy(&self) -> bool;

    /// Stops background work and closes connections.
    async fn shutdown(&self);
}
