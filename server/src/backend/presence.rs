//! Presence as the cluster shares it: which users are in a channel, per node, so a
//! dead node's entries drop out with its registry entry.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::error::BackendError;

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

/// The cluster's presence store (what centrifuge calls a `PresenceManager`).
#[async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    /// Applies presence changes made on node `node`.
    async fn presence_update(
        &self,
        node: &str,
        changes: &[PresenceChange],
    ) -> Result<(), BackendError>;

    /// Keeps node `node`'s presence in these channels from expiring.
    async fn presence_refresh(&self, node: &str, channels: &[String]) -> Result<(), BackendError>;

    /// Users present in a channel with their connection counts, over all live nodes.
    async fn presence(&self, channel: &str) -> Result<BTreeMap<String, u32>, BackendError>;

    /// Users present in a channel per live node: user → node id → connections.
    async fn presence_by_node(&self, channel: &str) -> Result<NodePresence, BackendError>;
}
