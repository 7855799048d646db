//! The memory backend's PresenceStore.

use async_trait::async_trait;

use super::MemoryBackend;
use crate::backend::error::BackendError;
use crate::backend::presence::NodePresence;
use crate::backend::presence::PresenceChange;
use crate::backend::presence::PresenceStore;
use std::collections::BTreeMap;
use std::time::Instant;

#[async_trait]
impl PresenceStore for MemoryBackend {
    async fn presence_update(
        &self,
        node: &str,
        changes: &[PresenceChange],
    ) -> Result<(), BackendError> {
        let now = Instant::now();
        let mut shared = self.shared();
        for change in changes {
            let key = (node.to_owned(), change.user.clone());
            if change.connections == 0 {
                if let Some(entries) = shared.presence.get_mut(&change.channel) {
                    entries.remove(&key);
                    if entries.is_empty() {
                        shared.presence.remove(&change.channel);
                    }
                }
            } else {
                shared
                    .presence
                    .entry(change.channel.clone())
                    .or_default()
                    .insert(key, (change.connections, now));
            }
        }
        Ok(())
    }

    async fn presence_refresh(&self, node: &str, channels: &[String]) -> Result<(), BackendError> {
        let now = Instant::now();
        let mut shared = self.shared();
        for channel in channels {
            if let Some(entries) = shared.presence.get_mut(channel) {
                for ((n, _), (_, at)) in entries.iter_mut() {
                    if n == node {
                        *at = now;
                    }
                }
            }
        }
        Ok(())
    }

    async fn presence(&self, channel: &str) -> Result<BTreeMap<String, u32>, BackendError> {
        let now = Instant::now();
        let shared = self.shared();
        let live = Self::live_nodes(&shared, self.settings.node_ttl, now);
        let mut users = BTreeMap::new();
        if let Some(entries) = shared.presence.get(channel) {
            for ((node, user), (count, at)) in entries {
                if live.contains(node) && now.duration_since(*at) <= self.settings.presence_ttl {
                    *users.entry(user.clone()).or_insert(0) += *count;
                }
            }
        }
        Ok(users)
    }

    async fn presence_by_node(&self, channel: &str) -> Result<NodePresence, BackendError> {
        let now = Instant::now();
        let shared = self.shared();
        let live = Self::live_nodes(&shared, self.settings.node_ttl, now);
        let mut users = NodePresence::new();
        for ((node, user), (count, at)) in shared.presence.get(channel).into_iter().flatten() {
            if *count > 0
                && live.contains(node)
                && now.duration_since(*at) <= self.settings.presence_ttl
            {
                users
                    .entry(user.clone())
                    .or_default()
                    .insert(node.clone(), *count);
            }
        }
        Ok(users)
    }
}
