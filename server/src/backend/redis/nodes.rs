//! The Redis backend's NodeRegistry.

use async_trait::async_trait;
use fred::interfaces::HashesInterface;

use super::broker_error;
use super::millis;
use super::scripts;
use super::RedisBackend;
use crate::backend::error::BackendError;
use crate::backend::nodes::NodeInfo;
use crate::backend::nodes::NodeRegistry;
use fred::types::Value;

#[async_trait]
impl NodeRegistry for RedisBackend {
    async fn register_node(&self, info: &NodeInfo) -> Result<(), BackendError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        let json = serde_json::to_string(info)
            .map_err(|e| BackendError::Internal(format!("node info: {e}")))?;
        // The registry as a whole expires when no node refreshes it for a while; each
        // entry's own age is judged by its heartbeat time.
        let registry_ttl = millis(inner.settings.node_ttl.saturating_mul(10));
        let args = vec![info.id.clone(), json, registry_ttl];
        scripts::run::<Value>(
            client,
            &inner.scripts.register_node,
            vec![inner.keys.nodes()],
            args,
        )
        .await
        .map_err(broker_error)?;
        Ok(())
    }

    async fn unregister_node(&self, id: &str) -> Result<(), BackendError> {
        let client = self.inner.ready()?;
        client
            .hdel::<Value, _, _>(self.inner.keys.nodes(), id)
            .await
            .map_err(broker_error)?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BackendError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        let args = vec![millis(inner.settings.node_ttl)];
        let answer: Vec<String> =
            scripts::run(client, &inner.scripts.nodes, vec![inner.keys.nodes()], args)
                .await
                .map_err(broker_error)?;
        let mut nodes: Vec<NodeInfo> = answer
            .iter()
            .filter_map(|json| match serde_json::from_str(json) {
                Ok(info) => Some(info),
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable node registry entry");
                    None
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }
}
