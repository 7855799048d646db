//! The memory backend's NodeRegistry.

use async_trait::async_trait;

use super::MemoryBackend;
use crate::backend::error::BackendError;
use crate::backend::nodes::NodeInfo;
use crate::backend::nodes::NodeRegistry;
use std::time::Instant;

#[async_trait]
impl NodeRegistry for MemoryBackend {
    async fn register_node(&self, info: &NodeInfo) -> Result<(), BackendError> {
        self.shared()
            .nodes
            .insert(info.id.clone(), (info.clone(), Instant::now()));
        Ok(())
    }

    async fn unregister_node(&self, id: &str) -> Result<(), BackendError> {
        self.shared().nodes.remove(id);
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BackendError> {
        let now = Instant::now();
        let shared = self.shared();
        let mut nodes: Vec<NodeInfo> = shared
            .nodes
            .values()
            .filter(|(_, at)| now.duration_since(*at) <= self.settings.node_ttl)
            .map(|(info, _)| info.clone())
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }
}
