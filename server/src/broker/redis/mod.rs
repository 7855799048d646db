//! The Redis broker: what lets identical nodes share streams, routing, presence and
//! the node registry through one Redis or a Redis Cluster.
//!
//! This module owns every Redis connection of a node and everything stored in Redis
//! (the key layout is documented in [`keys`]). Two fred clients are used:
//!
//! - the *command* client runs the Lua scripts (publish, history, position, presence,
//!   registry). Publishing is one script call: next offset, append to the history
//!   stream, and (S)PUBLISH `<offset>:<epoch>:[<from>:]<data>` to the channel's pub/sub
//!   channel. Publishes that arrive together (concurrent calls, or a batch) share one
//!   script call per cluster slot (`coalesce`). Only publishing creates a channel's keys; reads of a channel without them
//!   answer offset 0 with the empty epoch and write nothing.
//! - the *subscriber* client only (un)subscribes. One task, the subscription manager
//!   (`subscriptions`), owns which channels are subscribed; the hub's requests reach it
//!   in order over an unbounded queue and are applied in batches. Another task, the
//!   reader, decodes what arrives and sends it to the broker's event stream
//!   ([`BrokerEvent`]), which the hub consumes: the reader does no fan-out.
//!
//! With `redis://` the classic PUBLISH / SUBSCRIBE is used; with `redis-cluster://` the
//! sharded SPUBLISH / SSUBSCRIBE, so a message only travels inside the shard that owns
//! its channel and only to nodes subscribed to it.
//!
//! Failure handling, in short: commands fail fast with [`BrokerError::Unavailable`]
//! while a connection is down (short timeouts, no queueing while disconnected); fred
//! reconnects with exponential backoff; after the subscriber reconnects, the manager
//! subscribes every channel again itself and then sends
//! [`BrokerEvent::Resubscribed`], so the hub checks every channel against
//! history. A lagging fred broadcast receiver is treated the same way. A probe
//! (`probe`) publishes to a per-node channel every second and forces a reconnect
//! when the subscriber connection stops delivering.

mod coalesce;
mod keys;
mod probe;
mod receipts;
mod scripts;
mod subscriptions;
mod webhook;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fred::clients::Client;
use fred::error::{Error as FredError, ErrorKind};
use fred::interfaces::{
    ClientLike, EventInterface, HashesInterface, KeysInterface, PubsubInterface, ServerInterface,
};
use fred::types::config::{Config, ReconnectPolicy, TcpConfig, UnresponsiveConfig};
use fred::types::{Builder, ClusterStateChange, Message, Value};
use futures_util::future::try_join_all;
use herald_protocol::StreamPosition;
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    BatchMessage, Broker, BrokerError, BrokerEvent, BrokerEventSender, BrokerEvents,
    BrokerSettings, Ephemeral, History, NodeInfo, NodePresence, PresenceChange, Publication,
    Revocation, SubscribeAck, UserCommand,
};
use keys::{Keys, Topology};
use probe::ProbeState;
use scripts::Scripts;
use subscriptions::Request;

/// How long a command may take before it fails with [`BrokerError::Unavailable`].
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP connect plus handshake to Redis may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection with a command unanswered for this long is dropped and reconnected
/// (catches a Redis that is stopped but whose sockets stay open).
const UNRESPONSIVE_AFTER: Duration = Duration::from_secs(4);
/// How long a user command waits for the other nodes' answers.
const CONTROL_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the answers of a user command are kept in Redis.
const CONTROL_REPLY_TTL: Duration = Duration::from_secs(10);
/// Reconnect backoff: from 100 ms doubling up to 2 s, forever, with jitter.
const RECONNECT_MIN_MS: u32 = 100;
const RECONNECT_MAX_MS: u32 = 2_000;

/// The Redis broker. See the module doc.
pub struct RedisBroker {
    inner: Arc<Inner>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The event stream's receiving side, until the hub takes it.
    events: Mutex<Option<BrokerEvents>>,
}

/// State shared by the broker and its background tasks.
struct Inner {
    settings: BrokerSettings,
    keys: Keys,
    topology: Topology,
    /// Runs scripts and other commands.
    client: Client,
    /// Only (un)subscribes, and receives publications.
    sub: Client,
    /// Runs the publish script and `WAIT` when publishes wait for replicas
    /// (`wait_replicas` > 0): `WAIT` blocks its connection, so it gets its own.
    publisher: Option<Client>,
    scripts: Scripts,
    /// Publishes waiting for their slot's script call (see `coalesce`).
    lanes: coalesce::Lanes,
    /// The publish script's constant arguments, built once.
    publish_constants: coalesce::Constants,
    /// The subscription manager's queue.
    requests: mpsc::UnboundedSender<Request>,
    /// The broker's event stream towards the hub (see [`BrokerEvent`]).
    events: BrokerEventSender,
    /// Every wanted subscription is in place on the current subscriber connection(s).
    synced: AtomicBool,
    /// The last liveness probe arrived in time.
    probe_ok: AtomicBool,
    /// Probes in flight; a std `Mutex`, never held across an `.await`.
    probes: Mutex<ProbeState>,
    /// Wakes the probe early, after a resubscribe, so health returns without waiting
    /// for the next probe tick.
    probe_now: Notify,
    cancel: CancellationToken,
}

impl Inner {
    /// Fails fast when the command connection is down, instead of letting fred queue
    /// the command until it reconnects.
    fn ready(&self) -> Result<&Client, BrokerError> {
        if self.client.is_connected() && !self.cancel.is_cancelled() {
            Ok(&self.client)
        } else {
            Err(BrokerError::Unavailable("not connected to Redis".into()))
        }
    }

    /// The client that publishes, checked like [`Inner::ready`].
    fn publisher(&self) -> Result<&Client, BrokerError> {
        match &self.publisher {
            Some(p) if p.is_connected() && !self.cancel.is_cancelled() => Ok(p),
            Some(_) => Err(BrokerError::Unavailable("not connected to Redis".into())),
            None => self.ready(),
        }
    }

    /// Tells the hub to check every channel (waits for room in the event stream).
    async fn on_resubscribed(&self) {
        let _ = self.events.send(BrokerEvent::Resubscribed).await;
    }
}

/// Maps a fred error. Only a mistake of ours (a malformed command or answer, bad
/// configuration) is `Internal`; everything else (connection trouble, timeouts, commands
/// cancelled by a reconnect, Redis' own "try again" answers such as LOADING or
/// CLUSTERDOWN) is `Unavailable`, which callers report as "broker down, retry".
fn broker_error(e: FredError) -> BrokerError {
    let ours = matches!(
        e.kind(),
        ErrorKind::Parse
            | ErrorKind::InvalidArgument
            | ErrorKind::InvalidCommand
            | ErrorKind::Config
            | ErrorKind::Url
            | ErrorKind::NotFound
    );
    let transient = !ours
        || [
            "LOADING",
            "CLUSTERDOWN",
            "TRYAGAIN",
            "MASTERDOWN",
            "BUSY",
            "READONLY",
        ]
        .iter()
        .any(|p| e.details().starts_with(p));
    if transient {
        BrokerError::Unavailable(e.to_string())
    } else {
        BrokerError::Internal(e.to_string())
    }
}

fn millis(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

/// A client with the broker's settings: the subscriber (`broadcast_capacity`: the
/// buffer between its connection and the reader), or one that sends commands (`None`).
fn build_client(config: Config, broadcast_capacity: Option<usize>) -> Result<Client, FredError> {
    let mut builder = Builder::from_config(Config {
        // Do not fail when Redis is unreachable at start: keep trying in the background.
        fail_fast: false,
        ..config
    });
    builder
        .with_performance_config(|perf| {
            perf.default_command_timeout = COMMAND_TIMEOUT;
            if let Some(capacity) = broadcast_capacity {
                perf.broadcast_channel_capacity = capacity;
            }
        })
        .with_connection_config(|conn| {
            conn.connection_timeout = CONNECT_TIMEOUT;
            conn.internal_command_timeout = CONNECT_TIMEOUT;
            // One write attempt: a publish whose connection died after the write may
            // have run, and running it again would publish it twice.
            conn.max_command_attempts = 1;
            // Redirections (MOVED, ASK: a Redis Cluster slot moved or is moving) are
            // answered to the caller, which decides whether to send again: a MOVED
            // syncs the slot map first. Following an ASK takes a second attempt, and
            // with one attempt fred fails it by dropping every connection of the
            // client (every command in flight). The subscriber keeps fred's default:
            // its SSUBSCRIBEs are never redirected by ASK and fred follows MOVED itself.
            if broadcast_capacity.is_none() {
                conn.max_redirections = 0;
            }
            conn.unresponsive = UnresponsiveConfig {
                max_timeout: Some(UNRESPONSIVE_AFTER),
                interval: Duration::from_secs(1),
            };
            conn.tcp = TcpConfig {
                nodelay: Some(true),
                ..TcpConfig::default()
            };
        })
        .set_policy(ReconnectPolicy::new_exponential(
            0,
            RECONNECT_MIN_MS,
            RECONNECT_MAX_MS,
            2,
        ));
    builder.build()
}

/// Connects a Redis broker.
///
/// `url` is `redis://host:port[/db]` (one Redis, classic pub/sub) or
/// `redis-cluster://host:port[,host:port…]` (Redis Cluster, sharded pub/sub). Every key
/// and pub/sub channel name starts with `prefix`. Fails only on a malformed URL: if
/// Redis is unreachable the broker keeps reconnecting in the background and
/// [`Broker::is_healthy`] stays false until it is connected and subscribed.
pub async fn connect(
    url: &str,
    prefix: &str,
    node_id: &str,
    settings: BrokerSettings,
) -> Result<RedisBroker, BrokerError> {
    let (config, topology) =
        keys::parse_url(url).map_err(|e| BrokerError::Internal(format!("bad Redis URL: {e}")))?;
    let client = build_client(config.clone(), None)
        .map_err(|e| BrokerError::Internal(format!("bad Redis config: {e}")))?;
    // The capacity of fred's broadcast channel between the subscriber connection and
    // the reader (fred's default is 32 and it drops the oldest on lag). The reader only
    // decodes and hands off, so this absorbs scheduling hiccups, not sustained overload;
    // a lag is still detected and handled as possible loss.
    let sub = build_client(config.clone(), Some(settings.subscriber_buffer.max(1)))
        .map_err(|e| BrokerError::Internal(format!("bad Redis config: {e}")))?;
    let publisher = if settings.wait_replicas > 0 {
        Some(
            build_client(config.clone(), None)
                .map_err(|e| BrokerError::Internal(format!("bad Redis config: {e}")))?,
        )
    } else {
        None
    };
    let keys = Keys::new(prefix, node_id);
    let publish_constants = coalesce::Constants::new([
        settings.history_size.to_string(),
        millis(settings.history_ttl),
        millis(settings.meta_ttl),
        topology.publish_command().to_owned(),
        topology.replid_flag().to_owned(),
    ]);
    let (requests, requests_rx) = mpsc::unbounded_channel();
    let (events, events_rx) = super::event_stream();
    let inner = Arc::new(Inner {
        settings,
        keys,
        topology,
        client,
        sub,
        publisher,
        scripts: Scripts::new(),
        lanes: coalesce::Lanes::default(),
        publish_constants,
        requests,
        events,
        synced: AtomicBool::new(false),
        probe_ok: AtomicBool::new(false),
        probes: Mutex::new(ProbeState::default()),
        probe_now: Notify::new(),
        cancel: CancellationToken::new(),
    });

    // Take the receivers before connecting, so that the first connection's event and
    // the first messages are not missed.
    let messages = inner.sub.message_rx();
    let reconnects = inner.sub.reconnect_rx();
    let topology_changes = inner.sub.cluster_change_rx();
    let tasks = vec![
        tokio::spawn(subscriptions::run(inner.clone(), requests_rx)),
        tokio::spawn(read_publications(inner.clone(), messages)),
        tokio::spawn(watch_reconnects(
            inner.clone(),
            reconnects,
            topology_changes,
        )),
        tokio::spawn(probe::run(inner.clone())),
    ];
    // Every node listens to the server API's user commands for as long as it runs; the
    // manager keeps the subscription across reconnects like any other.
    let (ack, _) = oneshot::channel();
    let _ = inner.requests.send(Request::Subscribe {
        channel: keys::CONTROL.to_owned(),
        ack,
    });
    // The connection tasks run until `quit`; their handles are not needed.
    drop(inner.client.connect());
    drop(inner.sub.connect());
    if let Some(publisher) = &inner.publisher {
        drop(publisher.connect());
    }
    tracing::info!(
        kind = url_kind(&inner.topology),
        prefix,
        node_id,
        "redis broker started"
    );
    Ok(RedisBroker {
        inner,
        tasks: Mutex::new(tasks),
        events: Mutex::new(Some(events_rx)),
    })
}

fn url_kind(topology: &Topology) -> &'static str {
    match topology {
        Topology::Single => "redis",
        Topology::Cluster => "redis-cluster",
        Topology::Sentinel => "redis-sentinel",
    }
}

/// Turns every (re)connection of the subscriber client, and every change of the
/// cluster's slot map, into a resubscribe request. In a cluster each shard connection
/// reports separately; the manager merges requests that arrive together. A slot that
/// moved to another master drops its sharded subscriptions there (Redis sends an
/// SUNSUBSCRIBE that fred swallows), so a topology change resubscribes everything.
async fn watch_reconnects(
    inner: Arc<Inner>,
    mut events: broadcast::Receiver<fred::types::config::Server>,
    mut topology: broadcast::Receiver<Vec<ClusterStateChange>>,
) {
    loop {
        let event = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            event = events.recv() => event,
            change = topology.recv() => {
                match change {
                    Ok(changes) => {
                        tracing::info!(changes = changes.len(), "redis cluster topology changed");
                        let _ = inner.requests.send(Request::Resubscribe);
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = inner.requests.send(Request::Resubscribe);
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        if inner.cancel.is_cancelled() {
                            return;
                        }
                        topology = inner.sub.cluster_change_rx();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                continue;
            }
        };
        match event {
            Ok(server) => {
                tracing::info!(%server, "redis subscriber connected");
                // Until the manager has subscribed everything again, messages may be
                // missing: not healthy.
                inner.synced.store(false, Ordering::SeqCst);
                let _ = inner.requests.send(Request::Resubscribe);
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                inner.synced.store(false, Ordering::SeqCst);
                let _ = inner.requests.send(Request::Resubscribe);
            }
            Err(broadcast::error::RecvError::Closed) => {
                if inner.cancel.is_cancelled() {
                    return;
                }
                // fred replaces its channels on `quit`; pick up the new one.
                events = inner.sub.reconnect_rx();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The reader: hands each publication to the hub's event stream, in the order Redis sent them.
async fn read_publications(inner: Arc<Inner>, mut messages: broadcast::Receiver<Message>) {
    loop {
        let message = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            message = messages.recv() => message,
        };
        match message {
            Ok(message) => dispatch(&inner, &message).await,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // fred dropped messages we did not read in time: any channel may have
                // a gap now. The hub checks every channel against history.
                tracing::warn!(
                    missed,
                    "redis subscriber lagged; checking channel continuity"
                );
                inner.on_resubscribed().await;
            }
            Err(broadcast::error::RecvError::Closed) => {
                if inner.cancel.is_cancelled() {
                    return;
                }
                messages = inner.sub.message_rx();
                tokio::time::sleep(Duration::from_millis(100)).await;
                inner.on_resubscribed().await;
            }
        }
    }
}

/// Decodes one pub/sub message and sends it to the hub. Waits while the event stream is
/// full: the reader falls behind, fred's buffer overflows, and the lag is repaired.
async fn dispatch(inner: &Arc<Inner>, message: &Message) {
    let name: &str = &message.channel;
    let Some(text) = message.value.as_str() else {
        tracing::warn!(channel = name, "redis message without text payload");
        return;
    };
    if inner.keys.is_probe(name) {
        if let Ok(seq) = text.parse::<u64>() {
            probe::arrived(inner, name, seq);
        }
        return;
    }
    let Some(channel) = inner.keys.channel_of(name) else {
        return;
    };
    if channel == keys::CONTROL {
        on_control(inner, &text).await;
        return;
    }
    if let Some((from, data)) = keys::parse_ephemeral(&text) {
        let message = Ephemeral {
            data: data.into(),
            from: from.map(Arc::from),
        };
        let _ = inner
            .events
            .send(BrokerEvent::Ephemeral {
                channel: channel.into(),
                message,
            })
            .await;
        return;
    }
    let Some(payload) = keys::parse_payload(&text) else {
        tracing::warn!(channel, "malformed publication payload from redis");
        return;
    };
    let _ = inner
        .events
        .send(BrokerEvent::Publication {
            channel: channel.into(),
            publication: Publication {
                offset: payload.offset,
                epoch: payload.epoch.into(),
                data: payload.data.into(),
                from: payload.from.map(Arc::from),
            },
        })
        .await;
}

/// A user command as it travels over the control channel.
#[derive(serde::Serialize, serde::Deserialize)]
struct ControlMessage {
    /// Names the reply hash.
    id: String,
    user: String,
    command: UserCommand,
}

/// Hands a user command from the control channel to the hub, then answers with the
/// count of sessions it affected (in a task: the reader must not wait).
async fn on_control(inner: &Arc<Inner>, text: &str) {
    let message: ControlMessage = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "malformed user command from redis");
            return;
        }
    };
    let (reply, count) = oneshot::channel();
    let event = BrokerEvent::UserCommand {
        user: message.user,
        command: message.command,
        reply,
    };
    if inner.events.send(event).await.is_err() {
        return; // nobody listens: the node is stopping
    }
    let inner = Arc::clone(inner);
    let id = message.id;
    tokio::spawn(async move {
        let Ok(sessions) = count.await else { return };
        let Ok(client) = inner.ready() else { return };
        let key = inner.keys.control_reply(&id);
        let reply = async {
            client
                .hset::<Value, _, _>(key.as_str(), (inner.keys.node_id(), sessions.to_string()))
                .await?;
            client
                .pexpire::<Value, _>(key.as_str(), CONTROL_REPLY_TTL.as_millis() as i64, None)
                .await
        };
        if let Err(e) = reply.await {
            tracing::debug!(error = %e, "could not answer a user command");
        }
    });
}

/// Waits until `wait_replicas` replicas have every write made so far on the publisher
/// connection, the publish just made included (Redis `WAIT`; it cannot run inside a
/// script). A reconnect since the script ran means the `WAIT` would cover another
/// connection's writes, so it counts as not acknowledged.
async fn wait_replicas(
    inner: &Inner,
    client: &Client,
    mut reconnects: broadcast::Receiver<fred::types::config::Server>,
) -> Result<(), BrokerError> {
    let want = inner.settings.wait_replicas;
    let timeout = inner.settings.wait_timeout.as_millis().max(1) as i64;
    let acked: i64 = client
        .wait(i64::from(want), timeout)
        .await
        .map_err(broker_error)?;
    let reconnected = !matches!(
        reconnects.try_recv(),
        Err(broadcast::error::TryRecvError::Empty)
    );
    if reconnected {
        return Err(BrokerError::Unavailable(
            "redis reconnected before replicas acknowledged the publish".into(),
        ));
    }
    if acked < i64::from(want) {
        return Err(BrokerError::Unavailable(format!(
            "{acked} of {want} redis replicas acknowledged the publish in time"
        )));
    }
    Ok(())
}

/// Reads `{offset, epoch}` from the front of a script's answer.
fn parse_position(values: &[Value]) -> Result<StreamPosition, BrokerError> {
    let bad = || BrokerError::Internal("unexpected script answer".into());
    let offset = values.first().and_then(Value::as_u64).ok_or_else(bad)?;
    let epoch = values.get(1).and_then(Value::as_string).ok_or_else(bad)?;
    Ok(StreamPosition::new(offset, epoch))
}

impl RedisBroker {
    /// The coalescing lane of a channel: its cluster slot, or the one lane of a single
    /// Redis (every key is on it, so one call may carry every channel).
    fn lane(&self, channel: &str) -> u16 {
        match self.inner.topology {
            Topology::Cluster => {
                fred::util::redis_keyslot(self.inner.keys.meta(channel).as_bytes())
            }
            Topology::Single | Topology::Sentinel => 0,
        }
    }

    fn channel_keys(&self, channel: &str) -> Vec<String> {
        vec![
            self.inner.keys.meta(channel),
            self.inner.keys.history(channel),
        ]
    }

    async fn stop(&self) {
        self.inner.cancel.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        for client in [&self.inner.sub, &self.inner.client]
            .into_iter()
            .chain(&self.inner.publisher)
        {
            let _ = tokio::time::timeout(Duration::from_secs(2), client.quit()).await;
        }
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        if self.inner.cancel.is_cancelled() {
            return; // `shutdown` already stopped everything.
        }
        // Background tasks hold the shared state; without this they would outlive a
        // broker dropped without `shutdown`.
        self.inner.cancel.cancel();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (client, sub) = (self.inner.client.clone(), self.inner.sub.clone());
            let publisher = self.inner.publisher.clone();
            runtime.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), sub.quit()).await;
                let _ = tokio::time::timeout(Duration::from_secs(2), client.quit()).await;
                if let Some(publisher) = publisher {
                    let _ = tokio::time::timeout(Duration::from_secs(2), publisher.quit()).await;
                }
            });
        }
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn events(&self) -> Option<BrokerEvents> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    async fn publish(
        &self,
        channel: &str,
        data: &str,
        from: Option<&str>,
    ) -> Result<StreamPosition, BrokerError> {
        let message = BatchMessage {
            channel,
            data,
            from,
        };
        self.publish_batch(&[message])
            .await
            .pop()
            .unwrap_or_else(|| Err(BrokerError::Internal("no publish answer".into())))
    }

    async fn publish_batch(
        &self,
        messages: &[BatchMessage<'_>],
    ) -> Vec<Result<StreamPosition, BrokerError>> {
        let inner = &self.inner;
        // Fail fast while disconnected, as every command does (nothing is queued).
        if let Err(e) = inner.publisher() {
            return messages.iter().map(|_| Err(e.clone())).collect();
        }
        // Queued in order under one lock: a channel's messages keep their order, and
        // those of one slot go out in as few calls as the call bounds allow.
        let mut answers = Vec::with_capacity(messages.len());
        let queued: Vec<(u16, coalesce::Outgoing)> = messages
            .iter()
            .map(|m| {
                let (done, answer) = oneshot::channel();
                answers.push(answer);
                let message = coalesce::Outgoing {
                    channel: m.channel.to_owned(),
                    data: Value::from(m.data),
                    from: Value::from(m.from.unwrap_or_default()),
                    done,
                };
                (self.lane(m.channel), message)
            })
            .collect();
        for lane in inner.lanes.enqueue(queued) {
            tokio::spawn(coalesce::flush(self.inner.clone(), lane));
        }
        let mut out = Vec::with_capacity(answers.len());
        for answer in answers {
            out.push(
                answer.await.unwrap_or_else(|_| {
                    Err(BrokerError::Unavailable("redis broker stopped".into()))
                }),
            );
        }
        out
    }

    async fn publish_ephemeral(
        &self,
        channel: &str,
        data: &str,
        from: Option<&str>,
    ) -> Result<(), BrokerError> {
        // A bare (S)PUBLISH on the channel's pub/sub channel: no script, no key. Redis
        // hands it only to the nodes subscribed now. On the command connection, not the
        // publisher: there is nothing for replicas to acknowledge.
        let client = self.inner.ready()?;
        let name = self.inner.keys.pubsub(channel);
        let payload = keys::ephemeral_payload(from, data);
        let _receivers: i64 = match self.inner.topology {
            Topology::Cluster => client.spublish(name, payload).await,
            Topology::Single | Topology::Sentinel => client.publish(name, payload).await,
        }
        .map_err(broker_error)?;
        Ok(())
    }

    fn subscribe(&self, channel: &str) -> SubscribeAck {
        let (ack, done) = oneshot::channel();
        let sent = self.inner.requests.send(Request::Subscribe {
            channel: channel.to_owned(),
            ack,
        });
        Box::pin(async move {
            if sent.is_err() {
                return Err(BrokerError::Unavailable("redis broker stopped".into()));
            }
            done.await
                .unwrap_or_else(|_| Err(BrokerError::Unavailable("redis broker stopped".into())))
        })
    }

    fn unsubscribe(&self, channel: &str) {
        let _ = self.inner.requests.send(Request::Unsubscribe {
            channel: channel.to_owned(),
        });
    }

    async fn history(
        &self,
        channel: &str,
        since: u64,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        let args = vec![
            millis(inner.settings.meta_ttl),
            format!("{}-0", since.saturating_add(1)),
            limit.min(inner.settings.history_size).to_string(),
            millis(inner.settings.history_ttl),
            inner.topology.replid_flag().to_owned(),
            inner.settings.history_size.to_string(),
        ];
        let answer: Vec<Value> = scripts::run(
            client,
            &inner.scripts.history,
            self.channel_keys(channel),
            args,
        )
        .await
        .map_err(broker_error)?;
        let position = parse_position(&answer)?;
        let epoch: Arc<str> = position.epoch.as_str().into();
        // (id, data, from) triples; from is '' when the message has no publisher.
        let mut publications = Vec::with_capacity(answer.len().saturating_sub(2) / 3);
        for entry in answer.get(2..).unwrap_or_default().chunks_exact(3) {
            let offset = entry[0]
                .as_str()
                .and_then(|id| id.split('-').next()?.parse::<u64>().ok())
                .ok_or_else(|| BrokerError::Internal("bad history entry id".into()))?;
            let data = entry[1]
                .as_str()
                .ok_or_else(|| BrokerError::Internal("bad history entry".into()))?;
            let from = match &entry[2] {
                Value::String(s) if !s.is_empty() => Some(Arc::from(&**s)),
                _ => None,
            };
            publications.push(Publication {
                offset,
                epoch: epoch.clone(),
                data: data.as_ref().into(),
                from,
            });
        }
        Ok(History {
            position,
            publications,
        })
    }

    async fn position(&self, channel: &str) -> Result<StreamPosition, BrokerError> {
        // history.lua with a limit of 0 is exactly "read the position" (creating
        // nothing): one script keeps the epoch logic in one place.
        Ok(self.history(channel, 0, 0).await?.position)
    }

    async fn presence_update(
        &self,
        node: &str,
        changes: &[PresenceChange],
    ) -> Result<(), BrokerError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        // One script per channel: each channel's hash may live on another shard. Later
        // changes of the same user override earlier ones, in order.
        let mut by_channel: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for change in changes {
            let args = by_channel
                .entry(change.channel.as_str())
                .or_insert_with(|| vec![millis(inner.settings.presence_ttl)]);
            args.push(keys::presence_field(node, &change.user));
            args.push(change.connections.to_string());
        }
        let calls = by_channel.into_iter().map(|(channel, args)| {
            let keys = vec![inner.keys.presence(channel)];
            async move {
                scripts::run::<Value>(client, &inner.scripts.presence_update, keys, args).await
            }
        });
        try_join_all(calls).await.map_err(broker_error)?;
        Ok(())
    }

    async fn presence_refresh(&self, _node: &str, channels: &[String]) -> Result<(), BrokerError> {
        // Expiry is per hash, not per field: refreshing keeps every node's entries of
        // the channel; entries of dead nodes are filtered (and removed) on read.
        let inner = &self.inner;
        let client = inner.ready()?;
        let ttl = inner.settings.presence_ttl.as_millis().max(1) as i64;
        let calls = channels
            .iter()
            .map(|channel| client.pexpire::<Value, _>(inner.keys.presence(channel), ttl, None));
        try_join_all(calls).await.map_err(broker_error)?;
        Ok(())
    }

    async fn presence(&self, channel: &str) -> Result<BTreeMap<String, u32>, BrokerError> {
        let inner = &self.inner;
        let live: HashSet<String> = self.nodes().await?.into_iter().map(|n| n.id).collect();
        let client = inner.ready()?;
        let key = inner.keys.presence(channel);
        let entries: HashMap<String, String> =
            client.hgetall(key.as_str()).await.map_err(broker_error)?;
        let mut users = BTreeMap::new();
        let mut dead = Vec::new();
        for (field, count) in entries {
            match keys::split_presence_field(&field) {
                Some((node, user)) if live.contains(node) => {
                    let count: u32 = count.parse().unwrap_or(0);
                    let total: &mut u32 = users.entry(user.to_owned()).or_insert(0);
                    *total = total.saturating_add(count);
                }
                _ => dead.push(field),
            }
        }
        users.retain(|_, count| *count > 0);
        if !dead.is_empty() {
            // Lazy cleanup of nodes that left the registry; the answer is already right
            // without it, so a failure only leaves the cleanup for the next read.
            if let Err(e) = client.hdel::<Value, _, _>(key.as_str(), dead).await {
                tracing::debug!(error = %e, channel, "could not remove presence of dead nodes");
            }
        }
        Ok(users)
    }

    async fn presence_by_node(&self, channel: &str) -> Result<NodePresence, BrokerError> {
        // The same hash as `presence`, not summed over nodes. Entries of dead nodes are
        // skipped; removing them is left to `presence`, which runs far more often.
        let inner = &self.inner;
        let live: HashSet<String> = self.nodes().await?.into_iter().map(|n| n.id).collect();
        let client = inner.ready()?;
        let entries: HashMap<String, String> = client
            .hgetall(inner.keys.presence(channel).as_str())
            .await
            .map_err(broker_error)?;
        let mut users = NodePresence::new();
        for (field, count) in entries {
            let count: u32 = count.parse().unwrap_or(0);
            match keys::split_presence_field(&field) {
                Some((node, user)) if count > 0 && live.contains(node) => {
                    users
                        .entry(user.to_owned())
                        .or_default()
                        .insert(node.to_owned(), count);
                }
                _ => {}
            }
        }
        Ok(users)
    }

    async fn register_node(&self, info: &NodeInfo) -> Result<(), BrokerError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        let json = serde_json::to_string(info)
            .map_err(|e| BrokerError::Internal(format!("node info: {e}")))?;
        // The registry as a whole expires when no node refreshes it for a while; each
        // entry's own age is judged by its heartbeat time.
        let registry_ttl = millis(inner.settings.node_ttl.saturating_mul(10));
        let args = vec![info.id.clone(), json, registry_ttl];
        scripts::run::<Value>(
            client,
            &inner.scripts.register_node,
            vec![inner.keys.nodes()],
            args,
        )
        .await
        .map_err(broker_error)?;
        Ok(())
    }

    async fn unregister_node(&self, id: &str) -> Result<(), BrokerError> {
        let client = self.inner.ready()?;
        client
            .hdel::<Value, _, _>(self.inner.keys.nodes(), id)
            .await
            .map_err(broker_error)?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        let args = vec![millis(inner.settings.node_ttl)];
        let answer: Vec<String> =
            scripts::run(client, &inner.scripts.nodes, vec![inner.keys.nodes()], args)
                .await
                .map_err(broker_error)?;
        let mut nodes: Vec<NodeInfo> = answer
            .iter()
            .filter_map(|json| match serde_json::from_str(json) {
                Ok(info) => Some(info),
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable node registry entry");
                    None
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    async fn user_command(&self, user: &str, command: &UserCommand) -> Result<u64, BrokerError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        if let UserCommand::Revoke { before, until } = command {
            let ttl_ms = until
                .saturating_sub(crate::auth::now_secs())
                .max(1)
                .saturating_mul(1000);
            let args = vec![
                user.to_owned(),
                before.to_string(),
                until.to_string(),
                ttl_ms.to_string(),
            ];
            scripts::run::<Value>(
                client,
                &inner.scripts.revoke,
                vec![inner.keys.revocations()],
                args,
            )
            .await
            .map_err(broker_error)?;
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let message = ControlMessage {
            id: id.clone(),
            user: user.to_owned(),
            command: command.clone(),
        };
        let payload = serde_json::to_string(&message)
            .map_err(|e| BrokerError::Internal(format!("user command: {e}")))?;
        let channel = inner.keys.pubsub(keys::CONTROL);
        // The answer counts the subscriber connections that received it: one per node.
        let receivers: i64 = match inner.topology {
            Topology::Single | Topology::Sentinel => client.publish(channel, payload).await,
            Topology::Cluster => client.spublish(channel, payload).await,
        }
        .map_err(broker_error)?;
        let key = inner.keys.control_reply(&id);
        let deadline = tokio::time::Instant::now() + CONTROL_REPLY_TIMEOUT;
        let mut wait = Duration::from_millis(2);
        let answers: HashMap<String, String> = loop {
            let answers: HashMap<String, String> =
                client.hgetall(key.as_str()).await.map_err(broker_error)?;
            if answers.len() as i64 >= receivers || tokio::time::Instant::now() >= deadline {
                if (answers.len() as i64) < receivers {
                    tracing::warn!(
                        nodes = receivers,
                        answered = answers.len(),
                        "some nodes did not answer a user command in time; not counted"
                    );
                }
                break answers;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(50));
        };
        let _ = client.del::<Value, _>(key.as_str()).await;
        Ok(answers.values().filter_map(|v| v.parse::<u64>().ok()).sum())
    }

    async fn revocations(&self) -> Result<Vec<Revocation>, BrokerError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        let key = inner.keys.revocations();
        let entries: HashMap<String, String> =
            client.hgetall(key.as_str()).await.map_err(broker_error)?;
        let now = crate::auth::now_secs();
        let mut list = Vec::new();
        let mut stale = Vec::new();
        for (user, value) in entries {
            let parsed = value
                .split_once('|')
                .and_then(|(b, u)| Some((b.parse::<u64>().ok()?, u.parse::<u64>().ok()?)));
            match parsed {
                Some((before, until)) if until > now => list.push(Revocation {
                    user,
                    before,
                    until,
                }),
                _ => stale.push(user),
            }
        }
        if !stale.is_empty() {
            // Over or unreadable: forgotten; the answer is right without the cleanup.
            let _ = client.hdel::<Value, _, _>(key.as_str(), stale).await;
        }
        Ok(list)
    }

    fn webhooks(
        &self,
        settings: crate::broker::webhook::WebhookStoreSettings,
    ) -> Arc<dyn crate::broker::webhook::WebhookStore> {
        Arc::new(webhook::RedisWebhookStore::new(
            Arc::clone(&self.inner),
            settings,
        ))
    }

    fn is_healthy(&self) -> bool {
        let inner = &self.inner;
        !inner.cancel.is_cancelled()
            && inner.client.is_connected()
            && inner.sub.is_connected()
            && inner.synced.load(Ordering::SeqCst)
            && inner.probe_ok.load(Ordering::SeqCst)
    }

    async fn shutdown(&self) {
        self.stop().await;
    }
}
