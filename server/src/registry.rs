//! The node registry: this node's heartbeat, and the choice of a node for `/v1/connect`.
//!
//! Each node refreshes its entry (id, public URL, connection count) several times per
//! node TTL; a node that stops refreshing drops out of the registry, and so out of
//! `/v1/nodes`, `/v1/connect` and presence, within the TTL. A draining node removes its
//! entry at once and stops refreshing.
//!
//! The entry also carries the node's load figures ([`crate::backend::nodes::NodeStats`]) for the
//! dashboard, so it is refreshed at least every [`STATS_EVERY`]: the dashboard polls
//! every 2 s and its figures are then at most a second old.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backend::error::BackendError;
use crate::backend::nodes::{NodeInfo, NodeRegistry};
use crate::presence::Presence;

/// What the heartbeat reads of its node.
pub trait Announce: Send + Sync + 'static {
    /// The node's registry entry now. Walks `/proc`: called off the async workers.
    fn info(&self) -> NodeInfo;
    /// Whether the node is draining (it has left the registry and must stay out).
    fn is_draining(&self) -> bool;
}

/// Longest time between two heartbeats: how stale `/v1/nodes` figures may be. One small
/// Redis script call per node per second.
pub const STATS_EVERY: Duration = Duration::from_secs(1);

/// Time between two heartbeats: four per node TTL, so that a live node never looks
/// dead, but at least every [`STATS_EVERY`] for fresh load figures, and at most four a
/// second.
pub fn heartbeat_period(node_ttl: Duration) -> Duration {
    (node_ttl / 4).clamp(Duration::from_millis(250), STATS_EVERY)
}

/// The live node with the fewest connections that is not draining.
pub fn least_loaded(nodes: &[NodeInfo]) -> Option<&NodeInfo> {
    nodes
        .iter()
        .filter(|n| !n.draining)
        .min_by(|a, b| a.connections.cmp(&b.connections).then(a.id.cmp(&b.id)))
}

/// Refreshes this node's registry entry until `stop` is cancelled. A failed refresh is
/// retried quickly (the broker may still be connecting at start), and after a failure
/// this node's presence is written again in full, since the broker may have dropped it
/// while the node looked dead.
pub async fn heartbeat(
    node: Arc<dyn Announce>,
    registry: Arc<dyn NodeRegistry>,
    presence: Arc<Presence>,
    node_ttl: Duration,
    stop: CancellationToken,
) {
    let every = heartbeat_period(node_ttl);
    let retry = Duration::from_millis(200);
    let mut failing = false;
    let mut first = true;
    loop {
        if node.is_draining() {
            return;
        }
        let info = if std::mem::take(&mut first) {
            // At start the node is cheap to read and should join the registry at once,
            // as soon as it can be ready, without waiting for a blocking thread.
            Ok(node.info())
        } else {
            // Reading the load figures walks /proc (every open descriptor): not on a worker.
            tokio::task::spawn_blocking({
                let node = Arc::clone(&node);
                move || node.info()
            })
            .await
            .map_err(|e| BackendError::Internal(format!("reading the node's figures: {e}")))
        };
        if node.is_draining() {
            // Drain began meanwhile and removed the entry: don't write it back.
            return;
        }
        let registered = match info {
            Ok(info) => registry.register_node(&info).await,
            Err(e) => Err(e),
        };
        let next = match registered {
            Ok(()) => {
                if failing {
                    presence.flush(true).await;
                }
                failing = false;
                every
            }
            Err(e) => {
                if !failing {
                    tracing::debug!(error = %e, "registry heartbeat failed");
                }
                failing = true;
                retry
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: &str, connections: u64, draining: bool) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            url: format!("ws://{id}/ws"),
            connections,
            draining,
            stats: Default::default(),
        }
    }

    #[test]
    fn heartbeat_every_quarter_ttl_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(heartbeat_period(Duration::from_secs(10)), STATS_EVERY);
        assert_eq!(heartbeat_period(Duration::from_secs(3)), ms(750));
        assert_eq!(heartbeat_period(Duration::from_secs(1)), ms(250));
        assert_eq!(heartbeat_period(ms(100)), ms(250));
    }

    #[test]
    fn picks_the_least_loaded_live_node() {
        let nodes = [n("a", 5, false), n("b", 2, true), n("c", 3, false)];
        assert_eq!(least_loaded(&nodes).unwrap().id, "c");
        assert!(least_loaded(&[n("a", 1, true)]).is_none());
    }
}
