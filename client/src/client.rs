//! The application's side: the cloneable [`Client`] handle whose async commands resolve
//! with the server's reply, and the [`Events`] stream.
//!
//! Neither touches the socket: each command goes to the connection task over a channel
//! with a one-shot reply channel, and the task sends events back.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use herald_protocol::StreamPosition;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{check_channel, ClientBuilder};
use crate::connection::{Command, Reply};
use crate::error::Error;
use crate::event::{Event, State, Subscription};

impl ClientBuilder {
    /// Checks the settings and starts the client's connection task on the current tokio
    /// runtime. Returns at once; connecting happens in the background and is reported
    /// on [`Events`].
    pub fn start(self) -> Result<(Client, Events), Error> {
        let config = self.check()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Config("start must be called inside a tokio runtime".into()))?;
        let h = crate::connection::spawn(&runtime, config);
        Ok((
            Client::new(h.commands, h.state, h.closing, h.request_timeout),
            Events::new(h.events),
        ))
    }
}

/// A handle to a Herald client. Cheap to clone; the client stops when [`Client::close`]
/// is called or the last handle is dropped.
///
/// While the client is disconnected, commands behave like this:
/// - `subscribe` / `unsubscribe` change the set of followed channels at once; the next
///   `hello` carries it (its `resume` map). `subscribe` resolves when the server
///   confirms the channel; `unsubscribe` resolves at once.
/// - `publish` / `presence` wait for the next session and are sent then. The whole call
///   is bounded by the request timeout ([`Error::Timeout`]); a `publish` never waits
///   forever and is never sent twice.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    state: watch::Receiver<State>,
    /// Set by `close()`, so the task stops waiting on a full event buffer.
    closing: Arc<watch::Sender<bool>>,
    request_timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A builder; see [`ClientBuilder`].
    pub fn builder() -> ClientBuilder {
        ClientBuilder::new()
    }

    pub(crate) fn new(
        commands: mpsc::Sender<Command>,
        state: watch::Receiver<State>,
        closing: watch::Sender<bool>,
        request_timeout: Duration,
    ) -> Self {
        Self {
            commands,
            state,
            closing: Arc::new(closing),
            request_timeout,
        }
    }

    /// Follows a channel from its current position. Resolves when the server confirms
    /// it; the channel is then resumed after every reconnect. Errors: [`Error::Server`]
    /// (`forbidden`, …; the channel is forgotten), [`Error::AlreadySubscribed`],
    /// [`Error::InvalidChannel`], [`Error::Timeout`] (the channel stays followed and is
    /// subscribed when possible).
    pub async fn subscribe(&self, channel: &str) -> Result<Subscription, Error> {
        self.subscribe_since(channel, None).await
    }

    /// Like [`Client::subscribe`], but continues after a position the application
    /// stored earlier (for example [`Message::position`](crate::Message::position)):
    /// the missed messages are delivered first when the server still has them, else
    /// the result has `recovered: false` and an [`Event::Resync`] follows.
    pub async fn subscribe_from(
        &self,
        channel: &str,
        since: StreamPosition,
    ) -> Result<Subscription, Error> {
        self.subscribe_since(channel, Some(since)).await
    }

    async fn subscribe_since(
        &self,
        channel: &str,
        since: Option<StreamPosition>,
    ) -> Result<Subscription, Error> {
        check_channel(channel)?;
        let channel = channel.to_owned();
        self.request(|reply| Command::Subscribe {
            channel,
            since,
            reply,
        })
        .await
    }

    /// Stops following a channel; later messages on it are not delivered. The personal
    /// channel cannot be left (`forbidden`).
    pub async fn unsubscribe(&self, channel: &str) -> Result<(), Error> {
        check_channel(channel)?;
        let channel = channel.to_owned();
        self.request(|reply| Command::Unsubscribe { channel, reply })
            .await
    }

    /// Publishes a JSON value to a channel (the token's `publish` claim must allow it).
    /// Resolves with the message's position. If the connection breaks after sending and
    /// before the reply, the result is [`Error::ConnectionLost`]: the message may or may
    /// not have been published, and it is not sent again.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        channel: &str,
        data: &T,
    ) -> Result<StreamPosition, Error> {
        check_channel(channel)?;
        let data =
            serde_json::value::to_raw_value(data).map_err(|e| Error::Encode(e.to_string()))?;
        let channel = channel.to_owned();
        self.request(|reply| Command::Publish {
            channel,
            data,
            reply,
        })
        .await
    }

    /// Publishes an ephemeral message (a typing indicator, an "is viewing" marker):
    /// it gets no offset, is not stored, and reaches only the sessions subscribed to
    /// the channel at that moment, as [`Event::Ephemeral`](crate::Event::Ephemeral).
    /// Same permission as [`Client::publish`]; the server bounds the rate
    /// (`HERALD_MAX_EPHEMERAL_PER_SEC`, error `rate_limited` over it). Resolves when the
    /// server accepted it. Never queued while disconnected: then it fails at once with
    /// [`Error::NotConnected`].
    pub async fn publish_ephemeral<T: Serialize + ?Sized>(
        &self,
        channel: &str,
        data: &T,
    ) -> Result<(), Error> {
        check_channel(channel)?;
        let data =
            serde_json::value::to_raw_value(data).map_err(|e| Error::Encode(e.to_string()))?;
        let channel = channel.to_owned();
        self.request(|reply| Command::PublishEphemeral {
            channel,
            data,
            reply,
        })
        .await
    }

    /// Who is in a channel, across all nodes: user → number of connections.
    pub async fn presence(&self, channel: &str) -> Result<BTreeMap<String, u64>, Error> {
        check_channel(channel)?;
        let channel = channel.to_owned();
        self.request(|reply| Command::Presence { channel, reply })
            .await
    }

    /// Acknowledges the messages of the personal channel `user:<sub>` up to `offset`
    /// (cumulative; any of the user's devices acking counts for the user), in the epoch
    /// the client is in. Sent at once with an id and resolved with the server's answer:
    /// `bad_request` when `offset` is beyond what this connection delivered or the
    /// epoch changed meanwhile. While disconnected it waits for the next session, within
    /// the request timeout. Each call is one frame counted against the command rate: ack
    /// what the user saw, not every message. With [`ClientBuilder::auto_ack`] on (the
    /// default) this is rarely needed.
    pub async fn ack(&self, offset: u64) -> Result<(), Error> {
        self.request(|reply| Command::Ack { offset, reply }).await
    }

    /// The last position delivered on each followed channel, for example to store and
    /// later pass to [`ClientBuilder::subscribe_from`].
    pub async fn positions(&self) -> Result<BTreeMap<String, StreamPosition>, Error> {
        self.request(|reply| Command::Positions { reply }).await
    }

    /// The connection state now.
    pub fn state(&self) -> State {
        self.state.borrow().clone()
    }

    /// Closes the connection and stops the client; pending commands fail with
    /// [`Error::Closed`]. Returns when the connection task has finished. Events that no
    /// longer fit the event buffer from then on are dropped, so `close` never waits for
    /// the application to read them.
    pub async fn close(&self) {
        self.closing.send_replace(true);
        let (done, finished) = oneshot::channel();
        if self.commands.send(Command::Close { done }).await.is_ok() {
            let _ = finished.await;
        }
    }

    async fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        let exchange = async {
            self.commands
                .send(make(reply))
                .await
                .map_err(|_| Error::Closed)?;
            answer.await.map_err(|_| Error::Closed)?
        };
        tokio::time::timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| Error::Timeout(self.request_timeout))?
    }
}

/// The client's events, in order: see [`Event`]. Ends (`None`) after
/// [`Event::Stopped`]. Read it continuously, ideally in its own task: while events are
/// not read, the client does not read its socket either.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    pub(crate) fn new(rx: mpsc::Receiver<Event>) -> Self {
        Self { rx }
    }

    /// The next event; `None` once the client has stopped.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}
