//! The Redis broker against real Redis: one `redis-server`, and a local 3-master
//! Redis Cluster (sharded pub/sub). Each test has its own Redis (or cluster) and key
//! prefix; every wait has a timeout.
//!
//! What every broker must do (offsets, history, subscribe, presence, registry, user
//! commands) is `broker_conformance.rs`, run against the memory broker too; this file
//! keeps what only Redis has: several nodes, reconnects, lost keys, sharding.

#[path = "support/backend.rs"]
mod backend;
#[path = "support/broker_events.rs"]
mod broker_events;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::*;
use broker_events::{change, info, record, Event};
use herald_protocol::{StreamPosition, EMPTY_EPOCH};
use herald_server::backend::error::BackendError;
use herald_server::backend::nodes::NodeInfo;
use herald_server::backend::redis::{connect, RedisBackend};
use herald_server::backend::settings::BackendSettings;
use herald_server::backend::streams::{BatchMessage, Publication};
use herald_server::backend::users::UserCommand;
use redis_server::{RedisCluster, RedisOptions, RedisServer};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Generous: includes reconnect backoff and cluster discovery.
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

fn prefix(test: &str) -> String {
    format!("t:{test}:{}:", uuid_like())
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

struct Node {
    broker: Arc<RedisBackend>,
    events: mpsc::UnboundedReceiver<Event>,
}

impl Node {
    async fn start(url: &str, prefix: &str, id: &str, settings: BackendSettings) -> Self {
        init_tracing();
        let broker = Arc::new(connect(url, prefix, id, settings).await.expect("connect"));
        let events = record(&*broker);
        wait_healthy(&broker).await;
        Self { broker, events }
    }

    /// The next publication, skipping resubscribe events.
    async fn next_publication(&mut self) -> (String, Publication) {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, self.events.recv()).await {
                Ok(Some(Event::Publication(channel, p))) => return (channel, p),
                Ok(Some(Event::Resubscribed | Event::UserCommand(..) | Event::Ephemeral(..))) => {
                    continue
                }
                Ok(None) => panic!("sink closed"),
                Err(_) => panic!("no publication within {WAIT:?}"),
            }
        }
    }

    /// Waits for an `on_resubscribed` call; returns publications seen meanwhile.
    async fn wait_resubscribed(&mut self) -> Vec<(String, Publication)> {
        let mut seen = Vec::new();
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, self.events.recv()).await {
                Ok(Some(Event::Publication(channel, p))) => seen.push((channel, p)),
                Ok(Some(Event::Resubscribed)) => return seen,
                Ok(Some(Event::UserCommand(..) | Event::Ephemeral(..))) => continue,
                Ok(None) => panic!("sink closed"),
                Err(_) => panic!("no on_resubscribed within {WAIT:?}"),
            }
        }
    }

    /// Publications received so far, without waiting.
    fn drain(&mut self) -> Vec<(String, Publication)> {
        let mut seen = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            if let Event::Publication(channel, p) = event {
                seen.push((channel, p));
            }
        }
        seen
    }
}

/// Logs go to the test output, filtered by `RUST_LOG`.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

async fn wait_healthy(broker: &RedisBackend) {
    wait_until("broker healthy", || broker.is_healthy()).await;
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Where a scenario runs, and how to count subscribers of a pub/sub channel there.
enum Backend<'a> {
    Single(&'a RedisServer),
    Cluster(&'a RedisCluster),
}

impl Backend<'_> {
    fn url(&self) -> String {
        match self {
            Backend::Single(r) => r.url(),
            Backend::Cluster(c) => c.url(),
        }
    }

    /// Subscribers of the pub/sub channel of `channel` under `prefix`, over all masters.
    fn subscribers(&self, prefix: &str, channel: &str) -> u64 {
        let name = format!("{prefix}{{{channel}}}:c");
        let count = |out: String| -> u64 {
            out.lines()
                .nth(1)
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0)
        };
        match self {
            Backend::Single(r) => count(r.cli(&["pubsub", "numsub", &name])),
            Backend::Cluster(c) => c
                .nodes
                .iter()
                .map(|n| count(n.cli(&["pubsub", "shardnumsub", &name])))
                .sum(),
        }
    }

    /// Keys under `prefix`, over all masters.
    fn keys(&self, prefix: &str) -> usize {
        let pattern = format!("{prefix}*");
        let count = |out: String| out.lines().filter(|l| !l.trim().is_empty()).count();
        match self {
            Backend::Single(r) => count(r.cli(&["--scan", "--pattern", &pattern])),
            Backend::Cluster(c) => c
                .nodes
                .iter()
                .map(|n| count(n.cli(&["--scan", "--pattern", &pattern])))
                .sum(),
        }
    }

    fn flushall(&self) {
        match self {
            Backend::Single(r) => {
                r.cli(&["flushall"]);
            }
            Backend::Cluster(c) => {
                c.cli_all(&["flushall"]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Scenarios, run against one Redis and against a cluster.

async fn offsets_without_gaps(backend: &Backend<'_>) {
    let prefix = prefix("offsets");
    let url = backend.url();
    let mut reader = Node::start(&url, &prefix, "reader", settings()).await;
    reader.broker.subscribe("room:1").await.expect("subscribe");
    let writer = Node::start(&url, &prefix, "writer", settings()).await;

    let mut tasks = Vec::new();
    for t in 0..4 {
        let broker = if t % 2 == 0 {
            writer.broker.clone()
        } else {
            reader.broker.clone()
        };
        tasks.push(tokio::spawn(async move {
            let mut positions = Vec::new();
            for i in 0..50 {
                let data = format!(r#"{{"t":{t},"i":{i}}}"#);
                positions.push(
                    broker
                        .publish("room:1", &data, None)
                        .await
                        .expect("publish"),
                );
            }
            positions
        }));
    }
    let mut offsets = Vec::new();
    let mut epochs = BTreeSet::new();
    for task in tasks {
        for position in task.await.expect("task") {
            offsets.push(position.offset);
            epochs.insert(position.epoch);
        }
    }
    offsets.sort_unstable();
    assert_eq!(
        offsets,
        (1..=200).collect::<Vec<u64>>(),
        "offsets 1..=200, no gaps"
    );
    assert_eq!(epochs.len(), 1, "one epoch: {epochs:?}");

    // Delivered in offset order, each once.
    for expected in 1..=200u64 {
        let (channel, p) = reader.next_publication().await;
        assert_eq!(channel, "room:1");
        assert_eq!(p.offset, expected);
        assert!(epochs.contains(&*p.epoch));
    }
    reader.broker.shutdown().await;
    writer.broker.shutdown().await;
}

async fn epoch_changes_when_keys_are_lost(backend: &Backend<'_>) {
    let prefix = prefix("epoch");
    let node = Node::start(&backend.url(), &prefix, "n1", settings()).await;
    let b = &node.broker;
    for _ in 0..3 {
        b.publish("e", "{}", None).await.unwrap();
    }
    let before = b.position("e").await.unwrap();
    assert_eq!(before.offset, 3);
    backend.flushall();
    // History lost: the channel reads as never published, which no client at offset
    // 3 of the old epoch can take for a continuation.
    let after = b.position("e").await.unwrap();
    assert_eq!(after, StreamPosition::new(0, EMPTY_EPOCH));
    assert!(!before.continues_with(&after.epoch));
    let p = b.publish("e", "{}", None).await.unwrap();
    assert_eq!(p.offset, 1);
    assert!(
        p.epoch != EMPTY_EPOCH && p.epoch != before.epoch,
        "a new epoch"
    );
    assert!(after.continues_with(&p.epoch), "offset 0 continues with it");
    // Lost again, this time found by publish.
    backend.flushall();
    let again = b.publish("e", "{}", None).await.unwrap();
    assert_eq!(again.offset, 1);
    assert_ne!(again.epoch, p.epoch);
    let p = again;
    let h = b.history("e", 0, 10).await.unwrap();
    assert_eq!(h.position, p);
    assert_eq!(h.publications.len(), 1);
    node.broker.shutdown().await;
}

/// Reads of channels never published to store nothing; `from` is stored in history and
/// travels with the publication.
async fn reads_store_nothing_and_from_travels(backend: &Backend<'_>) {
    let prefix = prefix("reads");
    let mut node = Node::start(&backend.url(), &prefix, "n1", settings()).await;
    let b = node.broker.clone();
    for i in 0..200 {
        let channel = format!("room:{i}");
        assert_eq!(
            b.position(&channel).await.unwrap(),
            StreamPosition::new(0, EMPTY_EPOCH)
        );
        let h = b.history(&channel, 0, 10).await.unwrap();
        assert_eq!(h.position, StreamPosition::new(0, EMPTY_EPOCH));
        assert!(h.publications.is_empty());
    }
    assert_eq!(backend.keys(&prefix), 0, "reads created keys");

    b.subscribe("room:f").await.expect("subscribe");
    let p1 = b
        .publish("room:f", r#"{"t":"a:b"}"#, Some("alice@x.io"))
        .await
        .unwrap();
    let p2 = b.publish("room:f", "7", None).await.unwrap();
    let p3 = b.publish("room:f", r#""x:y""#, Some("b-2")).await.unwrap();
    let (_, got) = node.next_publication().await;
    assert_eq!(
        (got.offset, got.from.as_deref(), &*got.data),
        (p1.offset, Some("alice@x.io"), r#"{"t":"a:b"}"#)
    );
    let (_, got) = node.next_publication().await;
    assert_eq!(
        (got.offset, got.from.as_deref(), &*got.data),
        (p2.offset, None, "7")
    );
    let (_, got) = node.next_publication().await;
    assert_eq!(
        (got.offset, got.from.as_deref(), &*got.data),
        (p3.offset, Some("b-2"), r#""x:y""#)
    );
    let h = b.history("room:f", 0, 10).await.unwrap();
    let stored: Vec<(u64, Option<&str>, &str)> = h
        .publications
        .iter()
        .map(|p| (p.offset, p.from.as_deref(), &*p.data))
        .collect();
    assert_eq!(
        stored,
        vec![
            (1, Some("alice@x.io"), r#"{"t":"a:b"}"#),
            (2, None, "7"),
            (3, Some("b-2"), r#""x:y""#)
        ]
    );
    assert_eq!(backend.keys(&prefix), 2, "meta and history of room:f only");
    node.broker.shutdown().await;
}

async fn routing_between_nodes(backend: &Backend<'_>) {
    let prefix = prefix("routing");
    let url = backend.url();
    let mut a = Node::start(&url, &prefix, "node-a", settings()).await;
    let mut b = Node::start(&url, &prefix, "node-b", settings()).await;
    a.broker.subscribe("chan:a").await.expect("subscribe");

    // Redis itself routes only to subscribers: one for chan:a, none for chan:b.
    assert_eq!(backend.subscribers(&prefix, "chan:a"), 1);
    assert_eq!(backend.subscribers(&prefix, "chan:b"), 0);

    for i in 0..3 {
        b.broker
            .publish("chan:b", &i.to_string(), None)
            .await
            .unwrap();
    }
    let pos = b
        .broker
        .publish("chan:a", r#""hello""#, None)
        .await
        .unwrap();
    let (channel, p) = a.next_publication().await;
    assert_eq!(channel, "chan:a");
    assert_eq!(
        (p.offset, &*p.epoch, &*p.data),
        (1, pos.epoch.as_str(), r#""hello""#)
    );
    // A second message as a marker: nothing of chan:b came before or between.
    b.broker.publish("chan:a", "2", None).await.unwrap();
    let (channel, p) = a.next_publication().await;
    assert_eq!((channel.as_str(), p.offset), ("chan:a", 2));
    assert!(a.drain().is_empty());
    assert!(b.drain().is_empty(), "node-b subscribed to nothing");

    // Unsubscribe stops delivery. The later subscribe is applied after it (requests
    // keep their order), so its ack means the unsubscribe happened.
    a.broker.unsubscribe("chan:a");
    a.broker.subscribe("chan:c").await.expect("subscribe");
    assert_eq!(backend.subscribers(&prefix, "chan:a"), 0);
    b.broker.publish("chan:a", "3", None).await.unwrap();
    b.broker.publish("chan:c", "1", None).await.unwrap();
    let (channel, _) = a.next_publication().await;
    assert_eq!(channel, "chan:c");
    b.broker.publish("chan:c", "2", None).await.unwrap();
    let (channel, p) = a.next_publication().await;
    assert_eq!((channel.as_str(), p.offset), ("chan:c", 2));
    assert!(
        a.drain().is_empty(),
        "nothing from chan:a after unsubscribe"
    );

    // Subscribe, unsubscribe and subscribe again in a row: subscribed at the end.
    a.broker.subscribe("chan:d").await.expect("subscribe");
    a.broker.unsubscribe("chan:d");
    a.broker.subscribe("chan:d").await.expect("subscribe");
    assert_eq!(backend.subscribers(&prefix, "chan:d"), 1);
    b.broker.publish("chan:d", "1", None).await.unwrap();
    assert_eq!(a.next_publication().await.0, "chan:d");

    // Many channels at once (one batch).
    let channels: Vec<String> = (0..200).map(|i| format!("many:{i}")).collect();
    let acks: Vec<_> = channels.iter().map(|c| a.broker.subscribe(c)).collect();
    for ack in acks {
        ack.await.expect("subscribe");
    }
    for c in &channels {
        b.broker.publish(c, "1", None).await.unwrap();
    }
    let mut got = BTreeSet::new();
    for _ in 0..channels.len() {
        got.insert(a.next_publication().await.0);
    }
    assert_eq!(got, channels.iter().cloned().collect::<BTreeSet<_>>());
    a.broker.shutdown().await;
    b.broker.shutdown().await;
}

async fn presence_and_dead_nodes(backend: &Backend<'_>) {
    let prefix = prefix("presence");
    let url = backend.url();
    let n1 = Node::start(&url, &prefix, "n1", settings()).await;
    let n2 = Node::start(&url, &prefix, "n2", settings()).await;
    n1.broker.register_node(&info("n1")).await.unwrap();
    n2.broker.register_node(&info("n2")).await.unwrap();
    n1.broker
        .presence_update(
            "n1",
            &[change("room", "alice", 2), change("room", "bob", 1)],
        )
        .await
        .unwrap();
    n2.broker
        .presence_update(
            "n2",
            &[change("room", "alice", 1), change("lobby", "carol", 1)],
        )
        .await
        .unwrap();
    let users = n1.broker.presence("room").await.unwrap();
    assert_eq!(
        users,
        BTreeMap::from([("alice".into(), 3), ("bob".into(), 1)])
    );
    assert_eq!(
        n2.broker.presence("lobby").await.unwrap(),
        BTreeMap::from([("carol".into(), 1)])
    );
    // The same, per node (the user presence API's `nodes`).
    assert_eq!(
        n2.broker.presence_by_node("room").await.unwrap(),
        BTreeMap::from([
            (
                "alice".into(),
                BTreeMap::from([("n1".into(), 2), ("n2".into(), 1)])
            ),
            ("bob".into(), BTreeMap::from([("n1".into(), 1)])),
        ])
    );

    n1.broker
        .presence_update("n1", &[change("room", "alice", 0)])
        .await
        .unwrap();
    let users = n2.broker.presence("room").await.unwrap();
    assert_eq!(
        users,
        BTreeMap::from([("alice".into(), 1), ("bob".into(), 1)])
    );

    // n2 leaves the registry: its users no longer count, and its fields go away.
    n2.broker.unregister_node("n2").await.unwrap();
    let users = n1.broker.presence("room").await.unwrap();
    assert_eq!(users, BTreeMap::from([("bob".into(), 1)]));
    assert_eq!(
        n1.broker.presence_by_node("room").await.unwrap(),
        BTreeMap::from([("bob".into(), BTreeMap::from([("n1".into(), 1)]))])
    );
    assert!(n1.broker.presence("lobby").await.unwrap().is_empty());
    let key = format!("{prefix}presence:{{room}}");
    let fields = match backend {
        Backend::Single(r) => r.cli(&["hkeys", &key]),
        Backend::Cluster(c) => c.cli(&["hkeys", &key]),
    };
    assert_eq!(fields, "n1|bob", "dead node's fields removed");
    n1.broker.shutdown().await;
    n2.broker.shutdown().await;

    // Expiry: refreshed presence stays, unrefreshed presence expires.
    let short = BackendSettings {
        presence_ttl: Duration::from_millis(700),
        ..settings()
    };
    let n3 = Node::start(&url, &prefix, "n3", short).await;
    n3.broker.register_node(&info("n3")).await.unwrap();
    n3.broker
        .presence_update("n3", &[change("kept", "dan", 1), change("gone", "eve", 1)])
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        n3.broker
            .presence_refresh("n3", &["kept".into()])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(n3.broker.presence("kept").await.unwrap().len(), 1);
    assert!(
        n3.broker.presence("gone").await.unwrap().is_empty(),
        "expired"
    );
    n3.broker.shutdown().await;
}

/// A user command sent at one node reaches the event stream of every node, and the answer sums
/// their counts; a revocation is stored, merged and listed.
async fn user_commands_reach_every_node(backend: &Backend<'_>) {
    let prefix = prefix("control");
    let url = backend.url();
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        nodes.push(Node::start(&url, &prefix, id, settings()).await);
    }
    let kick = UserCommand::Disconnect { reconnect: false };
    let sessions = nodes[0]
        .broker
        .user_command("alice", &kick)
        .await
        .expect("user command");
    assert_eq!(sessions, 3, "each of three nodes counted one session");
    for node in &mut nodes {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, node.events.recv()).await {
                Ok(Some(Event::UserCommand(user, command))) => {
                    assert_eq!((user.as_str(), &command), ("alice", &kick));
                    break;
                }
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => panic!("no user command within {WAIT:?}"),
            }
        }
    }
    let now = herald_server::auth::now_secs();
    let revoke = |before, until| UserCommand::Revoke { before, until };
    assert_eq!(
        nodes[1]
            .broker
            .user_command("bob", &revoke(now, now + 100))
            .await
            .unwrap(),
        3
    );
    // An earlier revocation does not shorten the stored one.
    nodes[2]
        .broker
        .user_command("bob", &revoke(now - 50, now + 10))
        .await
        .unwrap();
    let list = nodes[2].broker.revocations().await.expect("revocations");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(
        (list[0].user.as_str(), list[0].before, list[0].until),
        ("bob", now, now + 100)
    );
    for node in nodes {
        node.broker.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------
// One Redis.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_offsets_without_gaps() {
    let redis = RedisServer::start();
    offsets_without_gaps(&Backend::Single(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_user_commands() {
    let redis = RedisServer::start();
    user_commands_reach_every_node(&Backend::Single(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_epoch_changes_when_keys_are_lost() {
    let redis = RedisServer::start();
    epoch_changes_when_keys_are_lost(&Backend::Single(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_reads_store_nothing_and_from_travels() {
    let redis = RedisServer::start();
    reads_store_nothing_and_from_travels(&Backend::Single(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_routing_between_nodes() {
    let redis = RedisServer::start();
    routing_between_nodes(&Backend::Single(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_presence_and_dead_nodes() {
    let redis = RedisServer::start();
    presence_and_dead_nodes(&Backend::Single(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_drops_nodes_that_stop_refreshing() {
    let redis = RedisServer::start();
    let fast = BackendSettings {
        node_ttl: Duration::from_secs(1),
        ..settings()
    };
    let node = Node::start(&redis.url(), &prefix("registry"), "n1", fast).await;
    let b = &node.broker;
    b.register_node(&info("n1")).await.unwrap();
    b.register_node(&info("n2")).await.unwrap();
    let ids = |nodes: Vec<NodeInfo>| nodes.into_iter().map(|n| n.id).collect::<Vec<_>>();
    assert_eq!(ids(b.nodes().await.unwrap()), vec!["n1", "n2"]);

    // Re-registering updates the entry, load figures included.
    let mut busy = info("n1");
    busy.connections = 7;
    busy.stats.subscriptions = 9;
    busy.stats.cpu_seconds = 1.25;
    busy.stats.messages_delivered_total = 42;
    b.register_node(&busy).await.unwrap();
    assert_eq!(b.nodes().await.unwrap()[0], busy);

    // n1 keeps its heartbeat, n2 stops: n2 drops out after node_ttl.
    let deadline = Instant::now() + WAIT;
    loop {
        b.register_node(&busy).await.unwrap();
        if ids(b.nodes().await.unwrap()) == vec!["n1"] {
            break;
        }
        assert!(Instant::now() < deadline, "stale node not dropped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.unregister_node("n1").await.unwrap();
    assert!(b.nodes().await.unwrap().is_empty());
    node.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_redis_at_start_then_connects() {
    let port = redis_server::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    assert!(
        connect("http://x", "p:", "n", settings()).await.is_err(),
        "bad URL fails"
    );
    let broker = connect(&url, &prefix("late"), "n1", settings())
        .await
        .expect("no Redis yet is not an error");
    let mut events = record(&broker);
    assert!(!broker.is_healthy());
    let started = Instant::now();
    let err = broker.publish("x", "1", None).await.unwrap_err();
    assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "fails fast");
    let subscribed = broker.subscribe("x");

    let redis = RedisServer::start_with(RedisOptions {
        port: Some(port),
        ..RedisOptions::default()
    });
    assert_eq!(redis.port(), port, "started on the port chosen above");
    wait_healthy(&broker).await;
    // The subscribe made while down failed or succeeded; either way it is wanted and
    // is in place once healthy.
    let _ = timeout(WAIT, subscribed).await.expect("ack");
    broker.publish("x", "1", None).await.expect("publish");
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, events.recv()).await.expect("delivery") {
            Some(Event::Publication(channel, p)) => {
                assert_eq!((channel.as_str(), p.offset), ("x", 1));
                break;
            }
            Some(Event::Resubscribed | Event::UserCommand(..) | Event::Ephemeral(..)) => continue,
            None => panic!("sink closed"),
        }
    }
    broker.shutdown().await;
    assert!(!broker.is_healthy());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted() {
    let mut redis = RedisServer::start_with(RedisOptions {
        aof: true,
        ..RedisOptions::default()
    });
    let prefix = prefix("restart");
    let mut a = Node::start(&redis.url(), &prefix, "a", settings()).await;
    let b = Node::start(&redis.url(), &prefix, "b", settings()).await;
    a.broker.subscribe("c").await.expect("subscribe");
    let before = b.broker.publish("c", "1", None).await.unwrap();
    assert_eq!(a.next_publication().await.1.offset, 1);

    redis.kill();
    wait_until("unhealthy after kill", || {
        !a.broker.is_healthy() && !b.broker.is_healthy()
    })
    .await;
    let started = Instant::now();
    let err = b.broker.publish("c", "2", None).await.unwrap_err();
    assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
    assert!(matches!(
        b.broker.history("c", 0, 10).await,
        Err(BackendError::Unavailable(_))
    ));
    assert!(matches!(
        a.broker.subscribe("c2").await,
        Err(BackendError::Unavailable(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(3), "fails fast");
    // Drop events from before the outage.
    let _ = a.drain();

    redis.restart();
    let seen = a.wait_resubscribed().await;
    assert!(seen.is_empty(), "nothing was published meanwhile: {seen:?}");
    wait_healthy(&a.broker).await;
    wait_healthy(&b.broker).await;

    // AOF kept the data: same epoch, offsets go on.
    let p = b.broker.publish("c", "2", None).await.unwrap();
    assert_eq!((p.offset, &p.epoch), (2, &before.epoch));
    let (channel, got) = a.next_publication().await;
    assert_eq!((channel.as_str(), got.offset), ("c", 2));
    // The subscribe that failed while down was retried: c2 is delivered too.
    b.broker.publish("c2", "1", None).await.unwrap();
    assert_eq!(a.next_publication().await.0, "c2");
    a.broker.shutdown().await;
    b.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscriber_connection_killed() {
    let redis = RedisServer::start();
    let prefix = prefix("clientkill");
    let mut a = Node::start(&redis.url(), &prefix, "a", settings()).await;
    a.broker.subscribe("k").await.expect("subscribe");
    a.broker.publish("k", "1", None).await.unwrap();
    assert_eq!(a.next_publication().await.1.offset, 1);
    let killed = redis.cli(&["client", "kill", "type", "pubsub"]);
    assert_eq!(killed, "1", "one subscriber connection");
    let seen = a.wait_resubscribed().await;
    assert!(seen.is_empty(), "{seen:?}");
    wait_healthy(&a.broker).await;
    assert_eq!(Backend::Single(&redis).subscribers(&prefix, "k"), 1);
    for _ in 0..5 {
        a.broker.publish("k", "x", None).await.unwrap();
    }
    // Each message exactly once, in order, after the resubscribe.
    for expected in 2..=6 {
        assert_eq!(a.next_publication().await.1.offset, expected);
    }
    a.broker.publish("k", "last", None).await.unwrap();
    assert_eq!(a.next_publication().await.1.offset, 7);
    assert!(a.drain().is_empty());
    a.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_redis_is_detected() {
    let redis = RedisServer::start();
    let prefix = prefix("pause");
    let mut a = Node::start(&redis.url(), &prefix, "a", settings()).await;
    a.broker.subscribe("p").await.expect("subscribe");
    redis.pause();
    wait_until("unhealthy while paused", || !a.broker.is_healthy()).await;
    let err = a.broker.publish("p", "1", None).await.unwrap_err();
    assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
    let _ = a.drain();
    redis.resume();
    wait_healthy(&a.broker).await;
    a.broker.publish("p", "1", None).await.expect("publish");
    let (channel, _) = a.next_publication().await;
    assert_eq!(channel, "p");
    a.broker.shutdown().await;
}

/// A channel's keys are bounded in time: they expire no sooner than their TTL after the
/// last publish (so history and epoch live as long as promised), no later than a TTL
/// plus an eighth of the shorter TTL after it (so an abandoned channel leaves nothing
/// in Redis), and their TTLs are refreshed once per eighth, not at every publish
/// (each refresh is a PEXPIRE per key, the cost `publish.lua` amortises).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn channel_keys_expire_with_amortised_refreshes() {
    let redis = RedisServer::start();
    let prefix = prefix("ttl");
    let mut s = settings();
    s.history_ttl = Duration::from_millis(800);
    s.meta_ttl = Duration::from_millis(1600);
    let every = 100; // min(800, 1600) / 8
    let node = Node::start(&redis.url(), &prefix, "n1", s).await;
    let pttl = |suffix: &str| -> i64 {
        let key = format!("{prefix}{{x}}:{suffix}");
        redis.cli(&["pttl", &key]).trim().parse().unwrap()
    };
    let pexpires = || command_calls(&Backend::Single(&redis), "pexpire");
    let before = pexpires();
    let started = Instant::now();
    let mut published = 0u64;
    // Publish for longer than the history TTL: the keys must never expire meanwhile.
    // The TTLs are read after every 10th publish only, so publishes come much faster
    // than `every` even on a loaded machine (each read starts two redis-cli).
    while started.elapsed() < Duration::from_millis(1400) {
        let sent = Instant::now();
        let p = node.broker.publish("x", "{}", None).await.unwrap();
        published += 1;
        assert_eq!(p.offset, published, "the channel never restarted");
        if published.is_multiple_of(10) {
            let (h, m) = (pttl("h"), pttl("m"));
            // At least the TTL from the publish on, which was `since` ms ago at most.
            let since = sent.elapsed().as_millis() as i64 + 1;
            assert!((800 - since..=800 + every).contains(&h), "history ttl {h}");
            assert!((1600 - since..=1600 + every).contains(&m), "meta ttl {m}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let refreshes = pexpires() - before;
    // Two keys, one refresh per `every` ms at most (plus the first publish), where a
    // refresh per publish would be two PEXPIREs per publish.
    let bound = 2 * (started.elapsed().as_millis() as i64 / every + 2);
    assert!(published > 2 * bound as u64, "{published} publishes");
    assert!(
        refreshes <= bound as u64,
        "{refreshes} PEXPIREs for {published} publishes"
    );
    // Abandoned: everything is gone within the meta TTL plus `every` (and Redis's
    // expiry sampling).
    let gone = Instant::now();
    wait_until("the channel's keys expire", || {
        redis
            .cli(&[
                "exists",
                &format!("{prefix}{{x}}:h"),
                &format!("{prefix}{{x}}:m"),
            ])
            .trim()
            == "0"
    })
    .await;
    assert!(gone.elapsed() <= Duration::from_millis(1600 + every as u64 + 1000));
    node.broker.shutdown().await;
}

/// `EVALSHA` calls so far, over all masters (`INFO commandstats`).
fn evalsha_calls(backend: &Backend<'_>) -> u64 {
    command_calls(backend, "evalsha")
}

/// Calls of Redis command `name` so far, over all masters (`INFO commandstats`).
fn command_calls(backend: &Backend<'_>, name: &str) -> u64 {
    let prefix = format!("cmdstat_{name}:calls=");
    let calls = |out: String| -> u64 {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    match backend {
        Backend::Single(r) => calls(r.cli(&["info", "commandstats"])),
        Backend::Cluster(c) => c
            .nodes
            .iter()
            .map(|n| calls(n.cli(&["info", "commandstats"])))
            .sum(),
    }
}

/// Publishes that arrive together share script calls: a batch is one call per Redis
/// slot, concurrent single publishes coalesce, and every guarantee of one publish
/// holds (offsets from 1 without gaps per channel, the batch's order within a channel,
/// delivery in offset order, history with the publisher).
async fn coalesced_publishes(backend: &Backend<'_>) {
    let prefix = prefix("coalesce");
    let url = backend.url();
    let mut reader = Node::start(&url, &prefix, "reader", settings()).await;
    let writer = Node::start(&url, &prefix, "writer", settings()).await;
    let channels: Vec<String> = (0..12).map(|i| format!("co:{i}")).collect();
    for c in &channels {
        reader.broker.subscribe(c).await.expect("subscribe");
    }
    // Warm the script cache (the first call may be NOSCRIPT then EVAL).
    for c in &channels {
        writer.broker.publish(c, "0", None).await.expect("publish");
    }
    let mut expected: BTreeMap<String, Vec<String>> = channels
        .iter()
        .map(|c| (c.clone(), vec!["0".to_owned()]))
        .collect();

    // A batch of 240 messages over the 12 channels, some with a publisher.
    let data: Vec<(String, String, Option<String>)> = (0..240)
        .map(|i| {
            let channel = channels[(i * 7) % channels.len()].clone();
            let from = (i % 3 == 0).then(|| format!("user{i}"));
            (channel, format!(r#"{{"i":{i}}}"#), from)
        })
        .collect();
    let messages: Vec<BatchMessage<'_>> = data
        .iter()
        .map(|(channel, data, from)| BatchMessage {
            channel,
            data,
            from: from.as_deref(),
        })
        .collect();
    let slots: BTreeSet<u16> = match backend {
        Backend::Single(_) => BTreeSet::from([0]),
        Backend::Cluster(_) => channels
            .iter()
            .map(|c| fred::util::redis_keyslot(format!("{prefix}{{{c}}}:m").as_bytes()))
            .collect(),
    };
    let before = evalsha_calls(backend);
    let answers = writer.broker.publish_batch(&messages).await;
    let calls = evalsha_calls(backend) - before;
    assert!(
        calls <= slots.len() as u64,
        "a batch is one script call per slot: {calls} calls for {} slots",
        slots.len()
    );
    let mut last: BTreeMap<&str, StreamPosition> = BTreeMap::new();
    for ((channel, data, _), answer) in data.iter().zip(&answers) {
        let position = answer.as_ref().expect("batch publish");
        let next = last
            .get(channel.as_str())
            .map_or(2, |p: &StreamPosition| p.offset + 1);
        assert_eq!(position.offset, next, "{channel}: batch order, no gaps");
        last.insert(channel, position.clone());
        expected.get_mut(channel).unwrap().push(data.clone());
    }

    // Concurrent single publishes: 16 tasks, each 20 messages over the channels.
    let mut tasks = Vec::new();
    for t in 0..16usize {
        let broker = writer.broker.clone();
        let channels = channels.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 0..20usize {
                let channel = &channels[(t + i) % channels.len()];
                let data = format!(r#"{{"t":{t},"i":{i}}}"#);
                let p = broker.publish(channel, &data, None).await.expect("publish");
                sent.push((channel.clone(), p.offset, data));
            }
            sent
        }));
    }
    let before = evalsha_calls(backend);
    let mut concurrent: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for task in tasks {
        for (channel, offset, data) in task.await.expect("task") {
            concurrent.entry(channel).or_default().push((offset, data));
        }
    }
    let calls = evalsha_calls(backend) - before;
    assert!(
        calls <= 320,
        "never more than one call per message: {calls}"
    );
    eprintln!("320 concurrent publishes took {calls} script calls");
    for (channel, mut sent) in concurrent {
        sent.sort();
        let first = last[channel.as_str()].offset + 1;
        let offsets: Vec<u64> = sent.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            offsets,
            (first..first + offsets.len() as u64).collect::<Vec<_>>(),
            "{channel}: no gaps"
        );
        expected
            .get_mut(&channel)
            .unwrap()
            .extend(sent.into_iter().map(|(_, d)| d));
    }

    // Each channel delivered in offset order, each message once, with its data.
    let total: usize = expected.values().map(Vec::len).sum();
    let mut got: BTreeMap<String, Vec<Publication>> = BTreeMap::new();
    for _ in 0..total {
        let (channel, p) = reader.next_publication().await;
        got.entry(channel).or_default().push(p);
    }
    for (channel, want) in &expected {
        let pubs = &got[channel];
        let offsets: Vec<u64> = pubs.iter().map(|p| p.offset).collect();
        assert_eq!(
            offsets,
            (1..=want.len() as u64).collect::<Vec<_>>(),
            "{channel}"
        );
        let datas: Vec<&str> = pubs.iter().map(|p| &*p.data).collect();
        assert_eq!(datas, want.iter().map(String::as_str).collect::<Vec<_>>());
    }
    // History keeps the last `history_size` (10) with their publishers.
    let c = &channels[0];
    let h = writer.broker.history(c, 0, 100).await.expect("history");
    let n = expected[c].len() as u64;
    assert_eq!(h.position.offset, n);
    let offsets: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, (n - 9..=n).collect::<Vec<_>>());
    for p in &got[c] {
        if let Some(from) = &p.from {
            let i: usize = from.trim_start_matches("user").parse().unwrap();
            assert_eq!(&*p.data, format!(r#"{{"i":{i}}}"#));
        }
    }
    assert!(got[c].iter().any(|p| p.from.is_some()), "publishers travel");
    // The stream is trimmed in steps of 16 offsets: at most history size + 15 entries.
    let key = format!("{prefix}{{{c}}}:h");
    let xlen = match backend {
        Backend::Single(r) => r.cli(&["xlen", &key]),
        Backend::Cluster(cluster) => cluster.cli(&["xlen", &key]),
    };
    let xlen: u64 = xlen.trim().parse().expect("xlen");
    assert!((10..=25).contains(&xlen), "stream length {xlen}");
    reader.broker.shutdown().await;
    writer.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_coalesced_publishes() {
    let redis = RedisServer::start();
    coalesced_publishes(&Backend::Single(&redis)).await;
}

// ---------------------------------------------------------------------------------
// Redis Cluster: the same scenarios over sharded pub/sub, on one cluster.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_scenarios() {
    let cluster = RedisCluster::start();
    let backend = Backend::Cluster(&cluster);
    offsets_without_gaps(&backend).await;
    routing_between_nodes(&backend).await;
    presence_and_dead_nodes(&backend).await;
    epoch_changes_when_keys_are_lost(&backend).await;
    user_commands_reach_every_node(&backend).await;
    reads_store_nothing_and_from_travels(&backend).await;
    coalesced_publishes(&backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_channels_spread_over_shards() {
    let cluster = RedisCluster::start();
    let prefix = prefix("spread");
    let url = cluster.url();
    let mut a = Node::start(&url, &prefix, "a", settings()).await;
    let b = Node::start(&url, &prefix, "b", settings()).await;
    let channels: Vec<String> = (0..30).map(|i| format!("s:{i}")).collect();
    for c in &channels {
        a.broker.subscribe(c).await.expect("subscribe");
    }
    // Every master holds some of the channels' subscriptions.
    for node in &cluster.nodes {
        let out = node.cli(&["pubsub", "shardchannels", &format!("{prefix}*")]);
        assert!(!out.is_empty(), "master {} has no channel", node.port());
    }
    for c in &channels {
        b.broker.publish(c, "1", None).await.unwrap();
    }
    let mut got = BTreeSet::new();
    for _ in 0..channels.len() {
        got.insert(a.next_publication().await.0);
    }
    assert_eq!(got.len(), channels.len());
    a.broker.shutdown().await;
    b.broker.shutdown().await;
}

/// The master (index into `cluster.nodes`) that owns `slot`, from `CLUSTER NODES`.
fn slot_owner(cluster: &RedisCluster, slot: u16) -> usize {
    let nodes = cluster.nodes[0].cli(&["cluster", "nodes"]);
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(port) = fields
            .get(1)
            .and_then(|a| a.split('@').next()?.rsplit(':').next()?.parse::<u16>().ok())
        else {
            continue;
        };
        let owns = fields.iter().skip(8).any(|range| {
            let mut ends = range.split('-').map(|n| n.parse::<u16>());
            match (ends.next(), ends.next()) {
                (Some(Ok(a)), Some(Ok(b))) => (a..=b).contains(&slot),
                (Some(Ok(a)), None) => a == slot,
                _ => false, // `[slot->-id]`: a migration marker
            }
        });
        if owns {
            return cluster
                .nodes
                .iter()
                .position(|n| n.port() == port)
                .expect("a master of ours");
        }
    }
    panic!("no owner for slot {slot}:\n{nodes}");
}

/// Publishing through a slot migration (a Redis Cluster reshard). While a channel's
/// slot migrates and its keys already moved, Redis answers ASK for it; a publish is
/// written once, so it is not followed: that channel's messages fail with an error,
/// and every other publish goes on, on the same connections (fred, left to follow the
/// ASK with one attempt, dropped them all). Once the slot moved, Redis answers MOVED,
/// the client syncs its slot map and the call goes again. No message is written twice
/// or in part: offsets stay gapless and history holds each accepted message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_publishes_through_a_slot_migration() {
    let cluster = RedisCluster::start();
    let prefix = prefix("reshard");
    let writer = Node::start(&cluster.url(), &prefix, "writer", settings()).await;
    let slot = |c: &str| fred::util::redis_keyslot(format!("{prefix}{{{c}}}:m").as_bytes());
    // Four channels of master 0, each in its own slot.
    let mut used: Vec<String> = Vec::new();
    for i in 0.. {
        let c = format!("lane:{i}");
        let s = slot(&c);
        if slot_owner(&cluster, s) == 0 && used.iter().all(|p| slot(p) != s) {
            used.push(c);
        }
        if used.len() == 4 {
            break;
        }
    }
    let batch = |round: usize, channels: &[String]| -> Vec<(String, String)> {
        channels
            .iter()
            .flat_map(|c| (0..2).map(move |k| (c.clone(), format!(r#"{{"r":{round},"k":{k}}}"#))))
            .collect()
    };
    let publish = |messages: Vec<(String, String)>| {
        let broker = writer.broker.clone();
        async move {
            let list: Vec<BatchMessage<'_>> = messages
                .iter()
                .map(|(channel, data)| BatchMessage {
                    channel,
                    data,
                    from: None,
                })
                .collect();
            broker
                .publish_batch(&list)
                .await
                .into_iter()
                .map(|a| a.ok().map(|p| p.offset))
                .collect::<Vec<Option<u64>>>()
        }
    };
    let ok = |offsets: &[u64]| offsets.iter().map(|&o| Some(o)).collect::<Vec<_>>();
    assert_eq!(
        publish(batch(0, &used)).await,
        ok(&[1, 2, 1, 2, 1, 2, 1, 2])
    );
    assert_eq!(
        publish(batch(1, &used)).await,
        ok(&[3, 4, 3, 4, 3, 4, 3, 4])
    );

    // used[1]'s slot migrates to master 1, and its keys are already there: master 0
    // answers ASK for them, master 1 serves them after ASKING.
    let moving = slot(&used[1]).to_string();
    let id = |n: usize| cluster.nodes[n].cli(&["cluster", "myid"]).trim().to_owned();
    let (source, target) = (id(0), id(1));
    cluster.nodes[1].cli(&["cluster", "setslot", &moving, "importing", &source]);
    cluster.nodes[0].cli(&["cluster", "setslot", &moving, "migrating", &target]);
    let keys = [
        format!("{prefix}{{{}}}:m", used[1]),
        format!("{prefix}{{{}}}:h", used[1]),
    ];
    let port = cluster.nodes[1].port().to_string();
    let out = cluster.nodes[0].cli(&[
        "migrate",
        "127.0.0.1",
        &port,
        "",
        "0",
        "5000",
        "keys",
        &keys[0],
        &keys[1],
    ]);
    assert_eq!(out.trim(), "OK", "migrate: {out}");
    assert_eq!(
        publish(batch(2, &used[..3])).await,
        vec![Some(5), Some(6), None, None, Some(5), Some(6)]
    );
    // The slot moved: the client's map still says master 0, which answers MOVED; the
    // client syncs its map and the call goes again.
    for n in &cluster.nodes {
        n.cli(&["cluster", "setslot", &moving, "node", &target]);
    }
    assert_eq!(
        publish(batch(3, &used)).await,
        ok(&[7, 8, 5, 6, 7, 8, 5, 6])
    );
    // Each channel's history: every message once, in order, nothing in part.
    for (c, skipped) in [
        (&used[0], false),
        (&used[1], true),
        (&used[2], false),
        (&used[3], true),
    ] {
        let h = writer.broker.history(c, 0, 100).await.expect("history");
        let got: Vec<(u64, String)> = h
            .publications
            .iter()
            .map(|p| (p.offset, p.data.to_string()))
            .collect();
        let want: Vec<(u64, String)> = (0..4)
            .filter(|&r| r != 2 || !skipped)
            .flat_map(|r| (0..2).map(move |k| format!(r#"{{"r":{r},"k":{k}}}"#)))
            .enumerate()
            .map(|(i, d)| (i as u64 + 1, d))
            .collect();
        assert_eq!(got, want, "{c}");
    }
    let stream = format!("{prefix}{{{}}}:h", used[1]);
    assert_eq!(cluster.nodes[1].cli(&["xlen", &stream]).trim(), "6");
    writer.broker.shutdown().await;
}

/// No reference cycle between hub and broker: dropping the hub and the last handle on
/// the broker (without `shutdown`) runs the Redis broker's `Drop`, which stops its tasks
/// (the event stream closes, so the hub's consumer ends) and closes its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropping_hub_and_broker_closes_redis_connections() {
    use herald_server::backend::memory::MemoryBackend;
    use herald_server::hub::Hub;
    use herald_server::mailbox::Mailbox;
    use herald_server::metrics::Metrics;
    use herald_server::users::Users;
    init_tracing();
    let redis = RedisServer::start();
    let connections = || {
        // `redis-cli` itself is one of them.
        redis.cli(&["client", "list"]).lines().count() - 1
    };
    let broker: Arc<dyn TestBackend> = Arc::new(
        connect(&redis.url(), &prefix("drop"), "n1", settings())
            .await
            .expect("connect"),
    );
    wait_until("broker healthy", || broker.is_healthy()).await;
    let events = broker.events().expect("events");
    assert!(broker.events().is_none(), "the stream is taken once");
    let hub = Arc::new(Hub::new(
        Arc::new(Metrics::new()),
        Arc::clone(&broker) as Arc<dyn Routing>,
        Arc::clone(&broker) as Arc<dyn Streams>,
        Duration::from_millis(10),
        10,
    ));
    // The users' commands go through a backend of their own here: this test is about
    // the hub's hold on the Redis backend.
    let users = Arc::new(Users::new(Arc::new(MemoryBackend::new(settings()))));
    let consumer = herald_server::events::consume(&hub, &users, events);
    hub.join("room", 1, Arc::new(Mailbox::new(10)))
        .await
        .expect("join");
    assert!(connections() >= 2, "command and subscriber connections");
    drop(broker);
    drop(hub);
    drop(users);
    timeout(WAIT, consumer)
        .await
        .expect("the hub's consumer ends when the broker is gone")
        .expect("no panic");
    wait_until("every connection closed", || connections() == 0).await;
}
