//! The node: the state every request and session of this process shares, and the
//! admission of new connections (limits per node, per address and per user).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_protocol::codes::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Keys;
use crate::backend::error::BackendError;
use crate::backend::health::Health;
use crate::backend::nodes::{NodeInfo, NodeRegistry, NodeStats};
use crate::backend::presence::{NodePresence, PresenceStore};
use crate::backend::streams::{History, Streams};
use crate::config::Config;
use crate::cutoff::Readiness;
use crate::limits::{BucketRule, Busy, PendingAdmit, PendingQueue, UserBudgets, UserLimit};
use crate::membership::Membership;
use crate::metrics::{self, Metrics};
use crate::publish::Publisher;
use crate::receipts::Receipts;
use crate::users::Users;
use crate::webhook::Webhooks;

/// Who this node is.
pub struct Identity {
    /// The configuration.
    pub config: Config,
    /// This node's id.
    pub id: String,
    /// The WebSocket URL clients use to reach this node directly.
    pub public_url: String,
    /// Token and API keys.
    pub keys: Keys,
}

/// The backend capabilities the node reads for its handlers (history, presence, the
/// registry, health); every write goes through a verb or a service.
pub struct Reads {
    /// History.
    pub streams: Arc<dyn Streams>,
    /// Presence.
    pub presence: Arc<dyn PresenceStore>,
    /// The registry.
    pub nodes: Arc<dyn NodeRegistry>,
    /// Connection health.
    pub health: Arc<dyn Health>,
}

/// The node's verbs and services, built by the wiring (`lib.rs`).
pub struct Services {
    /// The publish verb.
    pub publisher: Publisher,
    /// The membership verbs.
    pub membership: Membership,
    /// Users.
    pub users: Arc<Users>,
    /// Webhooks, when configured.
    pub webhooks: Option<Arc<Webhooks>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Delivery receipts.
    pub receipts: Arc<Receipts>,
    /// Since when the broker is healthy, kept by the cut-off watcher.
    pub readiness: Arc<Readiness>,
    /// Backend reads.
    pub reads: Reads,
}

/// Everything shared by the node's HTTP handlers and WebSocket sessions.
pub struct Node {
    /// The configuration.
    pub config: Config,
    /// This node's id.
    pub id: String,
    /// The WebSocket URL clients use to reach this node directly.
    pub public_url: String,
    /// Token and API keys.
    pub keys: Keys,
    /// The publish verb (single, batch, ephemeral).
    pub publisher: Publisher,
    /// The membership verbs (a session arriving, entering and leaving channels).
    pub membership: Membership,
    /// This node's users: sessions by user, revocations, user commands.
    pub users: Arc<Users>,
    /// Webhooks, when `HERALD_WEBHOOK_URL` is set (anything may append events).
    pub webhooks: Option<Arc<Webhooks>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Delivery receipts: coalesced acks, the unacked schedule.
    pub receipts: Arc<Receipts>,
    /// Since when the broker is healthy (`/readyz` reports it to peers).
    pub readiness: Arc<Readiness>,
    reads: Reads,
    /// Every WebSocket session, so shutdown can wait for them (axum does not).
    pub sessions: TaskTracker,
    /// Cancelled when the node starts draining.
    pub drain: CancellationToken,
    /// Cancelled when the drain window is over: every session still open closes now.
    pub force_close: CancellationToken,
    draining: AtomicBool,
    connections: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Connections that have not finished `hello`, oldest first; the token closes one
    /// when a newcomer evicts it.
    pending: Mutex<PendingQueue<CancellationToken>>,
    /// Admissions and refusals of the last second: the `after_ms` of `busy` answers,
    /// shared with the listener, which refuses too.
    pub busy: Arc<Busy>,
    /// Sessions starting now ([`MAX_STARTING`] at most): a burst queues here, not in
    /// the backend.
    pub starting: tokio::sync::Semaphore,
    /// Each user's connect and subscribe budgets, sharded by user like the user index.
    user_budgets: Box<[Mutex<UserBudgets>]>,
    next_session: AtomicU64,
}

/// Shards of the per-user budgets: a hello or subscribe locks one of them briefly.
const BUDGET_SHARDS: usize = 16;

/// Fewest users one shard of the budgets holds, unless the whole table is smaller.
const MIN_SHARD_USERS: usize = 64;

impl Node {
    /// Assembles a node from its identity and its services.
    pub fn new(identity: Identity, services: Services) -> Self {
        let Identity {
            config,
            id,
            public_url,
            keys,
        } = identity;
        let pending = PendingQueue::new(config.max_pending_handshakes, PENDING_EVICT_AFTER);
        let user_budgets = user_budgets(&config);
        Self {
            config,
            id,
            public_url,
            keys,
            publisher: services.publisher,
            membership: services.membership,
            users: services.users,
            webhooks: services.webhooks,
            metrics: services.metrics,
            receipts: services.receipts,
            readiness: services.readiness,
            reads: services.reads,
            sessions: TaskTracker::new(),
            drain: CancellationToken::new(),
            force_close: CancellationToken::new(),
            draining: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            per_ip: Mutex::default(),
            pending: Mutex::new(pending),
            busy: Arc::default(),
            starting: tokio::sync::Semaphore::new(MAX_STARTING),
            user_budgets,
            next_session: AtomicU64::new(1),
        }
    }

    /// Whether the node is draining (shutting down).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Starts draining: `/readyz` answers 503 from now on and sessions are told to leave.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.drain.cancel();
    }

    /// Whether the node accepts clients: not draining and the broker is healthy.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.backend_healthy()
    }

    /// Whether the backend is connected and delivering.
    pub fn backend_healthy(&self) -> bool {
        self.reads.health.is_healthy()
    }

    /// Retained publications of `channel` after `since`, at most `limit`, and where the
    /// channel stands (see [`Streams::history`]).
    pub async fn history(
        &self,
        channel: &str,
        since: u64,
        limit: usize,
    ) -> Result<History, BackendError> {
        self.counted(self.reads.streams.history(channel, since, limit).await)
    }

    /// Users present in `channel` over the live nodes, with their connections.
    pub async fn presence(
        &self,
        channel: &str,
    ) -> Result<std::collections::BTreeMap<String, u32>, BackendError> {
        self.counted(self.reads.presence.presence(channel).await)
    }

    /// Users present in `channel` per live node.
    pub async fn presence_by_node(&self, channel: &str) -> Result<NodePresence, BackendError> {
        self.counted(self.reads.presence.presence_by_node(channel).await)
    }

    /// The live nodes.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, BackendError> {
        self.counted(self.reads.nodes.nodes().await)
    }

    /// Counts a failed backend read in `herald_broker_errors_total`.
    fn counted<T>(&self, r: Result<T, BackendError>) -> Result<T, BackendError> {
        r.inspect_err(|_| {
            self.metrics.broker_errors.inc();
        })
    }

    /// Open authenticated client connections (those past `hello`).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// This node as the registry shows it.
    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            id: self.id.clone(),
            url: self.public_url.clone(),
            connections: self.connections() as u64,
            draining: self.is_draining(),
            stats: self.stats(),
        }
    }

    /// This node's load figures, for its registry entry and the dashboard. Reads
    /// `/proc` (and counts every open descriptor), so call it off the async workers.
    pub fn stats(&self) -> NodeStats {
        let gauge = |g: &prometheus_client::metrics::gauge::Gauge| g.get().max(0) as u64;
        let m = &self.metrics;
        NodeStats {
            sampled_at_ms: crate::clock::now_ms(),
            subscriptions: gauge(&m.subscriptions),
            channels: gauge(&m.broker_channels),
            rss_bytes: metrics::resident_memory_bytes().map_or(0, |b| b.max(0) as u64),
            cpu_seconds: metrics::cpu_seconds().unwrap_or(0.0),
            open_fds: metrics::open_fds().unwrap_or(0),
            messages_published_total: m.messages_published.get(),
            messages_delivered_total: m.messages_delivered.get(),
        }
    }

    /// A new node-local session id.
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Admits a new connection from `ip` as pending (it has not finished `hello`), or
    /// says which close code refuses it. Pending connections have their own budget
    /// (`max_pending_handshakes`); the authenticated slots of `max_connections` are only
    /// taken by [`Pending::authenticate`], so silent sockets can never fill them. A node
    /// whose authenticated slots are all taken refuses at once: the newcomer could not
    /// get one after its hello anyway.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Pending, CloseCode> {
        if self.connections() >= self.config.max_connections {
            return Err(CloseCode::TooMany);
        }
        let per_ip_limit = self.config.max_connections_per_ip;
        if per_ip_limit > 0 {
            let mut per_ip = lock(&self.per_ip);
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= per_ip_limit {
                return Err(CloseCode::TooMany);
            }
            *n += 1;
        }
        let evict = CancellationToken::new();
        let admitted = lock(&self.pending).admit(std::time::Instant::now(), evict.clone());
        let seq = match admitted {
            PendingAdmit::Admitted(seq) => seq,
            PendingAdmit::Evicted(seq, oldest) => {
                // Outside the lock: cancelling wakes the evicted session's task.
                oldest.cancel();
                self.metrics.pending_evicted.inc();
                seq
            }
            PendingAdmit::Refused => {
                self.release_ip(ip);
                return Err(CloseCode::TooMany);
            }
        };
        self.metrics.connections.inc();
        self.metrics.pending_handshakes.inc();
        self.metrics.connections_accepted.inc();
        Ok(Pending {
            node: Arc::clone(self),
            ip,
            seq,
            evict,
            authenticated: false,
        })
    }

    /// Gives back one connection of `ip` to the per-IP count.
    fn release_ip(&self, ip: IpAddr) {
        if self.config.max_connections_per_ip > 0 {
            let mut per_ip = lock(&self.per_ip);
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }

    /// Connections that have not finished `hello`.
    pub fn pending_handshakes(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Takes one token of `user`'s `kind` budget on this node; `false` (counted in
    /// `herald_user_limited_total`) when it is spent. The budgets belong to the user, not
    /// to a connection, so reconnecting does not refill them.
    pub fn take_user_budget(&self, user: &Arc<str>, kind: UserLimit) -> bool {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&**user, &mut h);
        let shard = (std::hash::Hasher::finish(&h) as usize) % self.user_budgets.len();
        let (taken, before, after) = {
            let mut budgets = lock(&self.user_budgets[shard]);
            let before = budgets.len();
            let taken = budgets.take(user, kind, std::time::Instant::now());
            (taken, before, budgets.len())
        };
        self.metrics
            .tracked_users
            .inc_by(after as i64 - before as i64);
        if !taken {
            let limit = match kind {
                UserLimit::Connect => "connect",
                UserLimit::Subscribe => "subscribe",
            };
            self.metrics
                .user_limited
                .get_or_create(&metrics::UserLimitLabel { limit })
                .inc();
        }
        taken
    }
}

/// The per-user budget shards of `config`, splitting `max_tracked_users` among them.
fn user_budgets(config: &Config) -> Box<[Mutex<UserBudgets>]> {
    let connect = BucketRule::new(
        config.max_user_connects_per_min as f32 / 60.0,
        config.user_connect_burst(),
    );
    let subscribe = BucketRule::new(
        config.max_user_subscribes_per_sec as f32,
        config.user_subscribe_burst(),
    );
    // The shards together hold at most `max_tracked_users`. A small table gets fewer
    // shards: in a shard of one or two places, a newcomer would have to push out a user
    // who spent the budget (eviction picks the entry nearest to full within a shard).
    let tracked = config.max_tracked_users.max(1);
    let shards = (tracked / MIN_SHARD_USERS).clamp(1, BUDGET_SHARDS);
    let capacity = tracked / shards;
    let epoch = std::time::Instant::now();
    (0..shards)
        .map(|_| Mutex::new(UserBudgets::new(connect, subscribe, capacity, epoch)))
        .collect()
}

impl crate::registry::Announce for Node {
    fn info(&self) -> NodeInfo {
        Node::info(self)
    }

    fn is_draining(&self) -> bool {
        Node::is_draining(self)
    }
}

/// Sessions a node starts at once (their backend reads and subscribes in flight).
pub const MAX_STARTING: usize = 256;

/// Locks a std mutex, ignoring poison: every critical section here leaves the map
/// consistent, and no await happens while holding it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long a pending connection is safe from eviction when the pending budget is full:
/// an honest client sends `hello` within a round trip of connecting.
pub const PENDING_EVICT_AFTER: Duration = Duration::from_secs(1);

/// A connection that has not finished `hello`: it holds a place in the pending budget
/// (and its IP's count) until [`Pending::authenticate`] or its drop.
pub struct Pending {
    node: Arc<Node>,
    ip: IpAddr,
    seq: u64,
    evict: CancellationToken,
    /// Set when the connection moved into an [`Admission`], which then owns the IP's
    /// count and the connection gauge.
    authenticated: bool,
}

impl Pending {
    /// Cancelled when a newcomer pushed this connection out of a full pending budget;
    /// it is then closed 4429.
    pub fn evicted(&self) -> &CancellationToken {
        &self.evict
    }

    /// Moves the connection from the pending budget into an authenticated slot, or
    /// refuses it (4429) when the node's authenticated slots are all taken. (The
    /// per-user limit is checked where the session registers with its user, in
    /// [`crate::users::UserIndex::register`].)
    pub fn authenticate(mut self) -> Result<Admission, CloseCode> {
        let node = Arc::clone(&self.node);
        let total = node.connections.fetch_add(1, Ordering::AcqRel) + 1;
        if total > node.config.max_connections {
            node.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(CloseCode::TooMany);
        }
        self.authenticated = true;
        node.busy.admitted();
        Ok(Admission { node, ip: self.ip })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        lock(&self.node.pending).remove(self.seq);
        self.node.metrics.pending_handshakes.dec();
        if !self.authenticated {
            self.node.metrics.connections.dec();
            self.node.release_ip(self.ip);
        }
    }
}

/// An authenticated connection; dropping it gives its slots back.
pub struct Admission {
    node: Arc<Node>,
    ip: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.node.connections.fetch_sub(1, Ordering::AcqRel);
        self.node.metrics.connections.dec();
        self.node.release_ip(self.ip);
    }
}
