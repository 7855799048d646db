//! Delivery receipts as the cluster stores them: each personal channel's acked
//! position, and the due set of the unacked detection (see the node's `receipts.rs`
//! for the protocol; Redis in `redis/receipts.rs`, memory in `memory/receipts.rs`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_protocol::channel::personal_channel_owner;

use super::error::BackendError;

/// The due computation of one scan, as a pure function (the memory broker runs it; the
/// Redis script `scan.lua` does the same in Lua): given a channel's retained messages
/// after max(acked, reported) as (offset, age) in offset order, which are overdue (age
/// at least `timeout`), at most `limit` of them, and when to look again: when the
/// first pending one becomes overdue, or at once (zero) when more are overdue than
/// `limit`; `None` when nothing is pending.
pub fn due_messages(
    ages: impl IntoIterator<Item = (u64, Duration)>,
    timeout: Duration,
    limit: usize,
) -> (Vec<u64>, Option<Duration>) {
    let mut overdue = Vec::new();
    for (offset, age) in ages {
        if age < timeout {
            return (overdue, Some(timeout - age));
        }
        if overdue.len() >= limit.max(1) {
            return (overdue, Some(Duration::ZERO));
        }
        overdue.push(offset);
    }
    (overdue, None)
}

/// One coalesced ack: everything up to `offset` of `channel` in `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The personal channel.
    pub channel: String,
    /// The epoch the offset belongs to; a broker ignores an ack of another epoch than
    /// the channel's current one (its messages are gone).
    pub epoch: String,
    /// Acknowledged up to here (cumulative); a broker keeps max(stored, offset), clamped
    /// to the channel's latest offset.
    pub offset: u64,
}

/// A channel's acknowledged position.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AckPosition {
    /// The epoch of `acked` (empty when nothing was ever acked).
    pub epoch: String,
    /// Acked up to here.
    pub acked: u64,
}

/// A message to a personal channel that no device acknowledged in time: the payload
/// of the `message.unacked` webhook event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unacked {
    /// The personal channel (`user:<id>`).
    pub channel: String,
    /// The message's offset.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: String,
    /// The message's data (JSON text, as published).
    pub data: Arc<str>,
    /// Who published it, when known.
    pub from: Option<Arc<str>>,
    /// When it was published (Unix ms; the broker's clock).
    pub published_at_ms: u64,
}

impl Unacked {
    /// The event's id, the same whenever (and by whichever node) the message is
    /// reported: `unacked:<channel>:<epoch>:<offset>`. A receiver deduplicates on it.
    pub fn event_id(&self) -> String {
        format!("unacked:{}:{}:{}", self.channel, self.epoch, self.offset)
    }

    /// The user the channel belongs to.
    pub fn user(&self) -> Option<&str> {
        personal_channel_owner(&self.channel)
    }
}

/// What [`ReceiptStore::scan`] found in one claimed channel.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scan {
    /// The channel's epoch ('' when the channel has no stored state any more).
    pub epoch: String,
    /// Overdue, unacked, unreported messages, oldest first.
    pub overdue: Vec<Unacked>,
    /// When the channel must be looked at again, from now: the next pending message
    /// becomes overdue (or more overdue ones than one scan returns). `None`: nothing
    /// pending.
    pub next_due_in: Option<Duration>,
}

/// What a broker stores for delivery receipts. Every method is one atomic step per
/// channel (or on the due set).
#[async_trait]
pub trait ReceiptStore: Send + Sync + 'static {
    /// Stores coalesced acks: per channel, max(stored, offset), clamped to the
    /// channel's latest offset; an ack whose epoch is not the channel's current one is
    /// ignored.
    async fn store_acks(&self, acks: &[Ack]) -> Result<(), BackendError>;

    /// The channel's acknowledged position. An ack of an older epoch reads as nothing
    /// acked in the current one.
    async fn acked(&self, channel: &str) -> Result<AckPosition, BackendError>;

    /// Records that `channel` must be checked in `delay` (unless it already is due
    /// earlier). Called before each publish to a personal channel. Returns how long
    /// until the channel's entry is due: until then the entry surely stays (only due
    /// entries are claimed), which lets the node skip the call for further publishes.
    async fn schedule(&self, channel: &str, delay: Duration) -> Result<Duration, BackendError>;

    /// Claims up to `limit` due channels for `visibility`: no other sweeper gets them
    /// until [`ReceiptStore::finish`] or the visibility runs out.
    async fn claim_due(
        &self,
        limit: usize,
        visibility: Duration,
    ) -> Result<Vec<String>, BackendError>;

    /// The channel's messages older than `timeout` after max(acked, reported), at most
    /// `limit`.
    async fn scan(
        &self,
        channel: &str,
        timeout: Duration,
        limit: usize,
    ) -> Result<Scan, BackendError>;

    /// Marks the channel reported up to `reported` (in `epoch`; 0: nothing new), then
    /// releases the claim and schedules the channel again in `next_due_in` if given.
    async fn finish(
        &self,
        channel: &str,
        epoch: &str,
        reported: u64,
        next_due_in: Option<Duration>,
    ) -> Result<(), BackendError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_messages_are_the_overdue_prefix() {
        let ms = Duration::from_millis;
        let t = ms(1000);
        assert_eq!(due_messages([], t, 10), (vec![], None));
        // Two overdue, the third due in 400 ms.
        let ages = [(3, ms(2500)), (4, ms(1000)), (5, ms(600)), (6, ms(10))];
        assert_eq!(due_messages(ages, t, 10), (vec![3, 4], Some(ms(400))));
        // All overdue: nothing pending after them.
        assert_eq!(
            due_messages([(1, ms(5000)), (2, ms(4000))], t, 10),
            (vec![1, 2], None)
        );
        // More overdue than the limit: look again at once.
        let many = (1..=5).map(|o| (o, ms(9000)));
        assert_eq!(due_messages(many, t, 2), (vec![1, 2], Some(Duration::ZERO)));
        // None overdue yet.
        assert_eq!(due_messages([(7, ms(1))], t, 2), (vec![], Some(ms(999))));
    }
}
