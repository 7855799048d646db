//! The hub: which local session is in which channel, and the fan-out of publications.
//!
//! The hub owns three invariants:
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
//!
//! Locks are std `Mutex`es over shards of the channel map: no `.await` happens while one
//! is held, and sharding keeps fan-outs of different channels from contending.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures_util::future::{FutureExt, Shared};
use herald_protocol::frame::encode_message;
use herald_protocol::{same_stream, StreamPosition};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::broker::{
    Broker, BrokerError, History, Publication, PublicationSink, SubscribeAck, UserCommand,
};
use crate::control::{Revocations, UserIndex};
use crate::metrics::Metrics;
use herald_protocol::codes::CloseCode;

/// How long a gap repair keeps retrying an unavailable history read before it sends
/// `resync` (see `Hub::history_for_repair`).
const REPAIR_RETRY_WINDOW: Duration = Duration::from_secs(5);

const SHARDS: usize = 64;

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

/// What the hub puts into a session's queue. One word wide, so that a queue of
/// hundreds costs little; the rare resync is boxed.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A message to write.
    Message(Arc<Delivery>),
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

/// Where the hub stands in one channel's stream.
#[derive(Debug, Clone)]
enum Continuity {
    /// Nothing known yet.
    Unknown,
    /// Positions read by sessions at subscribe, before any dispatch: the lowest one.
    Seeded(Arc<str>, u64),
    /// The last publication dispatched.
    Dispatched(Arc<str>, u64),
}

impl Continuity {
    /// The (epoch, offset) known, if any.
    fn position(&self) -> Option<(Arc<str>, u64)> {
        match self {
            Continuity::Unknown => None,
            Continuity::Seeded(e, o) | Continuity::Dispatched(e, o) => Some((e.clone(), *o)),
        }
    }
}

struct ChannelEntry {
    name: Arc<str>,
    sessions: HashMap<SessionId, SessionHandle>,
    /// The broker subscription, shared by every session waiting for it.
    subscription: Option<Shared<SubscribeAck>>,
    /// Bumped on every join: a delayed unsubscribe only applies to its own generation.
    generation: u64,
    continuity: Continuity,
    /// While a gap is being repaired: publications that arrived meanwhile.
    repairing: Option<Vec<Publication>>,
}

#[derive(Default)]
struct HubShard {
    channels: HashMap<Arc<str>, ChannelEntry>,
}

/// The hub. See the module doc.
pub struct Hub {
    shards: Box<[Mutex<HubShard>]>,
    broker: OnceLock<Arc<dyn Broker>>,
    metrics: Arc<Metrics>,
    unsubscribe_delay: Duration,
    repair_limit: usize,
    /// Channels whose last session left: (deadline, channel, generation), in deadline order.
    reap_queue: Mutex<VecDeque<(Instant, Arc<str>, u64)>>,
    /// Local sessions by user, for the server API's user commands.
    pub users: UserIndex,
    /// Revoked tokens, checked at hello and refresh.
    pub revocations: Revocations,
}

impl Hub {
    /// A hub. `repair_limit` bounds one history read when repairing a gap.
    pub fn new(metrics: Arc<Metrics>, unsubscribe_delay: Duration, repair_limit: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            broker: OnceLock::new(),
            metrics,
            unsubscribe_delay,
            repair_limit,
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

    /// Connects the hub to its broker. Called once, before any session.
    pub fn attach(&self, broker: Arc<dyn Broker>) {
        let _ = self.broker.set(broker);
    }

    fn broker(&self) -> &Arc<dyn Broker> {
        self.broker.get().expect("hub attached to a broker")
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
            let entry = shard.channels.entry(Arc::from(channel)).or_insert_with(|| {
                self.metrics.broker_channels.inc();
                ChannelEntry {
                    name: Arc::from(channel),
                    sessions: HashMap::new(),
                    subscription: None,
                    generation: 0,
                    continuity: Continuity::Unknown,
                    repairing: None,
                }
            });
            entry.sessions.insert(id, handle);
            entry.generation += 1;
            entry
                .subscription
                .get_or_insert_with(|| self.broker().subscribe(channel).shared())
                .clone()
        };
        if let Err(e) = ack.await {
            let mut shard = self.shard(channel);
            if let Some(entry) = shard.channels.get_mut(channel) {
                entry.sessions.remove(&id);
                // Forget the failed request so that the next join asks the broker again.
                entry.subscription = None;
                if entry.sessions.is_empty() {
                    shard.channels.remove(channel);
                    self.metrics.broker_channels.dec();
                    self.broker().unsubscribe(channel);
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// Tells the hub where a session found the channel when it joined (from `position`
    /// or `history`). Until the first dispatch, the lowest such position is where the
    /// node's continuity check starts.
    pub fn seed(&self, channel: &str, position: &StreamPosition) {
        let mut shard = self.shard(channel);
        if let Some(entry) = shard.channels.get_mut(channel) {
            let lower = match &entry.continuity {
                Continuity::Unknown => true,
                Continuity::Seeded(epoch, offset) => {
                    !same_stream(*offset, epoch, &position.epoch) || position.offset < *offset
                }
                Continuity::Dispatched(..) => false,
            };
            if lower {
                entry.continuity =
                    Continuity::Seeded(position.epoch.as_str().into(), position.offset);
            }
        }
    }

    /// Removes a session from a channel. When it was the last one, the broker
    /// subscription is dropped after the unsubscribe delay.
    pub fn leave(&self, channel: &str, id: SessionId) {
        let mut shard = self.shard(channel);
        if let Some(entry) = shard.channels.get_mut(channel) {
            if entry.sessions.remove(&id).is_some() && entry.sessions.is_empty() {
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

    /// Offers one encoded publication to every session of the entry.
    fn fan_out(&self, entry: &ChannelEntry, p: &Publication) {
        if entry.sessions.is_empty() {
            return;
        }
        let frame = Utf8Bytes::from(encode_message(
            &entry.name,
            p.offset,
            &p.epoch,
            p.from.as_deref(),
            &p.data,
        ));
        let delivery = Arc::new(Delivery {
            channel: entry.name.clone(),
            offset: p.offset,
            epoch: p.epoch.clone(),
            frame,
        });
        for handle in entry.sessions.values() {
            self.offer(handle, Outbound::Message(delivery.clone()));
        }
    }

    fn offer(&self, handle: &SessionHandle, item: Outbound) {
        match handle.offer(item) {
            Ok(()) => {}
            Err(Refused::Full) => {
                self.metrics.queue_drops.inc();
                handle.close(herald_protocol::codes::CloseCode::SlowConsumer.code());
            }
            // The session is gone and will leave the channel itself.
            Err(Refused::Gone) => {}
        }
    }

    fn resync_all(&self, entry: &ChannelEntry, position: StreamPosition) {
        // Rare and meaningful (clients must reload state): worth a log line.
        tracing::warn!(
            channel = %entry.name,
            offset = position.offset,
            epoch = %position.epoch,
            sessions = entry.sessions.len(),
            "continuity lost; sending resync"
        );
        self.metrics.resyncs.inc();
        for handle in entry.sessions.values() {
            self.offer(
                handle,
                Outbound::Resync(Box::new((entry.name.clone(), position.clone()))),
            );
        }
    }

    /// Dispatches a publication that is next in line (continuity already checked).
    fn dispatch(&self, entry: &mut ChannelEntry, p: &Publication) {
        entry.continuity = Continuity::Dispatched(p.epoch.clone(), p.offset);
        self.fan_out(entry, p);
    }

    /// Starts repairing a channel from `from` (the last offset known good).
    fn start_repair(self: &Arc<Self>, entry: &mut ChannelEntry, epoch: Arc<str>, from: u64) {
        if entry.repairing.is_some() {
            return;
        }
        entry.repairing = Some(Vec::new());
        let hub = Arc::clone(self);
        let channel = entry.name.clone();
        tokio::spawn(async move { hub.repair(channel, epoch, from).await });
    }

    async fn repair(self: Arc<Self>, channel: Arc<str>, epoch: Arc<str>, from: u64) {
        let history = self.history_for_repair(&channel, from).await;
        let mut shard = self.shard(&channel);
        let Some(entry) = shard.channels.get_mut(&channel) else {
            return;
        };
        let buffered = entry.repairing.take().unwrap_or_default();
        let mut last = from;
        let mut current_epoch = epoch;
        match history {
            Ok(h) if same_stream(from, &current_epoch, &h.position.epoch) => {
                // From offset 0 any epoch continues: repair in the history's.
                current_epoch = h.position.epoch.as_str().into();
                for p in &h.publications {
                    if *p.epoch == *current_epoch && p.offset == last + 1 {
                        self.dispatch(entry, p);
                        last = p.offset;
                    }
                }
                if h.position.offset > last {
                    // History no longer reaches back far enough.
                    let resume_at = h.position.offset;
                    self.resync_all(entry, StreamPosition::new(resume_at, &*current_epoch));
                    last = resume_at;
                    entry.continuity = Continuity::Dispatched(current_epoch.clone(), last);
                } else if last > from {
                    self.metrics.gaps_repaired.inc();
                }
            }
            Ok(h) => {
                // The epoch changed: the history we would repair from is gone.
                current_epoch = h.position.epoch.as_str().into();
                last = h.position.offset;
                self.resync_all(entry, h.position.clone());
                entry.continuity = Continuity::Dispatched(current_epoch.clone(), last);
            }
            Err(e) => {
                tracing::warn!(channel = %channel, error = %e, "gap repair failed; sending resync");
                self.metrics.broker_errors.inc();
            }
        }
        for p in buffered {
            if same_stream(last, &current_epoch, &p.epoch) {
                if p.offset <= last {
                    continue;
                }
                if p.offset > last + 1 {
                    self.resync_all(entry, StreamPosition::new(p.offset - 1, &*p.epoch));
                }
            }
            current_epoch = p.epoch.clone();
            last = p.offset;
            self.dispatch(entry, &p);
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
        let mut shard = self.shard(&channel);
        let Some(entry) = shard.channels.get_mut(&channel) else {
            return;
        };
        let Some((epoch, last)) = entry.continuity.position() else {
            return;
        };
        if before != Some((epoch.clone(), last)) {
            return;
        }
        if !same_stream(last, &epoch, &position.epoch) {
            self.resync_all(entry, position.clone());
            entry.continuity =
                Continuity::Dispatched(position.epoch.as_str().into(), position.offset);
        } else if position.offset > last {
            self.start_repair(entry, position.epoch.as_str().into(), last);
        }
    }
}

/// The hub as the broker's sink. `Arc<Hub>` because repairs run in their own tasks.
pub struct HubSink(pub Arc<Hub>);

impl PublicationSink for HubSink {
    fn on_publication(&self, channel: &str, p: Publication) {
        let hub = &self.0;
        hub.metrics.broker_messages_received.inc();
        let mut shard = hub.shard(channel);
        let Some(entry) = shard.channels.get_mut(channel) else {
            return;
        };
        if let Some(buffer) = entry.repairing.as_mut() {
            buffer.push(p);
            return;
        }
        let (known, dispatched) = match &entry.continuity {
            Continuity::Dispatched(epoch, last) => (Some((epoch.clone(), *last)), true),
            Continuity::Seeded(epoch, last) => (Some((epoch.clone(), *last)), false),
            Continuity::Unknown => (None, false),
        };
        if let Some((epoch, last)) = known {
            if same_stream(last, &epoch, &p.epoch) {
                if dispatched && p.offset <= last {
                    return; // already dispatched
                }
                if p.offset > last + 1 {
                    hub.start_repair(entry, p.epoch.clone(), last);
                    if let Some(buffer) = entry.repairing.as_mut() {
                        buffer.push(p);
                    }
                    return;
                }
            }
        }
        hub.dispatch(entry, &p);
    }

    fn on_resubscribed(&self) {
        for channel in self.0.channels() {
            tokio::spawn(Arc::clone(&self.0).check_continuity(channel));
        }
        // A revocation sent while this node was cut off was missed: load them again.
        tokio::spawn(Arc::clone(&self.0).load_revocations());
    }

    fn on_user_command(&self, user: &str, command: &UserCommand) -> u64 {
        self.0.on_user_command(user, command)
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
