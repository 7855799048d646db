//! The Redis backend's PresenceStore.

use async_trait::async_trait;
use fred::interfaces::{HashesInterface, KeysInterface};

use super::broker_error;
use super::keys;
use super::millis;
use super::scripts;
use super::RedisBackend;
use crate::backend::error::BackendError;
use crate::backend::nodes::NodeRegistry;
use crate::backend::presence::NodePresence;
use crate::backend::presence::PresenceChange;
use crate::backend::presence::PresenceStore;
use fred::types::Value;
use futures_util::future::try_join_all;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::collections::HashSet;

#[async_trait]
impl PresenceStore for RedisBackend {
    async fn presence_update(
        &self,
        node: &str,
        changes: &[PresenceChange],
    ) -> Result<(), BackendError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        // One script per channel: each channel's hash may live on another shard. Later
        // changes of the same user override earlier ones, in order.
        let mut by_channel: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for change in changes {
            let args = by_channel
                .entry(change.channel.as_str())
                .or_insert_with(|| vec![millis(inner.settings.presence_ttl)]);
            args.push(keys::presence_field(node, &change.user));
            args.push(change.connections.to_string());
        }
        let calls = by_channel.into_iter().map(|(channel, args)| {
            let keys = vec![inner.keys.presence(channel)];
            async move {
                scripts::run::<Value>(client, &inner.scripts.presence_update, keys, args).await
            }
        });
        try_join_all(calls).await.map_err(broker_error)?;
        Ok(())
    }

    async fn presence_refresh(&self, _node: &str, channels: &[String]) -> Result<(), BackendError> {
        // Expiry is per hash, not per field: refreshing keeps every node's entries of
        // the channel; entries of dead nodes are filtered (and removed) on read.
        let inner = &self.inner;
        let client = inner.ready()?;
        let ttl = inner.settings.presence_ttl.as_millis().max(1) as i64;
        let calls = channels
            .iter()
            .map(|channel| client.pexpire::<Value, _>(inner.keys.presence(channel), ttl, None));
        try_join_all(calls).await.map_err(broker_error)?;
        Ok(())
    }

    async fn presence(&self, channel: &str) -> Result<BTreeMap<String, u32>, BackendError> {
        let inner = &self.inner;
        let live: HashSet<String> = self.nodes().await?.into_iter().map(|n| n.id).collect();
        let client = inner.ready()?;
        let key = inner.keys.presence(channel);
        let entries: HashMap<String, String> =
            client.hgetall(key.as_str()).await.map_err(broker_error)?;
        let mut users = BTreeMap::new();
        let mut dead = Vec::new();
        for (field, count) in entries {
            match keys::split_presence_field(&field) {
                Some((node, user)) if live.contains(node) => {
                    let count: u32 = count.parse().unwrap_or(0);
                    let total: &mut u32 = users.entry(user.to_owned()).or_insert(0);
                    *total = total.saturating_add(count);
                }
                _ => dead.push(field),
            }
        }
        users.retain(|_, count| *count > 0);
        if !dead.is_empty() {
            // Lazy cleanup of nodes that left the registry; the answer is already right
            // without it, so a failure only leaves the cleanup for the next read.
            if let Err(e) = client.hdel::<Value, _, _>(key.as_str(), dead).await {
                tracing::debug!(error = %e, channel, "could not remove presence of dead nodes");
            }
        }
        Ok(users)
    }

    async fn presence_by_node(&self, channel: &str) -> Result<NodePresence, BackendError> {
        // The same hash as `presence`, not summed over nodes. Entries of dead nodes are
        // skipped; removing them is left to `presence`, which runs far more often.
        let inner = &self.inner;
        let live: HashSet<String> = self.nodes().await?.into_iter().map(|n| n.id).collect();
        let client = inner.ready()?;
        let entries: HashMap<String, String> = client
            .hgetall(inner.keys.presence(channel).as_str())
            .await
            .map_err(broker_error)?;
        let mut users = NodePresence::new();
        for (field, count) in entries {
            let count: u32 = count.parse().unwrap_or(0);
            match keys::split_presence_field(&field) {
                Some((node, user)) if count > 0 && live.contains(node) => {
                    users
                        .entry(user.to_owned())
                        .or_default()
                        .insert(node.to_owned(), count);
                }
                _ => {}
            }
        }
        Ok(users)
    }
}
