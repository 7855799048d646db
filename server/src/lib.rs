//! Herald node: a horizontally scaled WebSocket push server.
//!
//! # Layers
//!
//! Every module belongs to one layer, and **a module imports only from the layers
//! above it in this list, or from modules listed before it in its own layer**; so
//! there is no import cycle, and `testkit/tests/import_cycles.rs` fails on one. Data
//! still flows upward, through channels: the backend hands the node a stream of
//! events, and the hub offers frames to each session's mailbox; nothing below calls
//! back up. `main.rs` and this file are the wiring on top (see [`assemble`] and
//! [`run`]): the only place that sees every capability.
//!
//! 1. Leaves, which import nothing of the crate: [`config`] (every setting, from
//!    environment and flags, with its default), [`clock`] (the one wall clock),
//!    [`metrics`] (Prometheus).
//! 2. What the cluster shares: [`backend`], small capability traits (streams and
//!    history, routing, presence, the node registry, user control, receipts, the
//!    webhook store, health), each with a memory and a Redis implementation.
//! 3. Pure rules: [`continuity`] (a channel's stream: gap, buffer, repair, resync),
//!    [`limits`] (admission and recovery budgets); also `ws/rate.rs`.
//! 4. Node services, each given only the capabilities it uses: [`auth`] (tokens, the
//!    API key, dev mode), [`mailbox`] (the hub-to-session contract), [`hub`] (which
//!    local session is in which channel; encode once, fan out, repair), [`users`]
//!    (sessions by user, revocations, user commands), [`presence`], [`receipts`]
//!    (acks, unread, unacked detection), [`webhook`], [`registry`] (the heartbeat and
//!    the choice for `/v1/connect`), [`cutoff`] (a node cut off from the broker moves
//!    its clients to a ready peer).
//! 5. Verbs, which every transport calls: [`events`] (the one ordered consumer of
//!    backend events), [`publish`] (single, batch, ephemeral), [`membership`] (a
//!    session arriving, entering and leaving channels), [`node`] (the shared state,
//!    backend reads and admission).
//! 6. Transports: [`listener`] (accept, HTTP with timeouts), [`api`] (the HTTP API),
//!    [`ws`] (the upgrade, `hello`, one session's state machine), [`web`] (the embedded
//!    browser client, demo page and dashboard).
//!
//! docs/architecture.md follows one push through these files.

pub mod api;
pub mod auth;
pub mod backend;
pub mod clock;
pub mod config;
pub mod continuity;
pub mod cutoff;
pub mod events;
pub mod hub;
pub mod limits;
pub mod listener;
pub mod mailbox;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod presence;
pub mod publish;
pub mod receipts;
pub mod registry;
pub mod users;
pub mod web;
pub mod webhook;
pub mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Keys;
use crate::backend::error::BackendError;
use crate::backend::memory::MemoryBackend;
use crate::backend::settings::BackendSettings;
use crate::backend::Backend;
pub use crate::config::Config;
use crate::hub::Hub;
use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::node::{Identity, Node, Reads, Services};
use crate::presence::Presence;
use crate::publish::Publisher;
use crate::users::Users;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The keys could not be loaded, or break the startup rules ([`auth::dev_mode`]).
    #[error(transparent)]
    Keys(#[from] auth::KeyError),
    /// The broker could not be set up (a malformed URL).
    #[error(transparent)]
    Broker(#[from] BackendError),
    /// The webhook settings break a rule ([`webhook::Settings::from_config`]).
    #[error(transparent)]
    Webhook(#[from] webhook::SettingsError),
    /// The listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// How long closing frames may take after the drain window before the node gives up.
const DRAIN_GRACE: Duration = Duration::from_secs(4);

/// Serves one node on `listener` until `shutdown` resolves, then drains as docs/protocol.md
/// ("Node shutdown") says: `/readyz` turns 503 at once, the node leaves the registry, sessions get
/// `reconnect` spread over the drain window and close 4503, and this returns within the
/// drain window plus 5 s.
///
/// Before anything else it checks the keys against the startup rules
/// ([`auth::dev_mode`]) for the listener's address, and returns
/// [`StartError::Keys`] when they break one.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let local = listener.local_addr()?;
    // The startup rules judge the address actually bound: an embedder may hand in a
    // listener on another address than `config.listen`.
    let mut config = config;
    config.listen = local;
    let Assembly {
        node,
        backend,
        hub,
        presence,
        receipts,
        settings,
    } = assemble(config).await?;
    announce(&node, local);

    let background = CancellationToken::new();
    tokio::spawn(registry::heartbeat(
        Arc::clone(&node) as Arc<dyn registry::Announce>,
        Arc::clone(&backend.nodes),
        Arc::clone(&presence),
        settings.node_ttl,
        background.clone(),
    ));
    tokio::spawn(Arc::clone(&presence).run(settings.presence_ttl / 3, background.clone()));
    if node.config.redis_url.is_some() {
        tokio::spawn(cutoff::run(
            cutoff::Watch {
                node_id: node.id.clone(),
                health: Arc::clone(&backend.health),
                registry: Arc::clone(&backend.nodes),
                users: Arc::clone(&node.users),
                readiness: Arc::clone(&node.readiness),
                after: Duration::from_millis(node.config.cutoff_move_after_ms),
            },
            node.drain.clone(),
        ));
    }
    // Unacked reports: the sweeper hands them to this node's consumer, which appends
    // them to the webhook log (`message.unacked`) before confirming.
    let (unacked_tx, unacked_rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(webhook::unacked::forward_unacked(
        unacked_rx,
        node.webhooks.clone(),
    ));
    tokio::spawn(Arc::clone(&receipts).run_sweeper(unacked_tx, background.clone()));
    let stop_acks = CancellationToken::new();
    let acks_flushed = tokio::spawn(Arc::clone(&receipts).run_flusher(stop_acks.clone()));
    if let Some(w) = &node.webhooks {
        w.spawn(background.clone());
    }
    tokio::spawn(housekeeping(
        Arc::clone(&hub),
        backend.memory.clone(),
        Arc::clone(&node.metrics),
        background.clone(),
    ));

    let app = api::routes()
        .merge(web::routes())
        .route("/ws", get(ws::upgrade))
        .with_state(Arc::clone(&node));
    let stop_http = CancellationToken::new();
    let server = tokio::spawn(listener::serve(
        listener,
        app,
        listener::Limits {
            header_read_timeout: node.config.header_read_timeout(),
            max_request_head: usize::try_from(node.config.max_request_head_bytes)
                .unwrap_or(usize::MAX),
            send_buffer: node.config.tcp_send_buffer,
            max_http_connections: node.config.max_http_connections,
            refused: node.metrics.http_connections_refused.clone(),
            evicted: node.metrics.http_connections_evicted.clone(),
            busy: Arc::clone(&node.busy),
            dropped: node.metrics.http_connections_dropped.clone(),
            busy_answers: node.metrics.busy_answers.clone(),
        },
        stop_http.clone(),
    ));

    shutdown.await;
    tracing::info!(node = %node.id, "draining");
    node.start_draining();
    if let Err(e) = backend.nodes.unregister_node(&node.id).await {
        tracing::warn!(error = %e, "could not leave the registry; it will expire");
    }
    node.sessions.close();
    if tokio::time::timeout(node.config.drain(), node.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = node.connections(),
            "drain window over; closing the rest"
        );
        node.force_close.cancel();
        let _ = tokio::time::timeout(DRAIN_GRACE, node.sessions.wait()).await;
    }
    stop_http.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    // The sessions are gone: write their last acks before the broker closes.
    stop_acks.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), acks_flushed).await;
    background.cancel();
    if let Some(w) = &node.webhooks {
        // The sessions are gone: report their departures, hand the URLs over.
        let _ = tokio::time::timeout(Duration::from_secs(2), w.finish()).await;
    }
    backend.health.shutdown().await;
    tracing::info!(node = %node.id, "stopped");
    Ok(())
}

/// A node's services, wired, with what `run` starts and stops around them.
pub(crate) struct Assembly {
    pub(crate) node: Arc<Node>,
    pub(crate) backend: Backend,
    pub(crate) hub: Arc<Hub>,
    pub(crate) presence: Arc<Presence>,
    pub(crate) receipts: Arc<receipts::Receipts>,
    pub(crate) settings: BackendSettings,
}

/// Builds the node for `config` (whose `listen` is the address actually bound): the
/// backend, then each service with only the capabilities it uses, then the verbs. The
/// one place that sees every capability. Background work is started by [`run`].
pub(crate) async fn assemble(config: Config) -> Result<Assembly, StartError> {
    let keys = Keys::resolve(&config)?;
    let id = config
        .node_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("ws://{}/ws", config.listen));
    let metrics = Arc::new(Metrics::new());
    let webhook_settings = webhook::Settings::from_config(&config, keys.dev)?;
    let settings = BackendSettings::from_config(&config);
    let backend = Backend::connect(
        &config,
        settings.clone(),
        &id,
        webhook_settings.as_ref().map(|s| s.store_settings()),
    )
    .await?;
    // One direction: the backend hands its events to the node's one consumer and holds
    // nothing of the node.
    let events = backend
        .routing
        .events()
        .ok_or_else(|| BackendError::Internal("backend events already taken".into()))?;
    let hub = Arc::new(Hub::new(
        Arc::clone(&metrics),
        Arc::clone(&backend.routing),
        Arc::clone(&backend.streams),
        Duration::from_millis(config.unsubscribe_delay_ms),
        config.history_size.max(1),
    ));
    let users = Arc::new(Users::new(Arc::clone(&backend.users)));
    events::consume(&hub, &users, events);
    tokio::spawn(Arc::clone(&users).load_revocations());
    let presence = Arc::new(Presence::new(id.clone(), Arc::clone(&backend.presence)));
    // Unacked reports have one consumer, the webhook log. Without a webhook the
    // detection would schedule every personal message and sweep Redis for overdue ones
    // only to log them: about 120 µs of Redis CPU per message no client acks, three
    // times the publish itself (docs/benchmarks.md). So it runs only with
    // `HERALD_WEBHOOK_URL`.
    let ack_timeout_ms = if webhook_settings.is_some() {
        config.ack_timeout_ms
    } else {
        if config.ack_timeout_ms > 0 {
            tracing::info!(
                "unacked detection is off: no HERALD_WEBHOOK_URL to report message.unacked to; \
                 acks and GET /v1/users/{{user}}/unread work as ever"
            );
        }
        0
    };
    if ack_timeout_ms > 0 && ack_timeout_ms >= config.history_ttl_secs.saturating_mul(1000) {
        tracing::warn!(
            ack_timeout_ms = config.ack_timeout_ms,
            history_ttl_secs = config.history_ttl_secs,
            "HERALD_ACK_TIMEOUT_MS is not below the history TTL: messages leave history \
             before they are overdue and are never reported as unacked"
        );
    }
    let receipts = Arc::new(receipts::Receipts::new(
        Arc::clone(&backend.receipts),
        Arc::clone(&metrics),
        ack_timeout_ms,
        config.history_size,
    ));
    let webhooks = match (webhook_settings, &backend.webhooks) {
        (Some(settings), Some(store)) => Some(Arc::new(webhook::Webhooks::new(
            settings,
            Arc::clone(store),
            id.clone(),
            Arc::clone(&metrics),
        )?)),
        _ => None,
    };
    let publisher = Publisher::new(
        Arc::clone(&backend.streams),
        Arc::clone(&backend.routing),
        Arc::clone(&receipts),
        Arc::clone(&metrics),
    );
    let membership = Membership::new(
        Arc::clone(&hub),
        Arc::clone(&users),
        Arc::clone(&presence),
        webhooks.clone(),
        Arc::clone(&backend.streams),
        Arc::clone(&metrics),
        config.history_size,
    );
    let node = Arc::new(Node::new(
        Identity {
            config,
            id,
            public_url,
            keys,
        },
        Services {
            publisher,
            membership,
            users,
            webhooks,
            metrics,
            receipts: Arc::clone(&receipts),
            readiness: Arc::default(),
            reads: Reads {
                streams: Arc::clone(&backend.streams),
                presence: Arc::clone(&backend.presence),
                nodes: Arc::clone(&backend.nodes),
                health: Arc::clone(&backend.health),
            },
        },
    ));
    Ok(Assembly {
        node,
        backend,
        hub,
        presence,
        receipts,
        settings,
    })
}

/// Periodic work: delayed broker unsubscribes and the memory broker's expiry.
async fn housekeeping(
    hub: Arc<Hub>,
    memory: Option<Arc<MemoryBackend>>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                hub.reap();
                n += 1;
                if let Some(m) = &memory {
                    if n.is_multiple_of(4) { m.sweep(); }
                    metrics.memory_streams.set(m.stream_count() as i64);
                }
            }
        }
    }
}

/// Logs where the node listens and, in dev mode, prints the keys and a ready token.
fn announce(node: &Node, local: SocketAddr) {
    let broker = if node.config.redis_url.is_some() {
        "redis"
    } else {
        "memory"
    };
    tracing::info!(node = %node.id, listen = %local, url = %node.public_url, broker, "herald listening");
    if !node.keys.dev {
        return;
    }
    tracing::warn!(
        generated = ?node.keys.generated,
        "DEV MODE: keys are generated or shared and /dev/token hands out tokens to anyone. \
         Never run dev mode in production: set HERALD_JWT_SECRET (or HERALD_JWT_PUBLIC_KEY_FILE) \
         and HERALD_API_KEY, and unset HERALD_DEV."
    );
    let api_key = node.keys.dev_api_key.as_deref().unwrap_or("");
    let http = format!("http://{local}");
    let (token, more) = match node.keys.dev_signer.as_ref() {
        Some(s) => (
            s.dev_token("demo", api::dev_token_ttl(node)),
            format!("curl '{http}/dev/token?user=alice'"),
        ),
        None => (
            "(none: dev tokens need an HS256 secret)".into(),
            "(none: /dev/token needs an HS256 secret)".into(),
        ),
    };
    println!(
        "\n=== Herald dev mode ===\n\
         WebSocket:   {ws}\n\
         API key:     {api_key}\n\
         token (demo, 24 h): {token}\n\
         more tokens: {more}\n\
         push:        curl -X POST {http}/v1/publish -H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' -d '{{\"user\":\"demo\",\"data\":{{\"text\":\"hello\"}}}}'\n",
        ws = node.public_url,
    );
}
