//! The hub: which local session is in which channel, and the fan-out of publications.
//!
//! The hot path reads in one direction: API → broker → hub → session. The broker hands
//! the hub a stream of [`BackendEvent`]s (publications, resubscribes, user commands),
//! consumed in order by the node's one consumer (`crate::events`); nothing calls back from the broker into the
//! hub, and the hub holds the broker, not the other way round.
//!
//! The hub owns four invariants:
//! - **One broker subscription per channel per node**, counted by local sessions. The
//!   first session to join a channel subscribes the node at the broker; the last one to
//!   leave schedules an unsubscribe after `unsubscribe_delay`, which a new session in
//!   the meantime cancels, so churn does not thrash the broker.
//! - **Encode once, share the bytes.** A publication is encoded into one frame, wrapped
//!   in an `Arc`, and offered to every local session's bounded queue without waiting.
//!   A full queue never blocks the fan-out: that session is closed with 4509 and
//!   resumes from its offset.
//! - **Continuity per channel on this node.** The hub knows the last offset it
//!   dispatched per channel. When the broker skips offsets (a dropped pub/sub message,
//!   a lagging reader, a reconnect) the hub buffers the channel, repairs the gap from
//!   history, and if history cannot fill it sends `resync` to the channel's sessions.
//!   The rules themselves are pure, in [`crate::continuity`].
//! - **Per-channel order without a shared lock on the fan-out.** What to deliver is
//!   decided under the channel's shard lock (continuity, and an `Arc` snapshot of the
//!   subscriber list, rebuilt only after a join or leave), and only queued there, in the
//!   channel's [`Outlet`]. The offers to the sessions' mailboxes happen after the lock is
//!   released, by one drainer per channel at a time, so other channels never wait
//!   behind a fan-out and a later message never overtakes an earlier one. A fan-out to
//!   more than [`PARALLEL_FANOUT`] sessions is split into chunks offered in parallel on
//!   every worker of the runtime; the channel's next item starts when all are done.
//!
//! Locks are std `Mutex`es over shards of the channel map: no `.await` happens while one
//! is held, and sharding keeps decisions on different channels from contending. Lock
//! order: shard, then outlet; never the other way.

//!
//! Files: this one holds the channel map, joins, leaves and the arrival of a
//! publication; `channel.rs` the per-channel state; `fanout.rs` the encode-once
//! fan-out to the mailboxes; `repair.rs` gap repair from history.

mod channel;
mod fanout;
mod repair;

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::FutureExt;
use herald_protocol::StreamPosition;
use tokio::time::Instant;

use crate::backend::error::BackendError;
use crate::backend::routing::Routing;
use crate::backend::streams::{Publication, Streams};
use crate::continuity::Arrival;
use crate::mailbox::{SessionHandle, SessionId};
use crate::metrics::Metrics;
use channel::{
    ChannelEntry, RepairBudget, Subscription, REPAIR_BUFFER_CHANNEL_BYTES, REPAIR_BUFFER_NODE_BYTES,
};

const SHARDS: usize = 64;

#[derive(Default)]
struct HubShard {
    channels: HashMap<Arc<str>, ChannelEntry>,
}

/// The hub. See the module doc.
pub struct Hub {
    shards: Box<[Mutex<HubShard>]>,
    routing: Arc<dyn Routing>,
    /// History, for gap repairs and continuity checks.
    streams: Arc<dyn Streams>,
    metrics: Arc<Metrics>,
    unsubscribe_delay: Duration,
    repair_limit: usize,
    /// Bounds of the buffers of running repairs.
    repair_budget: Arc<RepairBudget>,
    /// Channels whose last session left: (deadline, channel, generation), in deadline order.
    reap_queue: Mutex<VecDeque<(Instant, Arc<str>, u64)>>,
}

impl Hub {
    /// A hub that subscribes through `routing` and repairs from `streams`.
    /// `repair_limit` bounds one history read when repairing a gap. The node's event
    /// consumer (`crate::events`) feeds it.
    pub fn new(
        metrics: Arc<Metrics>,
        routing: Arc<dyn Routing>,
        streams: Arc<dyn Streams>,
        unsubscribe_delay: Duration,
        repair_limit: usize,
    ) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            routing,
            streams,
            metrics,
            unsubscribe_delay,
            repair_limit,
            repair_budget: Arc::new(RepairBudget {
                used: AtomicUsize::new(0),
                channel_limit: REPAIR_BUFFER_CHANNEL_BYTES,
                node_limit: REPAIR_BUFFER_NODE_BYTES,
            }),
            reap_queue: Mutex::default(),
        }
    }

    /// Whether any local session is in `channel`.
    fn has_sessions(&self, channel: &str) -> bool {
        self.shard(channel)
            .channels
            .get(channel)
            .is_some_and(|e| !e.sessions.is_empty())
    }

    /// Whether session `id` is in `channel` (or joining it).
    pub fn is_member(&self, channel: &str, id: SessionId) -> bool {
        self.shard(channel)
            .channels
            .get(channel)
            .is_some_and(|e| e.sessions.contains_key(&id))
    }

    fn shard(&self, channel: &str) -> MutexGuard<'_, HubShard> {
        let mut h = DefaultHasher::new();
        channel.hash(&mut h);
        self.shards[(h.finish() as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a session to a channel; resolves once the node's broker subscription is live,
    /// so that every publication after this returns reaches the session.
    pub async fn join(
        &self,
        channel: &str,
        id: SessionId,
        handle: SessionHandle,
    ) -> Result<(), BackendError> {
        let ack = {
            let mut shard = self.shard(channel);
            let entry = match shard.channels.get_mut(channel) {
                Some(entry) => entry,
                None => {
                    self.metrics.broker_channels.inc();
                    // One allocation of the name, shared by the key and the entry.
                    let name: Arc<str> = Arc::from(channel);
                    shard
                        .channels
                        .entry(Arc::clone(&name))
                        .or_insert(ChannelEntry::new(name))
                }
            };
            entry.sessions.insert(id, handle);
            entry.snapshot = None;
            entry.generation += 1;
            match &entry.subscription {
                Subscription::Live => return Ok(()),
                Subscription::Pending(ack) => ack.clone(),
                Subscription::None => {
                    let ack = self.routing.subscribe(channel).shared();
                    entry.subscription = Subscription::Pending(ack.clone());
                    ack
                }
            }
        };
        let result = ack.clone().await;
        let mut shard = self.shard(channel);
        let Some(entry) = shard.channels.get_mut(channel) else {
            return result;
        };
        // Only the request this join waited for: the entry may have been dropped and
        // made again meanwhile, with a request of its own.
        let ours = matches!(&entry.subscription, Subscription::Pending(a) if a.ptr_eq(&ack));
        match result {
            Ok(()) => {
                if ours {
                    entry.subscription = Subscription::Live;
                }
                Ok(())
            }
            Err(e) => {
                entry.sessions.remove(&id);
                entry.snapshot = None;
                // Forget the failed request so that the next join asks the broker again.
                if ours {
                    entry.subscription = Subscription::None;
                }
                if entry.sessions.is_empty() {
                    shard.channels.remove(channel);
                    self.metrics.broker_channels.dec();
                    self.routing.unsubscribe(channel);
                }
                Err(e)
            }
        }
    }

    /// Tells the hub where a session found the channel when it joined (from `position`
    /// or `history`). Until the first dispatch, the lowest such position is where the
    /// node's continuity check starts.
    pub fn seed(&self, channel: &str, position: &StreamPosition) {
        let mut shard = self.shard(channel);
        if let Some(entry) = shard.channels.get_mut(channel) {
            entry.continuity.seed(position);
        }
    }

    /// Removes a session from a channel. When it was the last one, the broker
    /// subscription is dropped after the unsubscribe delay.
    pub fn leave(&self, channel: &str, id: SessionId) {
        let mut shard = self.shard(channel);
        if let Some(entry) = shard.channels.get_mut(channel) {
            let removed = entry.sessions.remove(&id).is_some();
            if removed {
                entry.snapshot = None;
            }
            if removed && entry.sessions.is_empty() {
                let item = (
                    Instant::now() + self.unsubscribe_delay,
                    entry.name.clone(),
                    entry.generation,
                );
                drop(shard);
                self.reap_queue
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_back(item);
            }
        }
    }

    /// Drops broker subscriptions whose delay has passed and that no session rejoined.
    /// The node calls this periodically.
    pub fn reap(&self) {
        let now = Instant::now();
        loop {
            let item = {
                let mut queue = self.reap_queue.lock().unwrap_or_else(|e| e.into_inner());
                match queue.front() {
                    Some((deadline, _, _)) if *deadline <= now => queue.pop_front(),
                    _ => None,
                }
            };
            let Some((_, channel, generation)) = item else {
                break;
            };
            let mut shard = self.shard(&channel);
            let stale = shard
                .channels
                .get(&channel)
                .is_some_and(|e| e.sessions.is_empty() && e.generation == generation);
            if stale {
                shard.channels.remove(&channel);
                self.metrics.broker_channels.dec();
                // Under the shard lock, so a concurrent join's subscribe is queued after it.
                self.routing.unsubscribe(&channel);
            }
        }
    }

    /// Channels this node is subscribed to.
    pub fn channels(&self) -> Vec<Arc<str>> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(shard.channels.keys().cloned());
        }
        out
    }

    /// A publication on a channel this node subscribed to, in the broker's order.
    pub fn on_publication(self: &Arc<Self>, channel: &str, p: Publication) {
        self.metrics.broker_messages_received.inc();
        let outlet = {
            let mut shard = self.shard(channel);
            let Some(entry) = shard.channels.get_mut(channel) else {
                return;
            };
            let arrival =
                entry
                    .continuity
                    .on_publication(entry.repairing.is_some(), &p.epoch, p.offset);
            match arrival {
                Arrival::Duplicate => return,
                Arrival::Buffer => return self.buffer_during_repair(entry, p),
                Arrival::Gap { epoch, from } => {
                    self.start_repair(entry, epoch, from, None);
                    return self.buffer_during_repair(entry, p);
                }
                Arrival::Deliver => self.dispatch(entry, p),
            }
        };
        if let Some(outlet) = outlet {
            self.drain(outlet);
        }
    }

    /// Publications may have been missed (the broker reconnected or its reader
    /// lagged): checks every channel against history.
    pub fn on_resubscribed(self: &Arc<Self>) {
        for channel in self.channels() {
            tokio::spawn(Arc::clone(self).check_continuity(channel));
        }
    }
}

#[cfg(test)]
mod tests;
