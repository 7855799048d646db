//! Which channels the client follows and the last position it handed to the
//! application in each: the source of the `resume` map, and the filter that guarantees
//! the application never sees a duplicate or an out-of-order message.
//!
//! The server already promises order without duplicates on one connection; across
//! reconnects the client resumes from the last offset it delivered, so the server starts
//! right after it. The filter here is the client's own guarantee on top: whatever
//! arrives (a second copy during a failover, a late frame), a message at or below the
//! last delivered offset of its epoch is dropped.

use std::collections::BTreeMap;

use herald_protocol::frame::{self, SubscribeResult};
use herald_protocol::StreamPosition;

use crate::event::{Resync, ResyncCause, Subscription};

/// What to do with an incoming message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Hand it to the application.
    Deliver,
    /// Offsets were skipped or the epoch changed without notice: report this resync,
    /// then hand the message over.
    DeliverAfterGap(Resync),
    /// A duplicate, an old message, or a channel the client no longer follows.
    Drop,
}

/// The followed channels and their positions.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    /// Channel → last delivered position (`None` until the server first confirmed it).
    channels: BTreeMap<String, Option<StreamPosition>>,
    /// The personal channel `user:<sub>`, once a `welcome` named the user.
    personal: Option<String>,
}

impl Tracker {
    /// Whether the client follows this channel.
    pub(crate) fn contains(&self, channel: &str) -> bool {
        self.channels.contains_key(channel)
    }

    /// Follows a channel, continuing after `since` when given. Returns false if it was
    /// already followed.
    pub(crate) fn add(&mut self, channel: &str, since: Option<StreamPosition>) -> bool {
        if self.contains(channel) {
            return false;
        }
        self.channels.insert(channel.to_owned(), since);
        true
    }

    /// Stops following a channel; its later messages are dropped.
    pub(crate) fn remove(&mut self, channel: &str) -> bool {
        self.channels.remove(channel).is_some()
    }

    /// Whether this is the session's own personal channel (which cannot be left).
    pub(crate) fn is_personal(&self, channel: &str) -> bool {
        self.personal.as_deref() == Some(channel)
    }

    /// The personal channel, once a `welcome` named it.
    pub(crate) fn personal(&self) -> Option<&str> {
        self.personal.as_deref()
    }

    /// Records the personal channel named by `welcome` (it is always followed). A
    /// token for another user replaces the old personal channel.
    pub(crate) fn set_personal(&mut self, channel: &str) {
        if let Some(old) = self.personal.take() {
            if old != channel {
                self.channels.remove(&old);
            }
        }
        self.channels.entry(channel.to_owned()).or_default();
        self.personal = Some(channel.to_owned());
    }

    /// The followed channels.
    pub(crate) fn channels(&self) -> impl Iterator<Item = &String> {
        self.channels.keys()
    }

    /// The `resume` map of a `hello`: every followed channel with its last position.
    /// A channel never confirmed gets the empty position `(0, "")`. The server replays
    /// that channel's retained history from offset 1 (offset 0 continues with any
    /// epoch), and [`Tracker::subscribed`] drops those messages: the channel was not
    /// resumed, so the client starts at the current position, as for a plain subscribe.
    pub(crate) fn resume(&self) -> BTreeMap<String, StreamPosition> {
        self.channels
            .iter()
            .map(|(c, p)| (c.clone(), p.clone().unwrap_or_default()))
            .collect()
    }

    /// The last position of every channel that has one.
    pub(crate) fn positions(&self) -> BTreeMap<String, StreamPosition> {
        self.channels
            .iter()
            .filter_map(|(c, p)| p.clone().map(|p| (c.clone(), p)))
            .collect()
    }

    /// The last position asked for on a channel (what a `subscribe` sends as `since`).
    pub(crate) fn position(&self, channel: &str) -> Option<StreamPosition> {
        self.channels.get(channel).cloned().flatten()
    }

    /// Applies a subscribe result (a `subscribe` reply or a `welcome` entry). Returns the
    /// subscription and, when a resume was not recovered, the resync to report; `None`
    /// when the channel is no longer followed.
    pub(crate) fn subscribed(
        &mut self,
        channel: &str,
        result: &SubscribeResult,
    ) -> Option<(Subscription, Option<Resync>)> {
        let slot = self.channels.get_mut(channel)?;
        let current = StreamPosition::new(result.offset, result.epoch.clone());
        let resumed = slot.is_some();
        let recovered = resumed && result.recovered;
        let mut resync = None;
        if !recovered {
            // Nothing is replayed: continue from the server's current position.
            *slot = Some(current.clone());
            if resumed {
                resync = Some(Resync {
                    channel: channel.to_owned(),
                    position: current.clone(),
                    cause: ResyncCause::NotRecovered,
                });
            }
        }
        // With `recovered` the missed messages follow and move the position themselves;
        // setting it to the current offset now would drop them as duplicates.
        let subscription = Subscription {
            channel: channel.to_owned(),
            position: current,
            resumed,
            recovered,
            by_server: false,
        };
        Some((subscription, resync))
    }

    /// Applies a server `subscribed` frame: follows the channel from `offset` (messages
    /// after it follow), unless it is followed already with a position, which then stays
    /// (the duplicate filter and the gap check go on from it). Returns the subscription
    /// to report.
    pub(crate) fn subscribed_by_server(
        &mut self,
        channel: &str,
        offset: u64,
        epoch: &str,
    ) -> Subscription {
        let current = StreamPosition::new(offset, epoch);
        let slot = self.channels.entry(channel.to_owned()).or_default();
        if slot.is_none() {
            *slot = Some(current.clone());
        }
        Subscription {
            channel: channel.to_owned(),
            position: current,
            resumed: false,
            recovered: false,
            by_server: true,
        }
    }

    /// Decides about a message and, when it is delivered, records its position.
    pub(crate) fn message(&mut self, channel: &str, offset: u64, epoch: &str) -> Verdict {
        let Some(slot) = self.channels.get_mut(channel) else {
            return Verdict::Drop;
        };
        let verdict = match slot {
            // `continues_with`: from offset 0 (nothing seen) any epoch continues.
            Some(last) if last.continues_with(epoch) && offset <= last.offset => {
                return Verdict::Drop
            }
            // `checked_add`: an offset of u64::MAX from a misbehaving server must not
            // overflow.
            Some(last)
                if last.continues_with(epoch) && Some(offset) == last.offset.checked_add(1) =>
            {
                Verdict::Deliver
            }
            Some(_) => Verdict::DeliverAfterGap(Resync {
                channel: channel.to_owned(),
                position: StreamPosition::new(offset.saturating_sub(1), epoch),
                cause: ResyncCause::Gap,
            }),
            // The server confirms a subscription before sending any of its messages, so
            // this one is left over from an earlier subscription to the same channel.
            None => return Verdict::Drop,
        };
        *slot = Some(StreamPosition::new(offset, epoch));
        verdict
    }

    /// Applies a server `resync`; `None` when the channel is not followed.
    pub(crate) fn resync(&mut self, frame: &frame::Resync) -> Option<Resync> {
        let slot = self.channels.get_mut(&frame.channel)?;
        let position = StreamPosition::new(frame.offset, frame.epoch.clone());
        *slot = Some(position.clone());
        Some(Resync {
            channel: frame.channel.clone(),
            position,
            cause: ResyncCause::Server,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(offset: u64, epoch: &str, recovered: bool) -> SubscribeResult {
        SubscribeResult {
            offset,
            epoch: epoch.into(),
            recovered,
        }
    }

    #[test]
    fn duplicates_and_old_messages_are_dropped() {
        let mut t = Tracker::default();
        t.add("a", None);
        assert_eq!(
            t.message("a", 1, "e"),
            Verdict::Drop,
            "before the confirmation"
        );
        t.subscribed("a", &result(3, "e", false)).unwrap();
        assert_eq!(t.message("a", 3, "e"), Verdict::Drop);
        assert_eq!(t.message("a", 4, "e"), Verdict::Deliver);
        assert_eq!(t.message("a", 4, "e"), Verdict::Drop);
        assert_eq!(t.message("a", 2, "e"), Verdict::Drop);
        assert_eq!(t.message("a", 5, "e"), Verdict::Deliver);
        assert_eq!(t.position("a"), Some(StreamPosition::new(5, "e")));
        assert_eq!(t.message("b", 1, "e"), Verdict::Drop);
    }

    #[test]
    fn a_recovered_resume_keeps_the_position_so_replayed_messages_pass() {
        let mut t = Tracker::default();
        t.add("a", Some(StreamPosition::new(5, "e")));
        let (sub, resync) = t.subscribed("a", &result(8, "e", true)).unwrap();
        assert!(sub.resumed && sub.recovered && resync.is_none());
        for o in 6..=8 {
            assert_eq!(t.message("a", o, "e"), Verdict::Deliver);
        }
        assert_eq!(t.resume()["a"], StreamPosition::new(8, "e"));
    }

    #[test]
    fn an_unrecovered_resume_reports_a_resync_and_jumps() {
        let mut t = Tracker::default();
        t.add("a", Some(StreamPosition::new(5, "e")));
        let (sub, resync) = t.subscribed("a", &result(2, "f", false)).unwrap();
        assert!(sub.resumed && !sub.recovered);
        let resync = resync.unwrap();
        assert_eq!(resync.cause, ResyncCause::NotRecovered);
        assert_eq!(resync.position, StreamPosition::new(2, "f"));
        assert_eq!(t.message("a", 3, "f"), Verdict::Deliver);
    }

    #[test]
    fn a_fresh_subscription_is_not_a_loss() {
        let mut t = Tracker::default();
        t.add("a", None);
        assert_eq!(t.resume()["a"], StreamPosition::default());
        let (sub, resync) = t.subscribed("a", &result(9, "e", false)).unwrap();
        assert!(!sub.resumed && resync.is_none());
    }

    #[test]
    fn gaps_and_epoch_changes_are_reported() {
        let mut t = Tracker::default();
        t.add("a", Some(StreamPosition::new(1, "e")));
        assert!(matches!(
            t.message("a", 3, "e"),
            Verdict::DeliverAfterGap(Resync {
                cause: ResyncCause::Gap,
                ..
            })
        ));
        assert!(matches!(
            t.message("a", 1, "f"),
            Verdict::DeliverAfterGap(_)
        ));
        assert_eq!(t.message("a", 2, "f"), Verdict::Deliver);
    }

    #[test]
    fn offset_zero_continues_with_any_epoch() {
        let mut t = Tracker::default();
        t.add("a", None);
        // A channel never published to: the server answers (0, "").
        let (_, resync) = t.subscribed("a", &result(0, "", false)).unwrap();
        assert!(resync.is_none());
        assert_eq!(
            t.message("a", 1, "e1"),
            Verdict::Deliver,
            "no gap, no resync"
        );
        assert_eq!(t.message("a", 1, "e1"), Verdict::Drop);
        assert_eq!(t.message("a", 2, "e1"), Verdict::Deliver);
        // Redis restarted empty: the server resyncs to (0, ""), then a new epoch starts.
        t.resync(&frame::Resync {
            channel: "a".into(),
            offset: 0,
            epoch: "".into(),
        })
        .unwrap();
        assert_eq!(t.message("a", 1, "e2"), Verdict::Deliver);
        // From offset 0 a skipped first offset is still a gap.
        t.add("b", Some(StreamPosition::new(0, "")));
        t.subscribed("b", &result(0, "", true)).unwrap();
        assert!(matches!(
            t.message("b", 2, "e1"),
            Verdict::DeliverAfterGap(_)
        ));
    }

    #[test]
    fn server_resync_moves_the_position() {
        let mut t = Tracker::default();
        t.add("a", Some(StreamPosition::new(1, "e")));
        let r = t
            .resync(&frame::Resync {
                channel: "a".into(),
                offset: 40,
                epoch: "e2".into(),
            })
            .unwrap();
        assert_eq!(r.cause, ResyncCause::Server);
        assert_eq!(t.message("a", 40, "e2"), Verdict::Drop);
        assert_eq!(t.message("a", 41, "e2"), Verdict::Deliver);
    }

    #[test]
    fn a_server_subscribe_follows_from_the_given_offset() {
        let mut t = Tracker::default();
        let sub = t.subscribed_by_server("room:9", 4, "e");
        assert!(sub.by_server && !sub.resumed);
        assert_eq!(t.message("room:9", 4, "e"), Verdict::Drop);
        assert_eq!(t.message("room:9", 5, "e"), Verdict::Deliver);
        assert_eq!(t.resume()["room:9"], StreamPosition::new(5, "e"));
        // Already followed with a position: the position stays.
        t.subscribed_by_server("room:9", 2, "e");
        assert_eq!(t.message("room:9", 5, "e"), Verdict::Drop);
        assert_eq!(t.message("room:9", 6, "e"), Verdict::Deliver);
        // Followed but not confirmed yet (a subscribe in flight): the server's position.
        t.add("room:10", None);
        t.subscribed_by_server("room:10", 7, "e");
        assert_eq!(t.message("room:10", 8, "e"), Verdict::Deliver);
    }

    #[test]
    fn extreme_offsets_do_not_overflow() {
        let mut t = Tracker::default();
        t.add("a", Some(StreamPosition::new(u64::MAX - 1, "e")));
        assert_eq!(t.message("a", u64::MAX, "e"), Verdict::Deliver);
        assert_eq!(t.message("a", u64::MAX, "e"), Verdict::Drop);
        assert!(matches!(
            t.message("a", 0, "f"),
            Verdict::DeliverAfterGap(_)
        ));
    }

    #[test]
    fn the_personal_channel_is_always_followed() {
        let mut t = Tracker::default();
        t.set_personal("user:alice");
        assert!(t.contains("user:alice") && t.is_personal("user:alice"));
        t.subscribed("user:alice", &result(4, "e", false)).unwrap();
        t.set_personal("user:alice");
        assert_eq!(t.position("user:alice"), Some(StreamPosition::new(4, "e")));
        t.set_personal("user:bob");
        assert!(!t.contains("user:alice") && t.contains("user:bob"));
    }
}
