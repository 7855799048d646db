//! One session's mailbox: the contract between the hub (and the user commands) that
//! offer to a session, and the session's task that takes from it.
//!
//! The mailbox is pull-based: offering never waits, and an idle mailbox allocates
//! nothing. A full mailbox refuses (the offerer closes the session with 4509, or drops
//! a droppable item); a closed one refuses everything.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use herald_protocol::codes::CloseCode;
use herald_protocol::StreamPosition;
use tokio::sync::{oneshot, Notify};
use tungstenite::Utf8Bytes;

use crate::backend::users::UserCommand;

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
    Control(Arc<Control>),
}

/// A user command on its way to the user's sessions, and the count of the sessions it
/// changed.
///
/// Why the sessions count: a join or leave happens in the session's own task, later
/// than the command is handed out. A count taken when handing out (is the session a
/// member yet?) counts a session once per concurrent command for the same channel,
/// although it joins only once. Each session instead counts itself after it applied the
/// command, in its own task, one command after the other; the answer goes out when the
/// last copy is dropped (every session applied it, or ended), or earlier through
/// [`Control::answer_now`].
#[derive(Debug)]
pub struct Control {
    /// The command.
    pub command: UserCommand,
    changed: AtomicU64,
    reply: Mutex<Option<oneshot::Sender<u64>>>,
}

impl Control {
    /// A command whose count goes to `reply`.
    pub fn new(command: UserCommand, reply: oneshot::Sender<u64>) -> Self {
        Self {
            command,
            changed: AtomicU64::new(0),
            reply: Mutex::new(Some(reply)),
        }
    }

    /// One session applied the command and was changed by it.
    pub fn changed(&self) {
        self.changed.fetch_add(1, Ordering::AcqRel);
    }

    /// Answers with the sessions counted so far, unless the answer went out already;
    /// sessions that apply the command later are not counted.
    pub fn answer_now(&self) {
        let reply = self.reply.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(reply) = reply {
            let _ = reply.send(self.changed.load(Ordering::Acquire));
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.answer_now();
    }
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
    /// 4429: the user's connect budget on this node is spent (`hello` refused).
    UserConnects = 4,
    /// 4503: the node is cut off from the broker and moves its clients to a ready peer
    /// (a `reconnect` frame with reason `unavailable` goes first).
    Unavailable = 5,
}

impl CloseReason {
    /// The reason text of a close with `code`.
    pub fn text(self, code: CloseCode) -> &'static str {
        match self {
            CloseReason::Default => code.reason(),
            CloseReason::TokenExpired => CloseCode::TOKEN_EXPIRED,
            CloseReason::TokenRevoked => "token revoked",
            CloseReason::Disconnected => "disconnected by the server",
            CloseReason::UserConnects => "too many connects for this user; back off",
            CloseReason::Unavailable => "node cut off from the broker; reconnect elsewhere",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => CloseReason::TokenExpired,
            2 => CloseReason::TokenRevoked,
            3 => CloseReason::Disconnected,
            4 => CloseReason::UserConnects,
            5 => CloseReason::Unavailable,
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
pub struct Mailbox {
    /// The close request: code in the low 16 bits, [`CloseReason`] above; 0 = none.
    pub(crate) code: AtomicU32,
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

impl Mailbox {
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

    /// Asks the session to close with `code` and a reason. The first request wins;
    /// whether this one was it.
    pub fn close_with(&self, code: u16, reason: CloseReason) -> bool {
        let packed = u32::from(code) | (u32::from(reason as u8) << 16);
        let first = self
            .code
            .compare_exchange(0, packed, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            // notify_one keeps a permit if the session is not waiting right now.
            self.close_notify.notify_one();
        }
        first
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

    pub(crate) fn queue(&self) -> MutexGuard<'_, VecDeque<Outbound>> {
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
pub type SessionHandle = Arc<Mailbox>;

#[cfg(test)]
mod tests {
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
        let mailbox = Mailbox::new(100);
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
        let mailbox = Mailbox::new(1000);
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
        let mailbox = Arc::new(Mailbox::new(10));
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

    #[test]
    fn a_control_answers_once_with_the_sessions_that_counted() {
        let command = UserCommand::Subscribe {
            channel: "room:1".into(),
        };
        // Answered when the last copy goes: every session applied it or ended.
        let (reply, mut answer) = oneshot::channel();
        let item = Arc::new(Control::new(command.clone(), reply));
        let copies = [Arc::clone(&item), Arc::clone(&item)];
        drop(item);
        copies[0].changed();
        assert!(answer.try_recv().is_err(), "a copy is still queued");
        drop(copies);
        assert_eq!(answer.try_recv(), Ok(1));
        // Answered early (a session is stuck): later counts change nothing.
        let (reply, mut answer) = oneshot::channel();
        let item = Control::new(command, reply);
        item.changed();
        item.answer_now();
        item.changed();
        drop(item);
        assert_eq!(answer.try_recv(), Ok(1));
    }

    #[test]
    fn the_first_close_request_wins() {
        let m = Mailbox::new(4);
        assert!(m.close_with(4410, CloseReason::Default));
        assert!(!m.close_with(4401, CloseReason::Disconnected));
        assert_eq!(m.code.load(Ordering::Acquire) as u16, 4410);
    }
}
