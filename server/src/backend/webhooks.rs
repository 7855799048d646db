//! The backend's side of webhooks: the cluster-wide event log and the online/occupied
//! state behind `user.online`, `user.offline`, `channel.occupied` and `channel.vacated`.
//!
//! Redis is the source of truth (`redis/webhooks.rs` keeps it all in one cluster slot,
//! so every step is one atomic Lua call); the memory backend keeps an equivalent
//! in-process log (`memory/webhooks.rs`), which is not durable across restarts.
//!
//! The model, shared by both stores:
//! - A *subject* is a user (`u:<user>`) or a channel (`c:<channel>`). Each node reports
//!   which subjects it *holds* (has at least one local session of the user / in the
//!   channel). Reports are idempotent assertions ("node N holds S" / "does not"), so a
//!   failed report is simply sent again.
//! - A subject held by some node is *on*. Turning on emits `user.online` /
//!   `channel.occupied` once. When the last node lets go, an offline deadline of
//!   `now + grace` is set; a hold before it cancels it (no event: a hop or a quick
//!   reconnect). A sweep, run by every node, emits `user.offline` / `channel.vacated`
//!   for due deadlines, atomically, so exactly one sweep emits each.
//! - Every report refreshes the node's heartbeat. A node silent for the node TTL is
//!   dead: a sweep drops its holds, which starts their grace (so its users go offline
//!   after node TTL + grace unless they reconnected elsewhere).
//! - Every event gets the next number `n` of the log: the stream id, the event's
//!   `seq` (increasing per subject, since it increases globally), and, with the log's
//!   random epoch, its unique `id` `<epoch>-<n>`. A new log starts numbering at the
//!   clock in ms × 1000, so `seq` keeps increasing even when Redis lost the log.
//! - Each webhook target (a URL) has a cursor: the last `n` it acknowledged. Only the
//!   holder of the target's lease (one node at a time) reads after the cursor and moves
//!   it; when the holder dies, the lease expires and another node re-sends everything
//!   after the cursor.

use std::time::Duration;

use async_trait::async_trait;

use super::error::BackendError;

/// What the event log and the presence machinery need to know.
#[derive(Debug, Clone)]
pub struct WebhookStoreSettings {
    /// `HERALD_OFFLINE_GRACE_MS`: how long a subject stays on after its last holder let go.
    pub grace: Duration,
    /// A node silent for this long is dead (the broker's node TTL).
    pub node_ttl: Duration,
    /// How long a target's lease lasts without renewal.
    pub lease: Duration,
    /// Events kept in the log (approximately, in Redis): the oldest are trimmed beyond it.
    pub retention: usize,
}

/// Whether one node holds one subject now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// `u:<user>` or `c:<channel>` (see [`user_subject`], [`channel_subject`]).
    pub subject: String,
    /// Whether the node has a local session of it.
    pub held: bool,
}

/// An event to append to the log, of any type (for example `message.unacked`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The event type, e.g. `message.unacked`.
    pub kind: String,
    /// The subject: `u:<user>` (the event gets a `user` field) or `c:<channel>`
    /// (a `channel` field).
    pub subject: String,
    /// More members of the event object as JSON text without the braces, e.g.
    /// `"channel":"user:alice","offset":17,"data":{…}`; empty for none. Must be valid:
    /// it is inserted as it is.
    pub extra: String,
    /// The event's `id`; `None` gives the log's own `<epoch>-<seq>`. A producer that
    /// may append the same event twice (a sweeper that died between appending and
    /// recording it) sets an id derived from the event, so that a duplicate carries
    /// the same id and the receiver drops it.
    pub id: Option<String>,
}

impl NewEvent {
    /// An event about `user` (it gets a `user` field); `extra` as in [`NewEvent::extra`].
    pub fn for_user(kind: &str, user: &str, extra: String) -> Self {
        Self {
            kind: kind.to_owned(),
            subject: user_subject(user),
            extra,
            id: None,
        }
    }

    /// An event about `channel` (it gets a `channel` field).
    pub fn for_channel(kind: &str, channel: &str, extra: String) -> Self {
        Self {
            kind: kind.to_owned(),
            subject: channel_subject(channel),
            extra,
            id: None,
        }
    }
}

/// One event as stored: its number and its JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// The event's number in the log (its `seq`).
    pub n: u64,
    /// The event as a JSON object.
    pub json: String,
}

/// Events after a target's cursor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// In log order.
    pub events: Vec<StoredEvent>,
    /// Events after the cursor that were trimmed before this target got them (lost).
    pub trimmed: u64,
}

/// The subject of a user.
pub fn user_subject(user: &str) -> String {
    format!("u:{user}")
}

/// The subject of a channel.
pub fn channel_subject(channel: &str) -> String {
    format!("c:{channel}")
}

/// The event types of a subject turning on and off, and the field that names it.
pub fn transition_kinds(subject: &str) -> Option<(&'static str, &'static str, &'static str, &str)> {
    if let Some(user) = subject.strip_prefix("u:") {
        Some(("user.online", "user.offline", "user", user))
    } else {
        subject
            .strip_prefix("c:")
            .map(|channel| ("channel.occupied", "channel.vacated", "channel", channel))
    }
}

/// Builds an event's JSON object. The Lua script in the Redis broker builds the same
/// text; `extra` is inserted as is.
pub fn event_json(
    id: &str,
    kind: &str,
    field: &str,
    name: &str,
    seq: u64,
    at_ms: u64,
    extra: &str,
) -> String {
    let mut s = format!(
        r#"{{"id":{},"type":{},"{field}":{},"seq":{seq},"at":{at_ms}"#,
        serde_json::Value::from(id),
        serde_json::Value::from(kind),
        serde_json::Value::from(name),
    );
    if !extra.is_empty() {
        s.push(',');
        s.push_str(extra);
    }
    s.push('}');
    s
}

/// The broker's webhook state. See the module doc.
#[async_trait]
pub trait WebhookStore: Send + Sync + 'static {
    /// Applies holdings of node `node` and refreshes its heartbeat (an empty list only
    /// refreshes). Returns `true` when the store did not know the node (first report,
    /// the node was declared dead, or the store lost its data): the node must then
    /// report every subject it holds again.
    async fn report(&self, node: &str, holdings: &[Holding]) -> Result<bool, BackendError>;

    /// Node `node` leaves (drains): whatever it still holds is let go as if it had
    /// died, at once.
    async fn leave(&self, node: &str) -> Result<(), BackendError>;

    /// Drops the holds of dead nodes and emits the offline/vacated events that are
    /// due. Every node runs it; each event is emitted by exactly one. Returns how many
    /// events it emitted.
    async fn sweep(&self) -> Result<u64, BackendError>;

    /// Appends an event of any type; it gets its `id`, `seq` and `at` here.
    async fn append(&self, event: &NewEvent) -> Result<(), BackendError>;

    /// Takes or renews the lease on `target` for `holder`; `false` when another holds it.
    async fn claim(&self, target: &str, holder: &str) -> Result<bool, BackendError>;

    /// Up to `max` events after `target`'s cursor, if `holder` holds (or could take)
    /// the lease; `None` when another node holds it.
    async fn read(
        &self,
        target: &str,
        holder: &str,
        max: usize,
    ) -> Result<Option<Batch>, BackendError>;

    /// Moves `target`'s cursor to `upto` (delivered), if `holder` still holds the
    /// lease; `false` otherwise (the events will be sent again by the new holder).
    async fn ack(&self, target: &str, holder: &str, upto: u64) -> Result<bool, BackendError>;

    /// Gives up the lease (a draining node), so another node takes over at once.
    async fn release(&self, target: &str, holder: &str) -> Result<(), BackendError>;
}

/// The event field and name of a subject, or an error for a malformed one.
pub fn subject_field(subject: &str) -> Result<(&'static str, &str), BackendError> {
    transition_kinds(subject)
        .map(|(_, _, field, name)| (field, name))
        .ok_or_else(|| BackendError::Internal(format!("bad webhook subject `{subject}`")))
}
