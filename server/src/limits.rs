//! Pure bookkeeping behind the limits a client cannot get around (docs/protocol.md
//! "Limits"): the byte budget of one recovery, the queue of connections that have not
//! finished `hello` yet, and the budgets of each user (connects, and subscriptions that
//! cost backend work) that outlive its connections.
//!
//! Nothing here does I/O or knows about sockets; [`crate::node`] and [`crate::ws`] apply
//! these rules, and the unit tests below pin them down.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::streams::Publication;

/// How many bytes of message data one `hello` (all its resumed channels together) or one
/// `subscribe` may recover. A channel is recovered completely or not at all: one that
/// does not fit in what is left gets `recovered: false` with the current position, so
/// the client reloads it instead of silently missing messages.
#[derive(Debug, Clone)]
pub struct RecoveryBudget {
    left: usize,
}

impl RecoveryBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> Self {
        Self { left: bytes }
    }

    /// Takes the data bytes of `pubs` if all of them fit; otherwise takes nothing.
    pub fn take(&mut self, pubs: &[Publication]) -> bool {
        let bytes = pubs
            .iter()
            .fold(0usize, |sum, p| sum.saturating_add(p.data.len()));
        match self.left.checked_sub(bytes) {
            Some(left) => {
                self.left = left;
                true
            }
            None => false,
        }
    }

    /// Bytes still available.
    pub fn left(&self) -> usize {
        self.left
    }
}

/// What [`PendingQueue::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum PendingAdmit<T> {
    /// Admitted under this number.
    Admitted(u64),
    /// Admitted under this number by pushing out the oldest pending connection, whose
    /// item is returned so the caller can close it.
    Evicted(u64, T),
    /// The budget is full of connections that are all younger than the eviction age.
    Refused,
}

/// Connections that have not finished `hello`, oldest first, with a budget of their own.
///
/// Why eviction: a budget that only refuses would let anyone who opens that many silent
/// sockets every hello timeout lock every user out. Instead, when the budget is full, the
/// oldest pending connection makes room, if it has waited at least `evict_after`: an
/// honest client sends `hello` one round trip after connecting, so it is never the oldest
/// for long, while a silent socket is. An attacker must then open a full budget of
/// sockets per `evict_after` (1,000 per second by default) to keep newcomers out,
/// instead of one budget per hello timeout.
#[derive(Debug)]
pub struct PendingQueue<T> {
    limit: usize,
    evict_after: Duration,
    next: u64,
    entries: BTreeMap<u64, (Instant, T)>,
}

impl<T> PendingQueue<T> {
    /// An empty queue for `limit` connections (`0`: none is ever admitted).
    pub fn new(limit: usize, evict_after: Duration) -> Self {
        Self {
            limit,
            evict_after,
            next: 0,
            entries: BTreeMap::new(),
        }
    }

    /// Admits a connection arriving at `now`, holding `item` (what closes it if evicted).
    /// When the budget is full, the oldest connection makes room, if it has waited
    /// `evict_after`.
    pub fn admit(&mut self, now: Instant, item: T) -> PendingAdmit<T> {
        self.admit_preferring(now, item, |_| true)
    }

    /// [`admit`](Self::admit), except that when the budget is full the oldest
    /// connection for which `prefer` holds makes room first, among those that have
    /// waited `evict_after`; only if there is none, the oldest of them. Scans the old
    /// connections, so it is for budgets that are rarely full.
    pub fn admit_preferring(
        &mut self,
        now: Instant,
        item: T,
        prefer: impl Fn(&T) -> bool,
    ) -> PendingAdmit<T> {
        let mut evicted = None;
        if self.entries.len() >= self.limit {
            // Admission order is time order: the old ones are a prefix.
            let mut old = self.entries.iter().take_while(|(_, (since, _))| {
                now.saturating_duration_since(*since) >= self.evict_after
            });
            let first_old = old.next().map(|(seq, (_, item))| (*seq, prefer(item)));
            let victim = match first_old {
                None => return PendingAdmit::Refused,
                Some((seq, true)) => seq,
                Some((seq, false)) => old
                    .find(|(_, (_, item))| prefer(item))
                    .map_or(seq, |(preferred, _)| *preferred),
            };
            evicted = self.entries.remove(&victim).map(|(_, item)| item);
        }
        let seq = self.next;
        self.next += 1;
        self.entries.insert(seq, (now, item));
        match evicted {
            Some(item) => PendingAdmit::Evicted(seq, item),
            None => PendingAdmit::Admitted(seq),
        }
    }

    /// Forgets connection `seq` (it finished `hello`, or ended); a no-op if it was evicted.
    pub fn remove(&mut self, seq: u64) -> Option<T> {
        self.entries.remove(&seq).map(|(_, item)| item)
    }

    /// Pending connections.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no connection is pending.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The shortest `after_ms` of a `busy` answer.
pub const BUSY_MIN_AFTER_MS: u64 = 250;

/// The longest `after_ms` of a `busy` answer.
pub const BUSY_MAX_AFTER_MS: u64 = 30_000;

/// The admission rate a node is assumed to have before it has measured one.
const BUSY_ASSUMED_RATE: u64 = 1_000;

/// The `after_ms` a node tells a client it has no room for (`reconnect` with reason
/// `busy`, then close 4429), from what it saw in the last second.
///
/// Why it is not a constant: a burst (a dead node's users, all arriving within a second)
/// must come back spread out at the rate the node can take them, or the second wave is
/// the first one again. So the `n`-th refusal of a second gets a time in
/// `[BUSY_MIN_AFTER_MS, BUSY_MIN_AFTER_MS + n / rate]`, `rate` being the admissions
/// the node made in the previous second (at least [`BUSY_ASSUMED_RATE`]), chosen by
/// `jitter` (in `[0, 1)`) so that the wave spreads evenly over that span.
#[derive(Debug, Default)]
pub struct BusyWindow {
    /// The start of the current second (ms), and what happened in it.
    start_ms: u64,
    refused: u64,
    admitted: u64,
    /// Admissions in the second before.
    last_admitted: u64,
}

impl BusyWindow {
    fn roll(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.start_ms);
        if elapsed >= 1_000 {
            // A quiet second in between counts as no admissions.
            self.last_admitted = if elapsed < 2_000 { self.admitted } else { 0 };
            self.start_ms = now_ms;
            self.refused = 0;
            self.admitted = 0;
        }
    }

    /// A connection was admitted at `now_ms`.
    pub fn admitted(&mut self, now_ms: u64) {
        self.roll(now_ms);
        self.admitted += 1;
    }

    /// A connection was refused at `now_ms`: the `after_ms` to tell it.
    pub fn refuse(&mut self, now_ms: u64, jitter: f64) -> u64 {
        self.roll(now_ms);
        self.refused += 1;
        let rate = self.last_admitted.max(self.admitted).max(BUSY_ASSUMED_RATE);
        let span = self.refused.saturating_mul(1_000) / rate;
        let after = BUSY_MIN_AFTER_MS + (span as f64 * jitter.clamp(0.0, 1.0)) as u64;
        after.min(BUSY_MAX_AFTER_MS)
    }
}

/// A [`BusyWindow`] shared by the listener and the node, on the monotonic clock.
#[derive(Debug)]
pub struct Busy {
    window: std::sync::Mutex<BusyWindow>,
    epoch: Instant,
}

impl Default for Busy {
    fn default() -> Self {
        Self {
            window: std::sync::Mutex::default(),
            epoch: Instant::now(),
        }
    }
}

impl Busy {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BusyWindow> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts an admission.
    pub fn admitted(&self) {
        let now = self.now_ms();
        self.lock().admitted(now);
    }

    /// Counts a refusal; the `after_ms` to tell the refused client.
    pub fn refuse(&self) -> u64 {
        let now = self.now_ms();
        let jitter = rand::random::<f64>();
        self.lock().refuse(now, jitter)
    }
}

/// How fast one kind of per-user budget refills, and how much of it may be spent at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketRule {
    /// Tokens added per second.
    pub per_sec: f32,
    /// Most tokens held (a full bucket).
    pub burst: f32,
}

impl BucketRule {
    /// `per_sec` tokens a second, up to `burst`; `None` when `per_sec` is 0 (no limit).
    pub fn new(per_sec: f32, burst: u32) -> Option<Self> {
        (per_sec > 0.0).then_some(Self {
            per_sec,
            burst: burst.max(1) as f32,
        })
    }

    /// Tokens after `secs` seconds of refill from `tokens`.
    fn refilled(&self, tokens: f32, secs: f32) -> f32 {
        (tokens + secs * self.per_sec).min(self.burst)
    }

    /// Seconds until `tokens` is a full bucket.
    fn secs_to_full(&self, tokens: f32) -> f32 {
        (self.burst - tokens).max(0.0) / self.per_sec
    }
}

/// The two budgets every user has on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserLimit {
    /// New connections (each `hello` that presents a valid token).
    Connect,
    /// Channels entered by the client at its own request: each resumed channel of
    /// `hello` and each `subscribe` (both read the channel's stream from the backend).
    Subscribe,
}

/// One user's buckets. Both are refilled together, so one timestamp serves both.
#[derive(Debug, Clone, Copy)]
struct UserEntry {
    /// Milliseconds since the table's epoch, when `connect` and `subscribe` were exact.
    at_ms: u64,
    connect: f32,
    subscribe: f32,
}

/// The per-user budgets of one node, keyed by user, so that a new connection does not
/// come with a new budget.
///
/// Why entries can be dropped: a user without an entry has full buckets, so an entry
/// whose buckets have refilled is the same as no entry. The table therefore only holds
/// users who spent something within the last refill time, and when it reaches
/// `capacity` the refilled ones are swept out. If that frees nothing, the entry nearest
/// to full goes: it gives that user back the least, and an attacker must keep more than
/// `capacity` users busy at once to refill any bucket early.
#[derive(Debug)]
pub struct UserBudgets {
    connect: Option<BucketRule>,
    subscribe: Option<BucketRule>,
    capacity: usize,
    epoch: Instant,
    entries: HashMap<Arc<str>, UserEntry>,
}

impl UserBudgets {
    /// Budgets with these rules (`None`: that kind is not limited), holding at most
    /// `capacity` users (at least 1).
    pub fn new(
        connect: Option<BucketRule>,
        subscribe: Option<BucketRule>,
        capacity: usize,
        epoch: Instant,
    ) -> Self {
        Self {
            connect,
            subscribe,
            capacity: capacity.max(1),
            epoch,
            entries: HashMap::new(),
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// `entry` brought forward to `now_ms`.
    fn refilled(&self, entry: UserEntry, now_ms: u64) -> UserEntry {
        let secs = now_ms.saturating_sub(entry.at_ms) as f32 / 1000.0;
        UserEntry {
            at_ms: now_ms.max(entry.at_ms),
            connect: self
                .connect
                .map_or(0.0, |r| r.refilled(entry.connect, secs)),
            subscribe: self
                .subscribe
                .map_or(0.0, |r| r.refilled(entry.subscribe, secs)),
        }
    }

    /// Seconds until both of `entry`'s buckets are full (0: the entry can go).
    fn secs_to_full(&self, entry: &UserEntry) -> f32 {
        let c = self.connect.map_or(0.0, |r| r.secs_to_full(entry.connect));
        let s = self
            .subscribe
            .map_or(0.0, |r| r.secs_to_full(entry.subscribe));
        c.max(s)
    }

    /// Takes one token of `kind` for `user` at `now`; whether there was one. A refusal
    /// takes nothing, so a client that keeps trying is not punished beyond the rate.
    pub fn take(&mut self, user: &Arc<str>, kind: UserLimit, now: Instant) -> bool {
        let limited = match kind {
            UserLimit::Connect => self.connect.is_some(),
            UserLimit::Subscribe => self.subscribe.is_some(),
        };
        if !limited {
            return true;
        }
        let now_ms = self.ms(now);
        let mut entry = match self.entries.get(&**user) {
            Some(e) => self.refilled(*e, now_ms),
            None => UserEntry {
                at_ms: now_ms,
                connect: self.connect.map_or(0.0, |r| r.burst),
                subscribe: self.subscribe.map_or(0.0, |r| r.burst),
            },
        };
        let tokens = match kind {
            UserLimit::Connect => &mut entry.connect,
            UserLimit::Subscribe => &mut entry.subscribe,
        };
        if *tokens < 1.0 {
            // Refused: nothing taken, the entry stays as it was.
            return false;
        }
        *tokens -= 1.0;
        if !self.entries.contains_key(&**user) {
            self.make_room(now_ms);
        }
        self.entries.insert(Arc::clone(user), entry);
        true
    }

    /// Frees one place when the table is full: first every refilled entry, else the one
    /// nearest to full.
    fn make_room(&mut self, now_ms: u64) {
        if self.entries.len() < self.capacity {
            return;
        }
        let mut nearest: Option<(Arc<str>, f32)> = None;
        let mut refilled = Vec::new();
        for (user, e) in &self.entries {
            let secs = self.secs_to_full(&self.refilled(*e, now_ms));
            if secs <= 0.0 {
                refilled.push(Arc::clone(user));
            } else if nearest.as_ref().is_none_or(|(_, s)| secs < *s) {
                nearest = Some((Arc::clone(user), secs));
            }
        }
        if refilled.is_empty() {
            refilled.extend(nearest.map(|(user, _)| user));
        }
        for user in refilled {
            self.entries.remove(&user);
        }
    }

    /// Users with an entry (who spent something that has not refilled yet).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no user has an entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests;
