//! The hub's state of one channel: its sessions, its broker subscription, its
//! continuity, the outlet that orders its fan-out, and the buffer of a repair.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::future::Shared;

use crate::backend::routing::{Ephemeral, SubscribeAck};
use crate::backend::streams::Publication;

use crate::continuity::buffer_admits;
use crate::continuity::buffered_size;
use crate::continuity::Continuity;
use crate::mailbox::{SessionHandle, SessionId};
use herald_protocol::StreamPosition;

/// Most bytes one channel buffers while its gap is repaired (see [`RepairBuffer`]).
pub(super) const REPAIR_BUFFER_CHANNEL_BYTES: usize = 1 << 20;
/// Most bytes all of a node's repairs buffer together: after a broker reconnect every
/// channel may be repairing at once.
pub(super) const REPAIR_BUFFER_NODE_BYTES: usize = 64 << 20;

/// The bounds of the repair buffers, and what all of them hold now.
pub(super) struct RepairBudget {
    /// Bytes held by every [`RepairBuffer`] of the node.
    pub(super) used: AtomicUsize,
    pub(super) channel_limit: usize,
    pub(super) node_limit: usize,
}

/// The live publications a channel receives while its gap is repaired, kept in order
/// until the repair delivers them after the history it read. Bounded: a repair may
/// wait up to [`REPAIR_RETRY_WINDOW`] for history while a busy channel keeps
/// publishing. A publication over the bounds is not kept, and the buffer remembers
/// that: when the repair is done the hub checks the channel against the broker again,
/// which repairs what was refused from history (or resyncs if history lost it). Never
/// silent, never unbounded.
pub(super) struct RepairBuffer {
    pub(super) items: Vec<Publication>,
    pub(super) bytes: usize,
    /// Some publication was refused: check the channel again after the repair.
    pub(super) overflowed: bool,
    pub(super) budget: Arc<RepairBudget>,
}

impl RepairBuffer {
    pub(super) fn new(budget: &Arc<RepairBudget>) -> Self {
        Self {
            items: Vec::new(),
            bytes: 0,
            overflowed: false,
            budget: Arc::clone(budget),
        }
    }

    /// Keeps `p` if the bounds allow; returns whether it did. After one refusal every
    /// later publication is refused too, so the buffer is always one unbroken run of
    /// offsets: a hole in it would end the repair in a `resync` that history could
    /// have avoided.
    pub(super) fn push(&mut self, p: Publication) -> bool {
        if self.overflowed {
            return false;
        }
        let size = buffered_size(&p);
        let b = &self.budget;
        let taken = b
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |node| {
                buffer_admits(self.bytes, node, size, b.channel_limit, b.node_limit)
                    .then_some(node + size)
            })
            .is_ok();
        if taken {
            self.bytes += size;
            self.items.push(p);
        } else {
            self.overflowed = true;
        }
        taken
    }

    /// The buffered publications, and whether any was refused. Releases the bytes.
    pub(super) fn finish(mut self) -> (Vec<Publication>, bool) {
        (std::mem::take(&mut self.items), self.overflowed)
    }
}

impl Drop for RepairBuffer {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The node's broker subscription of a channel.
pub(super) enum Subscription {
    /// Not asked yet, or the last request failed.
    None,
    /// Asked: every session joining meanwhile waits for the same answer.
    Pending(Shared<SubscribeAck>),
    /// Confirmed: later joins need not wait. The shared request is dropped then, since
    /// it kept about 200 bytes per channel for good, and most channels are one
    /// session's personal channel.
    Live,
}

pub(super) struct ChannelEntry {
    pub(super) name: Arc<str>,
    pub(super) sessions: HashMap<SessionId, SessionHandle>,
    /// The node's broker subscription of the channel.
    pub(super) subscription: Subscription,
    /// Bumped on every join: a delayed unsubscribe only applies to its own generation.
    pub(super) generation: u64,
    pub(super) continuity: Continuity,
    /// While a gap is being repaired: publications that arrived meanwhile. Boxed: it
    /// is rare, and the entry's size counts once per channel (most channels are one
    /// idle session's personal channel).
    pub(super) repairing: Option<Box<RepairBuffer>>,
    /// The sessions as one shared list, rebuilt on the first delivery after a join or
    /// leave (copy on write): a delivery takes it under the shard lock in O(1) and
    /// offers outside the lock.
    pub(super) snapshot: Option<Arc<[SessionHandle]>>,
    /// The channel's ordered delivery queue (see [`Outlet`]), made at the first
    /// delivery: an idle connection's personal channel never needs one.
    pub(super) outlet: Option<Arc<Outlet>>,
}

impl ChannelEntry {
    pub(super) fn new(name: Arc<str>) -> Self {
        Self {
            outlet: None,
            name,
            sessions: HashMap::new(),
            subscription: Subscription::None,
            generation: 0,
            continuity: Continuity::Unknown,
            repairing: None,
            snapshot: None,
        }
    }

    /// Queues `item` for every session of the channel now, in order after everything
    /// queued before. Returns the outlet when the caller must drain it (after letting
    /// go of the shard lock).
    pub(super) fn push(&mut self, item: Pending) -> Option<Arc<Outlet>> {
        if self.sessions.is_empty() {
            return None;
        }
        let sessions = match &self.snapshot {
            Some(s) => Arc::clone(s),
            None => {
                let s: Arc<[SessionHandle]> = self.sessions.values().cloned().collect();
                self.snapshot = Some(Arc::clone(&s));
                s
            }
        };
        let name = &self.name;
        let outlet = self.outlet.get_or_insert_with(|| {
            Arc::new(Outlet {
                channel: Arc::clone(name),
                state: Mutex::default(),
            })
        });
        let mut state = outlet.lock();
        state.queue.push_back((sessions, item));
        if state.draining {
            None
        } else {
            state.draining = true;
            Some(Arc::clone(outlet))
        }
    }
}

/// What a channel's outlet hands to its sessions.
pub(super) enum Pending {
    /// A publication, encoded when delivered (outside every lock).
    Publication(Publication),
    /// Continuity was lost: continue from here.
    Resync(StreamPosition),
    /// An ephemeral message: no offset, dropped rather than closing a full session.
    Ephemeral(Ephemeral),
}

/// One channel's ordered delivery queue.
///
/// Deciding what to deliver (continuity, the subscriber list) happens under the shard
/// lock and only appends here; offering to the sessions' mailboxes happens outside it,
/// by one drainer at a time per channel (whoever found the outlet idle). So another
/// channel's messages never wait behind this channel's fan-out, and one channel's items
/// reach each session in the order they were decided: a later message can never
/// overtake an earlier one, even when a big fan-out runs in parallel chunks (the next
/// item starts only after every chunk of the previous one is done).
pub(super) struct Outlet {
    pub(super) channel: Arc<str>,
    pub(super) state: Mutex<OutletState>,
}

#[derive(Default)]
pub(super) struct OutletState {
    pub(super) queue: VecDeque<(Arc<[SessionHandle]>, Pending)>,
    /// Someone is delivering this channel's items now.
    pub(super) draining: bool,
}

impl Outlet {
    pub(super) fn lock(&self) -> MutexGuard<'_, OutletState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next item; `None` ends the caller's turn as the drainer.
    pub(super) fn pop(&self) -> Option<(Arc<[SessionHandle]>, Pending)> {
        let mut state = self.lock();
        let next = state.queue.pop_front();
        if next.is_none() {
            state.draining = false;
        }
        next
    }
}
