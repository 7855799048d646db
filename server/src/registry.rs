//! The node registry: this node's heartbeat, and the choice of a node for `/v1/connect`.
//!
//! Each node refreshes its entry (id, public URL, connection count) several times per
//! node TTL; a node that stops refreshing drops out of the registry, and so out of
//! `/v1/nodes`, `/v1/connect` and presence, within the TTL. A draining node removes its
//! entry at once and stops refreshing.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::broker::NodeInfo;
use crate::node::Node;

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
pub async fn heartbeat(node: Arc<Node>, stop: CancellationToken) {
    let every = (node.config.broker_settings().node_ttl / 4).max(Duration::from_millis(250));
    let retry = Duration::from_millis(200);
    let mut failing = false;
    loop {
        if node.is_draining() {
            return;
        }
        let next = match node.broker.register_node(&node.info()).await {
            Ok(()) => {
                if failing {
                    node.presence.flush(true).await;
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
        }
    }

    #[test]
    fn picks_the_least_loaded_live_node() {
        let nodes = [n("a", 5, false), n("b", 2, true), n("c", 3, false)];
        assert_eq!(least_loaded(&nodes).unwrap().id, "c");
        assert!(least_loaded(&[n("a", 1, true)]).is_none());
    }
}
