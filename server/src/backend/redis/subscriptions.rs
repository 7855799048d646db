//! The subscription manager: the one task that (un)subscribes the subscriber client.
//!
//! Requests arrive over an unbounded queue in the order the hub made them. The manager
//! takes everything queued at once, keeps only the last request per channel, and
//! applies the difference to Redis with as few commands as it can: one SUBSCRIBE for
//! many channels on a single Redis; on a cluster one SSUBSCRIBE per channel, all sent
//! together (fred routes each to the shard owning the channel's slot, and a sharded
//! subscription reply must not be pipelined with several channels, see below).
//!
//! It keeps two sets: `desired`, the channels the hub asked for, and `active`, the
//! pub/sub names Redis confirmed on the current connection(s). After a reconnect (or
//! any failure) it subscribes every desired channel again and only then tells the
//! hub to check continuity, so that a message is either delivered live or found in
//! history. Subscribing a channel twice on one connection is a no-op in Redis, so a
//! repeated resubscribe never doubles delivery.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fred::interfaces::{ClientLike, PubsubInterface};
use fred::types::Value;
use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::keys::Topology;
use super::{BackendError, Inner};

/// Delay before trying again after a failed (re)subscribe.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Channels per SUBSCRIBE command on a single Redis.
const SUBSCRIBE_CHUNK: usize = 512;
/// Requests taken from the queue in one batch at most.
const MAX_BATCH: usize = 16_384;

/// A request to the manager.
pub(crate) enum Request {
    /// Subscribe to a channel; `ack` gets the outcome.
    Subscribe {
        /// The herald channel.
        channel: String,
        /// Resolved once Redis confirmed the subscription (or it failed).
        ack: oneshot::Sender<Result<(), BackendError>>,
    },
    /// Unsubscribe from a channel.
    Unsubscribe {
        /// The herald channel.
        channel: String,
    },
    /// The subscriber (re)connected: subscribe everything again.
    Resubscribe,
    /// The probe channels to keep subscribed (pub/sub names).
    SetProbes(Vec<String>),
}

struct Manager {
    inner: Arc<Inner>,
    /// Herald channels the hub wants.
    desired: HashSet<String>,
    /// Probe channels (pub/sub names) the probe wants.
    probes: HashSet<String>,
    /// Pub/sub names subscribed on the current connection(s).
    active: HashSet<String>,
    /// When to try a full resubscribe again after a failure.
    retry_at: Option<Instant>,
}

/// Runs the manager until the broker stops.
pub(crate) async fn run(inner: Arc<Inner>, mut requests: mpsc::UnboundedReceiver<Request>) {
    let mut manager = Manager {
        inner,
        desired: HashSet::new(),
        probes: HashSet::new(),
        active: HashSet::new(),
        retry_at: None,
    };
    loop {
        let retry_at = manager.retry_at;
        let first = tokio::select! {
            _ = manager.inner.cancel.cancelled() => return,
            request = requests.recv() => match request {
                Some(request) => request,
                None => return,
            },
            _ = sleep_until(retry_at), if retry_at.is_some() => Request::Resubscribe,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        manager.apply(batch).await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

impl Manager {
    async fn apply(&mut self, batch: Vec<Request>) {
        let mut resubscribe = false;
        // Last request per channel wins; requests for one channel keep their order.
        let mut wanted: HashMap<String, bool> = HashMap::new();
        let mut acks = Vec::new();
        let mut probes = None;
        for request in batch {
            match request {
                Request::Subscribe { channel, ack } => {
                    wanted.insert(channel.clone(), true);
                    acks.push((channel, ack));
                }
                Request::Unsubscribe { channel } => {
                    wanted.insert(channel, false);
                }
                Request::Resubscribe => resubscribe = true,
                Request::SetProbes(channels) => probes = Some(channels),
            }
        }
        for (channel, want) in &wanted {
            if *want {
                self.desired.insert(channel.clone());
            } else {
                self.desired.remove(channel);
            }
        }
        let old_probes =
            probes.map(|p| std::mem::replace(&mut self.probes, p.into_iter().collect()));

        let keys = &self.inner.keys;
        let (to_unsubscribe, to_subscribe): (Vec<String>, Vec<String>) = if resubscribe {
            let all_wanted: HashSet<String> = self
                .desired
                .iter()
                .map(|c| keys.pubsub(c))
                .chain(self.probes.iter().cloned())
                .collect();
            tracing::debug!(channels = all_wanted.len(), "resubscribing every channel");
            let stale = self.active.difference(&all_wanted).cloned().collect();
            // The connection(s) may be new: confirm everything again.
            self.active.clear();
            (stale, all_wanted.into_iter().collect())
        } else {
            // Only what this batch touched: comparing the whole sets on every batch
            // made a connect storm quadratic (each batch cost O(all channels)).
            let mut stale = Vec::new();
            let mut missing = Vec::new();
            for (channel, want) in &wanted {
                let name = keys.pubsub(channel);
                match (*want, self.active.contains(&name)) {
                    (true, false) => missing.push(name),
                    (false, true) => stale.push(name),
                    _ => {}
                }
            }
            if let Some(old) = &old_probes {
                stale.extend(
                    old.difference(&self.probes)
                        .filter(|p| self.active.contains(*p))
                        .cloned(),
                );
                missing.extend(
                    self.probes
                        .iter()
                        .filter(|p| !self.active.contains(*p))
                        .cloned(),
                );
            }
            (stale, missing)
        };

        if !to_unsubscribe.is_empty() {
            self.unsubscribe(&to_unsubscribe).await;
            for name in &to_unsubscribe {
                self.active.remove(name);
            }
        }
        let subscribed = if to_subscribe.is_empty() {
            Vec::new()
        } else {
            self.subscribe(to_subscribe.clone()).await
        };
        let missing = to_subscribe.len() - subscribed.len();
        let complete = missing == 0;
        self.active.extend(subscribed);

        let probes_changed = {
            let mut state = self.inner.probes.lock().unwrap_or_else(|e| e.into_inner());
            let active: HashSet<String> = self.probes.intersection(&self.active).cloned().collect();
            if resubscribe {
                state.reset();
            }
            let changed = resubscribe || active != state.active;
            state.active = active;
            changed
        };
        if probes_changed {
            // Probe at once rather than at the next tick: health comes back sooner.
            self.inner.probe_now.notify_one();
        }

        for (channel, ack) in acks {
            let outcome = if !self.desired.contains(&channel)
                || self.active.contains(&keys.pubsub(&channel))
            {
                Ok(())
            } else {
                Err(BackendError::Unavailable(
                    "could not subscribe in Redis; will retry on reconnect".into(),
                ))
            };
            let _ = ack.send(outcome);
        }

        if complete && (resubscribe || self.retry_at.is_some()) {
            self.retry_at = None;
            self.inner.synced.store(true, Ordering::SeqCst);
            tracing::info!(
                channels = self.desired.len(),
                "redis subscriptions in place"
            );
            // Only now: every message published from here on is delivered live, so
            // the hub's history check covers whatever was missed before.
            self.inner.on_resubscribed().await;
        } else if !complete {
            // Keep every channel wanted and rebuild all subscriptions a bit later;
            // the hub then checks continuity, as after a reconnect.
            self.inner.synced.store(false, Ordering::SeqCst);
            if self.retry_at.is_none() {
                tracing::warn!(missing, "redis subscriptions failed; retrying every second");
            } else {
                tracing::debug!(missing, "redis subscriptions failed again");
            }
            self.retry_at = Some(Instant::now() + RETRY_AFTER);
        }
    }

    /// Subscribes `names`; returns those Redis confirmed.
    async fn subscribe(&self, names: Vec<String>) -> Vec<String> {
        let sub = &self.inner.sub;
        if !sub.is_connected() {
            return Vec::new();
        }
        match self.inner.topology {
            Topology::Single | Topology::Sentinel => {
                for chunk in names.chunks(SUBSCRIBE_CHUNK) {
                    if let Err(e) = sub.subscribe(chunk.to_vec()).await {
                        tracing::warn!(error = %e, "redis SUBSCRIBE failed");
                        return Vec::new();
                    }
                }
                // fred completes SUBSCRIBE once written; Redis answers commands on a
                // connection in order, so the answer to a PING sent after it means the
                // subscriptions are in place.
                match sub.ping::<Value>(None).await {
                    Ok(_) => names,
                    Err(e) => {
                        tracing::warn!(error = %e, "redis subscriber did not answer PING");
                        Vec::new()
                    }
                }
            }
            Topology::Cluster => {
                // One channel per SSUBSCRIBE: fred expects one reply frame per
                // SSUBSCRIBE, and Redis sends one per channel. Sent together, fred
                // pipelines them to each shard.
                let calls = names.into_iter().map(|name| async move {
                    match sub.ssubscribe(name.as_str()).await {
                        Ok(()) => Some(name),
                        Err(e) => {
                            tracing::warn!(error = %e, channel = name, "redis SSUBSCRIBE failed");
                            None
                        }
                    }
                });
                join_all(calls).await.into_iter().flatten().collect()
            }
        }
    }

    /// Unsubscribes `names`. A failure needs no retry: it happens when the connection
    /// is gone, and with it the subscriptions.
    async fn unsubscribe(&self, names: &[String]) {
        let sub = &self.inner.sub;
        if !sub.is_connected() {
            return;
        }
        match self.inner.topology {
            Topology::Single | Topology::Sentinel => {
                for chunk in names.chunks(SUBSCRIBE_CHUNK) {
                    if let Err(e) = sub.unsubscribe(chunk.to_vec()).await {
                        tracing::debug!(error = %e, "redis UNSUBSCRIBE failed");
                    }
                }
            }
            Topology::Cluster => {
                // fred expects no reply to SUNSUBSCRIBE, so an error reply (several
                // slots in one command) would be taken as the answer to the next
                // command: one channel per command.
                let calls = names.iter().map(|name| async move {
                    if let Err(e) = sub.sunsubscribe(name.as_str()).await {
                        tracing::debug!(error = %e, channel = name, "redis SUNSUBSCRIBE failed");
                    }
                });
                join_all(calls).await;
            }
        }
    }
}
