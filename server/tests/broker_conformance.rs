//! One broker conformance suite: the same behaviours, written once over
//! `Arc<dyn TestBackend>`, run against the in-memory broker, the Redis broker on one Redis,
//! and the Redis broker on a 3-master Redis Cluster, so the backends cannot drift.
//!
//! What only Redis has (several nodes routing to each other, reconnects and the
//! `Resubscribed` event, lost keys, sharded pub/sub spread) stays in `redis_broker.rs`.

#[path = "support/backend.rs"]
mod backend;
#[path = "support/broker_events.rs"]
mod broker_events;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::*;
use broker_events::{change, info, record, Event};
use herald_protocol::{StreamPosition, EMPTY_EPOCH};
use herald_server::backend::memory::MemoryBackend;
use herald_server::backend::redis::connect;
use herald_server::backend::settings::BackendSettings;
use herald_server::backend::streams::Publication;
use herald_server::backend::users::UserCommand;
use redis_server::{RedisCluster, RedisServer};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Generous: includes reconnect backoff and cluster discovery on a shared machine.
const WAIT: Duration = Duration::from_secs(15);

fn settings() -> BackendSettings {
    BackendSettings {
        history_size: 10,
        history_ttl: Duration::from_secs(60),
        meta_ttl: Duration::from_secs(120),
        node_ttl: Duration::from_secs(10),
        presence_ttl: Duration::from_secs(10),
        subscriber_buffer: 16_384,
        wait_replicas: 0,
        wait_timeout: Duration::from_millis(500),
        reconnect_max: Duration::from_millis(250),
        connect_timeout: Duration::from_millis(500),
    }
}

/// Where the suite runs.
enum Backend<'a> {
    Memory,
    Single(&'a RedisServer),
    Cluster(&'a RedisCluster),
}

/// A broker under test, with its event stream (every user command counts 1 session).
struct Subject {
    /// Each capability of the backend under test, as the node's services get them.
    streams: Arc<dyn Streams>,
    routing: Arc<dyn Routing>,
    presence: Arc<dyn PresenceStore>,
    nodes: Arc<dyn NodeRegistry>,
    users: Arc<dyn UserControl>,
    health: Arc<dyn Health>,
    events: mpsc::UnboundedReceiver<Event>,
}

impl Backend<'_> {
    /// A fresh broker (its own key prefix on Redis).
    async fn open(&self, test: &str, settings: BackendSettings) -> Subject {
        let broker: Arc<dyn TestBackend> = match self {
            Backend::Memory => Arc::new(MemoryBackend::new(settings)),
            Backend::Single(_) | Backend::Cluster(_) => {
                let url = match self {
                    Backend::Single(r) => r.url(),
                    Backend::Cluster(c) => c.url(),
                    Backend::Memory => unreachable!(),
                };
                let prefix = format!("conf:{}:{test}:{}:", std::process::id(), unique());
                Arc::new(
                    connect(&url, &prefix, "n1", settings)
                        .await
                        .expect("connect"),
                )
            }
        };
        let deadline = Instant::now() + WAIT;
        while !broker.is_healthy() {
            assert!(Instant::now() < deadline, "broker never healthy");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let events = record(&*broker);
        Subject {
            streams: broker.clone(),
            routing: broker.clone(),
            presence: broker.clone(),
            nodes: broker.clone(),
            users: broker.clone(),
            health: broker,
            events,
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

impl Subject {
    /// The next event; resubscribes (Redis only, after a lag) are not part of the
    /// behaviours compared here.
    async fn next(&mut self) -> Event {
        loop {
            let event = timeout(WAIT, self.events.recv())
                .await
                .expect("an event in time")
                .expect("stream open");
            if !matches!(event, Event::Resubscribed) {
                return event;
            }
        }
    }

    async fn next_publication(&mut self) -> (String, Publication) {
        loop {
            if let Event::Publication(c, p) = self.next().await {
                return (c, p);
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// The behaviours.

/// Offsets from 1 without gaps under concurrent publishes, one epoch; a channel never
/// published reads `(0, "")` however often it is read, and its first publish starts a
/// real epoch.
async fn offsets_and_epochs(backend: &Backend<'_>) {
    let s = backend.open("offsets", settings()).await;
    let mut tasks = Vec::new();
    for t in 0..4 {
        let b = Arc::clone(&s.streams);
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..10 {
                out.push(b.publish("o", &format!("[{t},{i}]"), None).await.unwrap());
            }
            out
        }));
    }
    let mut offsets = Vec::new();
    let mut epochs = std::collections::BTreeSet::new();
    for t in tasks {
        for p in t.await.unwrap() {
            offsets.push(p.offset);
            epochs.insert(p.epoch);
        }
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=40).collect::<Vec<_>>());
    assert_eq!(epochs.len(), 1);
    let epoch = epochs.into_iter().next().unwrap();
    assert_ne!(epoch, EMPTY_EPOCH);
    assert_eq!(
        s.streams.position("o").await.unwrap(),
        StreamPosition::new(40, &epoch)
    );

    let empty = StreamPosition::new(0, EMPTY_EPOCH);
    assert_eq!(s.streams.position("fresh").await.unwrap(), empty);
    let h = s.streams.history("fresh", 0, 10).await.unwrap();
    assert_eq!((h.position, h.publications.len()), (empty.clone(), 0));
    assert_eq!(s.streams.position("fresh").await.unwrap(), empty);
    let first = s.streams.publish("fresh", "1", None).await.unwrap();
    assert_eq!(first.offset, 1);
    assert_ne!(first.epoch, EMPTY_EPOCH);
    assert_eq!(s.streams.position("fresh").await.unwrap(), first);
    s.health.shutdown().await;
}

/// History after `since`, at most `limit`, trimmed to `history_size` and aged out after
/// `history_ttl` (the position stays); `from` and the data travel unchanged.
async fn history_since_limit_trim_and_age(backend: &Backend<'_>) {
    let small = BackendSettings {
        history_size: 5,
        ..settings()
    };
    let s = backend.open("history", small).await;
    let mut epoch = String::new();
    for i in 1..=8u64 {
        let from = (i == 8).then_some("alice");
        let pos = s
            .streams
            .publish("h", &format!(r#"{{"n":{i},"s":"a:b"}}"#), from)
            .await
            .unwrap();
        assert_eq!(pos.offset, i);
        epoch = pos.epoch;
    }
    let h = s.streams.history("h", 0, 100).await.unwrap();
    assert_eq!(h.position, StreamPosition::new(8, &epoch));
    let offsets: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, vec![4, 5, 6, 7, 8], "trimmed to the last 5");
    assert_eq!(&*h.publications[0].data, r#"{"n":4,"s":"a:b"}"#);
    assert!(h.publications.iter().all(|p| *p.epoch == *epoch));
    assert_eq!(h.publications[0].from, None);
    assert_eq!(h.publications[4].from.as_deref(), Some("alice"));
    let h = s.streams.history("h", 5, 2).await.unwrap();
    let offsets: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, vec![6, 7]);
    assert!(s
        .streams
        .history("h", 8, 10)
        .await
        .unwrap()
        .publications
        .is_empty());
    assert!(s
        .streams
        .history("h", u64::MAX, 10)
        .await
        .unwrap()
        .publications
        .is_empty());
    s.health.shutdown().await;

    let short = BackendSettings {
        history_ttl: Duration::from_millis(300),
        ..settings()
    };
    let s = backend.open("aged", short).await;
    let pos = s.streams.publish("aged", "1", None).await.unwrap();
    s.streams.publish("aged", "2", None).await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let h = s.streams.history("aged", 0, 10).await.unwrap();
        if h.publications.is_empty() {
            assert_eq!(h.position, StreamPosition::new(2, &pos.epoch));
            break;
        }
        assert!(Instant::now() < deadline, "history did not age out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.health.shutdown().await;
}

/// A subscribed channel's publications arrive as events, in offset order, with their
/// data and `from`; after an unsubscribe nothing more of it arrives.
async fn subscribe_deliver_unsubscribe(backend: &Backend<'_>) {
    let mut s = backend.open("routing", settings()).await;
    s.routing.subscribe("room").await.expect("subscribe");
    for i in 1..=10 {
        let from = (i % 2 == 0).then_some("bob");
        s.streams
            .publish("room", &i.to_string(), from)
            .await
            .unwrap();
    }
    for i in 1..=10u64 {
        let (channel, p) = s.next_publication().await;
        assert_eq!((channel.as_str(), p.offset), ("room", i));
        assert_eq!(&*p.data, i.to_string());
        assert_eq!(p.from.as_deref(), (i % 2 == 0).then_some("bob"));
    }
    // Not subscribed: published, numbered, not delivered.
    s.streams.publish("elsewhere", "1", None).await.unwrap();
    s.routing.unsubscribe("room");
    // Requests apply in order: once this subscribe is acknowledged, the unsubscribe
    // before it is in place too.
    s.routing.subscribe("marker").await.expect("subscribe");
    s.streams.publish("room", "late", None).await.unwrap();
    s.streams.publish("marker", "m", None).await.unwrap();
    let (channel, p) = s.next_publication().await;
    assert_eq!(
        (channel.as_str(), &*p.data),
        ("marker", "m"),
        "only the still subscribed channel delivers"
    );
    s.health.shutdown().await;
}

/// An ephemeral message reaches a subscribed broker in order with the publications,
/// takes no offset (the next publish continues the sequence), stores nothing
/// (history and position unchanged) and is not delivered where nobody subscribed.
async fn ephemeral_messages(backend: &Backend<'_>) {
    let mut s = backend.open("ephemeral", settings()).await;
    s.routing.subscribe("room").await.expect("subscribe");
    let first = s.streams.publish("room", "1", None).await.unwrap();
    s.routing
        .publish_ephemeral("room", r#"{"typing":true}"#, Some("bob"))
        .await
        .unwrap();
    s.routing
        .publish_ephemeral("nobody", "1", None)
        .await
        .unwrap();
    let second = s.streams.publish("room", "2", None).await.unwrap();
    assert_eq!(
        second.offset,
        first.offset + 1,
        "the ephemeral took no offset"
    );
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match s.next().await {
            Event::Publication(c, p) => seen.push(format!("{c}#{}", p.offset)),
            Event::Ephemeral(c, data, from) => {
                assert_eq!(
                    (data.as_str(), from.as_deref()),
                    (r#"{"typing":true}"#, Some("bob"))
                );
                seen.push(format!("{c}~"));
            }
            Event::UserCommand(..) | Event::Resubscribed => {}
        }
    }
    assert_eq!(seen, ["room#1", "room~", "room#2"]);
    let history = s.streams.history("room", 0, 10).await.unwrap();
    assert_eq!(history.publications.len(), 2, "nothing stored");
    assert_eq!(
        s.streams.position("nobody").await.unwrap().offset,
        0,
        "no state for an ephemeral-only channel"
    );
    s.health.shutdown().await;
}

/// Presence per user and per node, 0 removes; the registry adds, lists, removes.
async fn presence_and_registry(backend: &Backend<'_>) {
    let s = backend.open("presence", settings()).await;
    s.nodes.register_node(&info("n1")).await.unwrap();
    s.nodes.register_node(&info("n2")).await.unwrap();
    let ids: Vec<String> = s
        .nodes
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(ids, vec!["n1", "n2"]);
    s.presence
        .presence_update("n1", &[change("p", "alice", 2), change("p", "bob", 1)])
        .await
        .unwrap();
    s.presence
        .presence_update("n2", &[change("p", "alice", 1)])
        .await
        .unwrap();
    s.presence
        .presence_refresh("n1", &["p".to_owned()])
        .await
        .unwrap();
    let all = s.presence.presence("p").await.unwrap();
    assert_eq!(
        all,
        BTreeMap::from([("alice".to_owned(), 3), ("bob".to_owned(), 1)])
    );
    let by_node = s.presence.presence_by_node("p").await.unwrap();
    assert_eq!(
        by_node["alice"],
        BTreeMap::from([("n1".to_owned(), 2), ("n2".to_owned(), 1)])
    );
    s.presence
        .presence_update("n1", &[change("p", "bob", 0)])
        .await
        .unwrap();
    assert!(!s.presence.presence("p").await.unwrap().contains_key("bob"));
    // A node that leaves the registry takes its presence with it.
    s.nodes.unregister_node("n2").await.unwrap();
    let ids: Vec<String> = s
        .nodes
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(ids, vec!["n1"]);
    assert_eq!(s.presence.presence("p").await.unwrap()["alice"], 2);
    assert!(s.presence.presence("nobody").await.unwrap().is_empty());
    s.health.shutdown().await;
}

/// A user command reaches this node's event stream and is counted; a revocation is
/// stored, merged (an earlier one does not shorten it) and listed.
async fn user_commands_and_revocations(backend: &Backend<'_>) {
    let mut s = backend.open("control", settings()).await;
    let kick = UserCommand::Disconnect { reconnect: true };
    assert_eq!(s.users.user_command("alice", &kick).await.unwrap(), 1);
    match s.next().await {
        Event::UserCommand(user, command) => assert_eq!((user.as_str(), command), ("alice", kick)),
        other => panic!("{other:?}"),
    }
    let now = herald_server::auth::now_secs();
    let revoke = |before, until| UserCommand::Revoke { before, until };
    assert_eq!(
        s.users
            .user_command("bob", &revoke(now, now + 100))
            .await
            .unwrap(),
        1
    );
    s.users
        .user_command("bob", &revoke(now - 50, now + 10))
        .await
        .unwrap();
    let list = s.users.revocations().await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(
        (list[0].user.as_str(), list[0].before, list[0].until),
        ("bob", now, now + 100)
    );
    s.health.shutdown().await;
}

/// Every behaviour, on one backend, capability by capability. Each behaviour uses only
/// the handles of the capabilities it is about (routing delivers what streams publish).
async fn conformance(backend: Backend<'_>) {
    // Streams and history.
    offsets_and_epochs(&backend).await;
    history_since_limit_trim_and_age(&backend).await;
    // Routing (with streams): subscriptions, delivery in order, ephemeral messages.
    subscribe_deliver_unsubscribe(&backend).await;
    ephemeral_messages(&backend).await;
    // Presence and the node registry.
    presence_and_registry(&backend).await;
    // User control.
    user_commands_and_revocations(&backend).await;
    // Receipts and the webhook store have their suites in `receipts.rs` and
    // `webhooks.rs`, over memory and Redis.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_broker_conforms() {
    conformance(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broker_conforms() {
    let redis = RedisServer::start();
    conformance(Backend::Single(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_broker_conforms() {
    let cluster = RedisCluster::start();
    conformance(Backend::Cluster(&cluster)).await;
}
