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
//! | 4429 after `reconnect` (reason `busy`) | reconnect after `after_ms` plus a jitter of up to 1 s |
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

mod commands;
mod handshake;
mod session;

use handshake::{closed, handshake, parse};

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
            // A busy node said when to come back: that time plus a jitter of up to a
            // second, so a burst it refused does not return as one.
            (Some(CloseCode::TooMany), Some(after)) => {
                let after = after.min(self.config.backoff_max);
                Next::Retry(after + crate::backoff::jitter(after.min(Duration::from_secs(1))))
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
