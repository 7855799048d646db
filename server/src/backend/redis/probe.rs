//! The liveness probe: catches a subscriber connection that is open but no longer
//! delivering (a half-open TCP connection, a stopped Redis, a proxy that lost state).
//!
//! Every [`PROBE_INTERVAL`] the node publishes a sequence number to its own probe
//! channels, which it subscribes to like any other channel: one channel on a single
//! Redis, one per master in a cluster (each subscriber connection to a shard is probed
//! through a channel whose hash slot that shard owns). A probe that has not come back
//! after [`PROBE_TIMEOUT`] marks the broker unhealthy and forces the subscriber to
//! reconnect, which resubscribes everything and makes the hub check continuity.
//! A probe that cannot even be published (Redis stopped or overloaded) also marks the
//! broker unhealthy, without touching the subscriber; the next probe that comes back
//! makes it healthy again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::interfaces::{ClientLike, ClusterInterface, PubsubInterface};
use fred::types::Value;
use tokio::time::MissedTickBehavior;

use super::keys::Topology;
use super::subscriptions::Request;
use super::Inner;

/// How often probes are published.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a probe may take to come back.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Probes in flight.
#[derive(Debug, Default)]
pub(crate) struct ProbeState {
    /// Probe channels the subscription manager has confirmed as subscribed.
    pub active: HashSet<String>,
    /// Per probe channel, the oldest probe published and not yet seen: (seq, sent at).
    pending: HashMap<String, (u64, Instant)>,
}

impl ProbeState {
    /// Forgets probes in flight: after a resubscribe, probes sent before it may have
    /// been lost with the old connection, which says nothing about the new one.
    pub(crate) fn reset(&mut self) {
        self.pending.clear();
    }
}

/// Records the arrival of probe `seq` on `channel`.
pub(crate) fn arrived(inner: &Inner, channel: &str, seq: u64) {
    let mut state = inner.probes.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((pending, _)) = state.pending.get(channel) {
        if *pending <= seq {
            state.pending.remove(channel);
        }
    }
    drop(state);
    inner.probe_ok.store(true, Ordering::SeqCst);
}

/// The probe channels this node should subscribe to now.
fn probe_channels(inner: &Inner) -> Vec<String> {
    match inner.topology {
        Topology::Single | Topology::Sentinel => vec![inner.keys.probe("0")],
        Topology::Cluster => {
            let Some(state) = inner.sub.cached_cluster_state() else {
                return Vec::new();
            };
            let mut channels = Vec::new();
            for primary in state.unique_primary_nodes() {
                // The first tag whose slot this master owns; a few tries at most.
                let found = (0..100_000u32)
                    .map(|k| inner.keys.probe(&k.to_string()))
                    .find(|name| {
                        let slot = fred::util::redis_keyslot(name.as_bytes());
                        state.get_server(slot) == Some(&primary)
                    });
                channels.extend(found);
            }
            channels.sort();
            channels
        }
    }
}

/// The probe task. See the module doc.
pub(crate) async fn run(inner: Arc<Inner>) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut wanted: Vec<String> = Vec::new();
    let mut seq: u64 = 0;
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = ticks.tick() => {}
            _ = inner.probe_now.notified() => {}
        }
        if !inner.sub.is_connected() {
            // Reconnecting already; the resubscribe that follows resets the probes.
            inner
                .probes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .reset();
            continue;
        }
        let channels = probe_channels(&inner);
        if channels != wanted && !channels.is_empty() {
            wanted = channels;
            let _ = inner.requests.send(Request::SetProbes(wanted.clone()));
        }

        let now = Instant::now();
        let (late, active) = {
            let mut state = inner.probes.lock().unwrap_or_else(|e| e.into_inner());
            let late: Vec<String> = state
                .pending
                .iter()
                .filter(|(_, (_, at))| now.duration_since(*at) > PROBE_TIMEOUT)
                .map(|(channel, _)| channel.clone())
                .collect();
            if !late.is_empty() {
                state.reset();
            }
            (late, state.active.iter().cloned().collect::<Vec<_>>())
        };
        if !late.is_empty() {
            tracing::warn!(
                channels = ?late,
                "redis subscriber did not deliver a liveness probe in time; reconnecting"
            );
            inner.probe_ok.store(false, Ordering::SeqCst);
            inner.synced.store(false, Ordering::SeqCst);
            // Bounded: a command to a stuck router must not stop the probe.
            let forced = tokio::time::timeout(PROBE_TIMEOUT, inner.sub.force_reconnection()).await;
            if !matches!(forced, Ok(Ok(()))) {
                tracing::warn!("forced reconnect of the redis subscriber did not complete");
            }
            // Rebuild the subscriptions even if no reconnect event comes; a second
            // resubscribe after the event's is harmless.
            let _ = inner.requests.send(Request::Resubscribe);
            continue;
        }

        if !inner.client.is_connected() {
            continue;
        }
        for channel in active {
            seq += 1;
            // Recorded before publishing: the probe may come back on the subscriber
            // connection before the publish is acknowledged on the command connection.
            inner
                .probes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pending
                .entry(channel.clone())
                .or_insert((seq, Instant::now()));
            let sent = match inner.topology {
                Topology::Single | Topology::Sentinel => {
                    inner
                        .client
                        .publish::<Value, _, _>(channel.as_str(), seq.to_string())
                        .await
                }
                Topology::Cluster => {
                    inner
                        .client
                        .spublish::<Value, _, _>(channel.as_str(), seq.to_string())
                        .await
                }
            };
            if let Err(e) = sent {
                // Redis does not answer publishes (down, stopped, overloaded): not
                // healthy, whatever the connection state says. A probe that was never
                // sent says nothing about the subscriber, so no forced reconnect.
                tracing::debug!(error = %e, "could not publish a liveness probe");
                inner.probe_ok.store(false, Ordering::SeqCst);
                let mut state = inner.probes.lock().unwrap_or_else(|e| e.into_inner());
                if state.pending.get(&channel).map(|(s, _)| *s) == Some(seq) {
                    state.pending.remove(&channel);
                }
            }
        }
    }
}
