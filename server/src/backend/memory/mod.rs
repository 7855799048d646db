//! The in-memory broker: the embedded default for a single node.
//!
//! It keeps each channel's stream (offset, epoch, history) in sharded maps, and sends a
//! publication to its event stream ([`BackendEvent`]) while still holding the channel's
//! shard lock, so that publications of a channel reach the hub in offset order. The lock
//! is a std `Mutex`, not a tokio one: no `.await` happens while it is held (room in the
//! bounded stream is reserved before it is taken).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use herald_protocol::StreamPosition;

use crate::backend::nodes::NodeInfo;
use crate::backend::routing::{event_stream, BackendEventSender, BackendEvents};
use crate::backend::settings::BackendSettings;
use crate::backend::streams::Publication;
use crate::backend::users::Revocations;
use crate::backend::webhooks::{WebhookStore, WebhookStoreSettings};

mod health;
mod nodes;
mod presence;
mod receipts;
mod routing;
mod streams;
mod users;
mod webhooks;

const SHARDS: usize = 16;

use crate::backend::streams::new_epoch;

struct Stream {
    offset: u64,
    epoch: Arc<str>,
    /// Retained publications with the instant they were published, oldest first.
    history: VecDeque<(Instant, Publication)>,
    /// Last publish or position read: the stream's metadata expires `meta_ttl` after it.
    touched: Instant,
}

impl Stream {
    fn new(now: Instant) -> Self {
        Self {
            offset: 0,
            epoch: new_epoch().into(),
            history: VecDeque::new(),
            touched: now,
        }
    }

    fn trim(&mut self, settings: &BackendSettings, now: Instant) {
        while self.history.len() > settings.history_size {
            self.history.pop_front();
        }
        while let Some((at, _)) = self.history.front() {
            if now.duration_since(*at) > settings.history_ttl {
                self.history.pop_front();
            } else {
                break;
            }
        }
    }

    fn position(&self) -> StreamPosition {
        StreamPosition::new(self.offset, self.epoch.to_string())
    }
}

#[derive(Default)]
struct Shard {
    streams: HashMap<String, Stream>,
}

/// (node, user) → (connections, refreshed at), of one channel.
type ChannelPresence = HashMap<(String, String), (u32, Instant)>;

#[derive(Default)]
struct Shared {
    /// channel → its presence entries
    presence: HashMap<String, ChannelPresence>,
    /// node id → (info, refreshed at)
    nodes: HashMap<String, (NodeInfo, Instant)>,
}

/// The in-memory broker. See the module doc.
pub struct MemoryBackend {
    settings: BackendSettings,
    shards: Vec<Mutex<Shard>>,
    shared: Mutex<Shared>,
    /// Channels this node subscribed to. Its own lock: the hub calls `subscribe` under
    /// its shard lock, so this is never held while waiting for anything else.
    subscribed: RwLock<HashSet<String>>,
    /// Where publications and user commands go (the hub).
    events: BackendEventSender,
    /// The receiving side, until the hub takes it.
    events_rx: Mutex<Option<BackendEvents>>,
    /// The stored revocations (what Redis' `revocations` hash is to a cluster); expired
    /// ones are dropped whenever one is recorded.
    revocations: Revocations,
    /// Delivery receipts (acks, the unacked due set): see `memory/receipts.rs`.
    receipts: Mutex<receipts::ReceiptState>,
}

impl MemoryBackend {
    /// A new, empty broker.
    pub fn new(settings: BackendSettings) -> Self {
        let (events, events_rx) = event_stream();
        Self {
            settings,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            shared: Mutex::default(),
            subscribed: RwLock::default(),
            events,
            events_rx: Mutex::new(Some(events_rx)),
            revocations: Revocations::default(),
            receipts: Mutex::default(),
        }
    }

    fn shard(&self, channel: &str) -> std::sync::MutexGuard<'_, Shard> {
        let mut h = DefaultHasher::new();
        channel.hash(&mut h);
        let i = (h.finish() as usize) % SHARDS;
        // A poisoned lock means a panic while holding it; the maps are still usable.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the channel's stream (created if new, with a fresh epoch) under its
    /// shard lock, after marking the stream as used. Only a publish may create a stream.
    fn with_stream<T>(&self, channel: &str, f: impl FnOnce(&mut Stream, Instant) -> T) -> T {
        let now = Instant::now();
        let mut shard = self.shard(channel);
        let stream = shard
            .streams
            .entry(channel.to_owned())
            .or_insert_with(|| Stream::new(now));
        stream.touched = now;
        f(stream, now)
    }

    /// Runs `f` on the channel's stream if it has one (marking it as used, so that an
    /// idle channel with readers keeps its epoch), or returns `None` without creating
    /// anything: reads of channels never published to must not grow the maps.
    fn read_stream<T>(
        &self,
        channel: &str,
        f: impl FnOnce(&mut Stream, Instant) -> T,
    ) -> Option<T> {
        let now = Instant::now();
        let mut shard = self.shard(channel);
        let stream = shard.streams.get_mut(channel)?;
        stream.touched = now;
        Some(f(stream, now))
    }

    /// Channels with a stream (stored state), for the `herald_memory_streams` gauge.
    pub fn stream_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).streams.len())
            .sum()
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops streams idle for longer than `meta_ttl` and expired presence and nodes.
    /// Called periodically by the node.
    pub fn sweep(&self) {
        let now = Instant::now();
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.streams.retain(|_, s| {
                s.trim(&self.settings, now);
                now.duration_since(s.touched) <= self.settings.meta_ttl
            });
        }
        self.sweep_receipts(now);
        let mut shared = self.shared();
        let (presence_ttl, node_ttl) = (self.settings.presence_ttl, self.settings.node_ttl);
        for entries in shared.presence.values_mut() {
            entries.retain(|_, (_, at)| now.duration_since(*at) <= presence_ttl);
        }
        shared.presence.retain(|_, e| !e.is_empty());
        shared
            .nodes
            .retain(|_, (_, at)| now.duration_since(*at) <= node_ttl);
    }

    /// Channels with presence entries (for tests of the memory bound).
    #[cfg(test)]
    pub(crate) fn presence_channel_count(&self) -> usize {
        self.shared().presence.len()
    }

    fn live_nodes(shared: &Shared, ttl: Duration, now: Instant) -> HashSet<String> {
        shared
            .nodes
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) <= ttl)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

impl MemoryBackend {
    /// The cluster's webhook state and event log with these settings (one process
    /// here). The node opens it once, when webhooks are configured.
    pub fn webhook_store(&self, settings: WebhookStoreSettings) -> Arc<dyn WebhookStore> {
        // A single node: the log lives in this process, and dies with it.
        Arc::new(webhooks::MemoryWebhookStore::new(settings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use herald_protocol::EMPTY_EPOCH;

    use crate::backend::nodes::NodeRegistry;
    use crate::backend::presence::{PresenceChange, PresenceStore};
    use crate::backend::routing::{Routing, EVENT_BUFFER};
    use crate::backend::streams::Streams;

    fn settings() -> BackendSettings {
        BackendSettings {
            history_size: 3,
            history_ttl: Duration::from_secs(300),
            meta_ttl: Duration::from_secs(3600),
            node_ttl: Duration::from_secs(10),
            presence_ttl: Duration::from_secs(10),
            subscriber_buffer: 16,
            wait_replicas: 0,
            wait_timeout: Duration::from_millis(500),
            reconnect_max: Duration::from_millis(250),
            connect_timeout: Duration::from_millis(500),
        }
    }

    #[tokio::test]
    async fn offsets_and_bounded_history() {
        let b = MemoryBackend::new(settings());
        for i in 1..=5u64 {
            let pos = b.publish("a", &i.to_string(), None).await.unwrap();
            assert_eq!(pos.offset, i);
        }
        let h = b.history("a", 0, 100).await.unwrap();
        assert_eq!(h.position.offset, 5);
        let offsets: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, vec![3, 4, 5]);
        let h = b.history("a", 3, 1).await.unwrap();
        assert_eq!(h.publications[0].offset, 4);
        assert_eq!(h.publications.len(), 1);
        // Another channel has its own offsets.
        assert_eq!(b.publish("b", "1", None).await.unwrap().offset, 1);
    }

    #[tokio::test]
    async fn reads_of_unpublished_channels_store_nothing() {
        let b = MemoryBackend::new(settings());
        for i in 0..1000 {
            let channel = format!("room:{i}");
            let p = b.position(&channel).await.unwrap();
            assert_eq!(p, StreamPosition::new(0, EMPTY_EPOCH));
            let h = b.history(&channel, 0, 10).await.unwrap();
            assert_eq!(h.position, StreamPosition::new(0, EMPTY_EPOCH));
            assert!(h.publications.is_empty());
        }
        assert_eq!(b.stream_count(), 0);
        // A publish creates the channel with a real epoch; reads then see it.
        let p = b.publish("room:1", "1", Some("alice")).await.unwrap();
        assert_eq!(p.offset, 1);
        assert!(!p.epoch.is_empty());
        assert_eq!(b.position("room:1").await.unwrap(), p);
        let h = b.history("room:1", 0, 10).await.unwrap();
        assert_eq!(h.publications[0].from.as_deref(), Some("alice"));
        assert_eq!(b.stream_count(), 1);
    }

    #[tokio::test]
    async fn presence_counts_live_nodes_only() {
        let b = MemoryBackend::new(settings());
        let info = NodeInfo {
            id: "n1".into(),
            url: "ws://x/ws".into(),
            connections: 1,
            draining: false,
            stats: Default::default(),
        };
        b.register_node(&info).await.unwrap();
        let change = |user: &str, connections| PresenceChange {
            channel: "room".into(),
            user: user.into(),
            connections,
        };
        b.presence_update("n1", &[change("alice", 2), change("bob", 1)])
            .await
            .unwrap();
        b.presence_update("n2", &[change("carol", 1)])
            .await
            .unwrap();
        let users = b.presence("room").await.unwrap();
        assert_eq!(users.len(), 2, "n2 is not a live node: {users:?}");
        assert_eq!(users["alice"], 2);
        let by_node = b.presence_by_node("room").await.unwrap();
        assert_eq!(by_node.len(), 2, "n2 is not a live node: {by_node:?}");
        assert_eq!(by_node["alice"], BTreeMap::from([("n1".to_owned(), 2)]));
        b.presence_update("n1", &[change("alice", 0)])
            .await
            .unwrap();
        assert!(!b.presence("room").await.unwrap().contains_key("alice"));
        b.unregister_node("n1").await.unwrap();
        assert!(b.presence("room").await.unwrap().is_empty());
    }

    /// The event stream is bounded: with the hub behind by `EVENT_BUFFER` events, a
    /// publish to a subscribed channel waits for room (and numbers nothing meanwhile),
    /// then goes through once the hub reads.
    #[tokio::test]
    async fn a_hub_that_falls_behind_makes_publishers_wait() {
        let b = Arc::new(MemoryBackend::new(settings()));
        let mut events = b.events().expect("events");
        assert!(b.events().is_none(), "taken once");
        b.subscribe("c").await.expect("subscribe");
        for _ in 0..EVENT_BUFFER {
            b.publish("c", "1", None).await.expect("publish");
        }
        let broker = Arc::clone(&b);
        let mut blocked = tokio::spawn(async move { broker.publish("c", "2", None).await });
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut blocked)
                .await
                .is_err(),
            "waits for room"
        );
        assert_eq!(
            b.position("c").await.unwrap().offset,
            EVENT_BUFFER as u64,
            "nothing numbered while waiting"
        );
        events.recv().await.expect("an event");
        let position = tokio::time::timeout(Duration::from_secs(5), blocked)
            .await
            .expect("room again")
            .expect("no panic")
            .expect("published");
        assert_eq!(position.offset, EVENT_BUFFER as u64 + 1);
    }
}
