//! `GET /ws`: the WebSocket upgrade and one session's protocol state machine.
//!
//! One task per connection runs the whole session: it reads commands, drains the
//! session's bounded queue in batches (one flush per batch), sends heartbeats and obeys
//! close requests from the hub (4509) and the node (4503). One task, not a reader and a
//! writer, keeps a connection's memory small; a write that stalls is raced against the
//! close request, so a stuck socket cannot hold the session forever.
//!
//! Per channel the session keeps the last offset it delivered, which makes delivery
//! exact: messages at or below it are dropped (duplicates after a recovery), a message
//! from another epoch or beyond a gap first produces a `resync` (or a repair from
//! history), so the client never sees a silent gap.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use futures_util::SinkExt;
use herald_protocol::channel::user_channel;
use herald_protocol::codes::{CloseCode, ErrorCode};
use herald_protocol::frame::{
    ClientCommand, ErrorBody, Expiring, ParseError, Reconnect, Reply, Resync, ServerFrame,
    SubscribeResult, Subscribed, Unsubscribed, Welcome,
};
use herald_protocol::{same_stream, StreamPosition};
use rand::Rng;
use serde_json::json;
use tokio::time::{timeout, timeout_at, Instant};

use crate::auth::{now_secs, Claims};
use crate::broker::{BrokerError, Publication, UserCommand};
use crate::hub::{CloseReason, Outbound, SessionControl, SessionHandle, SessionId};
use crate::limits::RecoveryBudget;
use crate::node::{Node, Pending};

/// Most queued messages written before one flush.
const BATCH: usize = 64;
/// How long a close frame may take to send.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The upgrade handler: checks origin and admission, then runs the session.
pub async fn upgrade(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let cfg = &node.config;
    let origin_ok = origin_allowed(cfg.allowed_origins.as_deref(), &headers);
    let ws = ws
        .read_buffer_size(cfg.ws_read_buffer)
        .write_buffer_size(cfg.ws_write_buffer)
        .max_message_size(cfg.max_frame_bytes)
        .max_frame_size(cfg.max_frame_bytes);
    let admission = node.admit(peer.ip());
    let tracker = node.sessions.clone();
    // The task runs `run`'s future directly: a wrapping `async` block would store the
    // socket twice in every connection's task.
    ws.on_upgrade(move |socket| tracker.track_future(run(node, socket, admission, origin_ok)))
}

/// Whether the request's `Origin` is allowed. Without a list every origin is; a request
/// without `Origin` (not a browser) is allowed too, since only browsers send it and a
/// non-browser client could forge any value.
fn origin_allowed(allowed: Option<&[String]>, headers: &HeaderMap) -> bool {
    let Some(allowed) = allowed else { return true };
    match headers.get(header::ORIGIN) {
        None => true,
        Some(origin) => {
            let origin = origin.to_str().unwrap_or("");
            allowed
                .iter()
                .any(|a| a.trim().eq_ignore_ascii_case(origin))
        }
    }
}

async fn send_text(socket: &mut WebSocket, text: impl Into<Utf8Bytes>) -> Result<(), axum::Error> {
    socket.send(Message::Text(text.into())).await
}

async fn send_reconnect(socket: &mut WebSocket) -> Result<(), axum::Error> {
    let after_ms = rand::rng().random_range(0..1000);
    let frame = ServerFrame::Reconnect(Reconnect {
        reason: "draining".into(),
        after_ms,
    });
    send_text(socket, frame.to_json()).await
}

/// Sends a close frame and waits for the client's answer, both bounded in time.
async fn close(socket: &mut WebSocket, code: CloseCode, reason: CloseReason) {
    let frame = CloseFrame {
        code: code.code(),
        reason: reason.text(code).into(),
    };
    let _ = timeout(CLOSE_TIMEOUT, async {
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        // Read (and drop) whatever the client still sends, up to its close answer.
        // Dropping a socket with unread bytes makes the kernel answer with a reset,
        // and a reset can destroy our close frame before the client reads it: a
        // client that flooded us would never learn why it was closed.
        while let Some(Ok(_)) = socket.recv().await {}
    })
    .await;
}

/// How a read error ends the session. A frame over the limit closes with 1009; a text
/// frame that is not UTF-8, or a frame that breaks the WebSocket framing rules (reserved
/// opcodes or bits, an unmasked or fragmented control frame, a stray continuation) is
/// not a command at all and closes with 4400, so the client learns it must not retry
/// the same bytes. Anything else (a reset, an EOF) means the client is gone.
fn read_error(err: &axum::Error) -> End {
    match std::error::Error::source(err).and_then(|e| e.downcast_ref::<tungstenite::Error>()) {
        Some(tungstenite::Error::Capacity(_)) => End::Close(CloseCode::TooLarge),
        Some(tungstenite::Error::Utf8(_)) => End::Close(CloseCode::BadRequest),
        Some(tungstenite::Error::Protocol(p)) => {
            use tungstenite::error::ProtocolError as P;
            match p {
                P::NonZeroReservedBits
                | P::UnmaskedFrameFromClient
                | P::FragmentedControlFrame
                | P::ControlFrameTooBig
                | P::UnknownControlFrameType(_)
                | P::UnknownDataFrameType(_)
                | P::UnexpectedContinueFrame
                | P::ExpectedFragment(_)
                | P::InvalidOpcode(_)
                | P::InvalidCloseSequence => End::Close(CloseCode::BadRequest),
                // A reset without a close frame, and the like: the client is gone.
                _ => End::Gone,
            }
        }
        _ => End::Gone,
    }
}

/// How a session ended.
enum End {
    /// Close with this code.
    Close(CloseCode),
    /// Close with this code and a reason other than the code's own.
    CloseWith(CloseCode, CloseReason),
    /// The client closed or the connection broke: nothing more to send.
    Gone,
}

/// Reads the first frame, which must be `hello`, within the hello timeout. WebSocket
/// ping and pong frames before it are answered by the library but cost work, so at most
/// `max_control` of them are tolerated (the command rate of one second): more is a
/// flood, closed with 4429.
async fn read_hello(
    socket: &mut WebSocket,
    max_control: u32,
) -> Result<(String, BTreeMap<String, StreamPosition>), End> {
    let mut control = 0u32;
    loop {
        match socket.recv().await {
            Some(Ok(Message::Text(text))) => {
                return match ClientCommand::parse(&text) {
                    Ok(ClientCommand::Hello { token, resume }) => Ok((token, resume)),
                    _ => Err(End::Close(CloseCode::BadRequest)),
                };
            }
            Some(Ok(Message::Binary(_))) => return Err(End::Close(CloseCode::BadRequest)),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                control += 1;
                if control > max_control {
                    return Err(End::Close(CloseCode::TooMany));
                }
            }
            Some(Ok(Message::Close(_))) | None => return Err(End::Gone),
            Some(Err(e)) => return Err(read_error(&e)),
        }
    }
}

/// Runs one upgraded connection to its end.
///
/// Memory per idle connection is dominated by this future, which lives in the
/// connection's task for its whole life. Only the session's state and the main loop
/// (`Session::serve`) are held inline; the one-off phases (hello, start, close) are
/// boxed, so their futures exist only while they run.
async fn run(
    node: Arc<Node>,
    mut socket: WebSocket,
    admission: Result<Pending, CloseCode>,
    origin_ok: bool,
) {
    let end = match admission {
        Err(code) => End::Close(code),
        Ok(_) if !origin_ok => End::Close(CloseCode::Forbidden),
        Ok(_) if node.is_draining() => {
            let _ = Box::pin(timeout(CLOSE_TIMEOUT, send_reconnect(&mut socket))).await;
            End::Close(CloseCode::Draining)
        }
        Ok(pending) => serve_session(&node, &mut socket, pending).await,
    };
    Box::pin(finish(&node, &mut socket, end)).await;
}

/// Hello, token, session: everything between the upgrade and the end. The connection
/// holds a pending slot until its token is verified, then an authenticated one
/// (`Pending::authenticate`: the node's and the user's connection limits).
async fn serve_session(node: &Arc<Node>, socket: &mut WebSocket, pending: Pending) -> End {
    let (token, resume) = match Box::pin(hello(node, socket, pending.evicted())).await {
        Ok(hello) => hello,
        Err(end) => return end,
    };
    let claims = match node.keys.verifier.verify(&token) {
        Ok(claims) => claims,
        Err(e) => {
            tracing::debug!(error = %e, "token refused");
            return End::Close(CloseCode::Unauthorized);
        }
    };
    if node
        .hub
        .revocations
        .is_revoked(&claims.sub, claims.issued_at(), now_secs())
    {
        tracing::debug!(user = %claims.sub, "revoked token refused");
        return End::CloseWith(CloseCode::Unauthorized, CloseReason::TokenRevoked);
    }
    drop(token);
    let mut session = Session::new(Arc::clone(node), claims);
    let admission = match pending.authenticate() {
        Ok(admission) => admission,
        Err(code) => return End::Close(code),
    };
    let end = match Box::pin(session.start(socket, resume)).await {
        Ok(()) => match session.serve(socket).await {
            Ok(()) => End::Gone,
            Err(end) => end,
        },
        Err(end) => end,
    };
    session.cleanup();
    drop(admission);
    end
}

/// Waits for `hello` within the hello timeout. A connection still silent when the node
/// drains is told to go elsewhere.
async fn hello(
    node: &Node,
    socket: &mut WebSocket,
    evicted: &tokio_util::sync::CancellationToken,
) -> Result<(String, BTreeMap<String, StreamPosition>), End> {
    let hello_timeout = Duration::from_millis(node.config.hello_timeout_ms);
    let max_control = node.config.max_messages_per_sec;
    tokio::select! {
        r = timeout(hello_timeout, read_hello(socket, max_control)) => match r {
            Ok(r) => r,
            Err(_) => Err(End::Close(CloseCode::Timeout)),
        },
        // A newcomer needed this connection's place in the full pending budget.
        _ = evicted.cancelled() => Err(End::Close(CloseCode::TooMany)),
        _ = node.drain.cancelled() => {
            let _ = timeout(CLOSE_TIMEOUT, send_reconnect(socket)).await;
            Err(End::Close(CloseCode::Draining))
        }
    }
}

/// Counts how the connection ended and sends the close frame, if any.
async fn finish(node: &Node, socket: &mut WebSocket, end: End) {
    let (code, reason) = match end {
        End::Close(code) => (code, CloseReason::Default),
        End::CloseWith(code, reason) => (code, reason),
        End::Gone => {
            node.metrics.disconnected(None);
            return;
        }
    };
    node.metrics.disconnected(Some(code.code()));
    if code == CloseCode::SlowConsumer {
        node.metrics.slow_consumer_disconnects.inc();
    }
    close(socket, code, reason).await;
}

/// Where the session stands in one channel.
struct ChannelState {
    epoch: Arc<str>,
    last: u64,
    /// Joined through the server API, or confirmed by it while already in: kept when
    /// a refreshed token's patterns no longer match it (the backend, not the token,
    /// holds the session there).
    granted: bool,
}

/// Errors of a command, as reply errors.
struct CommandError(ErrorCode, String);

impl From<BrokerError> for CommandError {
    /// A fixed, generic message: the broker's own error text names addresses and
    /// internals no client should see. The log keeps the detail.
    fn from(e: BrokerError) -> Self {
        tracing::warn!(error = %e, "broker error answering a client command");
        match e {
            BrokerError::Unavailable(_) => CommandError(
                ErrorCode::Unavailable,
                "broker unavailable; try again".into(),
            ),
            BrokerError::Internal(_) => CommandError(ErrorCode::Internal, "internal error".into()),
        }
    }
}

/// Token bucket of commands; sending at twice the rate for a second closes with 4429.
struct RateLimit {
    rate: f64,
    tokens: f64,
    refilled: Instant,
    refused_in_window: u32,
    window_start: Instant,
}

enum Rate {
    Allow,
    Refuse,
    Close,
}

impl RateLimit {
    fn new(per_sec: u32) -> Self {
        let now = Instant::now();
        Self {
            rate: per_sec.max(1) as f64,
            tokens: per_sec.max(1) as f64,
            refilled: now,
            refused_in_window: 0,
            window_start: now,
        }
    }

    /// Takes a token if one is there, without counting a refusal (resume entries).
    fn try_take(&mut self) -> bool {
        self.refill(Instant::now());
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        false
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.refilled = now;
    }

    fn check(&mut self) -> Rate {
        let now = Instant::now();
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Rate::Allow;
        }
        if now.duration_since(self.window_start) > Duration::from_secs(1) {
            self.window_start = now;
            self.refused_in_window = 0;
        }
        self.refused_in_window += 1;
        if self.refused_in_window as f64 > self.rate {
            Rate::Close
        } else {
            Rate::Refuse
        }
    }
}

/// One authenticated session.
struct Session {
    node: Arc<Node>,
    id: SessionId,
    uuid: uuid::Uuid,
    claims: Claims,
    user: Arc<str>,
    personal: Arc<str>,
    /// The session's mailbox, shared with the hub.
    handle: SessionHandle,
    channels: HashMap<Arc<str>, ChannelState>,
    rate: RateLimit,
    last_recv: Instant,
    last_send: Instant,
    /// Whether a ping went out since the client last sent anything.
    pinged: bool,
    drain_at: Option<Instant>,
    /// When the write in progress (a batch, a reply, a recovery: everything up to its
    /// flush) must be done; `None` between writes. See [`Session::send`].
    write_deadline: Option<Instant>,
    /// The token's `exp`: the session closes with 4401 "token expired" then, unless a
    /// `refresh` moved it.
    expires_at: Instant,
    /// When to send `expiring`; `None` once sent for the current token.
    notice_at: Option<Instant>,
}

/// When a token with expiry `exp` (unix seconds) runs out, and when to announce it,
/// as instants of the session's clock.
fn token_timers(exp: u64, notice_ms: u64) -> (Instant, Option<Instant>) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let remaining = exp.saturating_mul(1000).saturating_sub(now_ms);
    let expires_at = Instant::now() + Duration::from_millis(remaining);
    let lead = crate::auth::expiry_notice_ms(remaining, notice_ms);
    (expires_at, Some(expires_at - Duration::from_millis(lead)))
}

impl Session {
    fn new(node: Arc<Node>, claims: Claims) -> Self {
        let user: Arc<str> = claims.sub.as_str().into();
        let personal: Arc<str> = user_channel(&user).into();
        let now = Instant::now();
        let (expires_at, notice_at) = token_timers(claims.exp, node.config.token_expiry_notice_ms);
        let handle = Arc::new(SessionControl::new(node.config.session_queue));
        handle.set_token_iat(claims.issued_at());
        Self {
            id: node.next_session_id(),
            uuid: uuid::Uuid::new_v4(),
            rate: RateLimit::new(node.config.max_messages_per_sec),
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
    /// rate, like a `subscribe` (entries beyond the bucket get `rate_limited` in
    /// `errors`); all channels together recover at most `max_recovery_bytes` of data,
    /// the personal channel first, then in name order.
    async fn start(
        &mut self,
        socket: &mut WebSocket,
        mut resume: BTreeMap<String, StreamPosition>,
    ) -> Result<(), End> {
        // Registered before the revocation check, never after: see `control`'s race note.
        // Over the user's connections on this node (one token must not take the node's
        // slots): 4429.
        let limit = self.node.config.max_connections_per_user;
        if !self
            .node
            .hub
            .users
            .register(&self.user, self.id, self.handle.clone(), limit)
        {
            return Err(End::Close(CloseCode::TooMany));
        }
        if let Some(w) = &self.node.webhooks {
            w.user_connected(&self.user);
        }
        if self
            .node
            .hub
            .revocations
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
            Err(CommandError(code, message)) => {
                // Without its personal channel the session is useless; the broker is down.
                tracing::debug!(?code, %message, "personal channel subscribe failed");
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
                Err(CommandError(code, message)) => {
                    errors.insert(channel, ErrorBody::new(code, message));
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
        self.send(socket, welcome.to_json()).await?;
        for (channel, pubs) in missed {
            self.send_publications(socket, &channel, &pubs).await?;
        }
        self.flush(socket).await
    }

    fn channel_name(&self, channel: &str) -> Arc<str> {
        self.channels
            .get_key_value(channel)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| channel.into())
    }

    /// Subscribes to a channel; returns the result and the recovered publications,
    /// which the caller sends after the reply. The recovery has a budget of its own.
    async fn subscribe(
        &mut self,
        channel: &str,
        since: Option<StreamPosition>,
    ) -> Result<(SubscribeResult, Vec<Publication>), CommandError> {
        let mut budget = RecoveryBudget::new(self.node.config.max_recovery_bytes);
        self.subscribe_within(channel, since, &mut budget).await
    }

    /// [`Session::subscribe`], recovering within what is left of `budget`.
    async fn subscribe_within(
        &mut self,
        channel: &str,
        since: Option<StreamPosition>,
        budget: &mut RecoveryBudget,
    ) -> Result<(SubscribeResult, Vec<Publication>), CommandError> {
        self.room_for(channel)?;
        if !self.claims.may_subscribe(channel) {
            return Err(CommandError(
                ErrorCode::Forbidden,
                format!("not allowed to subscribe to {channel}"),
            ));
        }
        self.join(channel, since, false, budget).await
    }

    /// Whether the session can join `channel`: not in it yet, and under its limit.
    fn room_for(&self, channel: &str) -> Result<(), CommandError> {
        if self.channels.contains_key(channel) {
            return Err(CommandError(
                ErrorCode::BadRequest,
                "already subscribed".into(),
            ));
        }
        if self.channels.len() >= self.node.config.max_subscriptions {
            return Err(CommandError(
                ErrorCode::BadRequest,
                format!(
                    "subscription limit ({}) reached",
                    self.node.config.max_subscriptions
                ),
            ));
        }
        Ok(())
    }

    /// Joins a channel the session may be in (checked by the caller): the hub, the
    /// stream position or recovery, presence. `granted`: joined by the server API.
    async fn join(
        &mut self,
        channel: &str,
        since: Option<StreamPosition>,
        granted: bool,
        budget: &mut RecoveryBudget,
    ) -> Result<(SubscribeResult, Vec<Publication>), CommandError> {
        self.room_for(channel)?;
        let node = Arc::clone(&self.node);
        node.hub.join(channel, self.id, self.handle.clone()).await?;
        // Joined first, read the stream second: whatever is published in between
        // arrives both ways, and the offset check drops the second copy.
        let outcome = self.recover(channel, since, budget).await;
        let (result, pubs) = match outcome {
            Ok(r) => r,
            Err(e) => {
                node.hub.leave(channel, self.id);
                return Err(e.into());
            }
        };
        let position = StreamPosition::new(result.offset, result.epoch.clone());
        node.hub.seed(channel, &position);
        let name: Arc<str> = channel.into();
        node.presence.join(&name, &self.user);
        if let Some(w) = &node.webhooks {
            w.channel_joined(&name);
        }
        node.metrics.subscriptions.inc();
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

    /// Reads where the channel stands and, with `since`, what the client missed, if it
    /// fits in `budget`: a channel is recovered completely or not at all.
    async fn recover(
        &self,
        channel: &str,
        since: Option<StreamPosition>,
        budget: &mut RecoveryBudget,
    ) -> Result<(SubscribeResult, Vec<Publication>), BrokerError> {
        let broker = &self.node.broker;
        let Some(since) = since else {
            let p = broker.position(channel).await?;
            return Ok((
                SubscribeResult {
                    offset: p.offset,
                    epoch: p.epoch,
                    recovered: false,
                },
                Vec::new(),
            ));
        };
        let history = broker
            .history(channel, since.offset, self.node.config.history_size.max(1))
            .await?;
        let top = history.position;
        let mut recovered = false;
        let mut pubs = Vec::new();
        if since.continues_with(&top.epoch) && since.offset <= top.offset {
            let missing = top.offset - since.offset;
            let contiguous =
                history.publications.iter().enumerate().all(|(i, p)| {
                    p.offset == since.offset + 1 + i as u64 && *p.epoch == *top.epoch
                });
            if history.publications.len() as u64 >= missing && contiguous {
                pubs = history.publications;
                pubs.truncate(missing as usize);
                recovered = budget.take(&pubs);
                if !recovered {
                    // Honest, never a silent gap: the client is told it was not
                    // recovered and starts from the current position.
                    self.node.metrics.recovery_over_budget.inc();
                    pubs = Vec::new();
                }
            }
        }
        Ok((
            SubscribeResult {
                offset: top.offset,
                epoch: top.epoch,
                recovered,
            },
            pubs,
        ))
    }

    /// Queues a frame for the socket (writing out what the buffer cannot hold).
    ///
    /// Every write is bounded in time: the first `send` (or `flush`) of a write starts
    /// a deadline of `write_timeout`, which covers every frame up to the `flush` that
    /// ends it. A client that does not take the write within it, whatever the write is
    /// (live messages, a reply, `welcome`, a recovery), is a slow consumer: 4509.
    async fn send(
        &mut self,
        socket: &mut WebSocket,
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
    async fn flush(&mut self, socket: &mut WebSocket) -> Result<(), End> {
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
    fn write_deadline(&mut self, now: Instant) -> Instant {
        *self
            .write_deadline
            .get_or_insert_with(|| now + self.node.config.write_timeout())
    }

    async fn send_publications(
        &mut self,
        socket: &mut WebSocket,
        channel: &Arc<str>,
        pubs: &[Publication],
    ) -> Result<(), End> {
        for p in pubs {
            let frame = herald_protocol::frame::encode_message(
                channel,
                p.offset,
                &p.epoch,
                p.from.as_deref(),
                &p.data,
            );
            self.send(socket, frame).await?;
            self.node.metrics.messages_delivered.inc();
        }
        Ok(())
    }

    /// The main loop after `welcome`.
    async fn serve(&mut self, socket: &mut WebSocket) -> Result<(), End> {
        let heartbeat = self.node.config.heartbeat();
        let control = Arc::clone(&self.handle);
        let drain = self.node.drain.clone();
        let force = self.node.force_close.clone();
        let sleep = tokio::time::sleep_until(self.next_timer(heartbeat));
        tokio::pin!(sleep);
        loop {
            sleep.as_mut().reset(self.next_timer(heartbeat));
            tokio::select! {
                frame = socket.recv() => {
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
                        Some(Err(e)) => return Err(read_error(&e)),
                    }
                }
                item = control.next() => {
                    // Nothing goes out after the token's `exp`, even when this branch
                    // wins the race against the timer.
                    let expires_at = self.expires_at;
                    if Instant::now() >= expires_at {
                        return Err(End::CloseWith(CloseCode::Unauthorized, CloseReason::TokenExpired));
                    }
                    // A write that stalls loses against a close request, its deadline
                    // (`send`) or the token's expiry (a client that stops reading must
                    // not keep an expired session, and the messages behind it, open).
                    tokio::select! {
                        r = self.write_batch(socket, item) => r?,
                        (code, reason) = control.closed() => return Err(End::CloseWith(code_of(code), reason)),
                        _ = tokio::time::sleep_until(expires_at) => {
                            return Err(End::CloseWith(CloseCode::Unauthorized, CloseReason::TokenExpired));
                        }
                    }
                }
                (code, reason) = control.closed() => return Err(End::CloseWith(code_of(code), reason)),
                _ = force.cancelled() => return Err(End::Close(CloseCode::Draining)),
                _ = drain.cancelled(), if self.drain_at.is_none() => {
                    let spread = self.node.config.drain().mul_f64(0.8);
                    let delay = rand::rng().random_range(0..=spread.as_millis() as u64);
                    self.drain_at = Some(Instant::now() + Duration::from_millis(delay));
                }
                _ = &mut sleep => {
                    let now = Instant::now();
                    if self.drain_at.is_some_and(|t| now >= t) {
                        let _ = timeout(CLOSE_TIMEOUT, send_reconnect(socket)).await;
                        return Err(End::Close(CloseCode::Draining));
                    }
                    if now >= self.last_recv + heartbeat * 2 {
                        return Err(End::Close(CloseCode::Timeout));
                    }
                    if now >= self.expires_at {
                        return Err(End::CloseWith(CloseCode::Unauthorized, CloseReason::TokenExpired));
                    }
                    if self.notice_at.is_some_and(|t| now >= t) {
                        self.notice_at = None;
                        let in_ms = self.expires_at.saturating_duration_since(now).as_millis() as u64;
                        let frame = ServerFrame::Expiring(Expiring { in_ms }).to_json();
                        // Bounded like every write (`send`).
                        self.send(socket, frame).await?;
                        self.flush(socket).await?;
                    }
                    // Ping after a heartbeat of silence either way: ours (keeps
                    // intermediaries from timing out) or the client's (it must answer, even
                    // on a channel so busy that we are never silent).
                    let client_silent = !self.pinged && now >= self.last_recv + heartbeat;
                    if client_silent || now >= self.last_send + heartbeat {
                        self.pinged = true;
                        self.send(socket, ServerFrame::Ping.to_json()).await?;
                        self.flush(socket).await?;
                    }
                }
            }
        }
    }

    fn next_timer(&self, heartbeat: Duration) -> Instant {
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

    /// Writes `first` and whatever else is queued (up to a batch), then flushes once.
    async fn write_batch(&mut self, socket: &mut WebSocket, first: Outbound) -> Result<(), End> {
        self.write_item(socket, first).await?;
        for _ in 1..BATCH {
            match self.handle.try_next() {
                Some(item) => self.write_item(socket, item).await?,
                None => break,
            }
        }
        self.flush(socket).await
    }

    async fn write_item(&mut self, socket: &mut WebSocket, item: Outbound) -> Result<(), End> {
        match item {
            Outbound::Message(d) => {
                let Some(state) = self.channels.get(&d.channel) else {
                    return Ok(()); // unsubscribed meanwhile
                };
                let (epoch, last) = (state.epoch.clone(), state.last);
                // The rare paths are boxed to keep them out of the task's size.
                if !same_stream(last, &epoch, &d.epoch) {
                    let position = StreamPosition::new(d.offset - 1, &*d.epoch);
                    Box::pin(self.resync(socket, &d.channel, position)).await?;
                } else if d.offset <= last {
                    return Ok(()); // already delivered
                } else if d.offset > last + 1 {
                    // d's epoch: from offset 0 the gap is in whatever epoch d is in.
                    Box::pin(self.fill_gap(socket, &d.channel, &d.epoch, last, d.offset)).await?;
                }
                self.send(socket, d.frame.clone()).await?;
                self.node.metrics.messages_delivered.inc();
                if let Some(state) = self.channels.get_mut(&d.channel) {
                    state.epoch = d.epoch.clone();
                    state.last = d.offset;
                }
                Ok(())
            }
            Outbound::Control(command) => Box::pin(self.control(socket, &command)).await,
            Outbound::Resync(resync) => {
                let (channel, position) = *resync;
                let behind = self.channels.get(&channel).is_some_and(|s| {
                    !same_stream(s.last, &s.epoch, &position.epoch) || s.last < position.offset
                });
                if behind {
                    Box::pin(self.resync(socket, &channel, position)).await?;
                }
                Ok(())
            }
        }
    }

    /// The session saw a gap the hub did not repair (rare): fill it from history, or
    /// tell the client to resync.
    async fn fill_gap(
        &mut self,
        socket: &mut WebSocket,
        channel: &Arc<str>,
        epoch: &Arc<str>,
        last: u64,
        next: u64,
    ) -> Result<(), End> {
        let want = (next - last - 1) as usize;
        if let Ok(h) = self.node.broker.history(channel, last, want).await {
            let complete = h.publications.len() == want
                && h.publications
                    .iter()
                    .enumerate()
                    .all(|(i, p)| p.offset == last + 1 + i as u64 && *p.epoch == **epoch);
            if complete {
                self.send_publications(socket, channel, &h.publications)
                    .await?;
                self.node.metrics.gaps_repaired.inc();
                return Ok(());
            }
        }
        self.resync(socket, channel, StreamPosition::new(next - 1, &**epoch))
            .await
    }

    async fn resync(
        &mut self,
        socket: &mut WebSocket,
        channel: &Arc<str>,
        position: StreamPosition,
    ) -> Result<(), End> {
        if let Some(state) = self.channels.get_mut(channel) {
            state.epoch = position.epoch.as_str().into();
            state.last = position.offset;
        }
        self.node.metrics.resyncs.inc();
        let frame = ServerFrame::Resync(Resync {
            channel: channel.to_string(),
            offset: position.offset,
            epoch: position.epoch,
        });
        self.send(socket, frame.to_json()).await
    }

    /// Handles one text frame after `welcome`.
    async fn command(&mut self, socket: &mut WebSocket, text: &str) -> Result<(), End> {
        let parsed = ClientCommand::parse(text);
        let (id, kind) = match &parsed {
            Err(ParseError::NotACommand(_)) | Ok(ClientCommand::Hello { .. }) => {
                return Err(End::Close(CloseCode::BadRequest))
            }
            Ok(ClientCommand::Pong) => (None, "pong"),
            Err(ParseError::BadArgument { id, .. }) => (*id, "invalid"),
            Ok(ClientCommand::Subscribe { id, .. }) => (Some(*id), "subscribe"),
            Ok(ClientCommand::Unsubscribe { id, .. }) => (Some(*id), "unsubscribe"),
            Ok(ClientCommand::Publish { id, .. }) => (Some(*id), "publish"),
            Ok(ClientCommand::Presence { id, .. }) => (Some(*id), "presence"),
            Ok(ClientCommand::Refresh { id, .. }) => (Some(*id), "refresh"),
        };
        self.node
            .metrics
            .commands
            .get_or_create(&crate::metrics::CommandLabel { command: kind })
            .inc();
        // Every frame counts against the rate, malformed ones and pongs included.
        match self.rate.check() {
            Rate::Allow => {}
            // A pong expects no reply, so a refused one is only counted.
            Rate::Refuse if matches!(parsed, Ok(ClientCommand::Pong)) => {
                self.node.metrics.rate_limited.inc();
                return Ok(());
            }
            Rate::Refuse => {
                self.node.metrics.rate_limited.inc();
                let err = CommandError(
                    ErrorCode::RateLimited,
                    "too many commands; slow down".into(),
                );
                return self.reply(socket, id, Err(err)).await;
            }
            Rate::Close => return Err(End::Close(CloseCode::TooMany)),
        }
        let command = match parsed {
            Ok(c) => c,
            Err(ParseError::BadArgument { message, .. }) => {
                let err = CommandError(ErrorCode::BadRequest, message);
                return self.reply(socket, id, Err(err)).await;
            }
            Err(ParseError::NotACommand(_)) => return Err(End::Close(CloseCode::BadRequest)),
        };
        let id = id.unwrap_or_default();
        match command {
            ClientCommand::Subscribe { channel, since, .. } => {
                match self.subscribe(&channel, since).await {
                    Ok((result, pubs)) => {
                        let value = serde_json::to_value(&result).expect("serializable");
                        self.reply(socket, Some(id), Ok(value)).await?;
                        let name = self.channel_name(&channel);
                        self.send_publications(socket, &name, &pubs).await?;
                        self.flush(socket).await
                    }
                    Err(e) => self.reply(socket, Some(id), Err(e)).await,
                }
            }
            ClientCommand::Unsubscribe { channel, .. } => {
                let result = self.unsubscribe(&channel).map(|()| json!({}));
                self.reply(socket, Some(id), result).await
            }
            ClientCommand::Publish { channel, data, .. } => {
                let result = self.publish(&channel, data.get()).await;
                self.reply(socket, Some(id), result).await
            }
            ClientCommand::Presence { channel, .. } => {
                let result = self.presence(&channel).await;
                self.reply(socket, Some(id), result).await
            }
            ClientCommand::Refresh { token, .. } => self.refresh(socket, id, &token).await,
            ClientCommand::Pong | ClientCommand::Hello { .. } => Ok(()),
        }
    }

    /// Counts a frame that gets no answer (a WebSocket ping or pong) against the rate.
    fn count_silent_frame(&mut self) -> Result<(), End> {
        match self.rate.check() {
            Rate::Allow => Ok(()),
            Rate::Refuse => {
                self.node.metrics.rate_limited.inc();
                Ok(())
            }
            Rate::Close => Err(End::Close(CloseCode::TooMany)),
        }
    }

    fn unsubscribe(&mut self, channel: &str) -> Result<(), CommandError> {
        if *channel == *self.personal {
            return Err(CommandError(
                ErrorCode::Forbidden,
                "the personal channel cannot be left".into(),
            ));
        }
        self.leave(channel);
        Ok(())
    }

    /// Leaves a channel; whether the session was in it.
    fn leave(&mut self, channel: &str) -> bool {
        match self.channels.remove_entry(channel) {
            Some((name, _)) => {
                self.node.hub.leave(&name, self.id);
                self.node.presence.leave(&name, &self.user);
                if let Some(w) = &self.node.webhooks {
                    w.channel_left(&name);
                }
                self.node.metrics.subscriptions.dec();
                self.handle.set_full(false);
                true
            }
            None => false,
        }
    }

    /// `refresh`: swaps the session's token for a fresh one of the same user. A token
    /// that does not verify leaves the old one in place (the session still ends at the
    /// old `exp`). The new token's patterns apply at once: channels they no longer
    /// allow are left, each with an `unsubscribed` frame; server-granted ones stay.
    async fn refresh(&mut self, socket: &mut WebSocket, id: u64, token: &str) -> Result<(), End> {
        let claims = match self.node.keys.verifier.verify(token) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "refresh token refused");
                let err = CommandError(ErrorCode::Unauthorized, "invalid or expired token".into());
                return self.reply(socket, Some(id), Err(err)).await;
            }
        };
        if claims.sub != self.claims.sub {
            let err = CommandError(ErrorCode::Forbidden, "the token is for another user".into());
            return self.reply(socket, Some(id), Err(err)).await;
        }
        if self
            .node
            .hub
            .revocations
            .is_revoked(&claims.sub, claims.issued_at(), now_secs())
        {
            let err = CommandError(ErrorCode::Unauthorized, "token revoked".into());
            return self.reply(socket, Some(id), Err(err)).await;
        }
        let lost: Vec<Arc<str>> = self
            .channels
            .iter()
            .filter(|(name, state)| {
                !state.granted && ***name != *self.personal && !claims.may_subscribe(name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        (self.expires_at, self.notice_at) =
            token_timers(claims.exp, self.node.config.token_expiry_notice_ms);
        self.handle.set_token_iat(claims.issued_at());
        self.claims = claims;
        for channel in &lost {
            self.leave(channel);
        }
        let reply = ServerFrame::Reply(Reply {
            id: Some(id),
            result: Some(json!({})),
            error: None,
        });
        self.send(socket, reply.to_json()).await?;
        for channel in lost {
            let frame = ServerFrame::Unsubscribed(Unsubscribed {
                channel: channel.to_string(),
                reason: "permissions".into(),
            });
            self.send(socket, frame.to_json()).await?;
        }
        self.flush(socket).await
    }

    /// A server API command for this session's user: join or leave a channel, and tell
    /// the client with `subscribed` / `unsubscribed`. (Closes do not come this way: the
    /// hub asks for them directly.)
    async fn control(&mut self, socket: &mut WebSocket, command: &UserCommand) -> Result<(), End> {
        match command {
            UserCommand::Subscribe { channel } => {
                if let Some(state) = self.channels.get_mut(channel.as_str()) {
                    // In it by its own subscribe: the backend now holds the membership
                    // too, so a refresh that drops the pattern keeps the channel.
                    state.granted = true;
                    return Ok(());
                }
                // No `since`: nothing is recovered, the budget is a formality.
                let mut budget = RecoveryBudget::new(self.node.config.max_recovery_bytes);
                match self.join(channel, None, true, &mut budget).await {
                    Ok((result, _)) => {
                        let frame = ServerFrame::Subscribed(Subscribed {
                            channel: channel.clone(),
                            offset: result.offset,
                            epoch: result.epoch,
                        });
                        self.send(socket, frame.to_json()).await?;
                        self.flush(socket).await
                    }
                    Err(CommandError(code, message)) => {
                        // At its subscription limit, or the broker is down: the session
                        // stays as it is; the API caller sees the user's presence.
                        tracing::debug!(?code, %message, channel, "server subscribe not applied");
                        Ok(())
                    }
                }
            }
            UserCommand::Unsubscribe { channel } => {
                if **channel == *self.personal || !self.leave(channel) {
                    return Ok(());
                }
                let frame = ServerFrame::Unsubscribed(Unsubscribed {
                    channel: channel.clone(),
                    reason: "server".into(),
                });
                self.send(socket, frame.to_json()).await?;
                self.flush(socket).await
            }
            UserCommand::Disconnect { .. } | UserCommand::Revoke { .. } => Ok(()),
        }
    }

    async fn publish(&self, channel: &str, data: &str) -> Result<serde_json::Value, CommandError> {
        if !self.claims.may_publish(channel) {
            return Err(CommandError(
                ErrorCode::Forbidden,
                format!("not allowed to publish to {channel}"),
            ));
        }
        // `from` is always the session's user: a client cannot choose it (any `from` in
        // its frame is not even parsed).
        let position = self
            .node
            .broker
            .publish(channel, data, Some(&self.user))
            .await
            .inspect_err(|_| {
                self.node.metrics.broker_errors.inc();
            })?;
        self.node.metrics.messages_published.inc();
        self.node.metrics.message_bytes.observe(data.len() as f64);
        Ok(json!({"offset": position.offset, "epoch": position.epoch}))
    }

    async fn presence(&self, channel: &str) -> Result<serde_json::Value, CommandError> {
        // A member the backend put in the channel may see who else is in it, whatever
        // the token's patterns say.
        let granted = self.channels.get(channel).is_some_and(|s| s.granted);
        if !granted && !self.claims.may_subscribe(channel) {
            return Err(CommandError(
                ErrorCode::Forbidden,
                format!("not allowed to see presence of {channel}"),
            ));
        }
        let users = self.node.broker.presence(channel).await?;
        Ok(json!({ "users": users }))
    }

    async fn reply(
        &mut self,
        socket: &mut WebSocket,
        id: Option<u64>,
        result: Result<serde_json::Value, CommandError>,
    ) -> Result<(), End> {
        let reply = match result {
            Ok(value) => Reply {
                id,
                result: Some(value),
                error: None,
            },
            Err(CommandError(code, message)) => Reply {
                id,
                result: None,
                error: Some(ErrorBody::new(code, message)),
            },
        };
        self.send(socket, ServerFrame::Reply(reply).to_json())
            .await?;
        self.flush(socket).await
    }

    /// Leaves every channel.
    fn cleanup(&mut self) {
        self.handle.end();
        let registered = self.node.hub.users.unregister(&self.user, self.id);
        let webhooks = self.node.webhooks.as_ref();
        if let (true, Some(w)) = (registered, webhooks) {
            w.user_disconnected(&self.user);
        }
        for (name, _) in self.channels.drain() {
            self.node.hub.leave(&name, self.id);
            self.node.presence.leave(&name, &self.user);
            if let Some(w) = webhooks {
                w.channel_left(&name);
            }
            self.node.metrics.subscriptions.dec();
        }
    }
}

fn code_of(code: u16) -> CloseCode {
    CloseCode::from_code(code).unwrap_or(CloseCode::SlowConsumer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn origins() {
        let mut h = HeaderMap::new();
        assert!(origin_allowed(None, &h));
        let list = vec!["https://app.example".to_string()];
        assert!(
            origin_allowed(Some(&list), &h),
            "no Origin header: not a browser"
        );
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://app.example"),
        );
        assert!(origin_allowed(Some(&list), &h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!origin_allowed(Some(&list), &h));
    }

    #[tokio::test]
    async fn rate_limit_refuses_then_closes() {
        let mut r = RateLimit::new(5);
        let mut outcomes = (0, 0, 0);
        for _ in 0..20 {
            match r.check() {
                Rate::Allow => outcomes.0 += 1,
                Rate::Refuse => outcomes.1 += 1,
                Rate::Close => {
                    outcomes.2 += 1;
                    break;
                }
            }
        }
        assert_eq!(outcomes.0, 5);
        assert_eq!(outcomes.1, 5);
        assert_eq!(outcomes.2, 1);
    }

    #[tokio::test]
    async fn resume_entries_take_tokens_without_counting_refusals() {
        let mut r = RateLimit::new(3);
        assert!(r.try_take() && r.try_take() && r.try_take());
        for _ in 0..10 {
            assert!(!r.try_take(), "the bucket is empty");
        }
        // Refused resume entries do not push the connection towards a 4429.
        assert!(matches!(r.check(), Rate::Refuse));
    }
}
