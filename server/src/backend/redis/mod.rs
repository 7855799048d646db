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
//!   ([`BackendEvent`]), which the hub consumes: the reader does no fan-out.
//!
//! With `redis://` the classic PUBLISH / SUBSCRIBE is used; with `redis-cluster://` the
//! sharded SPUBLISH / SSUBSCRIBE, so a message only travels inside the shard that owns
//! its channel and only to nodes subscribed to it.
//!
//! Failure handling, in short: commands fail fast with [`BackendError::Unavailable`]
//! while a connection is down (short timeouts, no queueing while disconnected); fred
//! reconnects with exponential backoff; after the subscriber reconnects, the manager
//! subscribes every channel again itself and then sends
//! [`BackendEvent::Resubscribed`], so the hub checks every channel against
//! history. A lagging fred broadcast receiver is treated the same way. A probe
//! (`probe`) publishes to a per-node channel every second and forces a reconnect
//! when the subscriber connection stops delivering.

mod coalesce;
mod health;
mod keys;
mod nodes;
mod presence;
mod probe;
mod receipts;
mod routing;
mod scripts;
mod streams;
mod subscriptions;
mod users;
mod webhooks;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::clients::Client;
use fred::error::{Error as FredError, ErrorKind};
use fred::interfaces::{ClientLike, EventInterface, ServerInterface};
use fred::types::config::{Config, ReconnectPolicy, TcpConfig, UnresponsiveConfig};
use fred::types::{Builder, ClusterStateChange, Value};
use herald_protocol::StreamPosition;
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::error::BackendError;
use crate::backend::routing::{event_stream, BackendEvent, BackendEventSender, BackendEvents};
use crate::backend::settings::BackendSettings;
use crate::backend::webhooks::{WebhookStore, WebhookStoreSettings};
use keys::{Keys, Topology};
use probe::ProbeState;
use routing::read_publications;
use scripts::Scripts;
use subscriptions::Request;

/// How long a command may take before it fails with [`BackendError::Unavailable`].
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the handshake commands of a new connection (HELLO, AUTH, SELECT) may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection with a command unanswered for this long is dropped and reconnected
/// (catches a Redis that is stopped but whose sockets stay open).
const UNRESPONSIVE_AFTER: Duration = Duration::from_secs(4);
/// How long a user command waits for the other nodes' answers.
const CONTROL_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the answers of a user command are kept in Redis.
const CONTROL_REPLY_TTL: Duration = Duration::from_secs(10);
/// Reconnect backoff: from 50 ms doubling up to `HERALD_REDIS_RECONNECT_MAX_MS`
/// (200 ms), forever, with jitter.
///
/// Why a node took ~5 s to deliver again after a partition healed (packets dropped,
/// nothing closed), and what changed:
///
/// 1. Nothing closed the old connections. fred's unresponsive check never fires for
///    pub/sub commands (the probe's PUBLISH, and the subscriber connection never sends
///    anything else), and commands that time out leave the connection "connected". So
///    the connections outlived the partition, and after the heal both kernels resent
///    what was queued only at their next retransmission, whose interval had doubled all
///    along the partition (0.2 s, 0.4 s, … 6.4 s): that was the delay, several seconds
///    after the heal, and longer for longer partitions. Redis' side, which pushes the
///    publications to the subscriber, is out of our hands. Now every Redis socket has
///    TCP keepalive (probes after 1 s of silence) and `TCP_USER_TIMEOUT` (3 s): a
///    connection whose bytes or keepalive probes go unacknowledged for 3 s is closed by
///    the kernel during the partition, and fred reconnects on a fresh one.
/// 2. Reconnecting was slow. With a 2 s connect timeout and a 2 s backoff cap, each
///    attempt during the partition was a SYN unanswered for 2 s, then up to 2 s of
///    sleep: the first attempt after the heal could come 4 s late. An attempt now gives
///    up after `HERALD_REDIS_CONNECT_TIMEOUT_MS` (400 ms, far above a Redis round trip,
///    below the kernel's first SYN retransmit at 1 s) and the next starts at most
///    200 ms later, so a healed link is used within about 0.6 s; the resubscribe, the
///    history check and the probe (woken by the resubscribe) follow at once. The cost
///    while Redis is unreachable: one SYN per connection every ~0.6 s.
const RECONNECT_MIN_MS: u32 = 50;
/// A Redis connection whose sent bytes (a command, or a keepalive probe) stay
/// unacknowledged for this long is closed by the kernel (`TCP_USER_TIMEOUT`), and fred
/// reconnects. See below.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(3);
/// Keepalive probes after this much silence, then at this interval: an idle connection
/// (the subscriber's, when no publication comes) is found dead too.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(1);

/// The Redis broker. See the module doc.
pub struct RedisBackend {
    inner: Arc<Inner>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The event stream's receiving side, until the hub takes it.
    events: Mutex<Option<BackendEvents>>,
}

/// State shared by the broker and its background tasks.
struct Inner {
    settings: BackendSettings,
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
    /// The broker's event stream towards the hub (see [`BackendEvent`]).
    events: BackendEventSender,
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
    fn ready(&self) -> Result<&Client, BackendError> {
        if self.client.is_connected() && !self.cancel.is_cancelled() {
            Ok(&self.client)
        } else {
            Err(BackendError::Unavailable("not connected to Redis".into()))
        }
    }

    /// The client that publishes, checked like [`Inner::ready`].
    fn publisher(&self) -> Result<&Client, BackendError> {
        match &self.publisher {
            Some(p) if p.is_connected() && !self.cancel.is_cancelled() => Ok(p),
            Some(_) => Err(BackendError::Unavailable("not connected to Redis".into())),
            None => self.ready(),
        }
    }

    /// Tells the hub to check every channel (waits for room in the event stream).
    async fn on_resubscribed(&self) {
        let _ = self.events.send(BackendEvent::Resubscribed).await;
    }
}

/// Maps a fred error. Only a mistake of ours (a malformed command or answer, bad
/// configuration) is `Internal`; everything else (connection trouble, timeouts, commands
/// cancelled by a reconnect, Redis' own "try again" answers such as LOADING or
/// CLUSTERDOWN) is `Unavailable`, which callers report as "broker down, retry".
fn broker_error(e: FredError) -> BackendError {
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
        BackendError::Unavailable(e.to_string())
    } else {
        BackendError::Internal(e.to_string())
    }
}

fn millis(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

/// A client with the broker's settings: the subscriber (`broadcast_capacity`: the
/// buffer between its connection and the reader), or one that sends commands (`None`).
fn build_client(
    config: Config,
    settings: &BackendSettings,
    broadcast_capacity: Option<usize>,
) -> Result<Client, FredError> {
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
            conn.connection_timeout = settings.connect_timeout;
            conn.internal_command_timeout = HANDSHAKE_TIMEOUT;
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
                keepalive: Some(
                    fred_socket2::TcpKeepalive::new()
                        .with_time(KEEPALIVE_IDLE)
                        .with_interval(KEEPALIVE_IDLE),
                ),
                user_timeout: Some(TCP_USER_TIMEOUT),
                ..TcpConfig::default()
            };
        })
        .set_policy(ReconnectPolicy::new_exponential(
            0,
            RECONNECT_MIN_MS,
            settings.reconnect_max.as_millis().clamp(50, 60_000) as u32,
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
    settings: BackendSettings,
) -> Result<RedisBackend, BackendError> {
    let (config, topology) =
        keys::parse_url(url).map_err(|e| BackendError::Internal(format!("bad Redis URL: {e}")))?;
    let client = build_client(config.clone(), &settings, None)
        .map_err(|e| BackendError::Internal(format!("bad Redis config: {e}")))?;
    // The capacity of fred's broadcast channel between the subscriber connection and
    // the reader (fred's default is 32 and it drops the oldest on lag). The reader only
    // decodes and hands off, so this absorbs scheduling hiccups, not sustained overload;
    // a lag is still detected and handled as possible loss.
    let sub = build_client(
        config.clone(),
        &settings,
        Some(settings.subscriber_buffer.max(1)),
    )
    .map_err(|e| BackendError::Internal(format!("bad Redis config: {e}")))?;
    let publisher = if settings.wait_replicas > 0 {
        Some(
            build_client(config.clone(), &settings, None)
                .map_err(|e| BackendError::Internal(format!("bad Redis config: {e}")))?,
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
    let (events, events_rx) = event_stream();
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
    Ok(RedisBackend {
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

/// Waits until `wait_replicas` replicas have every write made so far on the publisher
/// connection, the publish just made included (Redis `WAIT`; it cannot run inside a
/// script). A reconnect since the script ran means the `WAIT` would cover another
/// connection's writes, so it counts as not acknowledged.
async fn wait_replicas(
    inner: &Inner,
    client: &Client,
    mut reconnects: broadcast::Receiver<fred::types::config::Server>,
) -> Result<(), BackendError> {
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
        return Err(BackendError::Unavailable(
            "redis reconnected before replicas acknowledged the publish".into(),
        ));
    }
    if acked < i64::from(want) {
        return Err(BackendError::Unavailable(format!(
            "{acked} of {want} redis replicas acknowledged the publish in time"
        )));
    }
    Ok(())
}

/// Reads `{offset, epoch}` from the front of a script's answer.
fn parse_position(values: &[Value]) -> Result<StreamPosition, BackendError> {
    let bad = || BackendError::Internal("unexpected script answer".into());
    let offset = values.first().and_then(Value::as_u64).ok_or_else(bad)?;
    let epoch = values.get(1).and_then(Value::as_string).ok_or_else(bad)?;
    Ok(StreamPosition::new(offset, epoch))
}

impl RedisBackend {
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

impl Drop for RedisBackend {
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

impl RedisBackend {
    /// The cluster's webhook state and event log with these settings. The node opens
    /// it once, when webhooks are configured.
    pub fn webhook_store(&self, settings: WebhookStoreSettings) -> Arc<dyn WebhookStore> {
        Arc::new(webhooks::RedisWebhookStore::new(
            Arc::clone(&self.inner),
            settings,
        ))
    }
}
