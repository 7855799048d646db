//! The connection task: the only owner of the socket. It finds a node, says `hello`,
//! serves one session at a time, and after each one decides from the close code whether
//! and when to connect again.
//!
//! The [`Client`] handles talk to it over a command channel and get their answers on
//! one-shot channels; the application reads [`Events`]. Between sessions the task keeps
//! answering commands: channel changes go into the [`Tracker`] (and so into the next
//! `hello`), `publish`/`presence` wait in a queue for the next session.
//!
//! What each close code makes the task do (docs/protocol.md "Close codes", [`CloseCode`]):
//!
//! | close | next step |
//! |---|---|
//! | 4503 draining after `reconnect` | reconnect after the server's `after_ms`, to another node, no backoff |
//! | 4503 without `reconnect` | back off (a jitter of up to 250 ms after a stable session), reconnect |
//! | 4401 unauthorized (also "token expired") | ask the token callback again, back off, reconnect; with a fixed token: stop |
//! | 4410 kicked | stop ([`StopReason::Kicked`]) |
//! | 4400, 4403, 1009 | stop ([`StopReason::Rejected`]) |
//! | 4408, 4429, 4509, anything else, a broken connection, a silent one | back off, reconnect, resume |
//!
//! Within a session, `expiring` starts a token refresh ([`Refresh`]): the callback runs
//! as a future polled by the session loop next to the socket, so messages keep flowing
//! while it runs, and its `refresh` command is answered like any other.
//!
//! Nothing the server sends can stop or wedge the task: frames that do not parse are
//! skipped (a `reply` among them still settles its command, with [`Error::Protocol`]),
//! and durations taken from frames (`heartbeat_ms`, `after_ms`, `in_ms`) are capped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald_protocol::channel::user_channel;
use herald_protocol::codes::{CloseCode, ErrorCode};
use herald_protocol::frame::{
    ClientCommand, ErrorBody, Reply as ReplyFrame, ServerFrame, SubscribeResult, Welcome,
};
use herald_protocol::StreamPosition;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::backoff::{jitter, Backoff};
use crate::config::{check_channel, Config, TokenSource};
use crate::endpoints::Endpoints;
use crate::error::Error;
use crate::event::{
    Connected, DisconnectReason, Disconnected, EphemeralMessage, Event, Message, State, StopReason,
    Subscription,
};
use crate::refresh::{Refresh, Stage};
use crate::tracker::{Tracker, Verdict};

/// The one-shot channel a command's answer goes back on.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, Error>>;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The least delay before a subscribe refused for a passing reason is tried again.
const RETRY_MIN: Duration = Duration::from_millis(500);

/// The longest heartbeat silence the watchdog accepts; `heartbeat_ms` is the server's
/// word, and a huge one must neither overflow an `Instant` nor disable the watchdog for
/// good.
const MAX_SILENCE: Duration = Duration::from_secs(86_400);

/// Auto-acks are coalesced over this long: a burst of messages of the personal channel
/// costs one `ack` frame (at most 10 per second, far below any command rate limit).
pub const ACK_DELAY: Duration = Duration::from_millis(100);

/// A token callback running for a refresh, bounded by the connect timeout.
type Fetch = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// A request from a [`Client`] handle.
pub(crate) enum Command {
    Subscribe {
        channel: String,
        since: Option<StreamPosition>,
        reply: Reply<Subscription>,
    },
    Unsubscribe {
        channel: String,
        reply: Reply<()>,
    },
    Publish {
        channel: String,
        data: Box<RawValue>,
        reply: Reply<StreamPosition>,
    },
    PublishEphemeral {
        channel: String,
        data: Box<RawValue>,
        reply: Reply<()>,
    },
    Presence {
        channel: String,
        reply: Reply<BTreeMap<String, u64>>,
    },
    Positions {
        reply: Reply<BTreeMap<String, StreamPosition>>,
    },
    Ack {
        offset: u64,
        reply: Reply<()>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

/// Starts the connection task; the handles become a `Client` and its `Events`.
pub(crate) fn spawn(runtime: &tokio::runtime::Handle, config: Config) -> Handles {
    let config = Arc::new(config);
    let (commands_tx, commands) = mpsc::channel(64);
    let (events_tx, events) = mpsc::channel(config.event_buffer);
    let (state_tx, state) = watch::channel(State::Connecting);
    let (closing_tx, closing) = watch::channel(false);
    let mut tracker = Tracker::default();
    for (channel, since) in &config.initial {
        tracker.add(channel, since.clone());
    }
    let driver = Driver {
        endpoints: Endpoints::new(config.endpoints.clone(), config.http.clone()),
        backoff: Backoff::new(config.backoff_initial, config.backoff_max),
        config: Arc::clone(&config),
        commands,
        events: events_tx,
        closing,
        state: state_tx,
        tracker,
        token: None,
        subscribers: HashMap::new(),
        queued: VecDeque::new(),
        next_id: 1,
        last_node: None,
        closers: Vec::new(),
        auto_ack: None,
        ack_at: None,
    };
    runtime.spawn(driver.run());
    Handles {
        commands: commands_tx,
        state,
        closing: closing_tx,
        request_timeout: config.request_timeout,
        events,
    }
}

/// What the application's handles hold of a started connection task.
pub(crate) struct Handles {
    /// Where the `Client` handles send their commands.
    pub(crate) commands: mpsc::Sender<Command>,
    /// The connection state.
    pub(crate) state: watch::Receiver<State>,
    /// Set by `close()`, so the task stops waiting on a full event buffer.
    pub(crate) closing: watch::Sender<bool>,
    /// How long a request waits for an answer.
    pub(crate) request_timeout: Duration,
    /// The application's events.
    pub(crate) events: mpsc::Receiver<Event>,
}

/// How a session or an attempt ended.
#[derive(Debug)]
enum End {
    /// The server closed with a code; `after` is the hint of a `reconnect` frame
    /// received before the close.
    Closed {
        code: u16,
        reason: String,
        after: Option<Duration>,
    },
    /// No frame for 2 × heartbeat.
    HeartbeatTimeout,
    /// The socket broke without a close frame.
    Lost(String),
    /// Connecting or `hello` failed.
    ConnectFailed(String),
    /// The TLS handshake failed (of the WebSocket or of every `/v1/connect` tried).
    Tls(String),
    /// No endpoint gave a URL.
    NoEndpoint(String),
    /// The token callback failed.
    Token(String),
    /// The client must stop.
    Stop(StopReason),
}

/// What follows the end of a session or attempt.
enum Next {
    /// Connect again after this delay.
    Retry(Duration),
    /// Stop for good.
    Stop(StopReason),
}

/// A command sent on the current session, waiting for its reply.
enum Pending {
    /// Waiters are in `Driver::subscribers`, keyed by channel.
    Subscribe(String),
    Unsubscribe(Reply<()>),
    Publish(Reply<StreamPosition>),
    PublishEphemeral(Reply<()>),
    Presence(String, Reply<BTreeMap<String, u64>>),
    /// A `refresh` with this new token.
    Refresh(String),
    /// A manual `ack` of this offset.
    Ack(u64, Reply<()>),
    /// Sent by the task itself; nobody waits.
    Ignore,
}

/// A command waiting for a session.
enum Queued {
    Publish(String, Box<RawValue>, Reply<StreamPosition>),
    Presence(String, Reply<BTreeMap<String, u64>>),
    Ack(u64, Reply<()>),
}

/// One live session: the socket and the commands in flight on it.
struct Session {
    ws: Ws,
    pending: HashMap<u64, Pending>,
    /// Channels refused for a passing reason (`unavailable`, …), subscribed again at
    /// `retry_at`.
    retry: Vec<String>,
    retry_at: Option<Instant>,
    /// `after_ms` of a `reconnect` frame: a planned close follows.
    reconnect_after: Option<Duration>,
    /// The token refresh after `expiring`.
    refresh: Refresh,
    /// The token callback of a refresh, while it runs.
    fetch: Option<Fetch>,
}

impl Session {
    async fn send(&mut self, command: &ClientCommand) -> Result<(), End> {
        self.ws
            .send(WsMessage::text(command.to_json()))
            .await
            .map_err(|e| End::Lost(e.to_string()))
    }
}

struct Driver {
    config: Arc<Config>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    /// True once `close()` was called (or every handle is gone).
    closing: watch::Receiver<bool>,
    state: watch::Sender<State>,
    tracker: Tracker,
    endpoints: Endpoints,
    backoff: Backoff,
    /// The token to use; `None` asks the provider first.
    token: Option<String>,
    /// Callers waiting for a channel's subscription to be confirmed.
    subscribers: HashMap<String, Vec<Reply<Subscription>>>,
    queued: VecDeque<Queued>,
    next_id: u64,
    last_node: Option<String>,
    /// `close()` calls waiting for the task to finish.
    closers: Vec<oneshot::Sender<()>>,
    /// The auto-ack to send: the last delivered position of the personal channel.
    auto_ack: Option<StreamPosition>,
    /// When to send it (a burst coalesces into one frame, see [`ACK_DELAY`]).
    ack_at: Option<Instant>,
}

impl Driver {
    async fn run(mut self) {
        let reason = self.connect_loop().await;
        self.finish(reason).await;
    }

    /// Connects, serves, and reconnects until the client must stop.
    async fn connect_loop(&mut self) -> StopReason {
        let mut avoid: Option<String> = None;
        loop {
            self.state.send_replace(State::Connecting);
            let (end, url) = self.attempt(avoid.take()).await;
            let next = self.decide(&end);
            let reason = match end {
                End::Stop(reason) => return reason,
                End::Closed { code, reason, .. } => DisconnectReason::Closed { code, reason },
                End::HeartbeatTimeout => DisconnectReason::HeartbeatTimeout,
                End::Lost(e) => DisconnectReason::ConnectionLost(e),
                End::ConnectFailed(e) => DisconnectReason::ConnectFailed(e),
                End::Tls(e) => DisconnectReason::Tls(e),
                End::NoEndpoint(e) => DisconnectReason::NoEndpoint(e),
                End::Token(e) => DisconnectReason::Token(e),
            };
            let retry_in = match &next {
                Next::Retry(delay) => Some(*delay),
                Next::Stop(_) => None,
            };
            tracing::info!(url = url.as_deref(), ?reason, ?retry_in, "disconnected");
            self.emit(Event::Disconnected(Disconnected {
                url: url.clone(),
                reason,
                retry_in,
            }))
            .await;
            let delay = match next {
                Next::Stop(stop) => return stop,
                Next::Retry(delay) => delay,
            };
            avoid = url;
            self.state.send_replace(State::Reconnecting);
            if let Err(stop) = self.offline(tokio::time::sleep(delay)).await {
                return stop;
            }
        }
    }

    /// One attempt: token, endpoint, handshake, then the session until it ends.
    /// Returns how it ended and the URL involved.
    async fn attempt(&mut self, avoid: Option<String>) -> (End, Option<String>) {
        let token = match self.token().await {
            Ok(token) => token,
            Err(end) => return (end, None),
        };
        let picked = match self.offline(self.endpoints.pick(avoid)).await {
            Err(stop) => return (End::Stop(stop), None),
            Ok(Err(e)) if e.tls => return (End::Tls(e.message), None),
            Ok(Err(e)) => return (End::NoEndpoint(e.message), None),
            Ok(Ok(picked)) => picked,
        };
        self.endpoints.used(picked.index);
        let url = picked.url;
        let handshake = handshake(
            Arc::clone(&self.config),
            url.clone(),
            token,
            self.tracker.resume(),
        );
        let timeout = self.config.connect_timeout;
        let (ws, welcome) = match self.offline(tokio::time::timeout(timeout, handshake)).await {
            Err(stop) => return (End::Stop(stop), Some(url)),
            Ok(Err(_)) => {
                let e = format!("no welcome within {timeout:?}");
                return (End::ConnectFailed(e), Some(url));
            }
            Ok(Ok(Err(end))) => return (end, Some(url)),
            Ok(Ok(Ok(up))) => up,
        };
        let started = Instant::now();
        let end = self.serve(ws, welcome, &url).await;
        if started.elapsed() >= self.config.stable_after {
            self.backoff.reset();
        }
        (end, Some(url))
    }

    /// The current token, asking the provider when there is none.
    async fn token(&mut self) -> Result<String, End> {
        if let Some(token) = &self.token {
            return Ok(token.clone());
        }
        let token = match &self.config.token {
            TokenSource::Static(token) => token.clone(),
            TokenSource::Provider(provider) => {
                let timeout = self.config.connect_timeout;
                match self
                    .offline(tokio::time::timeout(timeout, provider()))
                    .await
                {
                    Err(stop) => return Err(End::Stop(stop)),
                    Ok(Err(_)) => return Err(End::Token(format!("no token within {timeout:?}"))),
                    Ok(Ok(Err(e))) => return Err(End::Token(e.to_string())),
                    Ok(Ok(Ok(token))) => token,
                }
            }
        };
        self.token = Some(token.clone());
        Ok(token)
    }

    /// What follows the end of a session or attempt.
    fn decide(&mut self, end: &End) -> Next {
        let (code, reason, after) = match end {
            End::Stop(reason) => return Next::Stop(reason.clone()),
            End::Closed {
                code,
                reason,
                after,
            } => (*code, reason, *after),
            _ => return Next::Retry(self.backoff.next_delay()),
        };
        match (CloseCode::from_code(code), after) {
            // A drain: the server already spread its clients over `after_ms` (capped:
            // a bogus huge value must not park the client for good).
            (Some(CloseCode::Draining), Some(after)) => {
                Next::Retry(after.min(self.config.backoff_max))
            }
            (Some(CloseCode::Kicked), _) => Next::Stop(StopReason::Kicked {
                reason: reason.clone(),
            }),
            (Some(CloseCode::Unauthorized), _) => match self.config.token {
                TokenSource::Static(_) => Next::Stop(StopReason::Unauthorized),
                TokenSource::Provider(_) => {
                    self.token = None;
                    Next::Retry(self.backoff.next_delay())
                }
            },
            (Some(c), _) if !c.should_reconnect() => Next::Stop(StopReason::Rejected {
                code,
                reason: reason.clone(),
            }),
            // Everything else may happen again, so back off. That includes 4503 without
            // `reconnect` (the broker was down at hello, or the drain window ended):
            // after a stable session the first delay is a mere jitter of up to 250 ms.
            _ => Next::Retry(self.backoff.next_delay()),
        }
    }

    /// Runs `work` while answering commands as a disconnected client.
    /// `Err` when the client must stop meanwhile.
    async fn offline<F: Future>(&mut self, work: F) -> Result<F::Output, StopReason> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return Ok(out),
                command = self.commands.recv() => match command {
                    None => return Err(StopReason::ClientClosed),
                    Some(Command::Close { done }) => {
                        self.closers.push(done);
                        return Err(StopReason::ClientClosed);
                    }
                    Some(command) => self.command_offline(command),
                },
            }
        }
    }

    fn command_offline(&mut self, command: Command) {
        match command {
            Command::Subscribe {
                channel,
                since,
                reply,
            } => {
                // Subscribed at the next welcome (resume), answered then.
                self.follow(channel, since, reply);
            }
            Command::Unsubscribe { channel, reply } => {
                let _ = reply.send(self.leave(&channel));
            }
            Command::Publish {
                channel,
                data,
                reply,
            } => self.enqueue(Queued::Publish(channel, data, reply)),
            // Stale by the next session: not queued.
            Command::PublishEphemeral { reply, .. } => {
                let _ = reply.send(Err(Error::NotConnected));
            }
            Command::Presence { channel, reply } => self.enqueue(Queued::Presence(channel, reply)),
            Command::Ack { offset, reply } => self.enqueue(Queued::Ack(offset, reply)),
            Command::Positions { reply } => {
                let _ = reply.send(Ok(self.tracker.positions()));
            }
            Command::Close { done } => self.closers.push(done),
        }
    }

    /// Queues a command for the next session, forgetting those whose caller gave up.
    fn enqueue(&mut self, queued: Queued) {
        self.queued.retain(|q| match q {
            Queued::Publish(_, _, reply) => !reply.is_closed(),
            Queued::Presence(_, reply) => !reply.is_closed(),
            Queued::Ack(_, reply) => !reply.is_closed(),
        });
        self.queued.push_back(queued);
    }

    /// Stops following a channel locally; cancels waiting subscribers.
    fn leave(&mut self, channel: &str) -> Result<(), Error> {
        if self.tracker.is_personal(channel) {
            return Err(Error::Server(ErrorBody::new(
                ErrorCode::Forbidden,
                "the personal channel cannot be left",
            )));
        }
        self.tracker.remove(channel);
        for waiter in self.subscribers.remove(channel).unwrap_or_default() {
            let _ = waiter.send(Err(Error::Cancelled(channel.to_owned())));
        }
        Ok(())
    }

    /// Serves one session until it ends.
    async fn serve(&mut self, ws: Ws, welcome: Welcome, url: &str) -> End {
        let mut session = Session {
            ws,
            pending: HashMap::new(),
            retry: Vec::new(),
            retry_at: None,
            reconnect_after: None,
            refresh: Refresh::default(),
            fetch: None,
        };
        let end = match self.start_session(&mut session, welcome, url).await {
            Ok(heartbeat) => self.session_loop(&mut session, heartbeat).await,
            Err(end) => end,
        };
        self.session_ended(session.pending);
        end
    }

    /// Reports the session, applies `welcome`, sends what waited for a session.
    async fn start_session(
        &mut self,
        session: &mut Session,
        welcome: Welcome,
        url: &str,
    ) -> Result<Duration, End> {
        let heartbeat = Duration::from_millis(welcome.heartbeat_ms);
        let node_changed = self
            .last_node
            .as_deref()
            .is_some_and(|last| last != welcome.node);
        self.last_node = Some(welcome.node.clone());
        tracing::info!(url, node = %welcome.node, session = %welcome.session, "connected");
        self.state.send_replace(State::Connected {
            node: welcome.node.clone(),
        });
        self.emit(Event::Connected(Connected {
            url: url.to_owned(),
            node: welcome.node.clone(),
            session: welcome.session.clone(),
            user: welcome.user.clone(),
            heartbeat,
            node_changed,
        }))
        .await;
        self.tracker.set_personal(&user_channel(&welcome.user));
        for (channel, result) in &welcome.subscriptions {
            if self.tracker.contains(channel) {
                self.subscribed(channel, result).await;
            } else {
                // Left while the hello was on its way.
                self.send(session, Pending::Ignore, |id| ClientCommand::Unsubscribe {
                    id,
                    channel: channel.clone(),
                })
                .await?;
            }
        }
        // Channels added while the hello was on its way.
        let missing: Vec<String> = self
            .tracker
            .channels()
            .filter(|c| !welcome.subscriptions.contains_key(*c) && !welcome.errors.contains_key(*c))
            .cloned()
            .collect();
        for (channel, error) in welcome.errors {
            self.refused(session, &channel, error).await;
        }
        for channel in missing {
            self.send_subscribe(session, channel).await?;
        }
        while let Some(queued) = self.queued.pop_front() {
            match queued {
                Queued::Publish(channel, data, reply) if !reply.is_closed() => {
                    let command = |id| ClientCommand::Publish {
                        id,
                        channel,
                        data,
                        ephemeral: false,
                    };
                    self.send(session, Pending::Publish(reply), command).await?;
                }
                Queued::Presence(channel, reply) if !reply.is_closed() => {
                    let pending = Pending::Presence(channel.clone(), reply);
                    let command = |id| ClientCommand::Presence { id, channel };
                    self.send(session, pending, command).await?;
                }
                Queued::Ack(offset, reply) if !reply.is_closed() => {
                    self.send_ack(session, offset, reply).await?;
                }
                _ => {} // the caller gave up (timeout)
            }
        }
        Ok(heartbeat)
    }

    /// Reads frames and commands until the session ends.
    async fn session_loop(&mut self, session: &mut Session, heartbeat: Duration) -> End {
        // Any frame proves the connection alive; none for twice the heartbeat means it
        // is dead even if TCP has not noticed (a hung node, a dropped route).
        let silence = if heartbeat.is_zero() {
            MAX_SILENCE
        } else {
            heartbeat.saturating_mul(2).min(MAX_SILENCE)
        };
        let watchdog = tokio::time::sleep(silence);
        tokio::pin!(watchdog);
        loop {
            let retry_at = session.retry_at;
            let refresh_at = session.refresh.wake_at();
            let ack_at = self.ack_at;
            // Commands first: they are few, and a busy socket must not starve them.
            let step = tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    None => Err(End::Stop(StopReason::ClientClosed)),
                    Some(Command::Close { done }) => {
                        self.closers.push(done);
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            session.ws.close(None),
                        )
                        .await;
                        Err(End::Stop(StopReason::ClientClosed))
                    }
                    Some(command) => self.command_online(session, command).await,
                },
                // Frames before the watchdog: a frame that is ready proves life.
                frame = session.ws.next() => {
                    watchdog.as_mut().reset(Instant::now() + silence);
                    match frame {
                        Some(Ok(WsMessage::Text(text))) => self.on_text(session, &text).await,
                        Some(Ok(WsMessage::Close(frame))) => {
                            Err(closed(frame, session.reconnect_after))
                        }
                        Some(Ok(_)) => Ok(()),
                        Some(Err(e)) => Err(End::Lost(e.to_string())),
                        None => Err(End::Lost("connection closed".into())),
                    }
                }
                () = &mut watchdog => {
                    tracing::warn!(?silence, "no frame from the server: connection dead");
                    Err(End::HeartbeatTimeout)
                }
                () = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)),
                    if retry_at.is_some() => self.retry_subscribes(session).await,
                token = async { session.fetch.as_mut().expect("guarded").await },
                    if session.fetch.is_some() => {
                    session.fetch = None;
                    self.send_refresh(session, token).await
                }
                () = tokio::time::sleep_until(refresh_at.unwrap_or_else(Instant::now)),
                    if refresh_at.is_some() => {
                    self.refresh_due(session);
                    Ok(())
                }
                () = tokio::time::sleep_until(ack_at.unwrap_or_else(Instant::now)),
                    if ack_at.is_some() => self.send_auto_ack(session).await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    async fn retry_subscribes(&mut self, session: &mut Session) -> Result<(), End> {
        session.retry_at = None;
        for channel in std::mem::take(&mut session.retry) {
            if self.tracker.contains(&channel) {
                self.send_subscribe(session, channel).await?;
            }
        }
        Ok(())
    }

    async fn on_text(&mut self, session: &mut Session, text: &str) -> Result<(), End> {
        let frame = match ServerFrame::parse(text) {
            Ok(frame) => frame,
            Err(e) => {
                // Newer servers may add frame types: skip what this client does not know.
                tracing::debug!(error = %e, "unknown server frame skipped");
                self.malformed_reply(session, text, &e).await;
                return Ok(());
            }
        };
        match frame {
            ServerFrame::Message(m) => match self.tracker.message(&m.channel, m.offset, &m.epoch) {
                Verdict::Drop => {
                    tracing::trace!(channel = %m.channel, offset = m.offset, "dropped");
                }
                verdict => {
                    if let Verdict::DeliverAfterGap(resync) = verdict {
                        tracing::warn!(?resync, "gap in a channel's offsets");
                        self.emit(Event::Resync(resync)).await;
                    }
                    let personal = self.config.auto_ack && self.tracker.is_personal(&m.channel);
                    let position = personal.then(|| StreamPosition::new(m.offset, &m.epoch));
                    let message = Message {
                        channel: m.channel,
                        offset: m.offset,
                        epoch: m.epoch,
                        from: m.from,
                        data: m.data,
                    };
                    self.emit(Event::Message(message)).await;
                    if let Some(position) = position {
                        // Handed to the application: ack it, coalesced.
                        self.auto_ack = Some(position);
                        self.ack_at
                            .get_or_insert_with(|| Instant::now() + ACK_DELAY);
                    }
                }
            },
            // Apart from the tracker: no offset to order, deduplicate or resume by.
            // Only for channels still followed (one may arrive just after a local
            // unsubscribe).
            ServerFrame::Ephemeral(e) if self.tracker.contains(&e.channel) => {
                let message = EphemeralMessage {
                    channel: e.channel,
                    from: e.from,
                    data: e.data,
                };
                self.emit(Event::Ephemeral(message)).await;
            }
            ServerFrame::Ephemeral(e) => {
                tracing::trace!(channel = %e.channel, "ephemeral message of a channel not followed");
            }
            ServerFrame::Reply(reply) => self.on_reply(session, reply).await,
            ServerFrame::Ping => session.send(&ClientCommand::Pong).await?,
            ServerFrame::Reconnect(r) => {
                tracing::info!(reason = %r.reason, after_ms = r.after_ms, "server asks to reconnect");
                session.reconnect_after = Some(Duration::from_millis(r.after_ms));
            }
            ServerFrame::Resync(r) => {
                if let Some(resync) = self.tracker.resync(&r) {
                    self.emit(Event::Resync(resync)).await;
                }
            }
            ServerFrame::Welcome(_) => tracing::debug!("second welcome ignored"),
            ServerFrame::Expiring(e) => self.expiring(session, e.in_ms),
            ServerFrame::Subscribed(s) => {
                // A name the server would refuse in the next `hello` (4400 there) is
                // never followed.
                if check_channel(&s.channel).is_err() {
                    tracing::debug!(channel = %s.channel, "subscribed frame with a bad channel name skipped");
                    return Ok(());
                }
                tracing::info!(channel = %s.channel, offset = s.offset, "subscribed by the server");
                let subscription = self
                    .tracker
                    .subscribed_by_server(&s.channel, s.offset, &s.epoch);
                self.emit(Event::Subscribed(subscription)).await;
            }
            ServerFrame::Unsubscribed(u) => {
                if !self.tracker.remove(&u.channel) {
                    tracing::debug!(channel = %u.channel, "unsubscribed from a channel not followed");
                    return Ok(());
                }
                tracing::info!(channel = %u.channel, reason = %u.reason, "unsubscribed by the server");
                // A `subscribe` of the application still waiting for this channel
                // will not be confirmed any more.
                for waiter in self.subscribers.remove(&u.channel).unwrap_or_default() {
                    let _ = waiter.send(Err(Error::Cancelled(u.channel.clone())));
                }
                self.emit(Event::Unsubscribed {
                    channel: u.channel,
                    reason: u.reason,
                })
                .await;
            }
        }
        Ok(())
    }

    /// A frame that did not parse may still be the reply to a command in flight (an
    /// error code this client does not know, a result of another shape): settle that
    /// command now rather than let it wait for its timeout.
    async fn malformed_reply(&mut self, session: &mut Session, text: &str, e: &serde_json::Error) {
        #[derive(Deserialize)]
        struct Loose {
            #[serde(rename = "type")]
            kind: serde_json::Value,
            #[serde(default)]
            id: serde_json::Value,
        }
        let Ok(loose) = serde_json::from_str::<Loose>(text) else {
            return;
        };
        let Some(id) = loose.id.as_u64().filter(|_| loose.kind == "reply") else {
            return;
        };
        let Some(pending) = session.pending.remove(&id) else {
            return;
        };
        tracing::warn!(id, error = %e, "malformed reply");
        let error = Error::Protocol(format!("malformed reply: {e}"));
        match pending {
            Pending::Subscribe(channel) => self.answer_subscribers(&channel, Err(error)),
            Pending::Unsubscribe(reply) => drop(reply.send(Err(error))),
            Pending::Publish(reply) => drop(reply.send(Err(error))),
            Pending::PublishEphemeral(reply) => drop(reply.send(Err(error))),
            Pending::Presence(_, reply) => drop(reply.send(Err(error))),
            Pending::Ack(_, reply) => drop(reply.send(Err(error))),
            Pending::Refresh(_) => self.refresh_failed(session, "malformed reply"),
            Pending::Ignore => {}
        }
    }

    /// `expiring`: start a refresh through the token callback (a fixed token cannot be
    /// refreshed: the session ends with 4401 at the token's `exp`).
    fn expiring(&mut self, session: &mut Session, in_ms: u64) {
        match self.config.token {
            TokenSource::Static(_) => {
                tracing::info!(in_ms, "token expiring; a fixed token cannot be refreshed");
            }
            TokenSource::Provider(_) => {
                tracing::debug!(in_ms, "token expiring; refreshing");
                session.refresh.expiring(Instant::now(), in_ms);
            }
        }
    }

    /// The refresh timer fired: ask the callback, or give up on a reply that never came.
    fn refresh_due(&mut self, session: &mut Session) {
        match session.refresh.stage() {
            Stage::Wait(_) => {
                let TokenSource::Provider(provider) = &self.config.token else {
                    session.refresh.give_up();
                    return;
                };
                let timeout = self.config.connect_timeout;
                let token = provider();
                session.fetch = Some(Box::pin(async move {
                    match tokio::time::timeout(timeout, token).await {
                        Err(_) => Err(format!("no token within {timeout:?}")),
                        Ok(Err(e)) => Err(e.to_string()),
                        Ok(Ok(token)) => Ok(token),
                    }
                }));
                session.refresh.fetching();
            }
            Stage::Sent { id, .. } => {
                session.pending.remove(&id);
                self.refresh_failed(session, "no reply in time");
            }
            Stage::Fetching | Stage::Idle => {}
        }
    }

    /// The callback answered: send `refresh` with the new token.
    async fn send_refresh(
        &mut self,
        session: &mut Session,
        token: Result<String, String>,
    ) -> Result<(), End> {
        let token = match token {
            Ok(token) if token.is_empty() => {
                self.refresh_failed(session, "the token callback returned an empty token");
                return Ok(());
            }
            // The callback may cache tokens; the one about to expire is no refresh.
            Ok(token) if self.token.as_deref() == Some(token.as_str()) => {
                self.refresh_failed(session, "the token callback returned the expiring token");
                return Ok(());
            }
            Ok(token) => token,
            Err(e) => {
                self.refresh_failed(session, &format!("token callback failed: {e}"));
                return Ok(());
            }
        };
        let id = self.next_id;
        session
            .refresh
            .sent(id, Instant::now(), self.config.request_timeout);
        let pending = Pending::Refresh(token.clone());
        self.send(session, pending, |id| ClientCommand::Refresh { id, token })
            .await
    }

    fn refresh_failed(&mut self, session: &mut Session, why: &str) {
        match session.refresh.failed(Instant::now()) {
            Some(next) => {
                let retry_in = next.saturating_duration_since(Instant::now());
                tracing::warn!(why, ?retry_in, "token refresh failed; retrying");
            }
            None => tracing::warn!(
                why,
                "token refresh failed; the session ends when the token expires (4401) and the client reconnects with a new token"
            ),
        }
    }

    async fn on_reply(&mut self, session: &mut Session, reply: ReplyFrame) {
        let Some(pending) = reply.id.and_then(|id| session.pending.remove(&id)) else {
            tracing::debug!(id = ?reply.id, "reply to no pending command");
            return;
        };
        let outcome = match (reply.result, reply.error) {
            (_, Some(error)) => Err(error),
            (Some(result), None) => Ok(result),
            (None, None) => Ok(serde_json::Value::Null),
        };
        match pending {
            Pending::Subscribe(channel) => match outcome {
                Err(error) => self.refused(session, &channel, error).await,
                Ok(result) => match parse::<SubscribeResult>(result) {
                    Ok(result) => self.subscribed(&channel, &result).await,
                    Err(e) => self.answer_subscribers(&channel, Err(e)),
                },
            },
            Pending::Unsubscribe(reply) | Pending::Ack(_, reply) => {
                let _ = reply.send(outcome.map(drop).map_err(Error::Server));
            }
            Pending::Publish(reply) => {
                let _ = reply.send(outcome.map_err(Error::Server).and_then(parse));
            }
            Pending::PublishEphemeral(reply) => {
                let _ = reply.send(outcome.map(drop).map_err(Error::Server));
            }
            Pending::Presence(_, reply) => {
                #[derive(Deserialize)]
                struct Users {
                    users: BTreeMap<String, u64>,
                }
                let users = outcome
                    .map_err(Error::Server)
                    .and_then(parse::<Users>)
                    .map(|u| u.users);
                let _ = reply.send(users);
            }
            Pending::Refresh(token) => {
                if !reply.id.is_some_and(|id| session.refresh.is_pending(id)) {
                    return; // an older refresh, given up already
                }
                match outcome {
                    Ok(_) => {
                        tracing::info!("token refreshed");
                        session.refresh.succeeded();
                        // The next `hello` uses it too.
                        self.token = Some(token);
                    }
                    // A token of another user: asking again gives the same answer.
                    // At `exp` the session ends (4401) and the reconnect path asks the
                    // callback for whatever token it has then.
                    Err(error) if error.code == ErrorCode::Forbidden => {
                        tracing::warn!(error = %error.message, "token refresh refused (another user's token); not retrying");
                        session.refresh.give_up();
                    }
                    Err(error) => {
                        let why = format!("{}: {}", error.code.as_str(), error.message);
                        self.refresh_failed(session, &why);
                    }
                }
            }
            Pending::Ignore => {}
        }
    }

    /// A channel confirmed (reply or `welcome`): record, answer, report.
    async fn subscribed(&mut self, channel: &str, result: &SubscribeResult) {
        let Some((subscription, resync)) = self.tracker.subscribed(channel, result) else {
            return; // left meanwhile
        };
        self.answer_subscribers(channel, Ok(subscription.clone()));
        self.emit(Event::Subscribed(subscription)).await;
        if let Some(resync) = resync {
            self.emit(Event::Resync(resync)).await;
        }
    }

    /// A channel refused by the server: for a passing reason, try again soon on this
    /// session (callers keep waiting); otherwise forget it, answer, report.
    async fn refused(&mut self, session: &mut Session, channel: &str, error: ErrorBody) {
        let passing = matches!(
            error.code,
            ErrorCode::Unavailable | ErrorCode::RateLimited | ErrorCode::Internal
        );
        if passing && self.tracker.contains(channel) {
            tracing::warn!(channel, code = error.code.as_str(), error = %error.message, "subscribe failed; retrying");
            session.retry.push(channel.to_owned());
            session
                .retry_at
                .get_or_insert_with(|| Instant::now() + RETRY_MIN + jitter(RETRY_MIN * 2));
            return;
        }
        if !self.tracker.is_personal(channel) && self.tracker.remove(channel) {
            self.answer_subscribers(channel, Err(Error::Server(error.clone())));
            self.emit(Event::SubscribeFailed {
                channel: channel.to_owned(),
                error,
            })
            .await;
        }
    }

    /// Starts following `channel` and queues `reply` for the answer; a channel already
    /// followed is answered at once with `AlreadySubscribed`. True when newly followed.
    fn follow(
        &mut self,
        channel: String,
        since: Option<StreamPosition>,
        reply: Reply<Subscription>,
    ) -> bool {
        if !self.tracker.add(&channel, since) {
            let _ = reply.send(Err(Error::AlreadySubscribed(channel)));
            return false;
        }
        self.subscribers.entry(channel).or_default().push(reply);
        true
    }

    fn answer_subscribers(&mut self, channel: &str, answer: Result<Subscription, Error>) {
        for waiter in self.subscribers.remove(channel).unwrap_or_default() {
            let _ = waiter.send(answer.clone());
        }
    }

    async fn command_online(&mut self, session: &mut Session, command: Command) -> Result<(), End> {
        match command {
            Command::Subscribe {
                channel,
                since,
                reply,
            } => {
                if !self.follow(channel.clone(), since, reply) {
                    return Ok(());
                }
                self.send_subscribe(session, channel).await
            }
            Command::Unsubscribe { channel, reply } => {
                let followed = self.tracker.contains(&channel);
                if let Err(e) = self.leave(&channel) {
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                if !followed {
                    let _ = reply.send(Ok(()));
                    return Ok(());
                }
                let command = |id| ClientCommand::Unsubscribe { id, channel };
                self.send(session, Pending::Unsubscribe(reply), command)
                    .await
            }
            Command::Publish {
                channel,
                data,
                reply,
            } => {
                let command = |id| ClientCommand::Publish {
                    id,
                    channel,
                    data,
                    ephemeral: false,
                };
                self.send(session, Pending::Publish(reply), command).await
            }
            Command::PublishEphemeral {
                channel,
                data,
                reply,
            } => {
                let command = |id| ClientCommand::Publish {
                    id,
                    channel,
                    data,
                    ephemeral: true,
                };
                self.send(session, Pending::PublishEphemeral(reply), command)
                    .await
            }
            Command::Presence { channel, reply } => {
                let pending = Pending::Presence(channel.clone(), reply);
                let command = |id| ClientCommand::Presence { id, channel };
                self.send(session, pending, command).await
            }
            Command::Ack { offset, reply } => self.send_ack(session, offset, reply).await,
            other => {
                self.command_offline(other);
                Ok(())
            }
        }
    }

    async fn send_subscribe(&mut self, session: &mut Session, channel: String) -> Result<(), End> {
        let since = self.tracker.position(&channel);
        let pending = Pending::Subscribe(channel.clone());
        let command = |id| ClientCommand::Subscribe { id, channel, since };
        self.send(session, pending, command).await
    }

    /// A manual `ack` (with an id: the caller waits for the answer), in the epoch the
    /// client is in on its personal channel.
    async fn send_ack(
        &mut self,
        session: &mut Session,
        offset: u64,
        reply: Reply<()>,
    ) -> Result<(), End> {
        let Some(channel) = self.tracker.personal().map(str::to_owned) else {
            let _ = reply.send(Err(Error::Protocol("no personal channel yet".into())));
            return Ok(());
        };
        let epoch = self.tracker.position(&channel).map(|p| p.epoch);
        let command = |id| ClientCommand::Ack {
            id: Some(id),
            channel,
            offset,
            epoch,
        };
        self.send(session, Pending::Ack(offset, reply), command)
            .await
    }

    /// Sends the coalesced auto-ack, without an id (only a refusal is answered, and
    /// nobody waits for it). Skipped when the personal channel moved to another epoch
    /// meanwhile: its messages were not the ones delivered.
    async fn send_auto_ack(&mut self, session: &mut Session) -> Result<(), End> {
        self.ack_at = None;
        let Some(position) = self.auto_ack.take() else {
            return Ok(());
        };
        let Some(channel) = self.tracker.personal().map(str::to_owned) else {
            return Ok(());
        };
        if self
            .tracker
            .position(&channel)
            .is_some_and(|p| p.epoch != position.epoch)
        {
            return Ok(());
        }
        session
            .send(&ClientCommand::Ack {
                id: None,
                channel,
                offset: position.offset,
                epoch: Some(position.epoch),
            })
            .await
    }

    /// Sends a command with a fresh id and records what waits for its reply.
    async fn send(
        &mut self,
        session: &mut Session,
        pending: Pending,
        command: impl FnOnce(u64) -> ClientCommand,
    ) -> Result<(), End> {
        let id = self.next_id;
        self.next_id += 1;
        session.pending.insert(id, pending);
        session.send(&command(id)).await
    }

    /// The session is gone: settle what was in flight on it.
    fn session_ended(&mut self, pending: HashMap<u64, Pending>) {
        let mut pending: Vec<(u64, Pending)> = pending.into_iter().collect();
        pending.sort_by_key(|(id, _)| *id);
        for (_, p) in pending {
            match p {
                // The channel is still followed: the next hello resumes it and answers.
                // A refresh ends with its session (the next hello has a token anyway).
                Pending::Subscribe(_) | Pending::Ignore | Pending::Refresh(_) => {}
                // The next hello will not include it: done.
                Pending::Unsubscribe(reply) => {
                    let _ = reply.send(Ok(()));
                }
                // Maybe published, maybe not: never resend on the caller's behalf.
                Pending::Publish(reply) => {
                    let _ = reply.send(Err(Error::ConnectionLost));
                }
                Pending::PublishEphemeral(reply) => {
                    let _ = reply.send(Err(Error::ConnectionLost));
                }
                // Harmless to ask again.
                Pending::Presence(channel, reply) => {
                    self.queued.push_back(Queued::Presence(channel, reply));
                }
                // Cumulative and idempotent: sent again on the next session.
                Pending::Ack(offset, reply) => {
                    self.queued.push_back(Queued::Ack(offset, reply));
                }
            }
        }
    }

    /// The client stops: fail whatever waits, report, let `close()` return.
    async fn finish(mut self, reason: StopReason) {
        tracing::info!(?reason, "client stopped");
        self.state.send_replace(State::Stopped(reason.clone()));
        for (_, waiters) in self.subscribers.drain() {
            for waiter in waiters {
                let _ = waiter.send(Err(Error::Closed));
            }
        }
        for queued in self.queued.drain(..) {
            match queued {
                Queued::Publish(_, _, reply) => drop(reply.send(Err(Error::Closed))),
                Queued::Presence(_, reply) => drop(reply.send(Err(Error::Closed))),
                Queued::Ack(_, reply) => drop(reply.send(Err(Error::Closed))),
            }
        }
        self.emit(Event::Stopped(reason)).await;
        // Commands that raced with the stop: dropping their reply senders fails them
        // with `Error::Closed`.
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            if let Command::Close { done } = command {
                self.closers.push(done);
            }
        }
        for done in self.closers.drain(..) {
            let _ = done.send(());
        }
    }

    async fn emit(&mut self, event: Event) {
        // A full buffer holds the task (and so the socket) back: the backpressure the
        // server's slow-consumer rule expects. Once the client is closing, it doesn't.
        // An application that dropped its `Events` simply gets none.
        tokio::select! {
            biased;
            _ = self.events.send(event) => {}
            _ = self.closing.wait_for(|closing| *closing) => {}
        }
    }
}

/// Connects and says hello; returns the socket and the `welcome`.
async fn handshake(
    config: Arc<Config>,
    url: String,
    token: String,
    resume: BTreeMap<String, StreamPosition>,
) -> Result<(Ws, Welcome), End> {
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| End::ConnectFailed(e.to_string()))?;
    for (name, value) in &config.headers {
        request.headers_mut().insert(name.clone(), value.clone());
    }
    // With `tls`, the rustls configuration serves `wss://` URLs (`ws://` ones stay plain);
    // without it tungstenite has no TLS, and `wss://` never gets here (config.rs).
    #[cfg(feature = "tls")]
    let connecting = tokio_tungstenite::connect_async_tls_with_config(
        request,
        None,
        true,
        Some(tokio_tungstenite::Connector::Rustls(Arc::clone(
            &config.tls,
        ))),
    );
    #[cfg(not(feature = "tls"))]
    let connecting = tokio_tungstenite::connect_async_with_config(request, None, true);
    let (mut ws, _) = connecting.await.map_err(|e| connect_failed(&url, e))?;
    let hello = ClientCommand::Hello { token, resume };
    ws.send(WsMessage::text(hello.to_json()))
        .await
        .map_err(|e| End::ConnectFailed(e.to_string()))?;
    // A draining node says `reconnect` instead of `welcome`; its close follows.
    let mut after = None;
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(text))) => match ServerFrame::parse(&text) {
                Ok(ServerFrame::Welcome(welcome)) => return Ok((ws, welcome)),
                Ok(ServerFrame::Reconnect(r)) => after = Some(Duration::from_millis(r.after_ms)),
                _ => continue,
            },
            Some(Ok(WsMessage::Close(frame))) => return Err(closed(frame, after)),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(End::ConnectFailed(e.to_string())),
            None => return Err(End::ConnectFailed("closed before welcome".into())),
        }
    }
}

/// How a failed WebSocket connect ends the attempt: a TLS failure is told apart, since
/// it needs attention (a certificate the client does not trust) rather than patience.
fn connect_failed(url: &str, error: tokio_tungstenite::tungstenite::Error) -> End {
    #[cfg(feature = "tls")]
    if let Some(tls) = crate::tls::tls_cause(&error) {
        return End::Tls(crate::tls::describe(url, tls));
    }
    let _ = url;
    End::ConnectFailed(error.to_string())
}

fn closed(frame: Option<CloseFrame>, after: Option<Duration>) -> End {
    match frame {
        Some(frame) => End::Closed {
            code: u16::from(frame.code),
            reason: frame.reason.to_string(),
            after,
        },
        None => End::Lost("closed without a code".into()),
    }
}

fn parse<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, Error> {
    serde_json::from_value(value).map_err(|e| Error::Protocol(e.to_string()))
}
