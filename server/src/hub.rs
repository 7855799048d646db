//! The hub: which local session is in which channel, and the fan-out of publications.
//!
//! The hot path reads in one direction: API → broker → hub → session. The broker hands
//! the hub a stream of [`BrokerEvent`]s (publications, resubscribes, user commands),
//! consumed by one task ([`Hub::consume`]); nothing calls back from the broker into the
//! hub, and the hub holds the broker, not the other way round.
//!
//! The hub owns four invariants:
//! - **One broker subscription per channel per node**, counted by local sessions. The
//!   first session to join a channel subscribes the node at the broker; the last one to
//!   leave schedules an unsubscribe after `unsubscribe_delay`, which a new session in
//!   the meantime cancels, so churn does not thrash the broker.
//! - **Encode once, share the bytes.** A publication is encoded into one frame, wrapped
//!   in an `Arc`, and offered to every local session's bounded queue without waiting.
//!   A full queue never blocks the fan-out: that session is closed with 4509 and
//!   resumes from its offset.
//! - **Continuity per channel on this node.** The hub knows the last offset it
//!   dispatched per channel. When the broker skips offsets (a dropped pub/sub message,
//!   a lagging reader, a reconnect) the hub buffers the channel, repairs the gap from
//!   history, and if history cannot fill it sends `resync` to the channel's sessions.
//!   The rules themselves are pure, in [`crate::continuity`].
//! - **Per-channel order without a shared lock on the fan-out.** What to deliver is
//!   decided under the channel's shard lock (continuity, and an `Arc` snapshot of the
//!   subscriber list, rebuilt only after a join or leave), and only queued there, in the
//!   channel's [`Outlet`]. The offers to the sessions' mailboxes happen after the lock is
//!   released, by one drainer per channel at a time, so other channels never wait
//!   behind a fan-out and a later message never overtakes an earlier one. A fan-out to
//!   more than [`PARALLEL_FANOUT`] sessions is split into chunks offered in parallel on
//!   every worker of the runtime; the channel's next item starts when all are done.
//!
//! Locks are std `Mutex`es over shards of the channel map: no `.await` happens while one
//! is held, and sharding keeps decisions on different channels from contending. Lock
//! order: shard, then outlet; never the other way.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures_util::future::{FutureExt, Shared};
use herald_protocol::frame::{encode_ephemeral, encode_message};
use herald_protocol::StreamPosition;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::broker::{
    Broker, BrokerError, BrokerEvent, BrokerEvents, Ephemeral, History, Publication, SubscribeAck,
    UserCommand,
};
use crate::continuity::{
    buffer_admits, buffered_size, plan_repair, Arrival, Check, Continuity, Step,
};
use crate::control::{Revocations, UserIndex};
use crate::metrics::Metrics;
use herald_protocol::codes::CloseCode;

/// How long a gap repair keeps retrying an unavailable history read before it sends
/// `resync` (see `Hub::history_for_repair`).
const REPAIR_RETRY_WINDOW: Duration = Duration::from_secs(5);
/// Most bytes one channel buffers while its gap is repaired (see [`RepairBuffer`]).
const REPAIR_BUFFER_CHANNEL_BYTES: usize = 1 << 20;
/// Most bytes all of a node's repairs buffer together: after a broker reconnect every
/// channel may be repairing at once.
const REPAIR_BUFFER_NODE_BYTES: usize = 64 << 20;

const SHARDS: usize = 64;
/// Broker events taken from the stream at once (one upgrade of the hub's weak handle
/// per batch).
const EVENT_BATCH: usize = 256;

/// A node-local session id (cheaper to hash than the session's uuid).
pub type SessionId = u64;

/// One publication, encoded once and shared by every local recipient.
#[derive(Debug)]
pub struct Delivery {
    /// The channel.
    pub channel: Arc<str>,
    /// Offset of the message.
    pub offset: u64,
    /// Epoch of the message.
    pub epoch: Arc<str>,
    /// The encoded `message` frame.
    pub frame: Utf8Bytes,
}

/// One ephemeral message, encoded once and shared by every local recipient. It has no
/// position: sessions write it as it comes, outside their offset bookkeeping.
#[derive(Debug)]
pub struct EphemeralDelivery {
    /// The channel.
    pub channel: Arc<str>,
    /// The encoded ephemeral `message` frame.
    pub frame: Utf8Bytes,
}

/// What the hub puts into a session's queue. One word wide, so that a queue of
/// hundreds costs little; the rare resync is boxed.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A message to write.
    Message(Arc<Delivery>),
    /// An ephemeral message to write (no offset; see [`Hub::fan_out_ephemeral`]).
    Ephemeral(Arc<EphemeralDelivery>),
    /// Continuity on a channel was lost: continue from this position.
    Resync(Box<(Arc<str>, StreamPosition)>),
    /// A server API command for this session's user (subscribe, unsubscribe), shared
    /// by every session of the user on this node.
    Control(Arc<UserCommand>),
}

/// Why the node closes a session, beyond its close code: picks the close frame's
/// reason text when one code has several causes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// The code's own reason ([`CloseCode::reason`]).
    Default = 0,
    /// 4401: the token reached `exp` without a `refresh`.
    TokenExpired = 1,
    /// 4401: the token was revoked by the server API.
    TokenRevoked = 2,
    /// 4401: the server API disconnected the user (`reconnect: true`).
    Disconnected = 3,
}

impl CloseReason {
    /// The reason text of a close with `code`.
    pub fn text(self, code: CloseCode) -> &'static str {
        match self {
            CloseReason::Default => code.reason(),
            CloseReason::TokenExpired => CloseCode::TOKEN_EXPIRED,
            CloseReason::TokenRevoked => "token revoked",
            CloseReason::Disconnected => "disconnected by the server",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => CloseReason::TokenExpired,
            2 => CloseReason::TokenRevoked,
            3 => CloseReason::Disconnected,
            _ => CloseReason::Default,
        }
    }
}

/// One session's mailbox: its bounded queue of outbound items and the close request.
///
/// Not a `tokio::sync::mpsc` channel: a bounded channel allocates a block of 32 slots
/// and a cache-padded header up front (about 2 KiB per connection), while an idle
/// session needs nothing. This queue allocates only when items arrive and gives the
/// memory back once it has drained, so an idle connection costs a few dozen bytes here.
/// One consumer (the session's task), many producers (the hub's fan-outs).
#[derive(Debug)]
pub struct SessionControl {
    /// The close request: code in the low 16 bits, [`CloseReason`] above; 0 = none.
    code: AtomicU32,
    /// When the session's token was issued (unix seconds), for revocations.
    token_iat: AtomicU64,
    /// The session is at its subscription limit.
    full: AtomicBool,
    gone: AtomicBool,
    capacity: usize,
    queue: Mutex<VecDeque<Outbound>>,
    /// Wakes the session for a close request.
    close_notify: Notify,
    /// Wakes the session for queued items.
    ready: Notify,
}

/// Why an item was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full: the session is a slow consumer.
    Full,
    /// The session has ended.
    Gone,
}

/// A drained queue keeps at most this many slots; more is given back.
pub const KEEP_SLOTS: usize = 16;

impl SessionControl {
    /// A mailbox holding at most `capacity` items.
    pub fn new(capacity: usize) -> Self {
        Self {
            code: AtomicU32::new(0),
            token_iat: AtomicU64::new(0),
            full: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            capacity: capacity.max(1),
            queue: Mutex::new(VecDeque::new()),
            close_notify: Notify::new(),
            ready: Notify::new(),
        }
    }

    /// Asks the session to close with `code`. The first code asked for wins.
    pub fn close(&self, code: u16) {
        self.close_with(code, CloseReason::Default);
    }

    /// Asks the session to close with `code` and a reason. The first request wins.
    pub fn close_with(&self, code: u16, reason: CloseReason) {
        let packed = u32::from(code) | (u32::from(reason as u8) << 16);
        if self
            .code
            .compare_exchange(0, packed, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // notify_one keeps a permit if the session is not waiting right now.
            self.close_notify.notify_one();
        }
    }

    /// Resolves when a close was asked for, with its code and reason.
    pub async fn closed(&self) -> (u16, CloseReason) {
        loop {
            let packed = self.code.load(Ordering::Acquire);
            if packed != 0 {
                return (packed as u16, CloseReason::from_u8((packed >> 16) as u8));
            }
            self.close_notify.notified().await;
        }
    }

    /// Records whether the session is at its subscription limit (it then refuses a
    /// server subscribe, which the server API's count must not include).
    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::Release);
    }

    /// Whether the session is at its subscription limit.
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    /// Records when the session's current token was issued.
    pub fn set_token_iat(&self, iat: u64) {
        self.token_iat.store(iat, Ordering::Release);
    }

    /// When the session's current token was issued (unix seconds).
    pub fn token_iat(&self) -> u64 {
        self.token_iat.load(Ordering::Acquire)
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Outbound>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an item without waiting.
    pub fn offer(&self, item: Outbound) -> Result<(), Refused> {
        if self.gone.load(Ordering::Acquire) {
            return Err(Refused::Gone);
        }
        {
            let mut queue = self.queue();
            if queue.len() >= self.capacity {
                return Err(Refused::Full);
            }
            queue.push_back(item);
        }
        self.ready.notify_one();
        Ok(())
    }

    /// Queues an ephemeral item without waiting, only while the queue is less than half
    /// full: the other half stays for the channel's ordinary messages, so a burst of
    /// droppable items never turns a session into a slow consumer on its own.
    pub fn offer_droppable(&self, item: Outbound) -> Result<(), Refused> {
        if self.gone.load(Ordering::Acquire) {
            return Err(Refused::Gone);
        }
        {
            let mut queue = self.queue();
            if queue.len() >= self.capacity.div_ceil(2) {
                return Err(Refused::Full);
            }
            queue.push_back(item);
        }
        self.ready.notify_one();
        Ok(())
    }

    /// Waits for the next item (the session's task only).
    pub async fn next(&self) -> Outbound {
        loop {
            if let Some(item) = self.try_next() {
                return item;
            }
            self.ready.notified().await;
        }
    }

    /// The next item, if one is queued.
    pub fn try_next(&self) -> Option<Outbound> {
        let mut queue = self.queue();
        let item = queue.pop_front();
        if queue.is_empty() && queue.capacity() > KEEP_SLOTS {
            // A burst is over: give its memory back.
            queue.shrink_to(KEEP_SLOTS);
        }
        item
    }

    /// Moves up to `max` queued items, oldest first, to the back of `into`, under one
    /// lock: a session drains a burst with one lock per batch, not per message. When
    /// the whole queue fits and `into` is empty the two buffers are swapped, so neither
    /// copies nor allocates; either gives memory back beyond [`KEEP_SLOTS`].
    pub fn take_batch(&self, into: &mut VecDeque<Outbound>, max: usize) {
        let mut queue = self.queue();
        if into.is_empty() && queue.len() <= max {
            std::mem::swap(&mut *queue, into);
        } else {
            let n = queue.len().min(max.saturating_sub(into.len()));
            into.extend(queue.drain(..n));
        }
        if queue.is_empty() && queue.capacity() > KEEP_SLOTS {
            queue.shrink_to(KEEP_SLOTS);
        }
    }

    /// Waits until an item is queued (the session's task only); takes nothing.
    pub async fn ready(&self) {
        while self.queue().is_empty() {
            self.ready.notified().await;
        }
    }

    /// The session ended: refuse and drop whatever comes.
    pub fn end(&self) {
        self.gone.store(true, Ordering::Release);
        *self.queue() = VecDeque::new();
    }
}

/// The hub's handle on one session.
pub type SessionHandle = Arc<SessionControl>;

/// The bounds of the repair buffers, and what all of them hold now.
struct RepairBudget {
    /// Bytes held by every [`RepairBuffer`] of the node.
    used: AtomicUsize,
    channel_limit: usize,
    node_limit: usize,
}

/// The live publications a channel receives while its gap is repaired, kept in order
/// until the repair delivers them after the history it read. Bounded: a repair may
/// wait up to [`REPAIR_RETRY_WINDOW`] for history while a busy channel keeps
/// publishing. A publication over the bounds is not kept, and the buffer remembers
/// that: when the repair is done the hub checks the channel against the broker again,
/// which repairs what was refused from history (or resyncs if history lost it). Never
/// silent, never unbounded.
struct RepairBuffer {
    items: Vec<Publication>,
    bytes: usize,
    /// Some publication was refused: check the channel again after the repair.
    overflowed: bool,
    budget: Arc<RepairBudget>,
}

impl RepairBuffer {
    fn new(budget: &Arc<RepairBudget>) -> Self {
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
    fn push(&mut self, p: Publication) -> bool {
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
    fn finish(mut self) -> (Vec<Publication>, bool) {
        (std::mem::take(&mut self.items), self.overflowed)
    }
}

impl Drop for RepairBuffer {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The node's broker subscription of a channel.
enum Subscription {
    /// Not asked yet, or the last request failed.
    None,
    /// Asked: every session joining meanwhile waits for the same answer.
    Pending(Shared<SubscribeAck>),
    /// Confirmed: later joins need not wait. The shared request is dropped then, since
    /// it kept about 200 bytes per channel for good, and most channels are one
    /// session's personal channel.
    Live,
}

struct ChannelEntry {
    name: Arc<str>,
    sessions: HashMap<SessionId, SessionHandle>,
    /// The node's broker subscription of the channel.
    subscription: Subscription,
    /// Bumped on every join: a delayed unsubscribe only applies to its own generation.
    generation: u64,
    continuity: Continuity,
    /// While a gap is being repaired: publications that arrived meanwhile. Boxed: it
    /// is rare, and the entry's size counts once per channel (most channels are one
    /// idle session's personal channel).
    repairing: Option<Box<RepairBuffer>>,
    /// The sessions as one shared list, rebuilt on the first delivery after a join or
    /// leave (copy on write): a delivery takes it under the shard lock in O(1) and
    /// offers outside the lock.
    snapshot: Option<Arc<[SessionHandle]>>,
    /// The channel's ordered delivery queue (see [`Outlet`]), made at the first
    /// delivery: an idle connection's personal channel never needs one.
    outlet: Option<Arc<Outlet>>,
}

impl ChannelEntry {
    fn new(name: Arc<str>) -> Self {
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
    fn push(&mut self, item: Pending) -> Option<Arc<Outlet>> {
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
enum Pending {
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
struct Outlet {
    channel: Arc<str>,
    state: Mutex<OutletState>,
}

#[derive(Default)]
struct OutletState {
    queue: VecDeque<(Arc<[SessionHandle]>, Pending)>,
    /// Someone is delivering this channel's items now.
    draining: bool,
}

impl Outlet {
    fn lock(&self) -> MutexGuard<'_, OutletState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next item; `None` ends the caller's turn as the drainer.
    fn pop(&self) -> Option<(Arc<[SessionHandle]>, Pending)> {
        let mut state = self.lock();
        let next = state.queue.pop_front();
        if next.is_none() {
            state.draining = false;
        }
        next
    }
}

/// Fan-outs to more sessions than this are split into chunks offered in parallel on the
/// runtime's workers.
const PARALLEL_FANOUT: usize = 1024;
/// The smallest chunk of a parallel fan-out: smaller ones cost more to schedule than
/// they save.
const MIN_CHUNK: usize = 512;

#[derive(Default)]
struct HubShard {
    channels: HashMap<Arc<str>, ChannelEntry>,
}

/// The hub. See the module doc.
pub struct Hub {
    shards: Box<[Mutex<HubShard>]>,
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
    unsubscribe_delay: Duration,
    repair_limit: usize,
    /// Bounds of the buffers of running repairs.
    repair_budget: Arc<RepairBudget>,
    /// Channels whose last session left: (deadline, channel, generation), in deadline order.
    reap_queue: Mutex<VecDeque<(Instant, Arc<str>, u64)>>,
    /// Local sessions by user, for the server API's user commands.
    pub users: UserIndex,
    /// Revoked tokens, checked at hello and refresh.
    pub revocations: Revocations,
}

impl Hub {
    /// A hub over `broker`. `repair_limit` bounds one history read when repairing a
    /// gap. Start consuming the broker's events with [`Hub::consume`].
    pub fn new(
        metrics: Arc<Metrics>,
        broker: Arc<dyn Broker>,
        unsubscribe_delay: Duration,
        repair_limit: usize,
    ) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            broker,
            metrics,
            unsubscribe_delay,
            repair_limit,
            repair_budget: Arc::new(RepairBudget {
                used: AtomicUsize::new(0),
                channel_limit: REPAIR_BUFFER_CHANNEL_BYTES,
                node_limit: REPAIR_BUFFER_NODE_BYTES,
            }),
            reap_queue: Mutex::default(),
            users: UserIndex::default(),
            revocations: Revocations::default(),
        }
    }

    /// Whether any local session is in `channel`.
    fn has_sessions(&self, channel: &str) -> bool {
        self.shard(channel)
            .channels
            .get(channel)
            .is_some_and(|e| !e.sessions.is_empty())
    }

    /// Whether session `id` is in `channel` (or joining it).
    fn is_member(&self, channel: &str, id: SessionId) -> bool {
        self.shard(channel)
            .channels
            .get(channel)
            .is_some_and(|e| e.sessions.contains_key(&id))
    }

    /// Applies a server API command to the local sessions of `user`; returns how many
    /// it affected. Closes are requested at once; joins and leaves go through the
    /// sessions' queues, since only a session's own task changes its channels.
    pub fn on_user_command(&self, user: &str, command: &UserCommand) -> u64 {
        match command {
            UserCommand::Disconnect { reconnect } => {
                let (code, reason) = if *reconnect {
                    (CloseCode::Unauthorized, CloseReason::Disconnected)
                } else {
                    (CloseCode::Kicked, CloseReason::Default)
                };
                self.users.for_each(user, |_, h| {
                    h.close_with(code.code(), reason);
                    true
                })
            }
            UserCommand::Revoke { before, until } => {
                // Recorded before the scan: see the race note in `control`.
                self.revocations
                    .insert(user, *before, *until, crate::auth::now_secs());
                self.users.for_each(user, |_, h| {
                    let revoked = h.token_iat() < *before;
                    if revoked {
                        h.close_with(CloseCode::Unauthorized.code(), CloseReason::TokenRevoked);
                    }
                    revoked
                })
            }
            UserCommand::Subscribe { channel } | UserCommand::Unsubscribe { channel } => {
                let joining = matches!(command, UserCommand::Subscribe { .. });
                let item = Arc::new(command.clone());
                self.users.for_each(user, |id, h| {
                    // Only sessions the command changes count: a session at its
                    // subscription limit will not join.
                    let member = self.is_member(channel, id);
                    let changes = member != joining && !(joining && h.is_full());
                    // A session already in the channel (its own subscribe) still gets a
                    // server subscribe: from now on the backend holds the membership,
                    // and a refreshed token without the channel must not take it away.
                    if changes || joining {
                        self.offer(h, Outbound::Control(Arc::clone(&item)));
                    }
                    changes
                })
            }
        }
    }

    /// Loads the broker's revocations, retrying for a while when the broker does not
    /// answer (it may still be connecting). Run at start and after every resubscribe,
    /// which also covers a broker that was down for longer than the retries.
    ///
    /// A revocation this node missed (cut off from the broker when it was made) also
    /// closes the local sessions whose token it refuses, as the command would have:
    /// refusing only new hellos would leave those sessions open until their `exp`.
    pub async fn load_revocations(self: Arc<Self>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut delay = Duration::from_millis(100);
        loop {
            match self.broker().revocations().await {
                Ok(list) => {
                    let now = crate::auth::now_secs();
                    // Recorded before the scan: see the race note in `control`.
                    self.revocations.load(list.clone(), now);
                    for r in list.iter().filter(|r| r.until > now) {
                        let closed = self.users.for_each(&r.user, |_, h| {
                            let revoked = h.token_iat() < r.before;
                            if revoked {
                                h.close_with(
                                    CloseCode::Unauthorized.code(),
                                    CloseReason::TokenRevoked,
                                );
                            }
                            revoked
                        });
                        if closed > 0 {
                            tracing::info!(user = %r.user, sessions = closed, "missed revocation applied");
                        }
                    }
                    return;
                }
                Err(e) if Instant::now() + delay > deadline => {
                    tracing::warn!(error = %e, "could not load revocations; next try after a broker reconnect");
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not load revocations; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Consumes the broker's events (publications, resubscribes, user commands) in a
    /// task, in the order the broker sent them, until the broker closes the stream.
    ///
    /// The task holds the hub weakly: the hub owns the broker and the broker owns the
    /// stream's sender, so a strong reference here would keep all three alive forever.
    /// Dropping the hub (and the node) drops the broker, whose `Drop` stops its tasks and
    /// closes the stream, which ends this task.
    pub fn consume(hub: &Arc<Hub>, mut events: BrokerEvents) -> JoinHandle<()> {
        let hub = Arc::downgrade(hub);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(EVENT_BATCH);
            while events.recv_many(&mut batch, EVENT_BATCH).await > 0 {
                let Some(hub) = hub.upgrade() else { return };
                for event in batch.drain(..) {
                    hub.on_event(event);
                }
            }
        })
    }

    /// Handles one broker event. Never blocks: deliveries are offered without waiting,
    /// and anything that needs the broker runs in its own task.
    fn on_event(self: &Arc<Self>, event: BrokerEvent) {
        match event {
            BrokerEvent::Publication {
                channel,
                publication,
            } => self.on_publication(&channel, publication),
            BrokerEvent::Resubscribed => {
                for channel in self.channels() {
                    tokio::spawn(Arc::clone(self).check_continuity(channel));
                }
                // A revocation sent while this node was cut off was missed: load them again.
                tokio::spawn(Arc::clone(self).load_revocations());
            }
            BrokerEvent::UserCommand {
                user,
                command,
                reply,
            } => {
                let _ = reply.send(self.on_user_command(&user, &command));
            }
            BrokerEvent::Ephemeral { channel, message } => {
                self.fan_out_ephemeral(&channel, message);
            }
        }
    }

    /// A publication on a channel this node subscribed to, in the broker's order.
    fn on_publication(self: &Arc<Self>, channel: &str, p: Publication) {
        self.metrics.broker_messages_received.inc();
        let outlet = {
            let mut shard = self.shard(channel);
            let Some(entry) = shard.channels.get_mut(channel) else {
                return;
            };
            let arrival =
                entry
                    .continuity
                    .on_publication(entry.repairing.is_some(), &p.epoch, p.offset);
            match arrival {
                Arrival::Duplicate => return,
                Arrival::Buffer => return self.buffer_during_repair(entry, p),
                Arrival::Gap { epoch, from } => {
                    self.start_repair(entry, epoch, from, None);
                    return self.buffer_during_repair(entry, p);
                }
                Arrival::Deliver => self.dispatch(entry, p),
            }
        };
        if let Some(outlet) = outlet {
            self.drain(outlet);
        }
    }

    /// Keeps a live publication for the repair in progress, within the buffer bounds
    /// (a refusal is counted; the repair's end reads it from history). Only called
    /// while a repair runs: `start_repair` creates the buffer that the repair drains.
    fn buffer_during_repair(&self, entry: &mut ChannelEntry, p: Publication) {
        let Some(buffer) = entry.repairing.as_mut() else {
            debug_assert!(false, "buffering with no repair in progress");
            return;
        };
        if !buffer.push(p) {
            self.metrics.repair_buffer_overflows.inc();
        }
    }

    fn shard(&self, channel: &str) -> MutexGuard<'_, HubShard> {
        let mut h = DefaultHasher::new();
        channel.hash(&mut h);
        self.shards[(h.finish() as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a session to a channel; resolves once the node's broker subscription is live,
    /// so that every publication after this returns reaches the session.
    pub async fn join(
        &self,
        channel: &str,
        id: SessionId,
        handle: SessionHandle,
    ) -> Result<(), BrokerError> {
        let ack = {
            let mut shard = self.shard(channel);
            let entry = match shard.channels.get_mut(channel) {
                Some(entry) => entry,
                None => {
                    self.metrics.broker_channels.inc();
                    // One allocation of the name, shared by the key and the entry.
                    let name: Arc<str> = Arc::from(channel);
                    shard
                        .channels
                        .entry(Arc::clone(&name))
                        .or_insert(ChannelEntry::new(name))
                }
            };
            entry.sessions.insert(id, handle);
            entry.snapshot = None;
            entry.generation += 1;
            match &entry.subscription {
                Subscription::Live => return Ok(()),
                Subscription::Pending(ack) => ack.clone(),
                Subscription::None => {
                    let ack = self.broker().subscribe(channel).shared();
                    entry.subscription = Subscription::Pending(ack.clone());
                    ack
                }
            }
        };
        let result = ack.clone().await;
        let mut shard = self.shard(channel);
        let Some(entry) = shard.channels.get_mut(channel) else {
            return result;
        };
        // Only the request this join waited for: the entry may have been dropped and
        // made again meanwhile, with a request of its own.
        let ours = matches!(&entry.subscription, Subscription::Pending(a) if a.ptr_eq(&ack));
        match result {
            Ok(()) => {
                if ours {
                    entry.subscription = Subscription::Live;
                }
                Ok(())
            }
            Err(e) => {
                entry.sessions.remove(&id);
                entry.snapshot = None;
                // Forget the failed request so that the next join asks the broker again.
                if ours {
                    entry.subscription = Subscription::None;
                }
                if entry.sessions.is_empty() {
                    shard.channels.remove(channel);
                    self.metrics.broker_channels.dec();
                    self.broker().unsubscribe(channel);
                }
                Err(e)
            }
        }
    }

    /// Tells the hub where a session found the channel when it joined (from `position`
    /// or `history`). Until the first dispatch, the lowest such position is where the
    /// node's continuity check starts.
    pub fn seed(&self, channel: &str, position: &StreamPosition) {
        let mut shard = self.shard(channel);
        if let Some(entry) = shard.channels.get_mut(channel) {
            entry.continuity.seed(position);
        }
    }

    /// Removes a session from a channel. When it was the last one, the broker
    /// subscription is dropped after the unsubscribe delay.
    pub fn leave(&self, channel: &str, id: SessionId) {
        let mut shard = self.shard(channel);
        if let Some(entry) = shard.channels.get_mut(channel) {
            let removed = entry.sessions.remove(&id).is_some();
            if removed {
                entry.snapshot = None;
            }
            if removed && entry.sessions.is_empty() {
                let item = (
                    Instant::now() + self.unsubscribe_delay,
                    entry.name.clone(),
                    entry.generation,
                );
                drop(shard);
                self.reap_queue
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_back(item);
            }
        }
    }

    /// Drops broker subscriptions whose delay has passed and that no session rejoined.
    /// The node calls this periodically.
    pub fn reap(&self) {
        let now = Instant::now();
        loop {
            let item = {
                let mut queue = self.reap_queue.lock().unwrap_or_else(|e| e.into_inner());
                match queue.front() {
                    Some((deadline, _, _)) if *deadline <= now => queue.pop_front(),
                    _ => None,
                }
            };
            let Some((_, channel, generation)) = item else {
                break;
            };
            let mut shard = self.shard(&channel);
            let stale = shard
                .channels
                .get(&channel)
                .is_some_and(|e| e.sessions.is_empty() && e.generation == generation);
            if stale {
                shard.channels.remove(&channel);
                self.metrics.broker_channels.dec();
                // Under the shard lock, so a concurrent join's subscribe is queued after it.
                self.broker().unsubscribe(&channel);
            }
        }
    }

    /// Channels this node is subscribed to.
    pub fn channels(&self) -> Vec<Arc<str>> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(shard.channels.keys().cloned());
        }
        out
    }

    /// Delivers what the outlet holds, as its one drainer, until it is empty. Small
    /// fan-outs run right here; the first big one hands the rest of the turn to a task
    /// that splits it over the runtime's workers.
    fn drain(self: &Arc<Self>, outlet: Arc<Outlet>) {
        while let Some((sessions, item)) = outlet.pop() {
            if sessions.len() > PARALLEL_FANOUT {
                let hub = Arc::clone(self);
                tokio::spawn(async move { hub.drain_parallel(outlet, sessions, item).await });
                return;
            }
            let item = self.outbound(&outlet.channel, item);
            offer_all(&self.metrics, &sessions, &item);
        }
    }

    /// [`Hub::drain`] for a turn that met a big fan-out: each big item is offered in
    /// chunks on every worker, and the next item starts once all chunks are done.
    async fn drain_parallel(
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
                offer_all(&self.metrics, &sessions, &item);
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
                    offer_all(&metrics, &sessions[start..end], &item);
                });
            }
            // This task takes the first chunk itself.
            offer_all(&self.metrics, &sessions[..chunk], &item);
            while chunks.join_next().await.is_some() {}
        }
    }

    /// Turns a queued item into what sessions receive (a publication is encoded here,
    /// once for every recipient, outside every lock).
    fn outbound(&self, channel: &Arc<str>, item: Pending) -> Outbound {
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
    /// queue (half full, see [`SessionControl::offer_droppable`]) drops it instead of
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

    fn offer(&self, handle: &SessionHandle, item: Outbound) {
        offer(&self.metrics, handle, item);
    }

    /// Queues a `resync` to `position` for every session of the entry.
    fn resync_all(
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

    /// Queues a publication that is next in line (continuity already checked).
    fn dispatch(&self, entry: &mut ChannelEntry, p: Publication) -> Option<Arc<Outlet>> {
        entry.continuity = Continuity::Dispatched(p.epoch.clone(), p.offset);
        entry.push(Pending::Publication(p))
    }

    /// Starts repairing a channel from `from` (the last offset known good); `target`
    /// is where the stream is known to stand, if known.
    fn start_repair(
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

    async fn repair(
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
    fn finish_repair(
        self: Arc<Self>,
        channel: Arc<str>,
        epoch: Arc<str>,
        from: u64,
        target: Option<StreamPosition>,
        history: Result<History, BrokerError>,
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
    async fn history_for_repair(&self, channel: &str, from: u64) -> Result<History, BrokerError> {
        let deadline = Instant::now() + REPAIR_RETRY_WINDOW;
        let mut delay = Duration::from_millis(50);
        loop {
            match self
                .broker()
                .history(channel, from, self.repair_limit)
                .await
            {
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
    async fn check_continuity(self: Arc<Self>, channel: Arc<str>) {
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
            match self.broker().position(&channel).await {
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

/// Offers `item` to each session, without waiting.
fn offer_all(metrics: &Metrics, sessions: &[SessionHandle], item: &Outbound) {
    for handle in sessions {
        offer(metrics, handle, item.clone());
    }
}

fn offer(metrics: &Metrics, handle: &SessionHandle, item: Outbound) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::config::Config;

    fn hub() -> (Arc<Hub>, JoinHandle<()>) {
        hub_with(|hub| hub)
    }

    /// A hub on a memory broker, changed by `setup` before it starts.
    fn hub_with(setup: impl FnOnce(Hub) -> Hub) -> (Arc<Hub>, JoinHandle<()>) {
        let broker = Arc::new(MemoryBroker::new(Config::default().broker_settings()));
        let events = broker.events().expect("events");
        let hub = Arc::new(setup(Hub::new(
            Arc::new(Metrics::new()),
            broker,
            Duration::from_millis(10),
            100,
        )));
        let consumer = Hub::consume(&hub, events);
        (hub, consumer)
    }

    /// Once the broker confirmed a channel's subscription, the entry keeps only that
    /// fact (not the shared request, ~200 bytes per channel), and later joins return
    /// without asking or waiting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_confirmed_subscription_is_kept_as_a_fact() {
        let (hub, _consumer) = hub();
        let live = |hub: &Hub| {
            matches!(
                hub.shard("c").channels["c"].subscription,
                Subscription::Live
            )
        };
        hub.join("c", 1, Arc::new(SessionControl::new(10)))
            .await
            .expect("join");
        assert!(live(&hub));
        hub.join("c", 2, Arc::new(SessionControl::new(10)))
            .await
            .expect("join");
        assert!(live(&hub));
        assert_eq!(hub.shard("c").channels["c"].sessions.len(), 2);
        // The last session leaves and the entry is reaped: a new join asks again.
        hub.leave("c", 1);
        hub.leave("c", 2);
        tokio::time::sleep(Duration::from_millis(20)).await;
        hub.reap();
        assert!(!hub.shard("c").channels.contains_key("c"));
        hub.join("c", 3, Arc::new(SessionControl::new(10)))
            .await
            .expect("join");
        assert!(live(&hub));
    }

    /// A repair's buffer holds what its bounds allow; what it refuses is read from
    /// history once the repair is done, even with no later message on the channel. So
    /// the bound costs a history read, never a message: the session gets every offset
    /// once, in order, and the budget is released.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_repair_buffer_loses_nothing() {
        // Ten publications of data "1" fill a channel's buffer.
        let one = buffered_size(&Publication {
            offset: 1,
            epoch: "e".into(),
            data: "1".into(),
            from: None,
        });
        let (hub, _consumer) = hub_with(|mut hub| {
            hub.repair_budget = Arc::new(RepairBudget {
                used: AtomicUsize::new(0),
                channel_limit: 10 * one,
                node_limit: 1 << 20,
            });
            hub
        });
        let a = Arc::new(SessionControl::new(1_000));
        hub.join("c", 1, Arc::clone(&a)).await.expect("join");
        let first = hub.broker().publish("c", "1", None).await.expect("publish");
        wait_until("first delivery", || a.queue().len() == 1).await;
        assert_eq!(offsets(&a), vec![1]);
        let received = || hub.metrics.broker_messages_received.get();

        // A repair from offset 1 is running: live publications are buffered.
        {
            let mut shard = hub.shard("c");
            let entry = shard.channels.get_mut("c").expect("entry");
            entry.repairing = Some(Box::new(RepairBuffer::new(&hub.repair_budget)));
        }
        for _ in 2..=11 {
            hub.broker().publish("c", "1", None).await.expect("publish");
        }
        wait_until("10 buffered", || received() == 11).await;
        // The repair's history read happens here: it sees offsets 2..=11.
        let history = hub.broker().history("c", 1, 100).await.expect("history");
        assert_eq!(history.position.offset, 11);
        // The buffer is full: 30 more are refused (and the session gets nothing yet).
        for _ in 12..=41 {
            hub.broker().publish("c", "1", None).await.expect("publish");
        }
        wait_until("all seen by the hub", || received() == 41).await;
        {
            let shard = hub.shard("c");
            let buffer = shard.channels["c"].repairing.as_ref().expect("repairing");
            assert_eq!(buffer.items.len(), 10, "bounded");
            assert!(buffer.overflowed);
            assert_eq!(hub.repair_budget.used.load(Ordering::Acquire), 10 * one);
        }
        assert_eq!(hub.metrics.repair_buffer_overflows.get(), 30);
        // Once one was refused, even one that would fit is refused: no hole.
        {
            let mut shard = hub.shard("c");
            let buffer = shard
                .channels
                .get_mut("c")
                .unwrap()
                .repairing
                .as_mut()
                .unwrap();
            assert!(!buffer.push(Publication {
                offset: 42,
                epoch: first.epoch.as_str().into(),
                data: "".into(),
                from: None,
            }));
        }
        assert!(
            a.try_next().is_none(),
            "nothing delivered during the repair"
        );

        // The repair ends with its (older) history; the check that follows repairs the
        // refused ones from history.
        Arc::clone(&hub).finish_repair(
            "c".into(),
            first.epoch.as_str().into(),
            1,
            None,
            Ok(history),
        );
        let mut got = Vec::new();
        wait_until("every offset", || {
            got.extend(offsets(&a));
            got.len() >= 40
        })
        .await;
        assert_eq!(got, (2..=41).collect::<Vec<_>>());
        assert_eq!(
            hub.repair_budget.used.load(Ordering::Acquire),
            0,
            "released"
        );
        assert!(hub.shard("c").channels["c"].repairing.is_none());
    }

    /// Offsets queued in a session's mailbox for `channel`, in queue order.
    fn offsets(handle: &SessionControl) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(item) = handle.try_next() {
            if let Outbound::Message(d) = item {
                out.push(d.offset);
            }
        }
        out
    }

    async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check() {
            assert!(Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A fan-out big enough to run in parallel chunks keeps every session's order: a
    /// later message never overtakes an earlier one, and nothing is lost or doubled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn parallel_fan_out_keeps_per_session_order() {
        let (hub, _consumer) = hub();
        let sessions: Vec<SessionHandle> = (0..3 * PARALLEL_FANOUT as u64)
            .map(|_| Arc::new(SessionControl::new(1_000)))
            .collect();
        for (id, handle) in sessions.iter().enumerate() {
            hub.join("big", id as u64, Arc::clone(handle))
                .await
                .expect("join");
        }
        // A small channel alongside, published in between.
        let small = Arc::new(SessionControl::new(1_000));
        hub.join("small", u64::MAX, Arc::clone(&small))
            .await
            .expect("join");
        const N: u64 = 60;
        for i in 0..N {
            hub.broker()
                .publish("big", "1", None)
                .await
                .expect("publish");
            if i % 3 == 0 {
                hub.broker()
                    .publish("small", "1", None)
                    .await
                    .expect("publish");
            }
        }
        let last = &sessions[sessions.len() - 1];
        wait_until("every delivery", || last.queue().len() as u64 == N).await;
        // Every chunk of the last item is done before the drainer stops.
        wait_until("drained", || {
            sessions.iter().all(|s| s.queue().len() as u64 == N)
        })
        .await;
        for s in &sessions {
            assert_eq!(offsets(s), (1..=N).collect::<Vec<_>>());
        }
        assert_eq!(offsets(&small), (1..=N.div_ceil(3)).collect::<Vec<_>>());
    }

    /// Delivering offers outside the shard lock: while a channel's outlet is busy, the
    /// shard (and so every other channel in it) stays free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_outlet_holds_no_shard_lock() {
        let (hub, _consumer) = hub();
        let a = Arc::new(SessionControl::new(10));
        hub.join("c", 1, Arc::clone(&a)).await.expect("join");
        assert!(hub.shard("c").channels["c"].outlet.is_none(), "made lazily");
        hub.broker().publish("c", "1", None).await.expect("publish");
        wait_until("first delivery", || a.queue().len() == 1).await;
        assert_eq!(offsets(&a), vec![1]);
        // Take the channel's outlet as if a drainer were mid-delivery.
        let outlet = hub.shard("c").channels["c"].outlet.clone().expect("outlet");
        outlet.lock().draining = true;
        hub.broker().publish("c", "2", None).await.expect("publish");
        // The publication is decided and queued; the shard lock is free meanwhile.
        wait_until("queued in the outlet", || outlet.lock().queue.len() == 1).await;
        assert!(hub.has_sessions("c"), "shard lock not held");
        assert!(
            a.try_next().is_none(),
            "not delivered while the outlet is busy"
        );
        // The busy drainer finishes its turn and delivers what was queued, in order.
        outlet.lock().draining = false;
        let pending = outlet.lock().queue.len();
        assert_eq!(pending, 1);
        outlet.lock().draining = true;
        hub.drain(outlet);
        assert_eq!(offsets(&a), vec![2]);
    }

    /// No reference cycle: dropping the hub drops the broker, which closes the event
    /// stream, which ends the consumer task.
    #[tokio::test]
    async fn dropping_the_hub_ends_the_consumer() {
        let (hub, consumer) = hub();
        let a = Arc::new(SessionControl::new(10));
        hub.join("c", 1, Arc::clone(&a)).await.expect("join");
        drop(hub);
        tokio::time::timeout(Duration::from_secs(5), consumer)
            .await
            .expect("the consumer ends once the hub and its broker are gone")
            .expect("no panic");
    }

    fn ephemeral() -> Outbound {
        Outbound::Ephemeral(Arc::new(EphemeralDelivery {
            channel: "room:1".into(),
            frame: Utf8Bytes::from_static("{}"),
        }))
    }

    #[test]
    fn droppable_items_fill_half_the_queue_and_never_close() {
        let queue = SessionControl::new(8);
        for _ in 0..4 {
            assert_eq!(queue.offer_droppable(ephemeral()), Ok(()));
        }
        assert_eq!(queue.offer_droppable(ephemeral()), Err(Refused::Full));
        // The other half stays for ordinary items.
        for _ in 0..4 {
            assert_eq!(queue.offer(ephemeral()), Ok(()));
        }
        assert_eq!(queue.offer(ephemeral()), Err(Refused::Full));
        // Refusing a droppable item asks for no close.
        assert_eq!(queue.code.load(Ordering::Acquire), 0);
        while queue.try_next().is_some() {}
        assert_eq!(queue.offer_droppable(ephemeral()), Ok(()));
        queue.end();
        assert_eq!(queue.offer_droppable(ephemeral()), Err(Refused::Gone));
        // A queue of one still takes one droppable item.
        let tiny = SessionControl::new(1);
        assert_eq!(tiny.offer_droppable(ephemeral()), Ok(()));
        assert_eq!(tiny.offer_droppable(ephemeral()), Err(Refused::Full));
    }
}

#[cfg(test)]
mod mailbox_tests {
    use super::*;

    fn resync(n: u64) -> Outbound {
        Outbound::Resync(Box::new(("c".into(), StreamPosition::new(n, "e"))))
    }

    fn offsets(items: &VecDeque<Outbound>) -> Vec<u64> {
        items
            .iter()
            .map(|i| match i {
                Outbound::Resync(r) => r.1.offset,
                _ => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn take_batch_drains_in_order_within_the_bound() {
        let mailbox = SessionControl::new(100);
        for n in 1..=5 {
            mailbox.offer(resync(n)).unwrap();
        }
        let mut batch = VecDeque::new();
        // Everything fits: taken at once (the buffers are swapped).
        mailbox.take_batch(&mut batch, 8);
        assert_eq!(offsets(&batch), vec![1, 2, 3, 4, 5]);
        assert!(mailbox.try_next().is_none());
        batch.clear();
        // More than the bound: the oldest `max` first, the rest stays queued.
        for n in 6..=15 {
            mailbox.offer(resync(n)).unwrap();
        }
        mailbox.take_batch(&mut batch, 4);
        assert_eq!(offsets(&batch), vec![6, 7, 8, 9]);
        // A non-empty buffer is topped up to the bound, never past it.
        mailbox.take_batch(&mut batch, 6);
        assert_eq!(offsets(&batch), vec![6, 7, 8, 9, 10, 11]);
        batch.clear();
        mailbox.take_batch(&mut batch, 64);
        assert_eq!(offsets(&batch), vec![12, 13, 14, 15]);
        batch.clear();
        mailbox.take_batch(&mut batch, 64);
        assert!(batch.is_empty());
    }

    #[test]
    fn a_drained_burst_gives_its_memory_back() {
        let mailbox = SessionControl::new(1000);
        for n in 0..500 {
            mailbox.offer(resync(n)).unwrap();
        }
        let mut batch = VecDeque::new();
        while {
            batch.clear();
            mailbox.take_batch(&mut batch, 64);
            !batch.is_empty()
        } {}
        assert!(mailbox.queue().capacity() <= KEEP_SLOTS);
    }

    #[tokio::test]
    async fn ready_waits_for_an_item_and_takes_nothing() {
        let mailbox = Arc::new(SessionControl::new(10));
        let waiter = {
            let mailbox = mailbox.clone();
            tokio::spawn(async move { mailbox.ready().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        mailbox.offer(resync(1)).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("ready resolves")
            .unwrap();
        // Still queued: ready() only waits.
        mailbox.ready().await;
        assert!(mailbox.try_next().is_some());
    }
}
