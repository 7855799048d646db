//! Delivery receipts: acks of personal channels, unread state and unacked detection
//! (the `message.unacked` hook for mobile push).
//!
//! What this module owns:
//! - the rules of an `ack` (pure: [`check_ack`]);
//! - [`Receipts`], the node's part: it coalesces the acks of every local session per
//!   channel (latest offset wins) and writes them to the broker every
//!   [`ACK_FLUSH_INTERVAL`], so that acks cost the broker at most one call per channel
//!   per interval however many frames clients send; it schedules a personal channel for
//!   the unacked check before each publish to it; and it runs the sweeper;
//! - over [`ReceiptStore`], what the backend stores for it (`backend/receipts.rs`;
//!   Redis in `backend/redis/receipts.rs`, memory in `backend/memory/receipts.rs`).
//!
//! Unacked detection, at least once and surviving node death: a publish to a personal
//! channel first records the channel in a *due set* with the time its message becomes
//! overdue ([`ReceiptStore::schedule`]; before the publish, so a crash in between leaves
//! only a harmless entry). Every node runs a sweeper that claims due channels atomically
//! with a visibility timeout ([`ReceiptStore::claim_due`]: a claim of a node that dies is
//! taken again by another node once it runs out), reads the messages older than the ack
//! timeout beyond max(acked, reported) ([`ReceiptStore::scan`]), hands them to the
//! node's consumer as an [`UnackedBatch`] and waits for its confirmation, and only then
//! marks them reported and releases the claim, rescheduling the channel when newer
//! messages are pending ([`ReceiptStore::finish`]). A crash anywhere in between repeats
//! a report with the same [`Unacked::event_id`], never loses one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_protocol::channel::personal_channel_owner;
use herald_protocol::codes::ErrorCode;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::backend::error::BackendError;
use crate::backend::receipts::{Ack, AckPosition, ReceiptStore, Unacked};
use crate::metrics::Metrics;

/// How often coalesced acks are written to the broker: an ack is stored at most this
/// long after the frame arrived.
pub const ACK_FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// How long a sweeper's claim on a channel lasts: if the claiming node dies before it
/// finishes, another node takes the channel again after this.
pub const CLAIM_VISIBILITY: Duration = Duration::from_secs(10);
/// Most channels one sweep claims.
pub const CLAIM_BATCH: usize = 64;
/// How long the sweeper waits for its consumer to confirm a batch before it gives up
/// on it (the claim then runs out and the batch is reported again).
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a node's sweeper looks for due channels: a quarter of the timeout, so a
/// report comes at most about 25% late, between 50 ms and 1 s.
pub fn sweep_interval(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Why an `ack` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// Not the session's own personal channel.
    #[error("only the own personal channel {0} can be acknowledged")]
    NotOwnChannel(String),
    /// The given epoch is not the one the session is in (history was lost meanwhile).
    #[error("epoch {given:?} is not the channel's current epoch {current:?}; ack ignored")]
    StaleEpoch {
        /// The ack's epoch.
        given: String,
        /// The session's epoch of the channel.
        current: String,
    },
    /// Beyond what the session has seen.
    #[error(
        "offset {offset} is beyond the last offset delivered on this connection ({delivered})"
    )]
    BeyondDelivered {
        /// The ack's offset.
        offset: u64,
        /// The session's last delivered (or subscribed-at) offset.
        delivered: u64,
    },
}

impl AckError {
    /// The reply's error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            AckError::NotOwnChannel(_) => ErrorCode::Forbidden,
            AckError::StaleEpoch { .. } | AckError::BeyondDelivered { .. } => ErrorCode::BadRequest,
        }
    }
}

/// The rules of an `ack`, as a pure function: only the session's own personal channel
/// (`personal`); if the ack names an epoch it must be the session's current one; the
/// offset may not exceed what this connection was told about (`delivered`: the last
/// offset delivered, or the position at subscribe). Refusing rather than clamping: an
/// ack beyond that is a client bug, and acking messages no device saw would suppress
/// their mobile push. Returns the epoch the ack applies to.
pub fn check_ack<'a>(
    channel: &str,
    offset: u64,
    epoch: Option<&str>,
    personal: &str,
    current: (&'a str, u64),
) -> Result<&'a str, AckError> {
    if channel != personal {
        return Err(AckError::NotOwnChannel(personal.to_owned()));
    }
    let (current_epoch, delivered) = current;
    if let Some(e) = epoch {
        if e != current_epoch {
            return Err(AckError::StaleEpoch {
                given: e.to_owned(),
                current: current_epoch.to_owned(),
            });
        }
    }
    if offset > delivered {
        return Err(AckError::BeyondDelivered { offset, delivered });
    }
    Ok(current_epoch)
}

/// Overdue messages of one channel, handed from the sweeper to the node's consumer
/// (the webhook log: `webhook::unacked::forward_unacked`). The sweeper marks
/// them reported only after [`UnackedBatch::confirm`]: drop the batch unconfirmed and
/// the messages are reported again later (same event ids).
#[derive(Debug)]
pub struct UnackedBatch {
    /// The messages, oldest first, all of one channel.
    pub messages: Vec<Unacked>,
    confirmed: oneshot::Sender<()>,
}

impl UnackedBatch {
    /// The consumer took the messages durably: the sweeper may mark them reported.
    pub fn confirm(self) {
        let _ = self.confirmed.send(());
    }
}

/// The node's delivery receipts. See the module doc.
pub struct Receipts {
    store: Arc<dyn ReceiptStore>,
    metrics: Arc<Metrics>,
    /// `HERALD_ACK_TIMEOUT_MS`; `None`: unacked detection is off.
    timeout: Option<Duration>,
    /// Most messages one scan reads (the history size).
    scan_limit: usize,
    /// How long a claim lasts ([`CLAIM_VISIBILITY`] unless a test shortens it).
    visibility: Duration,
    /// Acks not yet written: channel → (epoch, offset). One entry per personal channel
    /// with an ack since the last flush, so bounded by the users of local sessions. A
    /// std `Mutex`: never held across an `.await`.
    pending: Mutex<HashMap<String, (Arc<str>, u64)>>,
    /// Personal channels whose due entry surely exists until the instant given (see
    /// [`schedule_valid_until`]): a publish to one of them needs no schedule call.
    /// Bounded by `schedule_cache_limit` ([`MAX_SCHEDULE_CACHE`] unless a test lowers it).
    scheduled: Mutex<HashMap<String, Instant>>,
    schedule_cache_limit: usize,
}

/// Most channels [`Receipts`] remembers as scheduled; beyond it (after dropping the
/// expired ones) publishes simply call the broker.
pub const MAX_SCHEDULE_CACHE: usize = 100_000;

/// Until when a node may skip scheduling `channel` again, given that a schedule call
/// started at `started` answered that the entry is due in `remaining`: the entry stays
/// until then (only due entries are claimed). A margin of a quarter of the timeout is
/// kept for a publish still on its way after the check: a message must reach history
/// before the sweeper's scan of the entry, or the scan would not reschedule it. `None`:
/// not worth remembering.
pub fn schedule_valid_until(
    started: Instant,
    remaining: Duration,
    timeout: Duration,
) -> Option<Instant> {
    let margin = timeout / 4;
    (remaining > margin).then(|| started + (remaining - margin))
}

impl Receipts {
    /// The node's receipts over `broker`; `timeout` 0 turns unacked detection off.
    pub fn new(
        store: Arc<dyn ReceiptStore>,
        metrics: Arc<Metrics>,
        timeout_ms: u64,
        scan_limit: usize,
    ) -> Self {
        Self {
            store,
            metrics,
            timeout: (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms)),
            scan_limit: scan_limit.max(1),
            visibility: CLAIM_VISIBILITY,
            pending: Mutex::default(),
            scheduled: Mutex::default(),
            schedule_cache_limit: MAX_SCHEDULE_CACHE,
        }
    }

    /// The same remembering at most `limit` scheduled channels (tests of the bound).
    pub fn with_schedule_cache_limit(mut self, limit: usize) -> Self {
        self.schedule_cache_limit = limit;
        self
    }

    /// The same with another claim visibility (tests of a sweeper that dies).
    pub fn with_claim_visibility(mut self, visibility: Duration) -> Self {
        self.visibility = visibility;
        self
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<str>, u64)>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The channel's acknowledged position, as stored.
    pub async fn acked(&self, channel: &str) -> Result<AckPosition, BackendError> {
        self.store.acked(channel).await.inspect_err(|_| {
            self.metrics.broker_errors.inc();
        })
    }

    /// Queues an ack (already checked with [`check_ack`]); written within
    /// [`ACK_FLUSH_INTERVAL`]. Acks of a channel coalesce: the highest offset of the
    /// latest epoch wins.
    pub fn ack(&self, channel: &str, epoch: &Arc<str>, offset: u64) {
        self.metrics.acks_received.inc();
        if offset == 0 {
            return;
        }
        let mut pending = self.pending();
        match pending.get_mut(channel) {
            Some((e, o)) if **e == **epoch => *o = (*o).max(offset),
            Some(entry) => *entry = (epoch.clone(), offset),
            None => {
                pending.insert(channel.to_owned(), (epoch.clone(), offset));
            }
        }
    }

    /// Writes the queued acks. On a broker failure they are put back (merged with any
    /// newer ones) for the next flush.
    pub async fn flush(&self) {
        let batch: Vec<Ack> = {
            let mut pending = self.pending();
            if pending.is_empty() {
                return;
            }
            pending
                .drain()
                .map(|(channel, (epoch, offset))| Ack {
                    channel,
                    epoch: epoch.to_string(),
                    offset,
                })
                .collect()
        };
        match self.store.store_acks(&batch).await {
            Ok(()) => {
                self.metrics.acks_flushed.inc_by(batch.len() as u64);
            }
            Err(e) => {
                self.metrics.broker_errors.inc();
                tracing::warn!(error = %e, acks = batch.len(), "could not store acks; retrying");
                let mut pending = self.pending();
                for ack in batch {
                    let epoch: Arc<str> = ack.epoch.into();
                    pending.entry(ack.channel).or_insert((epoch, ack.offset));
                }
            }
        }
    }

    /// Called before each publish to `channel`: a personal channel is scheduled for
    /// the unacked check (when detection is on). Before, not after: a node that dies
    /// between the two leaves a harmless entry, never an unchecked message.
    ///
    /// One call per channel per about ¾ of the timeout, not one per publish: the answer
    /// says how long the channel's entry stays due ([`schedule_valid_until`]), and until
    /// then further publishes to it skip the call.
    pub async fn before_publish(&self, channel: &str) -> Result<(), BackendError> {
        let Some(timeout) = self.timeout else {
            return Ok(());
        };
        if personal_channel_owner(channel).is_none() {
            return Ok(());
        }
        let started = Instant::now();
        if self
            .scheduled()
            .get(channel)
            .is_some_and(|until| started < *until)
        {
            return Ok(());
        }
        let remaining = self.store.schedule(channel, timeout).await?;
        if let Some(until) = schedule_valid_until(started, remaining, timeout) {
            let mut scheduled = self.scheduled();
            if scheduled.len() >= self.schedule_cache_limit {
                let now = Instant::now();
                scheduled.retain(|_, until| *until > now);
            }
            if scheduled.len() < self.schedule_cache_limit {
                scheduled.insert(channel.to_owned(), until);
            }
        }
        Ok(())
    }

    fn scheduled(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.scheduled.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes acks every [`ACK_FLUSH_INTERVAL`] until `stop`, then once more.
    pub async fn run_flusher(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(ACK_FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => self.flush().await,
            }
        }
        self.flush().await;
    }

    /// The sweeper: claims due channels and hands their overdue messages to `out`
    /// until `stop`. Does nothing when detection is off.
    pub async fn run_sweeper(
        self: Arc<Self>,
        out: mpsc::Sender<UnackedBatch>,
        stop: CancellationToken,
    ) {
        let Some(timeout) = self.timeout else { return };
        let mut tick = tokio::time::interval(sweep_interval(timeout));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Keep going while claims come back full: a backlog is worked off at once.
            loop {
                let claimed = match self.store.claim_due(CLAIM_BATCH, self.visibility).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "unacked sweep: claim failed");
                        break;
                    }
                };
                let full = claimed.len() >= CLAIM_BATCH;
                for channel in claimed {
                    if stop.is_cancelled() {
                        // The claims run out and another node takes them.
                        return;
                    }
                    if let Err(e) = self.sweep_channel(&channel, timeout, &out).await {
                        tracing::warn!(error = %e, channel, "unacked sweep of a channel failed; retried after the claim runs out");
                    }
                }
                if !full {
                    break;
                }
            }
        }
    }

    async fn sweep_channel(
        &self,
        channel: &str,
        timeout: Duration,
        out: &mpsc::Sender<UnackedBatch>,
    ) -> Result<(), BackendError> {
        let scan = self.store.scan(channel, timeout, self.scan_limit).await?;
        let reported = scan.overdue.last().map_or(0, |m| m.offset);
        if !scan.overdue.is_empty() {
            let (confirmed, done) = oneshot::channel();
            let count = scan.overdue.len() as u64;
            let batch = UnackedBatch {
                messages: scan.overdue,
                confirmed,
            };
            if out.send(batch).await.is_err() {
                return Err(BackendError::Unavailable("unacked consumer stopped".into()));
            }
            match tokio::time::timeout(CONFIRM_TIMEOUT, done).await {
                Ok(Ok(())) => {
                    self.metrics.unacked_messages.inc_by(count);
                }
                _ => {
                    return Err(BackendError::Unavailable(
                        "unacked consumer did not confirm".into(),
                    ))
                }
            }
        }
        self.store
            .finish(channel, &scan.epoch, reported, scan.next_due_in)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schedule cache never holds more than its limit; beyond it publishes still
    /// schedule (a call each), and a remembered channel needs no call.
    #[tokio::test]
    async fn the_schedule_cache_is_bounded() {
        let broker = Arc::new(crate::backend::memory::MemoryBackend::new(
            crate::backend::settings::BackendSettings::from_config(
                &crate::config::Config::default(),
            ),
        ));
        let receipts = Receipts::new(broker, Arc::new(Metrics::new()), 30_000, 10)
            .with_schedule_cache_limit(3);
        for i in 0..10 {
            receipts
                .before_publish(&format!("user:u{i}"))
                .await
                .unwrap();
            assert!(receipts.scheduled().len() <= 3);
        }
        assert_eq!(receipts.scheduled().len(), 3);
        // Other channels are never remembered.
        receipts.before_publish("room:1").await.unwrap();
        assert!(!receipts.scheduled().contains_key("room:1"));
    }

    #[test]
    fn a_schedule_is_remembered_until_a_margin_before_it_is_due() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(30);
        // A fresh entry, due in 30 s: skip calls for 22.5 s.
        assert_eq!(
            schedule_valid_until(t0, timeout, timeout),
            Some(t0 + Duration::from_millis(22_500))
        );
        // An older entry due in 10 s: 2.5 s.
        assert_eq!(
            schedule_valid_until(t0, Duration::from_secs(10), timeout),
            Some(t0 + Duration::from_millis(2_500))
        );
        // Due within the margin (or overdue): call every time.
        assert_eq!(
            schedule_valid_until(t0, Duration::from_secs(7), timeout),
            None
        );
        assert_eq!(schedule_valid_until(t0, Duration::ZERO, timeout), None);
    }

    #[test]
    fn acks_only_the_own_channel_up_to_what_was_delivered() {
        let me = "user:alice";
        assert_eq!(check_ack(me, 5, None, me, ("e1", 7)), Ok("e1"));
        assert_eq!(check_ack(me, 7, Some("e1"), me, ("e1", 7)), Ok("e1"));
        assert_eq!(check_ack(me, 0, None, me, ("", 0)), Ok(""));
        let e = check_ack("user:bob", 1, None, me, ("e1", 7)).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Forbidden);
        assert_eq!(
            check_ack(me, 8, None, me, ("e1", 7)),
            Err(AckError::BeyondDelivered {
                offset: 8,
                delivered: 7
            })
        );
        let e = check_ack(me, 1, Some("e0"), me, ("e1", 7)).unwrap_err();
        assert!(matches!(e, AckError::StaleEpoch { .. }));
        assert_eq!(e.code(), ErrorCode::BadRequest);
    }

    #[test]
    fn sweep_interval_is_a_quarter_of_the_timeout_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(sweep_interval(ms(100)), ms(50));
        assert_eq!(sweep_interval(ms(400)), ms(100));
        assert_eq!(sweep_interval(ms(30_000)), Duration::from_secs(1));
    }

    #[test]
    fn event_ids_are_deterministic() {
        let m = Unacked {
            channel: "user:bob".into(),
            offset: 3,
            epoch: "e1".into(),
            data: "{}".into(),
            from: None,
            published_at_ms: 1,
        };
        assert_eq!(m.event_id(), "unacked:user:bob:e1:3");
        assert_eq!(m.user(), Some("bob"));
    }
}
