//! The fan-out: encode once, then offer the shared frame to every session of a
//! channel, in the channel's order, outside the shard lock.

use std::sync::Arc;

use herald_protocol::codes::CloseCode;
use herald_protocol::frame::{encode_ephemeral, encode_message};

use super::channel::{ChannelEntry, Outlet, Pending};
use super::Hub;
use crate::backend::routing::Ephemeral;
use crate::backend::streams::Publication;
use crate::continuity::Continuity;
use crate::mailbox::Delivery;
use crate::mailbox::EphemeralDelivery;
use crate::mailbox::{Outbound, Refused, SessionHandle};
use crate::metrics::Metrics;
use tungstenite::Utf8Bytes;

/// Fan-outs to more sessions than this are split into chunks offered in parallel on the
/// runtime's workers.
pub(super) const PARALLEL_FANOUT: usize = 1024;
/// The smallest chunk of a parallel fan-out: smaller ones cost more to schedule than
/// they save.
const MIN_CHUNK: usize = 512;

impl Hub {
    /// Delivers what the outlet holds, as its one drainer, until it is empty. Small
    /// fan-outs run right here; the first big one hands the rest of the turn to a task
    /// that splits it over the runtime's workers.
    pub(super) fn drain(self: &Arc<Self>, outlet: Arc<Outlet>) {
        while let Some((sessions, item)) = outlet.pop() {
            if sessions.len() > PARALLEL_FANOUT {
                let hub = Arc::clone(self);
                tokio::spawn(async move { hub.drain_parallel(outlet, sessions, item).await });
                return;
            }
            let item = self.outbound(&outlet.channel, item);
            offer_all_or_close(&self.metrics, &sessions, &item);
        }
    }

    /// [`Hub::drain`] for a turn that met a big fan-out: each big item is offered in
    /// chunks on every worker, and the next item starts once all chunks are done.
    pub(super) async fn drain_parallel(
        self: Arc<Self>,
        outlet: Arc<Outlet>,
        sessions: Arc<[SessionHandle]>,
        item: Pending,
    ) {
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        let mut next = Some((sessions, item));
        while let Some((sessions, item)) = next.take().or_else(|| outlet.pop()) {
            let item = self.outbound(&outlet.channel, item);
            let parts = workers.min(sessions.len() / MIN_CHUNK).max(1);
            if parts == 1 {
                offer_all_or_close(&self.metrics, &sessions, &item);
                continue;
            }
            let chunk = sessions.len().div_ceil(parts);
            let mut chunks = tokio::task::JoinSet::new();
            for start in (chunk..sessions.len()).step_by(chunk) {
                let (metrics, sessions, item) = (
                    Arc::clone(&self.metrics),
                    Arc::clone(&sessions),
                    item.clone(),
                );
                chunks.spawn(async move {
                    let end = (start + chunk).min(sessions.len());
                    offer_all_or_close(&metrics, &sessions[start..end], &item);
                });
            }
            // This task takes the first chunk itself.
            offer_all_or_close(&self.metrics, &sessions[..chunk], &item);
            while chunks.join_next().await.is_some() {}
        }
    }

    /// Turns a queued item into what sessions receive (a publication is encoded here,
    /// once for every recipient, outside every lock).
    pub(super) fn outbound(&self, channel: &Arc<str>, item: Pending) -> Outbound {
        match item {
            Pending::Publication(p) => {
                let frame = Utf8Bytes::from(encode_message(
                    channel,
                    p.offset,
                    &p.epoch,
                    p.from.as_deref(),
                    &p.data,
                ));
                Outbound::Message(Arc::new(Delivery {
                    channel: Arc::clone(channel),
                    offset: p.offset,
                    epoch: p.epoch,
                    frame,
                }))
            }
            Pending::Resync(position) => {
                Outbound::Resync(Box::new((Arc::clone(channel), position)))
            }
            Pending::Ephemeral(message) => {
                let frame = encode_ephemeral(channel, message.from.as_deref(), &message.data);
                Outbound::Ephemeral(Arc::new(EphemeralDelivery {
                    channel: Arc::clone(channel),
                    frame: Utf8Bytes::from(frame),
                }))
            }
        }
    }

    /// Offers an ephemeral message to every session in the channel now. Kept apart from
    /// [`Hub::dispatch`]: it never touches the channel's continuity, is not buffered
    /// during a repair (it has no place in the offset order to wait for), and a full
    /// queue (half full, see [`Mailbox::offer_droppable`]) drops it instead of
    /// closing the session: losing a typing indicator is
    /// harmless, and closing a session for one would cost a reconnect and a recovery.
    pub fn fan_out_ephemeral(self: &Arc<Self>, channel: &str, message: Ephemeral) {
        let outlet = {
            let mut shard = self.shard(channel);
            let Some(entry) = shard.channels.get_mut(channel) else {
                return;
            };
            entry.push(Pending::Ephemeral(message))
        };
        if let Some(outlet) = outlet {
            self.drain(outlet);
        }
    }

    /// Offers `item` to one session with the slow-consumer rule of [`offer_or_close`].
    pub fn offer_or_close(&self, handle: &SessionHandle, item: Outbound) {
        offer_or_close(&self.metrics, handle, item);
    }

    /// Queues a publication that is next in line (continuity already checked).
    pub(super) fn dispatch(&self, entry: &mut ChannelEntry, p: Publication) -> Option<Arc<Outlet>> {
        entry.continuity = Continuity::Dispatched(p.epoch.clone(), p.offset);
        entry.push(Pending::Publication(p))
    }
}

/// Offers `item` to each session, without waiting.
fn offer_all_or_close(metrics: &Metrics, sessions: &[SessionHandle], item: &Outbound) {
    for handle in sessions {
        offer_or_close(metrics, handle, item.clone());
    }
}

/// Offers `item` to one session without waiting; a full mailbox closes the session
/// with 4509 (slow consumer), or drops an ephemeral item.
fn offer_or_close(metrics: &Metrics, handle: &SessionHandle, item: Outbound) {
    if matches!(item, Outbound::Ephemeral(_)) {
        if let Err(Refused::Full) = handle.offer_droppable(item) {
            metrics.ephemeral_dropped.inc();
        }
        return;
    }
    match handle.offer(item) {
        Ok(()) => {}
        Err(Refused::Full) => {
            metrics.queue_drops.inc();
            handle.close(CloseCode::SlowConsumer.code());
        }
        // The session is gone and will leave the channel itself.
        Err(Refused::Gone) => {}
    }
}
