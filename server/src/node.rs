//! The node: the state every request and session of this process shares, and the
//! admission of new connections (limits per node and per address).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_protocol::codes::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Keys;
use crate::broker::{Broker, NodeInfo, NodeStats};
use crate::config::Config;
use crate::hub::Hub;
use crate::limits::{PendingAdmit, PendingQueue};
use crate::metrics::{self, Metrics};
use crate::presence::Presence;
use crate::receipts::Receipts;
use crate::webhook::Webhooks;

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
    /// The broker.
    pub broker: Arc<dyn Broker>,
    /// Local sessions by channel.
    pub hub: Arc<Hub>,
    /// Presence of local sessions.
    pub presence: Arc<Presence>,
    /// Webhooks, when `HERALD_WEBHOOK_URL` is set: sessions report users and channels
    /// here, and anything may append events ([`Webhooks::append`]).
    pub webhooks: Option<Arc<Webhooks>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Delivery receipts: coalesced acks, the unacked schedule.
    pub receipts: Arc<Receipts>,
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
    next_session: AtomicU64,
}

impl Node {
    /// Assembles a node.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        id: String,
        public_url: String,
        keys: Keys,
        broker: Arc<dyn Broker>,
        hub: Arc<Hub>,
        presence: Arc<Presence>,
        webhooks: Option<Arc<Webhooks>>,
        metrics: Arc<Metrics>,
        receipts: Arc<Receipts>,
    ) -> Self {
        let pending = PendingQueue::new(config.max_pending_handshakes, PENDING_EVICT_AFTER);
        Self {
            config,
            id,
            public_url,
            keys,
            broker,
            hub,
            presence,
            webhooks,
            metrics,
            receipts,
            sessions: TaskTracker::new(),
            drain: CancellationToken::new(),
            force_close: CancellationToken::new(),
            draining: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            per_ip: Mutex::default(),
            pending: Mutex::new(pending),
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
        !self.is_draining() && self.broker.is_healthy()
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
            sampled_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
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
}

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
    /// [`crate::control::UserIndex::register`].)
    pub fn authenticate(mut self) -> Result<Admission, CloseCode> {
        let node = Arc::clone(&self.node);
        let total = node.connections.fetch_add(1, Ordering::AcqRel) + 1;
        if total > node.config.max_connections {
            node.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(CloseCode::TooMany);
        }
        self.authenticated = true;
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
