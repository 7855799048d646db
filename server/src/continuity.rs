//! The continuity rules of a channel's stream, in one place and pure: what a gap is,
//! when to buffer, when to repair from history and when to send `resync`.
//!
//! Two receivers follow a channel's stream on a node, and both use these rules:
//! - the **hub** (one per node and channel): [`Continuity`] is where it stands,
//!   [`Continuity::on_publication`] judges a live publication, [`Continuity::on_position`]
//!   judges the broker's position read after a reconnect, and [`plan_repair`] turns a
//!   history read plus what was buffered meanwhile into the steps to deliver;
//! - the **session** (one per client and channel): [`session_arrival`] judges a message
//!   against what the client last got, [`resync_applies`] says whether a hub `resync` is
//!   news to it, [`fills_gap`] whether a history read fills its gap exactly, and
//!   [`recovery`] whether a client resuming from a position is recovered completely.
//!
//! Epochs are compared only through [`herald_protocol::same_stream`] (offset 0 continues
//! with any epoch). Nothing here does I/O or takes a lock, so every rule is unit-tested
//! and property-tested below, and runs in the fast test tier (`cargo test --lib`).

use std::sync::Arc;

use herald_protocol::{same_stream, StreamPosition};

use crate::backend::error::BackendError;
use crate::backend::streams::{History, Publication};

/// Where the hub stands in one channel's stream on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Continuity {
    /// Nothing known yet.
    #[default]
    Unknown,
    /// Positions read by sessions at subscribe, before any dispatch: the lowest one.
    Seeded(Arc<str>, u64),
    /// The last publication dispatched (or the position a `resync` moved everyone to).
    Dispatched(Arc<str>, u64),
}

/// What the hub does with a live publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// It is next in line (or in a new stream, which each session judges itself):
    /// dispatch it.
    Deliver,
    /// A repair is running: keep it, in order, until the repair is done.
    Buffer,
    /// Already dispatched (a repair read it from history first): drop it.
    Duplicate,
    /// Offsets after `from` are missing: start a repair from `from` in `epoch`, and
    /// buffer this publication meanwhile.
    Gap {
        /// The epoch the gap is in.
        epoch: Arc<str>,
        /// The last offset known good.
        from: u64,
    },
}

/// What the hub does with the broker's position of a channel, read after a reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Nothing was missed (or the hub moved meanwhile and judged that itself).
    InStep,
    /// The stream the hub followed is gone (other epoch): every session resyncs here.
    Resync(StreamPosition),
    /// Publications after `from` were missed: repair them from history; `target` is
    /// where the stream stood, the fallback `resync` if history cannot be read.
    Repair {
        /// The epoch to repair in.
        epoch: Arc<str>,
        /// The last offset known good.
        from: u64,
        /// The broker's position.
        target: StreamPosition,
    },
}

/// One thing a repair hands to the channel's sessions, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Deliver this publication.
    Deliver(Publication),
    /// Tell every session to continue from here (what lies before is lost).
    Resync(StreamPosition),
}

/// The outcome of a repair: what to hand to the sessions, and where the hub stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairPlan {
    /// The steps, in delivery order.
    pub steps: Vec<Step>,
    /// Where the hub stands after the steps; `None`: unchanged.
    pub last: Option<(Arc<str>, u64)>,
    /// Whether history filled a gap (for the `gaps_repaired` metric).
    pub repaired: bool,
}

impl Continuity {
    /// The (epoch, offset) known, if any.
    pub fn position(&self) -> Option<(Arc<str>, u64)> {
        match self {
            Continuity::Unknown => None,
            Continuity::Seeded(e, o) | Continuity::Dispatched(e, o) => Some((e.clone(), *o)),
        }
    }

    /// A session found the channel at `position` when it joined. Until the first
    /// dispatch the lowest such position is where continuity starts (a session that
    /// read an older position must not miss what came after it).
    pub fn seed(&mut self, position: &StreamPosition) {
        let lower = match self {
            Continuity::Unknown => true,
            Continuity::Seeded(epoch, offset) => {
                !same_stream(*offset, epoch, &position.epoch) || position.offset < *offset
            }
            Continuity::Dispatched(..) => false,
        };
        if lower {
            *self = Continuity::Seeded(position.epoch.as_str().into(), position.offset);
        }
    }

    /// Judges a live publication (`repairing`: a repair of the channel is running).
    pub fn on_publication(&self, repairing: bool, epoch: &str, offset: u64) -> Arrival {
        if repairing {
            return Arrival::Buffer;
        }
        let (known, dispatched) = match self {
            Continuity::Dispatched(e, o) => ((e, *o), true),
            Continuity::Seeded(e, o) => ((e, *o), false),
            Continuity::Unknown => return Arrival::Deliver,
        };
        let (last_epoch, last) = known;
        if !same_stream(last, last_epoch, epoch) {
            // A new stream: each session sees the epoch change and resyncs itself.
            return Arrival::Deliver;
        }
        if dispatched && offset <= last {
            return Arrival::Duplicate;
        }
        if offset > last + 1 {
            return Arrival::Gap {
                epoch: epoch.into(),
                from: last,
            };
        }
        Arrival::Deliver
    }

    /// Judges the broker's `position` of the channel, read after a reconnect. `before`
    /// is where the hub stood when the read started: if a publication moved it
    /// meanwhile, the read may predate that publication (a channel whose state was lost
    /// reads as `(0, "")` and would look lost again after its next first publish); that
    /// publication's own continuity was judged when it arrived, so the read is dropped.
    pub fn on_position(
        &self,
        before: Option<&(Arc<str>, u64)>,
        position: &StreamPosition,
    ) -> Check {
        let Some((epoch, last)) = self.position() else {
            return Check::InStep;
        };
        if before != Some(&(epoch.clone(), last)) {
            return Check::InStep;
        }
        if !same_stream(last, &epoch, &position.epoch) {
            Check::Resync(position.clone())
        } else if position.offset > last {
            Check::Repair {
                epoch: position.epoch.as_str().into(),
                from: last,
                target: position.clone(),
            }
        } else {
            Check::InStep
        }
    }
}

/// What buffering `p` during a repair costs against the buffer bounds: its data and
/// publisher plus the publication's own bookkeeping.
pub fn buffered_size(p: &Publication) -> usize {
    const BOOKKEEPING: usize = 64;
    p.data.len() + p.from.as_ref().map_or(0, |f| f.len()) + BOOKKEEPING
}

/// Whether a repair buffer holding `channel` bytes, on a node whose repairs hold `node`
/// bytes together, takes one more publication of `size` bytes. What it refuses is not
/// lost: the repair's end reads it from history (see [`crate::hub`]).
pub fn buffer_admits(
    channel: usize,
    node: usize,
    size: usize,
    channel_limit: usize,
    node_limit: usize,
) -> bool {
    let within = |held: usize, limit: usize| held.checked_add(size).is_some_and(|n| n <= limit);
    within(channel, channel_limit) && within(node, node_limit)
}

/// Plans the end of a repair that started from offset `from` of `epoch`: the history
/// read (`Err` after its retries), then the publications `buffered` while it ran, in
/// arrival order. `target` is a position known to exist (from a continuity check); when
/// history cannot be read and nothing was buffered, the sessions resync there rather
/// than wait for the channel's next message, which may never come.
pub fn plan_repair(
    from: u64,
    epoch: Arc<str>,
    history: Result<&History, &BackendError>,
    target: Option<&StreamPosition>,
    buffered: Vec<Publication>,
) -> RepairPlan {
    let mut steps = Vec::new();
    let mut last = from;
    let mut current = epoch;
    let mut moved = false;
    let mut repaired = false;
    match history {
        Ok(h) if same_stream(from, &current, &h.position.epoch) => {
            // From offset 0 any epoch continues: repair in the history's.
            current = h.position.epoch.as_str().into();
            for p in &h.publications {
                if *p.epoch == *current && p.offset == last + 1 {
                    steps.push(Step::Deliver(p.clone()));
                    last = p.offset;
                    moved = true;
                }
            }
            if h.position.offset > last {
                // History no longer reaches back far enough.
                last = h.position.offset;
                steps.push(Step::Resync(StreamPosition::new(last, &*current)));
                moved = true;
            } else if last > from {
                repaired = true;
            }
        }
        Ok(h) => {
            // The epoch changed: the history we would repair from is gone.
            current = h.position.epoch.as_str().into();
            last = h.position.offset;
            steps.push(Step::Resync(h.position.clone()));
            moved = true;
        }
        Err(_) => {
            if let (Some(t), true) = (target, buffered.is_empty()) {
                current = t.epoch.as_str().into();
                last = t.offset;
                steps.push(Step::Resync(t.clone()));
                moved = true;
            }
        }
    }
    for p in buffered {
        if same_stream(last, &current, &p.epoch) {
            if p.offset <= last {
                continue;
            }
            if p.offset > last + 1 {
                steps.push(Step::Resync(StreamPosition::new(p.offset - 1, &*p.epoch)));
            }
        }
        current = p.epoch.clone();
        last = p.offset;
        moved = true;
        steps.push(Step::Deliver(p));
    }
    RepairPlan {
        steps,
        last: moved.then_some((current, last)),
        repaired,
    }
}

/// How a session judges a message of a channel it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionArrival {
    /// The next message: write it.
    Next,
    /// Already written: skip it.
    Duplicate,
    /// Offsets `last + 1 .. offset` are missing (same stream): fill them from history
    /// (or resync), then write it.
    Gap,
    /// Another stream (the epoch changed): resync to just before it, then write it.
    NewStream(StreamPosition),
}

/// Judges message `(offset, epoch)` against the session's `(last, last_epoch)`.
pub fn session_arrival(last: u64, last_epoch: &str, offset: u64, epoch: &str) -> SessionArrival {
    if !same_stream(last, last_epoch, epoch) {
        SessionArrival::NewStream(StreamPosition::new(offset.saturating_sub(1), epoch))
    } else if offset <= last {
        SessionArrival::Duplicate
    } else if offset > last + 1 {
        SessionArrival::Gap
    } else {
        SessionArrival::Next
    }
}

/// Whether a hub `resync` to `position` is news to a session at `(last, last_epoch)`:
/// it is in another stream, or behind.
pub fn resync_applies(last: u64, last_epoch: &str, position: &StreamPosition) -> bool {
    !same_stream(last, last_epoch, &position.epoch) || last < position.offset
}

/// Whether `publications` are exactly the `want` messages after `last` in `epoch`.
pub fn fills_gap(last: u64, epoch: &str, want: usize, publications: &[Publication]) -> bool {
    publications.len() == want
        && publications
            .iter()
            .enumerate()
            .all(|(i, p)| p.offset == last + 1 + i as u64 && *p.epoch == *epoch)
}

/// How a client at `since` (a `resume` or a `subscribe` with a position) is recovered
/// from `history` (read after `since.offset`): `Some(n)` when the stream continues from
/// `since` and the first `n` retained publications are exactly the ones missed up to
/// the channel's position (`n` may be 0); `None` when it cannot be recovered completely.
pub fn recovery(since: &StreamPosition, history: &History) -> Option<usize> {
    let top = &history.position;
    if !since.continues_with(&top.epoch) || since.offset > top.offset {
        return None;
    }
    let missing = usize::try_from(top.offset - since.offset).ok()?;
    let publications = history.publications.get(..missing)?;
    fills_gap(since.offset, &top.epoch, missing, publications).then_some(missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(offset: u64, epoch: &str) -> Publication {
        Publication {
            offset,
            epoch: epoch.into(),
            data: "1".into(),
            from: None,
        }
    }

    fn history(offset: u64, epoch: &str, pubs: Vec<Publication>) -> History {
        History {
            position: StreamPosition::new(offset, epoch),
            publications: pubs,
        }
    }

    fn dispatched(e: &str, o: u64) -> Continuity {
        Continuity::Dispatched(e.into(), o)
    }

    #[test]
    fn publication_rules() {
        let c = dispatched("e", 5);
        assert_eq!(c.on_publication(false, "e", 6), Arrival::Deliver);
        assert_eq!(c.on_publication(false, "e", 5), Arrival::Duplicate);
        assert_eq!(
            c.on_publication(false, "e", 8),
            Arrival::Gap {
                epoch: "e".into(),
                from: 5
            }
        );
        assert_eq!(c.on_publication(false, "x", 1), Arrival::Deliver);
        assert_eq!(c.on_publication(true, "e", 6), Arrival::Buffer);
        assert_eq!(
            Continuity::Unknown.on_publication(false, "e", 9),
            Arrival::Deliver
        );
        // Seeded: a publication at or below the seed is not a duplicate (nothing was
        // dispatched yet); from offset 0 any epoch continues.
        let s = Continuity::Seeded("".into(), 0);
        assert_eq!(s.on_publication(false, "e", 1), Arrival::Deliver);
        assert_eq!(
            s.on_publication(false, "e", 2),
            Arrival::Gap {
                epoch: "e".into(),
                from: 0
            }
        );
    }

    #[test]
    fn seed_keeps_the_lowest_until_dispatch() {
        let mut c = Continuity::Unknown;
        c.seed(&StreamPosition::new(4, "e"));
        c.seed(&StreamPosition::new(6, "e"));
        assert_eq!(c, Continuity::Seeded("e".into(), 4));
        c.seed(&StreamPosition::new(2, "e"));
        assert_eq!(c, Continuity::Seeded("e".into(), 2));
        c.seed(&StreamPosition::new(9, "f"));
        assert_eq!(c, Continuity::Seeded("f".into(), 9));
        let mut d = dispatched("e", 3);
        d.seed(&StreamPosition::new(1, "e"));
        assert_eq!(d, dispatched("e", 3));
    }

    #[test]
    fn position_check_rules() {
        let c = dispatched("e", 5);
        let before = Some(("e".into(), 5));
        assert_eq!(
            c.on_position(before.as_ref(), &StreamPosition::new(5, "e")),
            Check::InStep
        );
        assert_eq!(
            c.on_position(before.as_ref(), &StreamPosition::new(7, "e")),
            Check::Repair {
                epoch: "e".into(),
                from: 5,
                target: StreamPosition::new(7, "e")
            }
        );
        // Redis restarted empty and someone published once: another epoch.
        assert_eq!(
            c.on_position(before.as_ref(), &StreamPosition::new(1, "n")),
            Check::Resync(StreamPosition::new(1, "n"))
        );
        // Moved meanwhile: the read may be stale.
        assert_eq!(
            c.on_position(Some(&("e".into(), 4)), &StreamPosition::new(0, "")),
            Check::InStep
        );
        // A personal channel never published before the restart: seeded at (0, "").
        let s = Continuity::Seeded("".into(), 0);
        assert_eq!(
            s.on_position(Some(&("".into(), 0)), &StreamPosition::new(1, "n")),
            Check::Repair {
                epoch: "n".into(),
                from: 0,
                target: StreamPosition::new(1, "n")
            }
        );
    }

    #[test]
    fn repair_buffers_are_bounded_per_channel_and_per_node() {
        assert!(buffer_admits(0, 0, 100, 100, 1000));
        assert!(!buffer_admits(1, 0, 100, 100, 1000), "channel bound");
        assert!(!buffer_admits(0, 901, 100, 100, 1000), "node bound");
        assert!(
            !buffer_admits(usize::MAX, 0, 1, usize::MAX, usize::MAX),
            "no overflow"
        );
        let with_from = Publication {
            from: Some("alice".into()),
            ..p(1, "e")
        };
        assert_eq!(buffered_size(&with_from), buffered_size(&p(1, "e")) + 5);
    }

    #[test]
    fn repair_fills_from_history_then_buffered() {
        let h = history(4, "e", vec![p(3, "e"), p(4, "e")]);
        let plan = plan_repair(2, "e".into(), Ok(&h), None, vec![p(4, "e"), p(5, "e")]);
        assert_eq!(
            plan.steps,
            vec![
                Step::Deliver(p(3, "e")),
                Step::Deliver(p(4, "e")),
                Step::Deliver(p(5, "e"))
            ]
        );
        assert_eq!(plan.last, Some(("e".into(), 5)));
        assert!(plan.repaired);
    }

    #[test]
    fn repair_resyncs_when_history_is_short_or_gone() {
        let short = history(9, "e", vec![p(8, "e"), p(9, "e")]);
        let plan = plan_repair(2, "e".into(), Ok(&short), None, vec![]);
        assert_eq!(plan.steps, vec![Step::Resync(StreamPosition::new(9, "e"))]);
        let other = history(1, "n", vec![p(1, "n")]);
        let plan = plan_repair(2, "e".into(), Ok(&other), None, vec![]);
        assert_eq!(plan.steps, vec![Step::Resync(StreamPosition::new(1, "n"))]);
        assert_eq!(plan.last, Some(("n".into(), 1)));
    }

    #[test]
    fn failed_repair_never_ends_in_silence() {
        let err = BackendError::Unavailable("down".into());
        // Nothing buffered but the stream is known to have moved: resync there.
        let target = StreamPosition::new(1, "n");
        let plan = plan_repair(0, "n".into(), Err(&err), Some(&target), vec![]);
        assert_eq!(plan.steps, vec![Step::Resync(target)]);
        // Buffered publications carry the news themselves.
        let plan = plan_repair(2, "e".into(), Err(&err), None, vec![p(5, "e")]);
        assert_eq!(
            plan.steps,
            vec![
                Step::Resync(StreamPosition::new(4, "e")),
                Step::Deliver(p(5, "e"))
            ]
        );
    }

    #[test]
    fn session_rules() {
        assert_eq!(session_arrival(3, "e", 4, "e"), SessionArrival::Next);
        assert_eq!(session_arrival(3, "e", 3, "e"), SessionArrival::Duplicate);
        assert_eq!(session_arrival(3, "e", 6, "e"), SessionArrival::Gap);
        assert_eq!(
            session_arrival(3, "e", 2, "f"),
            SessionArrival::NewStream(StreamPosition::new(1, "f"))
        );
        assert_eq!(session_arrival(0, "", 1, "f"), SessionArrival::Next);
        assert!(resync_applies(3, "e", &StreamPosition::new(4, "e")));
        assert!(!resync_applies(4, "e", &StreamPosition::new(4, "e")));
        assert!(resync_applies(4, "e", &StreamPosition::new(1, "f")));
        assert!(fills_gap(2, "e", 2, &[p(3, "e"), p(4, "e")]));
        assert!(!fills_gap(2, "e", 2, &[p(3, "e")]));
        assert!(!fills_gap(2, "e", 1, &[p(3, "f")]));
    }

    #[test]
    fn recovery_rules() {
        let h = history(4, "e", vec![p(3, "e"), p(4, "e")]);
        assert_eq!(recovery(&StreamPosition::new(2, "e"), &h), Some(2));
        assert_eq!(recovery(&StreamPosition::new(4, "e"), &h), Some(0));
        assert_eq!(recovery(&StreamPosition::new(1, "e"), &h), None, "trimmed");
        assert_eq!(
            recovery(&StreamPosition::new(2, "x"), &h),
            None,
            "other epoch"
        );
        assert_eq!(recovery(&StreamPosition::new(0, "x"), &h), None, "trimmed");
        assert_eq!(recovery(&StreamPosition::new(9, "e"), &h), None, "ahead");
        let full = history(2, "e", vec![p(1, "e"), p(2, "e")]);
        assert_eq!(recovery(&StreamPosition::new(0, ""), &full), Some(2));
    }

    proptest! {
        /// Whatever history answers and whatever was buffered (in order, possibly
        /// overlapping history), a repair's deliveries never go backwards within a
        /// stream, never repeat an offset, and every jump forward within a stream is
        /// announced by a resync: sessions never see a silent gap.
        #[test]
        fn repair_is_ordered_and_never_silent(
            from in 0u64..5,
            retained in 0u64..6,
            top in 0u64..12,
            same_epoch in any::<bool>(),
            buffered in proptest::collection::vec(1u64..15, 0..6),
            fail in any::<bool>(),
        ) {
            let epoch = if same_epoch { "e" } else { "n" };
            let first = top.saturating_sub(retained) + 1;
            let pubs: Vec<_> = (first..=top).map(|o| p(o, epoch)).collect();
            let h = history(top, epoch, pubs);
            let mut buf: Vec<u64> = buffered.into_iter().filter(|o| *o > top).collect();
            buf.sort_unstable();
            buf.dedup();
            let buf: Vec<_> = buf.into_iter().map(|o| p(o, epoch)).collect();
            let err = BackendError::Unavailable("x".into());
            let target = StreamPosition::new(top, epoch);
            let history = if fail { Err(&err) } else { Ok(&h) };
            let plan = plan_repair(from, "e".into(), history, Some(&target), buf);
            let mut at: (Arc<str>, u64) = ("e".into(), from);
            for step in &plan.steps {
                match step {
                    Step::Resync(pos) => at = (pos.epoch.as_str().into(), pos.offset),
                    Step::Deliver(pub_) => {
                        // Another stream announces itself (each session resyncs on
                        // the epoch change); within a stream, only the next offset.
                        if same_stream(at.1, &at.0, &pub_.epoch) {
                            prop_assert_eq!(pub_.offset, at.1 + 1, "silent gap or repeat");
                        }
                        at = (pub_.epoch.clone(), pub_.offset);
                    }
                }
            }
            if let Some(last) = &plan.last {
                prop_assert_eq!(last, &at);
            }
        }

        /// The session's judgement agrees with the hub's for a dispatched position.
        #[test]
        fn session_and_hub_agree(last in 0u64..10, offset in 1u64..12, same in any::<bool>()) {
            let epoch = if same { "e" } else { "f" };
            let hub = dispatched("e", last).on_publication(false, epoch, offset);
            let session = session_arrival(last, "e", offset, epoch);
            match session {
                SessionArrival::Next => prop_assert_eq!(hub, Arrival::Deliver),
                SessionArrival::Duplicate => prop_assert_eq!(hub, Arrival::Duplicate),
                SessionArrival::Gap => {
                    let is_gap = matches!(hub, Arrival::Gap { .. });
                    prop_assert!(is_gap);
                }
                SessionArrival::NewStream(_) => prop_assert_eq!(hub, Arrival::Deliver),
            }
        }
    }
}
