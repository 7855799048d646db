//! The node: the state every request and session of this process shares, and the
//! admission of new connections (limits per node and per address).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use herald_protocol::codes::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Keys;
use crate::broker::{Broker, NodeInfo, NodeStats};
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::{self, Metrics};
use crate::presence::Presence;

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
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Every WebSocket session, so shutdown can wait for them (axum does not).
    pub sessions: TaskTracker,
    /// Cancelled when the node starts draining.
    pub drain: CancellationToken,
    /// Cancelled when the drain window is over: every session still open closes now.
    pub force_close: CancellationToken,
    draining: AtomicBool,
    connections: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
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
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            config,
            id,
            public_url,
            keys,
            broker,
            hub,
            presence,
            metrics,
            sessions: TaskTracker::new(),
            drain: CancellationToken::new(),
            force_close: CancellationToken::new(),
            draining: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            per_ip: Mutex::default(),
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

    /// Open client connections.
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

    /// Admits a new connection from `ip`, or says which close code refuses it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, CloseCode> {
        let total = self.connections.fetch_add(1, Ordering::AcqRel) + 1;
        if total > self.config.max_connections {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(CloseCode::TooMany);
        }
        let per_ip_limit = self.config.max_connections_per_ip;
        if per_ip_limit > 0 {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= per_ip_limit {
                drop(per_ip);
                self.connections.fetch_sub(1, Ordering::AcqRel);
                return Err(CloseCode::TooMany);
            }
            *n += 1;
        }
        self.metrics.connections.inc();
        self.metrics.connections_accepted.inc();
        Ok(Admission {
            node: Arc::clone(self),
            ip,
        })
    }
}

/// An admitted connection; dropping it gives the slot back.
pub struct Admission {
    node: Arc<Node>,
    ip: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.node.connections.fetch_sub(1, Ordering::AcqRel);
        self.node.metrics.connections.dec();
        if self.node.config.max_connections_per_ip > 0 {
            let mut per_ip = self.node.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = per_ip.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
    }
}
