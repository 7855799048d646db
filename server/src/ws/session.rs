//! One authenticated session: its channels, its main loop, delivery and recovery.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald_protocol::channel::user_channel;
use herald_protocol::codes::{CloseCode, ErrorCode};
use herald_protocol::frame::{ErrorBody, Expiring, Resync, ServerFrame, SubscribeResult, Welcome};
use herald_protocol::StreamPosition;
use rand::Rng;
use tokio::time::{timeout, timeout_at, Instant};
use tungstenite::{Message, Utf8Bytes};

use crate::auth::Claims;
use crate::backend::streams::Publication;
use crate::clock::now_secs;
use crate::continuity::{self, SessionArrival};
use crate::limits::{RecoveryBudget, UserLimit};
use crate::mailbox::{CloseReason, Mailbox, Outbound, SessionHandle, SessionId, KEEP_SLOTS};
use crate::membership::Member;
use crate::node::Node;

use super::error::CommandError;
use super::rate::RateLimit;
mod deliver;

use super::socket::Socket;
use super::{read_error, send_reconnect, End, CLOSE_TIMEOUT};

/// Most queued messages written before one flush.
pub(super) const BATCH: usize = 64;

/// Where the session stands in one channel.
pub(super) struct ChannelState {
    pub(super) epoch: Arc<str>,
    pub(super) last: u64,
    /// Joined through the server API, or confirmed by it while already in: kept when
    /// a refreshed token's patterns no longer match it (the backend, not the token,
    /// holds the session there).
    pub(super) granted: bool,
}

/// One authenticated session.
pub(super) struct Session {
    pub(super) node: Arc<Node>,
    pub(super) id: SessionId,
    pub(super) uuid: uuid::Uuid,
    pub(super) claims: Claims,
    pub(super) user: Arc<str>,
    pub(super) personal: Arc<str>,
    /// The session's mailbox, shared with the hub.
    pub(super) handle: SessionHandle,
    pub(super) channels: HashMap<Arc<str>, ChannelState>,
    pub(super) rate: RateLimit,
    /// Ephemeral publishes, a bucket of their own on top of `rate`.
    pub(super) ephemeral_rate: RateLimit,
    pub(super) last_recv: Instant,
    pub(super) last_send: Instant,
    /// Whether a ping went out since the client last sent anything.
    pub(super) pinged: bool,
    pub(super) drain_at: Option<Instant>,
    /// When the write in progress (a batch, a reply, a recovery: everything up to its
    /// flush) must be done; `None` between writes. See [`Session::send`].
    pub(super) write_deadline: Option<Instant>,
    /// The token's `exp`: the session closes with 4401 "token expired" then, unless a
    /// `refresh` moved it.
    pub(super) expires_at: Instant,
    /// When to send `expiring`; `None` once sent for the current token.
    pub(super) notice_at: Option<Instant>,
}

/// When a token with expiry `exp` (unix seconds) runs out, and when to announce it,
/// as instants of the session's clock.
pub(super) fn token_timers(exp: u64, notice_ms: u64) -> (Instant, Option<Instant>) {
    let now_ms = crate::clock::now_ms();
    let remaining = exp.saturating_mul(1000).saturating_sub(now_ms);
    let expires_at = Instant::now() + Duration::from_millis(remaining);
    let lead = crate::auth::expiry_notice_ms(remaining, notice_ms);
    (expires_at, Some(expires_at - Duration::from_millis(lead)))
}

impl Session {
    pub(super) fn new(node: Arc<Node>, claims: Claims) -> Self {
        let user: Arc<str> = claims.sub.as_str().into();
        let personal: Arc<str> = user_channel(&user).into();
        let now = Instant::now();
        let (expires_at, notice_at) = token_timers(claims.exp, node.config.token_expiry_notice_ms);
        let handle = Arc::new(Mailbox::new(node.config.session_queue));
        handle.set_token_iat(claims.issued_at());
        Self {
            id: node.next_session_id(),
            uuid: uuid::Uuid::new_v4(),
            rate: RateLimit::new(node.config.max_messages_per_sec),
            ephemeral_rate: RateLimit::new(node.config.max_ephemeral_per_sec),
            handle,
            expires_at,
            notice_at,
            node,
            claims,
            user,
            personal,
            channels: HashMap::new(),
            last_recv: now,
            last_send: now,
            pinged: false,
            drain_at: None,
            write_deadline: None,
        }
    }

    /// Subscribes the personal channel and the resumed ones, sends `welcome`, then the
    /// recovered messages.
    ///
    /// Bounds: every resume entry but the personal channel takes a token of the command
    /// rate and one of the user's subscribe budget, like a `subscribe` (entries beyond
    /// either get `rate_limited` in `errors`); all channels together recover at most
    /// `max_recovery_bytes` of data, the personal channel first, then in name order.
    pub(super) async fn start(
        &mut self,
        socket: &mut dyn Socket,
        mut resume: BTreeMap<String, StreamPosition>,
        starting: tokio::sync::SemaphorePermit<'_>,
    ) -> Result<(), End> {
        // Registered before the revocation check, never after: see `users`' race note.
        // Over the user's connections on this node (one token must not take the node's
        // slots): 4429.
        let limit = self.node.config.max_connections_per_user;
        if !self.node.membership.arrive(self.member(), limit) {
            return Err(End::Close(CloseCode::TooMany));
        }
        if self
            .node
            .users
            .is_revoked(&self.user, self.claims.issued_at(), now_secs())
        {
            return Err(End::CloseWith(
                CloseCode::Unauthorized,
                CloseReason::TokenRevoked,
            ));
        }
        let mut subscriptions = BTreeMap::new();
        let mut errors = BTreeMap::new();
        let mut missed = Vec::new();
        let mut budget = RecoveryBudget::new(self.node.config.max_recovery_bytes);
        let personal = self.personal.to_string();
        let since = resume.remove(&personal);
        match self.subscribe_within(&personal, since, &mut budget).await {
            Ok((result, pubs)) => {
                subscriptions.insert(personal.clone(), result);
                missed.push((self.personal.clone(), pubs));
            }
            Err(e) => {
                // Without its personal channel the session is useless; the broker is down.
                e.log("personal channel subscribe failed");
                tracing::debug!(code = ?e.code, message = %e.message, "personal channel subscribe failed");
                return Err(End::Close(CloseCode::Draining));
            }
        }
        for (channel, since) in resume {
            if !self.rate.try_take() {
                self.node.metrics.rate_limited.inc();
                let error = ErrorBody::new(
                    ErrorCode::RateLimited,
                    "more resume entries than the command rate allows; subscribe later",
                );
                errors.insert(channel, error);
                continue;
            }
            match self
                .subscribe_within(&channel, Some(since), &mut budget)
                .await
            {
                Ok((result, pubs)) => {
                    let name = self.channel_name(&channel);
                    subscriptions.insert(channel, result);
                    missed.push((name, pubs));
                }
                Err(e) => {
                    e.log("a resumed channel could not be joined");
                    errors.insert(channel, ErrorBody::new(e.code, e.message));
                }
            }
        }
        let welcome = ServerFrame::Welcome(Welcome {
            session: self.uuid.to_string(),
            node: self.node.id.clone(),
            user: self.user.to_string(),
            heartbeat_ms: self.node.config.heartbeat_ms,
            subscriptions,
            errors,
        });
        // The backend work is done: the place among the starting sessions is given
        // back before writing, so a client that doesn't read can't hold it.
        drop(starting);
        self.send(socket, welcome.to_json()).await?;
        for (channel, pubs) in missed {
            self.send_publications(socket, &channel, &pubs).await?;
        }
        self.flush(socket).await
    }

    pub(super) fn channel_name(&self, channel: &str) -> Arc<str> {
        self.channels
            .get_key_value(channel)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| channel.into())
    }

    /// Subscribes to a channel; returns the result and the recovered publications,
    /// which the caller sends after the reply. The recovery has a budget of its own.
    pub(super) async fn subscribe(
        &mut self,
        channel: &str,
        since: Option<StreamPosition>,
    ) -> Result<(SubscribeResult, Vec<Publication>), CommandError> {
        let mut budget = RecoveryBudget::new(self.node.config.max_recovery_bytes);
        self.subscribe_within(channel, since, &mut budget).await
    }

    /// [`Session::subscribe`], recovering within what is left of `budget`.
    pub(super) async fn subscribe_within(
        &mut self,
        channel: &str,
        since: Option<StreamPosition>,
        budget: &mut RecoveryBudget,
    ) -> Result<(SubscribeResult, Vec<Publication>), CommandError> {
        self.room_for(channel)?;
        if !self.claims.may_subscribe(channel) {
            return Err(CommandError::new(
                ErrorCode::Forbidden,
                format!("not allowed to subscribe to {channel}"),
            ));
        }
        // Every channel entered at the client's request reads the backend, so it draws
        // on the user's budget, which a new connection does not refill. The personal
        // channel is part of the connect, which has a budget of its own.
        if *channel != *self.personal
            && !self.node.take_user_budget(&self.user, UserLimit::Subscribe)
        {
            self.node.metrics.rate_limited.inc();
            return Err(CommandError::new(
                ErrorCode::RateLimited,
                "over this user's subscribe budget on this node; subscribe later".into(),
            ));
        }
        self.join(channel, since, false, budget).await
    }

    /// Whether the session can join `channel`: not in it yet, and under its limit.
    pub(super) fn room_for(&self, channel: &str) -> Result<(), CommandError> {
        if self.channels.contains_key(channel) {
            return Err(CommandError::new(
                ErrorCode::BadRequest,
                "already subscribed".into(),
            ));
        }
        if self.channels.len() >= self.node.config.max_subscriptions {
            return Err(CommandError::new(
                ErrorCode::BadRequest,
                format!(
                    "subscription limit ({}) reached",
                    self.node.config.max_subscriptions
                ),
            ));
        }
        Ok(())
    }

    /// Joins a channel the session may be in (checked by the caller), through the
    /// membership verb. `granted`: joined by the server API.
    pub(super) async fn join(
        &mut self,
        channel: &str,
        since: Option<StreamPosition>,
        granted: bool,
        budget: &mut RecoveryBudget,
    ) -> Result<(SubscribeResult, Vec<Publication>), CommandError> {
        self.room_for(channel)?;
        let node = Arc::clone(&self.node);
        let (name, result, pubs) = node
            .membership
            .enter(self.member(), channel, since, budget)
            .await?;
        self.handle
            .set_full(self.channels.len() + 1 >= node.config.max_subscriptions);
        self.channels.insert(
            name,
            ChannelState {
                epoch: result.epoch.as_str().into(),
                last: result.offset,
                granted,
            },
        );
        Ok((result, pubs))
    }

    /// The session as the membership verbs know it.
    pub(super) fn member(&self) -> Member<'_> {
        Member {
            id: self.id,
            user: &self.user,
            handle: &self.handle,
        }
    }

    /// Queues a frame for the socket (writing out what the buffer cannot hold).
    ///
    /// Every write is bounded in time: the first `send` (or `flush`) of a write starts
    /// a deadline of `write_timeout`, which covers every frame up to the `flush` that
    /// ends it. A client that does not take the write within it, whatever the write is
    /// (live messages, a reply, `welcome`, a recovery), is a slow consumer: 4509.
    pub(super) async fn send(
        &mut self,
        socket: &mut dyn Socket,
        text: impl Into<Utf8Bytes>,
    ) -> Result<(), End> {
        let now = Instant::now();
        self.last_send = now;
        let deadline = self.write_deadline(now);
        match timeout_at(deadline, socket.feed(Message::Text(text.into()))).await {
            Ok(r) => r.map_err(|_| End::Gone),
            Err(_) => Err(End::Close(CloseCode::SlowConsumer)),
        }
    }

    /// Writes out everything queued and ends the write (and its deadline).
    pub(super) async fn flush(&mut self, socket: &mut dyn Socket) -> Result<(), End> {
        let deadline = self.write_deadline(Instant::now());
        match timeout_at(deadline, socket.flush()).await {
            Ok(r) => {
                self.write_deadline = None;
                r.map_err(|_| End::Gone)
            }
            Err(_) => Err(End::Close(CloseCode::SlowConsumer)),
        }
    }

    /// The deadline of the write in progress, started at `now` if none is.
    pub(super) fn write_deadline(&mut self, now: Instant) -> Instant {
        *self
            .write_deadline
            .get_or_insert_with(|| now + self.node.config.write_timeout())
    }

    /// The main loop after `welcome`.
    pub(super) async fn serve(&mut self, socket: &mut dyn Socket) -> Result<(), End> {
        let heartbeat = self.node.config.heartbeat();
        let control = Arc::clone(&self.handle);
        let drain = self.node.drain.clone();
        let force = self.node.force_close.clone();
        // Created and pinned once per session, not per wakeup: these tokens are
        // node-wide, and each new wait would register in (and leave) their shared waiter
        // list under its mutex, for every session at every message.
        let drain_wait = drain.cancelled();
        let force_wait = force.cancelled();
        tokio::pin!(drain_wait, force_wait);
        // The session's own buffer for a batch drained from the mailbox in one lock.
        let mut batch = VecDeque::new();
        let sleep = tokio::time::sleep_until(self.next_timer(heartbeat));
        tokio::pin!(sleep);
        loop {
            sleep.as_mut().reset(self.next_timer(heartbeat));
            tokio::select! {
                frame = socket.next() => {
                    self.last_recv = Instant::now();
                    self.pinged = false;
                    match frame {
                        // Boxed: commands are rare next to deliveries, and their
                        // futures (broker calls) would otherwise sit in every idle
                        // connection's task.
                        Some(Ok(Message::Text(text))) => Box::pin(self.command(socket, &text)).await?,
                        Some(Ok(Message::Binary(_))) => return Err(End::Close(CloseCode::BadRequest)),
                        // The library answers pings itself, but a flood of them is still
                        // work: they count against the command rate like any frame.
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => self.count_silent_frame()?,
                        Some(Ok(Message::Close(_))) | None => return Err(End::Gone),
            // Never yielded by a read: tungstenite assembles frames into messages.
            Some(Ok(Message::Frame(_))) => {}
                        Some(Err(e)) => return Err(read_error(&e)),
                    }
                }
                // Boxed: the write's futures (the frames' writes, their deadline, the
                // token's expiry) would otherwise be part of every idle connection's
                // task, about a third of its size (docs/benchmarks.md, "memory per connection").
                () = control.ready() => Box::pin(self.deliver(socket, &mut batch, &control)).await?,
                (code, reason) = control.closed() => return Err(End::CloseWith(code_of(code), reason)),
                _ = &mut force_wait => return Err(End::Close(CloseCode::Draining)),
                _ = &mut drain_wait, if self.drain_at.is_none() => {
                    let spread = self.node.config.drain().mul_f64(0.8);
                    let delay = rand::rng().random_range(0..=spread.as_millis() as u64);
                    self.drain_at = Some(Instant::now() + Duration::from_millis(delay));
                }
                // Boxed for the same reason: timers fire once per heartbeat at most.
                _ = &mut sleep => Box::pin(self.on_timer(socket, heartbeat)).await?,
            }
        }
    }

    /// The session's timer: drain, liveness, the token's expiry and its notice, pings.
    async fn on_timer(&mut self, socket: &mut dyn Socket, heartbeat: Duration) -> Result<(), End> {
        let now = Instant::now();
        if self.drain_at.is_some_and(|t| now >= t) {
            let _ = timeout(CLOSE_TIMEOUT, send_reconnect(socket)).await;
            return Err(End::Close(CloseCode::Draining));
        }
        if now >= self.last_recv + heartbeat * 2 {
            return Err(End::Close(CloseCode::Timeout));
        }
        if now >= self.expires_at {
            return Err(End::CloseWith(
                CloseCode::Unauthorized,
                CloseReason::TokenExpired,
            ));
        }
        if self.notice_at.is_some_and(|t| now >= t) {
            self.notice_at = None;
            let in_ms = self.expires_at.saturating_duration_since(now).as_millis() as u64;
            let frame = ServerFrame::Expiring(Expiring { in_ms }).to_json();
            // Bounded like every write (`send`).
            self.send(socket, frame).await?;
            self.flush(socket).await?;
        }
        // Ping after a heartbeat of silence either way: ours (keeps intermediaries from
        // timing out) or the client's (it must answer, even on a channel so busy that
        // we are never silent).
        let client_silent = !self.pinged && now >= self.last_recv + heartbeat;
        if client_silent || now >= self.last_send + heartbeat {
            self.pinged = true;
            self.send(socket, ServerFrame::Ping.to_json()).await?;
            self.flush(socket).await?;
        }
        Ok(())
    }

    pub(super) fn next_timer(&self, heartbeat: Duration) -> Instant {
        let mut t = (self.last_send + heartbeat).min(self.last_recv + heartbeat * 2);
        if !self.pinged {
            t = t.min(self.last_recv + heartbeat);
        }
        if let Some(d) = self.drain_at {
            t = t.min(d);
        }
        if let Some(n) = self.notice_at {
            t = t.min(n);
        }
        t.min(self.expires_at)
    }

    /// Leaves a channel; whether the session was in it.
    pub(super) fn leave(&mut self, channel: &str) -> bool {
        match self.channels.remove_entry(channel) {
            Some((name, _)) => {
                self.node.membership.leave(self.member(), &name);
                self.handle.set_full(false);
                true
            }
            None => false,
        }
    }

    /// Leaves every channel, then the node.
    pub(super) fn cleanup(&mut self) {
        let channels: Vec<Arc<str>> = self.channels.drain().map(|(name, _)| name).collect();
        self.node.membership.depart(self.member(), channels);
    }
}

pub(super) fn code_of(code: u16) -> CloseCode {
    CloseCode::from_code(code).unwrap_or(CloseCode::SlowConsumer)
}
