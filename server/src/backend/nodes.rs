//! The node registry: which nodes are alive, where clients reach them, and their load.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::error::BackendError;

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

/// The cluster's registry of live nodes.
#[async_trait]
pub trait NodeRegistry: Send + Sync + 'static {
    /// Adds or refreshes a node in the registry.
    async fn register_node(&self, info: &NodeInfo) -> Result<(), BackendError>;

    /// Removes a node from the registry at once (draining or stopping).
    async fn unregister_node(&self, id: &str) -> Result<(), BackendError>;

    /// Live nodes.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, BackendError>;
}
