//! The broker's side of webhooks: the cluster-wide event log and the online/occupied
//! state behind `user.online`, `user.offline`, `channel.occupied` and `channel.vacated`.
//!
//! Redis is the source of truth ([`super::redis`] keeps it all in one cluster slot,
//! so every step is one atomic Lua call); the memory broker keeps an equivalent
//! in-process log ([`MemoryWebhookStore`]), which is not durable across restarts.
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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use super::BrokerError;

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
    async fn report(&self, node: &str, holdings: &[Holding]) -> Result<bool, BrokerError>;

    /// Node `node` leaves (drains): whatever it still holds is let go as if it had
    /// died, at once.
    async fn leave(&self, node: &str) -> Result<(), BrokerError>;

    /// Drops the holds of dead nodes and emits the offline/vacated events that are
    /// due. Every node runs it; each event is emitted by exactly one. Returns how many
    /// events it emitted.
    async fn sweep(&self) -> Result<u64, BrokerError>;

    /// Appends an event of any type; it gets its `id`, `seq` and `at` here.
    async fn append(&self, event: &NewEvent) -> Result<(), BrokerError>;

    /// Takes or renews the lease on `target` for `holder`; `false` when another holds it.
    async fn claim(&self, target: &str, holder: &str) -> Result<bool, BrokerError>;

    /// Up to `max` events after `target`'s cursor, if `holder` holds (or could take)
    /// the lease; `None` when another node holds it.
    async fn read(
        &self,
        target: &str,
        holder: &str,
        max: usize,
    ) -> Result<Option<Batch>, BrokerError>;

    /// Moves `target`'s cursor to `upto` (delivered), if `holder` still holds the
    /// lease; `false` otherwise (the events will be sent again by the new holder).
    async fn ack(&self, target: &str, holder: &str, upto: u64) -> Result<bool, BrokerError>;

    /// Gives up the lease (a draining node), so another node takes over at once.
    async fn release(&self, target: &str, holder: &str) -> Result<(), BrokerError>;
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The memory broker's webhook state: the same model in one process, for a single
/// node. Not durable: a restart forgets the log and the cursors.
pub struct MemoryWebhookStore {
    settings: WebhookStoreSettings,
    epoch: String,
    state: Mutex<MemState>,
}

#[derive(Default)]
struct MemState {
    n: u64,
    log: VecDeque<StoredEvent>,
    /// subject → nodes holding it.
    holders: HashMap<String, HashSet<String>>,
    on: HashSet<String>,
    /// subject → offline deadline (unix ms).
    due: BTreeMap<String, u64>,
    nodes: HashMap<String, u64>,
    cursors: HashMap<String, u64>,
    leases: HashMap<String, (String, u64)>,
}

impl MemState {
    fn emit(&mut self, epoch: &str, retention: usize, subject: &str, up: bool, now: u64) {
        let Some((on, off, field, name)) = transition_kinds(subject) else {
            return;
        };
        self.push(
            epoch,
            retention,
            if up { on } else { off },
            field,
            name,
            "",
            None,
            now,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        epoch: &str,
        retention: usize,
        kind: &str,
        field: &str,
        name: &str,
        extra: &str,
        id: Option<&str>,
        now: u64,
    ) {
        self.n += 1;
        let id = id.map_or_else(|| format!("{epoch}-{}", self.n), str::to_owned);
        let json = event_json(&id, kind, field, name, self.n, now, extra);
        self.log.push_back(StoredEvent { n: self.n, json });
        while self.log.len() > retention.max(1) {
            self.log.pop_front();
        }
    }

    fn let_go(&mut self, node: &str, subject: &str, grace: u64, now: u64) -> bool {
        let empty = match self.holders.get_mut(subject) {
            Some(set) => {
                set.remove(node);
                set.is_empty()
            }
            None => true,
        };
        if empty {
            self.holders.remove(subject);
            if self.on.contains(subject) {
                self.due.entry(subject.to_owned()).or_insert(now + grace);
                return true;
            }
        }
        false
    }

    fn drop_node(&mut self, node: &str, grace: u64, now: u64) {
        self.nodes.remove(node);
        let held: Vec<String> = self
            .holders
            .iter()
            .filter(|(_, nodes)| nodes.contains(node))
            .map(|(s, _)| s.clone())
            .collect();
        for s in held {
            self.let_go(node, &s, grace, now);
        }
    }
}

impl MemoryWebhookStore {
    /// An empty store.
    pub fn new(settings: WebhookStoreSettings) -> Self {
        // Numbered from the clock like the Redis log: see `webhook.lua`.
        let state = MemState {
            n: now_ms() * 1000,
            ..MemState::default()
        };
        Self {
            settings,
            epoch: super::memory::new_epoch(),
            state: Mutex::new(state),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn grace_ms(&self) -> u64 {
        self.settings.grace.as_millis() as u64
    }

    fn lease_ok(state: &mut MemState, target: &str, holder: &str, lease_ms: u64, now: u64) -> bool {
        match state.leases.get(target) {
            Some((h, until)) if h != holder && *until > now => false,
            _ => {
                state
                    .leases
                    .insert(target.to_owned(), (holder.to_owned(), now + lease_ms));
                true
            }
        }
    }
}

#[async_trait]
impl WebhookStore for MemoryWebhookStore {
    async fn report(&self, node: &str, holdings: &[Holding]) -> Result<bool, BrokerError> {
        let now = now_ms();
        let (grace, retention) = (self.grace_ms(), self.settings.retention);
        let mut st = self.state();
        let fresh = st.nodes.insert(node.to_owned(), now).is_none();
        for h in holdings {
            if h.held {
                st.holders
                    .entry(h.subject.clone())
                    .or_default()
                    .insert(node.to_owned());
                if st.on.contains(&h.subject) {
                    st.due.remove(&h.subject);
                } else {
                    st.on.insert(h.subject.clone());
                    st.emit(&self.epoch, retention, &h.subject, true, now);
                }
            } else if st.let_go(node, &h.subject, grace, now) && grace == 0 {
                st.due.remove(&h.subject);
                st.on.remove(&h.subject);
                st.emit(&self.epoch, retention, &h.subject, false, now);
            }
        }
        Ok(fresh)
    }

    async fn leave(&self, node: &str) -> Result<(), BrokerError> {
        let now = now_ms();
        let grace = self.grace_ms();
        self.state().drop_node(node, grace, now);
        Ok(())
    }

    async fn sweep(&self) -> Result<u64, BrokerError> {
        let now = now_ms();
        let ttl = self.settings.node_ttl.as_millis() as u64;
        let (grace, retention) = (self.grace_ms(), self.settings.retention);
        let mut st = self.state();
        let dead: Vec<String> = st
            .nodes
            .iter()
            .filter(|(_, at)| now.saturating_sub(**at) > ttl)
            .map(|(n, _)| n.clone())
            .collect();
        for node in dead {
            st.drop_node(&node, grace, now);
        }
        let due: Vec<String> = st
            .due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(s, _)| s.clone())
            .collect();
        let mut emitted = 0;
        for s in due {
            st.due.remove(&s);
            if !st.holders.contains_key(&s) && st.on.remove(&s) {
                st.emit(&self.epoch, retention, &s, false, now);
                emitted += 1;
            }
        }
        Ok(emitted)
    }

    async fn append(&self, event: &NewEvent) -> Result<(), BrokerError> {
        let (field, name) = subject_field(&event.subject)?;
        let now = now_ms();
        let retention = self.settings.retention;
        self.state().push(
            &self.epoch,
            retention,
            &event.kind,
            field,
            name,
            &event.extra,
            event.id.as_deref(),
            now,
        );
        Ok(())
    }

    async fn claim(&self, target: &str, holder: &str) -> Result<bool, BrokerError> {
        let lease = self.settings.lease.as_millis() as u64;
        Ok(Self::lease_ok(
            &mut self.state(),
            target,
            holder,
            lease,
            now_ms(),
        ))
    }

    async fn read(
        &self,
        target: &str,
        holder: &str,
        max: usize,
    ) -> Result<Option<Batch>, BrokerError> {
        let lease = self.settings.lease.as_millis() as u64;
        let mut st = self.state();
        if !Self::lease_ok(&mut st, target, holder, lease, now_ms()) {
            return Ok(None);
        }
        let cursor = st.cursors.get(target).copied();
        let after = cursor.unwrap_or(0);
        let events: Vec<StoredEvent> = st
            .log
            .iter()
            .filter(|e| e.n > after)
            .take(max.max(1))
            .cloned()
            .collect();
        let trimmed = match (cursor, events.first()) {
            (Some(c), Some(first)) => first.n.saturating_sub(c + 1),
            _ => 0,
        };
        Ok(Some(Batch { events, trimmed }))
    }

    async fn ack(&self, target: &str, holder: &str, upto: u64) -> Result<bool, BrokerError> {
        let mut st = self.state();
        let now = now_ms();
        if !matches!(st.leases.get(target), Some((h, until)) if h == holder && *until > now) {
            return Ok(false);
        }
        let c = st.cursors.entry(target.to_owned()).or_insert(0);
        *c = (*c).max(upto);
        Ok(true)
    }

    async fn release(&self, target: &str, holder: &str) -> Result<(), BrokerError> {
        let mut st = self.state();
        if matches!(st.leases.get(target), Some((h, _)) if h == holder) {
            st.leases.remove(target);
        }
        Ok(())
    }
}

/// The event field and name of a subject, or an error for a malformed one.
pub fn subject_field(subject: &str) -> Result<(&'static str, &str), BrokerError> {
    transition_kinds(subject)
        .map(|(_, _, field, name)| (field, name))
        .ok_or_else(|| BrokerError::Internal(format!("bad webhook subject `{subject}`")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(grace_ms: u64) -> MemoryWebhookStore {
        MemoryWebhookStore::new(WebhookStoreSettings {
            grace: Duration::from_millis(grace_ms),
            node_ttl: Duration::from_secs(10),
            lease: Duration::from_secs(10),
            retention: 5,
        })
    }

    fn hold(s: &str, held: bool) -> Holding {
        Holding {
            subject: s.into(),
            held,
        }
    }

    /// Type and seq (relative to the log's first number) of each event.
    fn kinds(st: &MemoryWebhookStore) -> Vec<String> {
        let state = st.state();
        let base = state.log.front().map_or(0, |e| e.n - 1);
        state
            .log
            .iter()
            .map(|e| {
                let v: serde_json::Value = serde_json::from_str(&e.json).unwrap();
                let seq = v["seq"].as_u64().unwrap();
                assert_eq!(seq, e.n);
                format!("{} {}", v["type"].as_str().unwrap(), seq - base)
            })
            .collect()
    }

    #[test]
    fn event_json_is_json_with_the_contract_fields() {
        let j = event_json(
            "e-7",
            "user.online",
            "user",
            "al\"ice",
            7,
            1_700_000_000_123,
            "",
        );
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["id"], "e-7");
        assert_eq!(v["type"], "user.online");
        assert_eq!(v["user"], "al\"ice");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["at"], 1_700_000_000_123u64);
        let j = event_json(
            "e-8",
            "message.unacked",
            "user",
            "bob",
            8,
            1,
            r#""offset":3,"data":{"a":1}"#,
        );
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["data"]["a"], 1);
    }

    #[tokio::test]
    async fn hops_do_not_flap_and_the_last_leave_emits_once() {
        let st = store(0);
        assert!(st.report("a", &[hold("u:alice", true)]).await.unwrap());
        st.report("b", &[hold("u:alice", true)]).await.unwrap();
        st.report("a", &[hold("u:alice", false)]).await.unwrap();
        st.report("b", &[hold("u:alice", false)]).await.unwrap();
        st.report("b", &[hold("u:alice", false)]).await.unwrap(); // repeated: idempotent
        assert_eq!(kinds(&st), ["user.online 1", "user.offline 2"]);
    }

    #[tokio::test]
    async fn a_reconnect_within_the_grace_emits_nothing() {
        let st = store(60_000);
        st.report("a", &[hold("c:room", true)]).await.unwrap();
        st.report("a", &[hold("c:room", false)]).await.unwrap();
        st.report("a", &[hold("c:room", true)]).await.unwrap();
        st.sweep().await.unwrap();
        assert_eq!(kinds(&st), ["channel.occupied 1"]);
        st.report("a", &[hold("c:room", false)]).await.unwrap();
        st.state().due.values_mut().for_each(|d| *d = 0); // the grace is over
        assert_eq!(st.sweep().await.unwrap(), 1);
        assert_eq!(st.sweep().await.unwrap(), 0);
        assert_eq!(kinds(&st), ["channel.occupied 1", "channel.vacated 2"]);
    }

    #[tokio::test]
    async fn a_leaving_node_lets_go_of_everything() {
        let st = store(0);
        st.report("a", &[hold("u:x", true), hold("u:y", true)])
            .await
            .unwrap();
        st.report("b", &[hold("u:y", true)]).await.unwrap();
        st.leave("a").await.unwrap();
        st.sweep().await.unwrap();
        assert_eq!(
            kinds(&st),
            ["user.online 1", "user.online 2", "user.offline 3"]
        );
    }

    #[tokio::test]
    async fn cursor_lease_and_retention() {
        let st = store(0);
        let base = st.state().n; // event k (from 1) has number base + k
        for i in 0..8 {
            st.append(&NewEvent {
                kind: "test".into(),
                subject: format!("u:u{i}"),
                extra: String::new(),
                id: None,
            })
            .await
            .unwrap();
        }
        // Retention 5: events 4..=8 are kept; a new target starts at the oldest.
        let b = st.read("t", "n1", 2).await.unwrap().unwrap();
        assert_eq!((b.events[0].n - base, b.events.len(), b.trimmed), (4, 2, 0));
        assert!(
            st.read("t", "n2", 2).await.unwrap().is_none(),
            "n1 holds the lease"
        );
        assert!(!st.ack("t", "n2", base + 5).await.unwrap());
        assert!(st.ack("t", "n1", base + 5).await.unwrap());
        let b = st.read("t", "n1", 10).await.unwrap().unwrap();
        assert_eq!(
            b.events.iter().map(|e| e.n - base).collect::<Vec<_>>(),
            [6, 7, 8]
        );
        st.ack("t", "n1", base + 8).await.unwrap();
        for _ in 0..7 {
            st.append(&NewEvent {
                kind: "test".into(),
                subject: "c:room".into(),
                extra: String::new(),
                id: None,
            })
            .await
            .unwrap();
        }
        let b = st.read("t", "n1", 10).await.unwrap().unwrap();
        assert_eq!(
            (b.events[0].n - base, b.trimmed),
            (11, 2),
            "9 and 10 were trimmed"
        );
        st.release("t", "n1").await.unwrap();
        assert!(st.claim("t", "n2").await.unwrap());
        assert!(st
            .append(&NewEvent {
                kind: "x".into(),
                subject: "bad".into(),
                extra: String::new(),
                id: None,
            })
            .await
            .is_err());
    }
}
