//! Delivery receipts in the memory broker: the same semantics as Redis' (see
//! `broker/redis/receipts.rs` and [`crate::receipts`]), in process. A claim still has a
//! visibility timeout, so a sweep that failed half-way is retried.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use super::MemoryBackend;
use crate::backend::error::BackendError;
use crate::backend::receipts::{due_messages, Ack, AckPosition, ReceiptStore, Scan, Unacked};

/// One personal channel's receipts.
struct Receipt {
    epoch: Arc<str>,
    acked: u64,
    reported: u64,
    /// Last write: dropped `meta_ttl` after it, like the Redis hash.
    touched: Instant,
}

/// Every receipt of the broker, behind one lock (never held with a stream shard's lock).
#[derive(Default)]
pub(super) struct ReceiptState {
    channels: HashMap<String, Receipt>,
    /// Channel → when it is due for the unacked check.
    due: HashMap<String, Instant>,
    /// Channel → when the sweeper's claim runs out.
    claimed: HashMap<String, Instant>,
}

impl ReceiptState {
    /// The receipt of `channel` in `epoch`, reset if it belongs to another epoch.
    fn entry(&mut self, channel: &str, epoch: &Arc<str>, now: Instant) -> &mut Receipt {
        let r = self
            .channels
            .entry(channel.to_owned())
            .or_insert_with(|| Receipt {
                epoch: epoch.clone(),
                acked: 0,
                reported: 0,
                touched: now,
            });
        if r.epoch != *epoch {
            *r = Receipt {
                epoch: epoch.clone(),
                acked: 0,
                reported: 0,
                touched: now,
            };
        }
        r.touched = now;
        r
    }

    /// (acked, reported) of `channel` in `epoch`.
    fn position(&self, channel: &str, epoch: &str) -> (u64, u64) {
        match self.channels.get(channel) {
            Some(r) if *r.epoch == *epoch => (r.acked, r.reported),
            _ => (0, 0),
        }
    }

    /// Schedules `channel` at `at` unless it is due earlier; returns when it is due.
    fn schedule_at(&mut self, channel: &str, at: Instant) -> Instant {
        let due = self.due.entry(channel.to_owned()).or_insert(at);
        *due = (*due).min(at);
        *due
    }
}

impl MemoryBackend {
    fn receipts(&self) -> std::sync::MutexGuard<'_, ReceiptState> {
        self.receipts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The channel's (epoch, latest offset), without creating or touching anything.
    fn stream_position(&self, channel: &str) -> Option<(Arc<str>, u64)> {
        let shard = self.shard(channel);
        shard
            .streams
            .get(channel)
            .map(|s| (s.epoch.clone(), s.offset))
    }

    /// Drops receipts not written for `meta_ttl` (their messages are long gone).
    pub(super) fn sweep_receipts(&self, now: Instant) {
        let ttl = self.settings.meta_ttl;
        self.receipts()
            .channels
            .retain(|_, r| now.duration_since(r.touched) <= ttl);
    }
}

fn unix_ms(at: Instant, now: Instant) -> u64 {
    let wall = SystemTime::now()
        .checked_sub(now.saturating_duration_since(at))
        .unwrap_or(UNIX_EPOCH);
    wall.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[async_trait]
impl ReceiptStore for MemoryBackend {
    async fn store_acks(&self, acks: &[Ack]) -> Result<(), BackendError> {
        let now = Instant::now();
        for ack in acks {
            let Some((epoch, latest)) = self.stream_position(&ack.channel) else {
                continue;
            };
            if *epoch != *ack.epoch {
                continue; // another epoch: its messages are gone
            }
            let mut state = self.receipts();
            let r = state.entry(&ack.channel, &epoch, now);
            r.acked = r.acked.max(ack.offset.min(latest));
        }
        Ok(())
    }

    async fn acked(&self, channel: &str) -> Result<AckPosition, BackendError> {
        let Some((epoch, _)) = self.stream_position(channel) else {
            return Ok(AckPosition::default());
        };
        let (acked, _) = self.receipts().position(channel, &epoch);
        Ok(AckPosition {
            epoch: epoch.to_string(),
            acked,
        })
    }

    async fn schedule(&self, channel: &str, delay: Duration) -> Result<Duration, BackendError> {
        let now = Instant::now();
        let due = self.receipts().schedule_at(channel, now + delay);
        Ok(due.saturating_duration_since(now))
    }

    async fn claim_due(
        &self,
        limit: usize,
        visibility: Duration,
    ) -> Result<Vec<String>, BackendError> {
        let now = Instant::now();
        let mut state = self.receipts();
        let lost: Vec<String> = state
            .claimed
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(c, _)| c.clone())
            .collect();
        for channel in lost {
            state.claimed.remove(&channel);
            state.schedule_at(&channel, now);
        }
        let mut due: Vec<(Instant, String)> = state
            .due
            .iter()
            .filter(|(c, at)| **at <= now && !state.claimed.contains_key(*c))
            .map(|(c, at)| (*at, c.clone()))
            .collect();
        due.sort();
        due.truncate(limit.max(1));
        let mut out = Vec::with_capacity(due.len());
        for (_, channel) in due {
            state.due.remove(&channel);
            state.claimed.insert(channel.clone(), now + visibility);
            out.push(channel);
        }
        Ok(out)
    }

    async fn scan(
        &self,
        channel: &str,
        timeout: Duration,
        limit: usize,
    ) -> Result<Scan, BackendError> {
        let now = Instant::now();
        // Copy what is needed under the shard lock, then read the receipts: the two
        // locks are never held together.
        let snapshot = {
            let shard = self.shard(channel);
            shard.streams.get(channel).map(|s| {
                let entries: Vec<_> = s
                    .history
                    .iter()
                    .filter(|(at, _)| {
                        now.saturating_duration_since(*at) <= self.settings.history_ttl
                    })
                    .map(|(at, p)| (*at, p.clone()))
                    .collect();
                (s.epoch.clone(), entries)
            })
        };
        let Some((epoch, entries)) = snapshot else {
            return Ok(Scan::default());
        };
        let (acked, reported) = self.receipts().position(channel, &epoch);
        let start = acked.max(reported);
        let fresh: Vec<_> = entries
            .into_iter()
            .filter(|(_, p)| p.offset > start)
            .collect();
        let ages = fresh
            .iter()
            .map(|(at, p)| (p.offset, now.saturating_duration_since(*at)));
        let (due, next_due_in) = due_messages(ages, timeout, limit);
        let overdue = fresh
            .into_iter()
            .take(due.len())
            .map(|(at, p)| Unacked {
                channel: channel.to_owned(),
                offset: p.offset,
                epoch: epoch.to_string(),
                data: p.data,
                from: p.from,
                published_at_ms: unix_ms(at, now),
            })
            .collect();
        let scan = Scan {
            epoch: epoch.to_string(),
            overdue,
            next_due_in,
        };
        Ok(scan)
    }

    async fn finish(
        &self,
        channel: &str,
        epoch: &str,
        reported: u64,
        next_due_in: Option<Duration>,
    ) -> Result<(), BackendError> {
        let now = Instant::now();
        let current = self.stream_position(channel);
        let mut state = self.receipts();
        if let Some((e, _)) = current.filter(|(e, _)| reported > 0 && **e == *epoch) {
            let r = state.entry(channel, &e, now);
            r.reported = r.reported.max(reported);
        }
        state.claimed.remove(channel);
        if let Some(delay) = next_due_in {
            state.schedule_at(channel, now + delay);
        }
        Ok(())
    }
}
