//! Gap repair: a channel whose broker stream skipped offsets buffers live
//! publications, reads the gap from history, and delivers it in order, or sends
//! `resync` when history cannot cover it. The rules are pure, in [`crate::continuity`].

use std::sync::Arc;
use std::time::Duration;

use herald_protocol::StreamPosition;
use tokio::time::Instant;

use super::channel::Outlet;
use super::channel::Pending;
use super::channel::{ChannelEntry, RepairBuffer};
use super::Hub;
use crate::backend::error::BackendError;
use crate::backend::streams::{History, Publication};
use crate::continuity::plan_repair;
use crate::continuity::Check;
use crate::continuity::Continuity;
use crate::continuity::Step;

/// How long a gap repair keeps retrying an unavailable history read before it sends
/// `resync` (see `Hub::history_for_repair`).
const REPAIR_RETRY_WINDOW: Duration = Duration::from_secs(5);

impl Hub {
    /// Keeps a live publication for the repair in progress, within the buffer bounds
    /// (a refusal is counted; the repair's end reads it from history). Only called
    /// while a repair runs: `start_repair` creates the buffer that the repair drains.
    pub(super) fn buffer_during_repair(&self, entry: &mut ChannelEntry, p: Publication) {
        let Some(buffer) = entry.repairing.as_mut() else {
            debug_assert!(false, "buffering with no repair in progress");
            return;
        };
        if !buffer.push(p) {
            self.metrics.repair_buffer_overflows.inc();
        }
    }

    /// Queues a `resync` to `position` for every session of the entry.
    pub(super) fn resync_all(
        &self,
        entry: &mut ChannelEntry,
        position: StreamPosition,
    ) -> Option<Arc<Outlet>> {
        // Rare and meaningful (clients must reload state): worth a log line.
        tracing::warn!(
            channel = %entry.name,
            offset = position.offset,
            epoch = %position.epoch,
            sessions = entry.sessions.len(),
            "continuity lost; sending resync"
        );
        self.metrics.resyncs.inc();
        entry.continuity = Continuity::Dispatched(position.epoch.as_str().into(), position.offset);
        entry.push(Pending::Resync(position))
    }

    /// Starts repairing a channel from `from` (the last offset known good); `target`
    /// is where the stream is known to stand, if known.
    pub(super) fn start_repair(
        self: &Arc<Self>,
        entry: &mut ChannelEntry,
        epoch: Arc<str>,
        from: u64,
        target: Option<StreamPosition>,
    ) {
        if entry.repairing.is_some() {
            return;
        }
        entry.repairing = Some(Box::new(RepairBuffer::new(&self.repair_budget)));
        let hub = Arc::clone(self);
        let channel = entry.name.clone();
        tokio::spawn(async move { hub.repair(channel, epoch, from, target).await });
    }

    pub(super) async fn repair(
        self: Arc<Self>,
        channel: Arc<str>,
        epoch: Arc<str>,
        from: u64,
        target: Option<StreamPosition>,
    ) {
        let history = self.history_for_repair(&channel, from).await;
        self.finish_repair(channel, epoch, from, target, history);
    }

    /// Ends a repair with the history it read: delivers history and then what was
    /// buffered, in order, or resyncs.
    pub(super) fn finish_repair(
        self: Arc<Self>,
        channel: Arc<str>,
        epoch: Arc<str>,
        from: u64,
        target: Option<StreamPosition>,
        history: Result<History, BackendError>,
    ) {
        if let Err(e) = &history {
            tracing::warn!(channel = %channel, error = %e, "gap repair failed; sending resync");
            self.metrics.broker_errors.inc();
        }
        let mut drain = None;
        let overflowed;
        {
            let mut shard = self.shard(&channel);
            let Some(entry) = shard.channels.get_mut(&channel) else {
                return;
            };
            let buffered;
            (buffered, overflowed) = entry
                .repairing
                .take()
                .map_or((Vec::new(), false), |b| b.finish());
            let plan = plan_repair(from, epoch, history.as_ref(), target.as_ref(), buffered);
            for step in plan.steps {
                let outlet = match step {
                    Step::Deliver(p) => self.dispatch(entry, p),
                    Step::Resync(position) => self.resync_all(entry, position),
                };
                drain = drain.or(outlet);
            }
            if let Some((epoch, last)) = plan.last {
                entry.continuity = Continuity::Dispatched(epoch, last);
            }
            if plan.repaired {
                self.metrics.gaps_repaired.inc();
            }
        }
        if let Some(outlet) = drain {
            self.drain(outlet);
        }
        if overflowed {
            // Publications after the buffered ones were refused: the broker is ahead of
            // what was dispatched. The check reads its position and repairs the rest
            // (retrying until it can), even if the channel gets no further message.
            tokio::spawn(Arc::clone(&self).check_continuity(channel));
        }
    }

    /// Reads the history a repair needs. A gap is usually noticed right after the
    /// subscriber connection came back, while the command connection may still be
    /// reconnecting, so a failed read is retried for [`REPAIR_RETRY_WINDOW`] before the
    /// repair gives up with `resync`: the history is most likely still there. Live
    /// publications keep buffering meanwhile.
    pub(super) async fn history_for_repair(
        &self,
        channel: &str,
        from: u64,
    ) -> Result<History, BackendError> {
        let deadline = Instant::now() + REPAIR_RETRY_WINDOW;
        let mut delay = Duration::from_millis(50);
        loop {
            match self.streams.history(channel, from, self.repair_limit).await {
                Ok(h) => return Ok(h),
                Err(e) if Instant::now() + delay < deadline => {
                    tracing::debug!(channel, error = %e, "gap repair: history unavailable; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Checks one channel against the broker's position after a broker reconnect.
    ///
    /// The read is retried until it succeeds, for as long as the channel has local
    /// sessions: after a Redis restart the subscriber connection may be back before the
    /// command connection, and a check given up on would leave a missed publication
    /// undelivered until the channel's next message, which for a personal channel may
    /// never come.
    pub(super) async fn check_continuity(self: Arc<Self>, channel: Arc<str>) {
        // Where the hub stood before the read. If a publication moves it meanwhile, the
        // read may predate that publication: a channel whose state was lost reads as
        // (0, "") and would look lost again after its next first publish. The dispatch
        // checked that publication's continuity itself (gap → repair, other epoch →
        // each session resyncs), so a stale read is dropped.
        let before = self
            .shard(&channel)
            .channels
            .get(&channel)
            .and_then(|e| e.continuity.position());
        let mut delay = Duration::from_millis(50);
        let position = loop {
            match self.streams.position(&channel).await {
                Ok(p) => break p,
                Err(e) => {
                    self.metrics.broker_errors.inc();
                    if !self.has_sessions(&channel) {
                        return; // nobody left to deliver to
                    }
                    tracing::debug!(channel = %channel, error = %e, "continuity check: broker unavailable; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        };
        let outlet = {
            let mut shard = self.shard(&channel);
            let Some(entry) = shard.channels.get_mut(&channel) else {
                return;
            };
            match entry.continuity.on_position(before.as_ref(), &position) {
                Check::InStep => None,
                Check::Resync(position) => self.resync_all(entry, position),
                Check::Repair {
                    epoch,
                    from,
                    target,
                } => {
                    self.start_repair(entry, epoch, from, Some(target));
                    None
                }
            }
        };
        if let Some(outlet) = outlet {
            self.drain(outlet);
        }
    }
}
