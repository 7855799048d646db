//! The in-memory broker: the embedded default for a single node.
//!
//! It keeps each channel's stream (offset, epoch, history) in sharded maps, and sends a
//! publication to its event stream ([`BrokerEvent`]) while still holding the channel's
//! shard lock, so that publications of a channel reach the hub in offset order. The lock
//! is a std `Mutex`, not a tokio one: no `.await` happens while it is held (room in the
//! bounded stream is reserved before it is taken).

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use herald_protocol::{StreamPosition, EMPTY_EPOCH};

use crate::control::Revocations;

use super::{
    Broker, BrokerError, BrokerEvent, BrokerEventSender, BrokerEvents, BrokerSettings, Ephemeral,
    History, NodeInfo, NodePresence, PresenceChange, Publication, Revocation, SubscribeAck,
    UserCommand,
};

mod receipts;

const SHARDS: usize = 16;

/// A random epoch: 8 alphanumeric characters.
pub fn new_epoch() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 8)
}

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

    fn trim(&mut self, settings: &BrokerSettings, now: Instant) {
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
pub struct MemoryBroker {
    settings: BrokerSettings,
    shards: Vec<Mutex<Shard>>,
    shared: Mutex<Shared>,
    /// Channels this node subscribed to. Its own lock: the hub calls `subscribe` under
    /// its shard lock, so this is never held while waiting for anything else.
    subscribed: RwLock<HashSet<String>>,
    /// Where publications and user commands go (the hub).
    events: BrokerEventSender,
    /// The receiving side, until the hub takes it.
    events_rx: Mutex<Option<BrokerEvents>>,
    /// The stored revocations (what Redis' `revocations` hash is to a cluster); expired
    /// ones are dropped whenever one is recorded.
    revocations: Revocations,
    /// Delivery receipts (acks, the unacked due set): see `memory/receipts.rs`.
    receipts: Mutex<receipts::ReceiptState>,
}

impl MemoryBroker {
    /// A new, empty broker.
    pub fn new(settings: BrokerSettings) -> Self {
        let (events, events_rx) = super::event_stream();
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

#[async_trait]
impl Broker for MemoryBroker {
    fn events(&self) -> Option<BrokerEvents> {
        self.events_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    async fn publish(
        &self,
        channel: &str,
        data: &str,
        from: Option<&str>,
    ) -> Result<StreamPosition, BrokerError> {
        // Room in the event stream first (a hub that falls behind makes publishers
        // wait), then the event is sent inside the stream's lock, so publications of a
        // channel reach the hub in offset order. Whether the channel is subscribed is
        // read under that lock too: a subscribe that returned before this publish
        // numbered its message must get it.
        let permit = self.events.reserve().await.ok();
        Ok(self.with_stream(channel, |stream, now| {
            stream.offset += 1;
            let publication = Publication {
                offset: stream.offset,
                epoch: stream.epoch.clone(),
                data: data.into(),
                from: from.map(Arc::from),
            };
            stream.history.push_back((now, publication.clone()));
            stream.trim(&self.settings, now);
            let subscribed = self
                .subscribed
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(channel);
            if let (true, Some(permit)) = (subscribed, permit) {
                permit.send(BrokerEvent::Publication {
                    channel: channel.into(),
                    publication,
                });
            }
            stream.position()
        }))
    }

    async fn publish_ephemeral(
        &self,
        channel: &str,
        data: &str,
        from: Option<&str>,
    ) -> Result<(), BrokerError> {
        // No stream is touched or created: into the event stream when this node is
        // subscribed. Best effort: a stream that is full (a hub far behind) drops it
        // rather than making the publisher wait.
        let subscribed = self
            .subscribed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(channel);
        if subscribed {
            let message = Ephemeral {
                data: data.into(),
                from: from.map(Arc::from),
            };
            let _ = self.events.try_send(BrokerEvent::Ephemeral {
                channel: channel.into(),
                message,
            });
        }
        Ok(())
    }

    fn subscribe(&self, channel: &str) -> SubscribeAck {
        self.subscribed
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(channel.to_owned());
        Box::pin(async { Ok(()) })
    }

    fn unsubscribe(&self, channel: &str) {
        self.subscribed
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(channel);
    }

    async fn history(
        &self,
        channel: &str,
        since: u64,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let history = self.read_stream(channel, |stream, now| {
            stream.trim(&self.settings, now);
            let publications = stream
                .history
                .iter()
                .map(|(_, p)| p)
                .filter(|p| p.offset > since)
                .take(limit)
                .cloned()
                .collect();
            History {
                position: stream.position(),
                publications,
            }
        });
        Ok(history.unwrap_or_else(|| History {
            position: StreamPosition::new(0, EMPTY_EPOCH),
            publications: Vec::new(),
        }))
    }

    async fn position(&self, channel: &str) -> Result<StreamPosition, BrokerError> {
        Ok(self
            .read_stream(channel, |stream, _| stream.position())
            .unwrap_or_else(|| StreamPosition::new(0, EMPTY_EPOCH)))
    }

    async fn presence_update(
        &self,
        node: &str,
        changes: &[PresenceChange],
    ) -> Result<(), BrokerError> {
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

    async fn presence_refresh(&self, node: &str, channels: &[String]) -> Result<(), BrokerError> {
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

    async fn presence(&self, channel: &str) -> Result<BTreeMap<String, u32>, BrokerError> {
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

    async fn presence_by_node(&self, channel: &str) -> Result<NodePresence, BrokerError> {
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

    async fn register_node(&self, info: &NodeInfo) -> Result<(), BrokerError> {
        self.shared()
            .nodes
            .insert(info.id.clone(), (info.clone(), Instant::now()));
        Ok(())
    }

    async fn unregister_node(&self, id: &str) -> Result<(), BrokerError> {
        self.shared().nodes.remove(id);
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
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

    async fn user_command(&self, user: &str, command: &UserCommand) -> Result<u64, BrokerError> {
        if let UserCommand::Revoke { before, until } = command {
            // The stored list: the same merge rules as every node's own copy.
            self.revocations
                .insert(user, *before, *until, crate::auth::now_secs());
        }
        // One node: the command reaches this node's hub directly. No hub listening (it
        // is gone, or never took the stream): nobody was affected.
        let (reply, count) = tokio::sync::oneshot::channel();
        let event = BrokerEvent::UserCommand {
            user: user.to_owned(),
            command: command.clone(),
            reply,
        };
        if self.events.send(event).await.is_err() {
            return Ok(0);
        }
        Ok(count.await.unwrap_or(0))
    }

    async fn revocations(&self) -> Result<Vec<Revocation>, BrokerError> {
        Ok(self.revocations.list(crate::auth::now_secs()))
    }

    fn webhooks(
        &self,
        settings: super::webhook::WebhookStoreSettings,
    ) -> Arc<dyn super::webhook::WebhookStore> {
        // A single node: the log lives in this process, and dies with it.
        Arc::new(super::webhook::MemoryWebhookStore::new(settings))
    }

    fn is_healthy(&self) -> bool {
        true
    }

    async fn shutdown(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BrokerSettings {
        BrokerSettings {
            history_size: 3,
            history_ttl: Duration::from_secs(300),
            meta_ttl: Duration::from_secs(3600),
            node_ttl: Duration::from_secs(10),
            presence_ttl: Duration::from_secs(10),
            subscriber_buffer: 16,
            wait_replicas: 0,
            wait_timeout: Duration::from_millis(500),
        }
    }

    #[tokio::test]
    async fn offsets_and_bounded_history() {
        let b = MemoryBroker::new(settings());
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
        let b = MemoryBroker::new(settings());
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
        let b = MemoryBroker::new(settings());
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
        let b = Arc::new(MemoryBroker::new(settings()));
        let mut events = b.events().expect("events");
        assert!(b.events().is_none(), "taken once");
        b.subscribe("c").await.expect("subscribe");
        for _ in 0..super::super::EVENT_BUFFER {
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
            super::super::EVENT_BUFFER as u64,
            "nothing numbered while waiting"
        );
        events.recv().await.expect("an event");
        let position = tokio::time::timeout(Duration::from_secs(5), blocked)
            .await
            .expect("room again")
            .expect("no panic")
            .expect("published");
        assert_eq!(position.offset, super::super::EVENT_BUFFER as u64 + 1);
    }
}
