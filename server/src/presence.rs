//! Presence: which users are connected to which channel, on this node and in the cluster.
//!
//! Sessions report joins and leaves here; this module keeps the node's counts per
//! (channel, user) and sends only the changes to the broker in batches (every 100 ms),
//! so that a burst of connects costs one broker round trip, not one per connection.
//! It also refreshes the node's entries before they expire and, every third refresh,
//! writes them all again so that presence heals after the broker lost its data.
//!
//! Broker calls go out in chunks of [`CHUNK`] channels: a node with 20k users has 20k
//! personal channels, and one call per channel all at once would hold 20k requests
//! (and their buffers) in memory at the same moment.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backend::presence::{PresenceChange, PresenceStore};

type Key = (Arc<str>, Arc<str>);

/// Channels per broker call batch.
const CHUNK: usize = 512;

#[derive(Default)]
struct State {
    counts: HashMap<Key, u32>,
    dirty: HashSet<Key>,
}

/// This node's presence. See the module doc.
pub struct Presence {
    node_id: String,
    store: Arc<dyn PresenceStore>,
    state: Mutex<State>,
}

impl Presence {
    /// Presence of node `node_id`, stored in `broker`.
    pub fn new(node_id: String, store: Arc<dyn PresenceStore>) -> Self {
        Self {
            node_id,
            store,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One more connection of `user` in `channel`.
    pub fn join(&self, channel: &Arc<str>, user: &Arc<str>) {
        let key = (channel.clone(), user.clone());
        let mut state = self.state();
        *state.counts.entry(key.clone()).or_insert(0) += 1;
        state.dirty.insert(key);
    }

    /// One connection fewer of `user` in `channel`.
    pub fn leave(&self, channel: &Arc<str>, user: &Arc<str>) {
        let key = (channel.clone(), user.clone());
        let mut state = self.state();
        if let Some(n) = state.counts.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                state.counts.remove(&key);
            }
            state.dirty.insert(key);
        }
    }

    fn take_changes(&self, all: bool) -> Vec<PresenceChange> {
        let mut state = self.state();
        let keys: Vec<Key> = if all {
            // Every entry, and every pending change: a leave that emptied its entry is
            // only in `dirty`, and dropping it would keep the user present in the
            // broker until the hash expires.
            let State { counts, dirty } = &mut *state;
            let gone = dirty.drain().filter(|k| !counts.contains_key(k));
            counts.keys().cloned().chain(gone).collect()
        } else {
            state.dirty.drain().collect()
        };
        keys.into_iter()
            .map(|key| PresenceChange {
                connections: state.counts.get(&key).copied().unwrap_or(0),
                channel: key.0.to_string(),
                user: key.1.to_string(),
            })
            .collect()
    }

    fn mark_dirty(&self, changes: &[PresenceChange]) {
        let mut state = self.state();
        for c in changes {
            state
                .dirty
                .insert((c.channel.as_str().into(), c.user.as_str().into()));
        }
    }

    /// Sends pending changes (or, with `all`, every entry) to the broker; on failure
    /// they stay pending for the next flush.
    pub async fn flush(&self, all: bool) {
        let changes = self.take_changes(all);
        for (i, chunk) in changes.chunks(CHUNK).enumerate() {
            if let Err(e) = self.store.presence_update(&self.node_id, chunk).await {
                tracing::debug!(error = %e, "presence update failed; will retry");
                // This chunk and the ones not sent yet.
                self.mark_dirty(&changes[i * CHUNK..]);
                return;
            }
        }
    }

    /// Keeps this node's entries from expiring.
    pub async fn refresh(&self) {
        let channels: Vec<String> = {
            let state = self.state();
            let set: HashSet<&Arc<str>> = state.counts.keys().map(|(c, _)| c).collect();
            set.into_iter().map(|c| c.to_string()).collect()
        };
        for chunk in channels.chunks(CHUNK) {
            if let Err(e) = self.store.presence_refresh(&self.node_id, chunk).await {
                tracing::debug!(error = %e, "presence refresh failed");
                return;
            }
        }
    }

    /// Local connections of a user in a channel (for tests and metrics).
    pub fn local_count(&self, channel: &str, user: &str) -> u32 {
        let key: Key = (channel.into(), user.into());
        self.state().counts.get(&key).copied().unwrap_or(0)
    }

    /// Runs the flush and refresh loops until `stop` is cancelled, then removes this
    /// node's entries.
    pub async fn run(self: Arc<Self>, refresh_every: Duration, stop: CancellationToken) {
        let mut flush = tokio::time::interval(Duration::from_millis(100));
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refresh = tokio::time::interval(refresh_every);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refreshes: u64 = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = flush.tick() => self.flush(false).await,
                _ = refresh.tick() => {
                    refreshes += 1;
                    // Every third refresh rewrites everything: heals a broker that lost data.
                    if refreshes.is_multiple_of(3) { self.flush(true).await } else { self.refresh().await }
                }
            }
        }
        self.flush(false).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::backend::settings::BackendSettings;

    /// Node `n1`'s presence, stored in a fresh in-memory broker.
    fn presence_on_memory_broker() -> (Arc<MemoryBackend>, Presence) {
        let broker = Arc::new(MemoryBackend::new(BackendSettings {
            history_size: 10,
            history_ttl: Duration::from_secs(60),
            meta_ttl: Duration::from_secs(60),
            node_ttl: Duration::from_secs(10),
            presence_ttl: Duration::from_secs(10),
            subscriber_buffer: 16,
            wait_replicas: 0,
            wait_timeout: Duration::from_millis(500),
            reconnect_max: Duration::from_millis(250),
            connect_timeout: Duration::from_millis(500),
        }));
        let presence = Presence::new("n1".into(), Arc::clone(&broker) as Arc<dyn PresenceStore>);
        (broker, presence)
    }

    /// Joining and leaving ever new channels leaves nothing behind, here or in the
    /// broker, whether the leave comes before or after a flush.
    #[tokio::test]
    async fn churn_over_new_channels_leaves_nothing() {
        let (broker, presence) = presence_on_memory_broker();
        let user: Arc<str> = "alice".into();
        for i in 0..2000 {
            let channel: Arc<str> = format!("room:{i}").into();
            presence.join(&channel, &user);
            if i % 2 == 0 {
                presence.flush(false).await; // the join reached the broker
            }
            presence.leave(&channel, &user);
            if i % 3 == 0 {
                presence.flush(false).await;
            }
        }
        presence.flush(false).await;
        {
            let state = presence.state();
            assert!(state.counts.is_empty() && state.dirty.is_empty());
        }
        assert_eq!(broker.presence_channel_count(), 0);
    }

    /// A leave that is still pending when the periodic full rewrite runs reaches the
    /// broker with it: the rewrite sends the pending changes, not only the live entries.
    #[tokio::test]
    async fn a_full_rewrite_sends_pending_leaves() {
        let (broker, presence) = presence_on_memory_broker();
        let user: Arc<str> = "alice".into();
        let (gone, kept): (Arc<str>, Arc<str>) = ("room:gone".into(), "room:kept".into());
        presence.join(&gone, &user);
        presence.join(&kept, &user);
        presence.flush(false).await;
        assert_eq!(broker.presence_channel_count(), 2);
        presence.leave(&gone, &user);
        presence.flush(true).await;
        assert_eq!(broker.presence_channel_count(), 1);
        assert!(presence.state().dirty.is_empty());
    }
}
