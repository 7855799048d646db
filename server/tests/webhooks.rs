//! Webhooks (docs/protocol.md "Webhooks") against a real HTTP receiver
//! in this process, real `herald` processes and a real `redis-server`: transitions
//! across three nodes, hops and quick reconnects that must not flap, channel
//! occupied/vacated across nodes, a receiver that fails and recovers, and a node
//! SIGKILLed while it holds undelivered events. Every test counts: none lost, none
//! invented, duplicates only with the same id and the same content.

#[path = "support/backend.rs"]
mod backend;
#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use backend::*;
use client::Client;
use herald_server::webhook::{dispatch, sign};
use herald_testkit::process::NodeProcess;
use herald_testkit::redis::{RedisCluster, RedisServer};
use serde_json::{json, Value};

const SECRET: &str = "webhook-secret-0123456789-abcdefghijkl";
const WAIT: Duration = Duration::from_secs(30);

/// What the receiver saw.
#[derive(Default)]
struct Seen {
    /// Events of accepted (200) requests, in arrival order.
    accepted: Vec<Value>,
    /// Events of refused (500) requests.
    refused: Vec<Value>,
    requests: usize,
}

/// A webhook receiver on 127.0.0.1: verifies every signature, records the events, and
/// answers 500 while `fail` is set.
struct Receiver {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    fail: Arc<AtomicBool>,
    bad_signatures: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct Shared {
    seen: Arc<Mutex<Seen>>,
    fail: Arc<AtomicBool>,
    bad: Arc<AtomicUsize>,
}

async fn hook(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = headers
        .get(sign::HEADER)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let now = herald_server::auth::now_secs();
    if sign::verify(SECRET.as_bytes(), header, &body, now, 300).is_err()
        || headers.get("content-type").and_then(|h| h.to_str().ok()) != Some("application/json")
    {
        s.bad.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED;
    }
    let v: Value = serde_json::from_slice(&body).expect("a JSON body");
    let events = v["events"].as_array().expect("events").clone();
    let mut seen = s.seen.lock().unwrap();
    seen.requests += 1;
    if s.fail.load(Ordering::SeqCst) {
        seen.refused.extend(events);
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        seen.accepted.extend(events);
        StatusCode::OK
    }
}

impl Receiver {
    async fn start() -> Receiver {
        let shared = Shared {
            seen: Arc::default(),
            fail: Arc::default(),
            bad: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/hook", post(hook))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver {
            addr,
            seen: shared.seen,
            fail: shared.fail,
            bad_signatures: shared.bad,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn accepted(&self) -> Vec<Value> {
        self.seen.lock().unwrap().accepted.clone()
    }

    /// The accepted events without duplicates, checking that a duplicate is the same
    /// event (same id, same content).
    fn unique(&self) -> Vec<Value> {
        let mut by_id: HashMap<String, Value> = HashMap::new();
        let mut out = Vec::new();
        for e in self.accepted() {
            let id = e["id"].as_str().expect("an id").to_owned();
            match by_id.get(&id) {
                Some(first) => assert_eq!(first, &e, "a duplicate id with other content"),
                None => {
                    by_id.insert(id, e.clone());
                    out.push(e);
                }
            }
        }
        out
    }

    /// `type` of each unique event about `who` (`user` or `channel` field), in order.
    fn kinds_of(&self, field: &str, who: &str) -> Vec<String> {
        self.unique()
            .iter()
            .filter(|e| e[field] == who)
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Polls until `done` holds for the unique events, or panics after [`WAIT`].
    async fn wait_until(&self, what: &str, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            let events = self.unique();
            if done(&events) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; got {events:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `field`=`who` has exactly these events.
    async fn wait_kinds(&self, field: &str, who: &str, kinds: &[&str]) {
        self.wait_until(&format!("{field} {who}: {kinds:?}"), |_| {
            self.kinds_of(field, who) == kinds
        })
        .await;
    }

    /// The rules every run must keep: valid signatures only, each event well formed,
    /// `seq` increasing per subject in arrival order, on/off alternating from "on",
    /// and every refused event delivered later with the same id and content.
    fn check(&self) {
        assert_eq!(self.bad_signatures.load(Ordering::SeqCst), 0);
        let unique = self.unique();
        let mut last: BTreeMap<String, (u64, String)> = BTreeMap::new();
        for e in &unique {
            let kind = e["type"].as_str().unwrap();
            let subject = match kind {
                "user.online" | "user.offline" => format!("u:{}", e["user"].as_str().unwrap()),
                "channel.occupied" | "channel.vacated" => {
                    format!("c:{}", e["channel"].as_str().unwrap())
                }
                // Not a transition: checked by the test that expects them.
                "message.unacked" => continue,
                other => panic!("unexpected event type {other}"),
            };
            let seq = e["seq"].as_u64().expect("seq");
            // Numbered from the clock (ms × 1000), below 2^53.
            assert!((1_600_000_000_000_000..1 << 53).contains(&seq), "{e}");
            assert!(e["at"].as_u64().expect("at") > 1_600_000_000_000);
            let on = matches!(kind, "user.online" | "channel.occupied");
            match last.get(&subject) {
                Some((prev, prev_kind)) => {
                    assert!(seq > *prev, "{subject}: seq {seq} after {prev}");
                    let prev_on = matches!(prev_kind.as_str(), "user.online" | "channel.occupied");
                    assert_ne!(on, prev_on, "{subject}: {kind} twice in a row");
                }
                None => assert!(on, "{subject} starts with {kind}"),
            }
            last.insert(subject, (seq, kind.to_owned()));
        }
        let seen = self.seen.lock().unwrap();
        for r in &seen.refused {
            assert!(
                unique.contains(r),
                "refused event {r} was never delivered as it was"
            );
        }
    }
}

fn prefix(test: &str) -> String {
    format!("t{}:{test}:", std::process::id())
}

fn start_nodes(redis: &RedisServer, prefix: &str, hook: &str, count: usize) -> Vec<NodeProcess> {
    start_nodes_on(&redis.url(), prefix, hook, count)
}

fn start_nodes_on(url: &str, prefix: &str, hook: &str, count: usize) -> Vec<NodeProcess> {
    let env = [
        ("HERALD_REDIS_URL", url),
        ("HERALD_REDIS_PREFIX", prefix),
        ("HERALD_WEBHOOK_URL", hook),
        ("HERALD_WEBHOOK_SECRET", SECRET),
        ("HERALD_OFFLINE_GRACE_MS", "2500"),
        ("HERALD_WEBHOOK_RETRY_MAX_MS", "400"),
        ("HERALD_WEBHOOK_TIMEOUT_MS", "2000"),
        ("HERALD_UNSUBSCRIBE_DELAY_MS", "200"),
    ];
    (0..count)
        .map(|i| NodeProcess::start(&format!("{prefix}n{i}"), &env))
        .collect()
}

async fn ready(nodes: &[NodeProcess]) {
    for n in nodes {
        n.wait_ready(WAIT).await;
    }
}

fn token(user: &str) -> String {
    herald_testkit::token(user, &["room:*"], &[])
}

async fn connect(n: &NodeProcess, user: &str) -> Client {
    Client::hello(&format!("ws://{}/ws", n.addr), &token(user), json!({}))
        .await
        .0
}

async fn join(c: &mut Client, channel: &str) {
    let r = c
        .request(json!({"type": "subscribe", "channel": channel}))
        .await;
    assert!(r.get("error").is_none(), "{r}");
}

#[tokio::test]
async fn transitions_across_three_nodes_without_flapping() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let p = prefix("three");
    let nodes = start_nodes(&redis, &p, &rx.url(), 3);
    ready(&nodes).await;

    // alice comes online on node 0.
    let a0 = connect(&nodes[0], "alice").await;
    rx.wait_kinds("user", "alice", &["user.online"]).await;
    // She hops: opens on node 1, closes node 0. Then a quick reconnect: closes node 1
    // and comes back on node 2 within the grace. Neither may produce an event.
    let a1 = connect(&nodes[1], "alice").await;
    a0.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    a1.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a2 = connect(&nodes[2], "alice").await;

    // A room with members on two nodes: occupied once, vacated once when the last left.
    let mut b0 = connect(&nodes[0], "bob").await;
    join(&mut b0, "room:x").await;
    let mut c1 = connect(&nodes[1], "carol").await;
    join(&mut c1, "room:x").await;
    rx.wait_kinds("channel", "room:x", &["channel.occupied"])
        .await;
    b0.request(json!({"type": "unsubscribe", "channel": "room:x"}))
        .await;

    // Past the grace: alice never went offline, the room is still occupied.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(rx.kinds_of("user", "alice"), ["user.online"]);
    assert_eq!(rx.kinds_of("channel", "room:x"), ["channel.occupied"]);

    // Everyone leaves: one offline per user, one vacated.
    c1.close().await;
    b0.close().await;
    a2.close().await;
    for user in ["alice", "bob", "carol"] {
        rx.wait_kinds("user", user, &["user.online", "user.offline"])
            .await;
    }
    rx.wait_kinds(
        "channel",
        "room:x",
        &["channel.occupied", "channel.vacated"],
    )
    .await;
    // Nothing else, and nothing late.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(rx.unique().len(), 8, "{:#?}", rx.unique());
    // Personal channels make no channel events.
    assert!(rx.unique().iter().all(|e| e["channel"] != "user:alice"));
    rx.check();
}

/// The node that holds the URL's lease is SIGKILLed while the receiver refuses
/// everything: its users go offline after the node TTL plus the grace unless they
/// reconnected elsewhere, and another node delivers every event once the receiver
/// recovers, with the same ids.
#[tokio::test]
async fn node_sigkill_and_a_receiver_that_fails_then_recovers() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let p = prefix("kill");
    let mut nodes = start_nodes(&redis, &p, &rx.url(), 3);
    ready(&nodes).await;

    // Find the lease holder (any node may have taken it).
    let lease = format!(
        "{p}{{#webhook}}:lease:{}",
        dispatch::target_id(&rx.url().parse().unwrap())
    );
    let deadline = Instant::now() + WAIT;
    let holder = loop {
        let h = redis.cli(&["GET", &lease]);
        if let Some(i) = nodes.iter().position(|n| n.id == h.trim()) {
            break i;
        }
        assert!(Instant::now() < deadline, "nobody took the lease: {h:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let other = (holder + 1) % 3;
    let third = (holder + 2) % 3;

    // The receiver fails from now on; events pile up in the log.
    rx.fail.store(true, Ordering::SeqCst);
    let _alice = connect(&nodes[holder], "alice").await; // dies with the node
    let _carol_h = connect(&nodes[holder], "carol").await;
    let carol_o = connect(&nodes[other], "carol").await; // survives elsewhere
    let _dave = connect(&nodes[holder], "dave").await; // will reconnect elsewhere
    let deadline = Instant::now() + WAIT;
    while rx.seen.lock().unwrap().refused.len() < 3 {
        assert!(Instant::now() < deadline, "no attempt reached the receiver");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    nodes[holder].kill();
    let dave = connect(&nodes[third], "dave").await;
    // Node TTL (3 s) + grace (2.5 s) + sweeps later alice is offline; the receiver
    // comes back before that.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    rx.fail.store(false, Ordering::SeqCst);

    rx.wait_kinds("user", "alice", &["user.online", "user.offline"])
        .await;
    rx.wait_kinds("user", "carol", &["user.online"]).await;
    rx.wait_kinds("user", "dave", &["user.online"]).await;
    // Carol and dave stay online: the dead node's holds are gone, theirs are not.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(rx.kinds_of("user", "carol"), ["user.online"]);
    assert_eq!(rx.kinds_of("user", "dave"), ["user.online"]);
    assert_eq!(rx.unique().len(), 4, "{:#?}", rx.unique());

    carol_o.close().await;
    dave.close().await;
    rx.wait_kinds("user", "carol", &["user.online", "user.offline"])
        .await;
    rx.wait_kinds("user", "dave", &["user.online", "user.offline"])
        .await;
    rx.check();
    let survivors: f64 = {
        let mut sum = 0.0;
        for i in [other, third] {
            sum +=
                herald_testkit::metric(&nodes[i].http(), "herald_webhook_events_delivered_total")
                    .await;
        }
        sum
    };
    assert!(survivors >= 6.0, "the survivors delivered {survivors}");
}

/// On Redis Cluster every webhook key shares one slot, so the scripts run there too.
#[tokio::test]
async fn works_on_redis_cluster() {
    let cluster = RedisCluster::start();
    let rx = Receiver::start().await;
    let nodes = start_nodes_on(&cluster.url(), &prefix("cluster"), &rx.url(), 2);
    ready(&nodes).await;
    let mut a0 = connect(&nodes[0], "alice").await;
    join(&mut a0, "room:c").await;
    rx.wait_kinds("user", "alice", &["user.online"]).await;
    rx.wait_kinds("channel", "room:c", &["channel.occupied"])
        .await;
    // A hop to the other node: nothing.
    let mut a1 = connect(&nodes[1], "alice").await;
    join(&mut a1, "room:c").await;
    a0.close().await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(rx.unique().len(), 2, "{:#?}", rx.unique());
    a1.close().await;
    rx.wait_kinds("user", "alice", &["user.online", "user.offline"])
        .await;
    rx.wait_kinds(
        "channel",
        "room:c",
        &["channel.occupied", "channel.vacated"],
    )
    .await;
    rx.check();
}

/// Redis frozen (SIGSTOP) while a user leaves: the node's report fails and is sent
/// again after Redis is back, so the user still goes offline, once.
#[tokio::test]
async fn a_departure_while_redis_is_frozen_is_not_lost() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let nodes = start_nodes(&redis, &prefix("frozen"), &rx.url(), 1);
    ready(&nodes).await;
    let bob = connect(&nodes[0], "bob").await;
    rx.wait_kinds("user", "bob", &["user.online"]).await;
    redis.pause();
    bob.close().await;
    // Longer than the command timeout (2 s): the report fails at least once.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    redis.resume();
    rx.wait_kinds("user", "bob", &["user.online", "user.offline"])
        .await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(rx.unique().len(), 2, "{:#?}", rx.unique());
    rx.check();
}

/// A node SIGKILLed and restarted at once under the same id, before its TTL ran out:
/// the users of its previous life are not its users any more. They go offline after
/// the grace (unless they come back), and are never stuck online.
#[tokio::test]
async fn a_node_restarted_under_its_id_lets_go_of_its_previous_life() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let mut nodes = start_nodes(&redis, &prefix("reborn"), &rx.url(), 1);
    ready(&nodes).await;
    let _erin = connect(&nodes[0], "erin").await;
    let _finn = connect(&nodes[0], "finn").await;
    rx.wait_kinds("user", "erin", &["user.online"]).await;
    rx.wait_kinds("user", "finn", &["user.online"]).await;
    nodes[0].restart();
    ready(&nodes).await;
    // finn reconnects to the new life within the grace: no event. erin does not.
    let finn = connect(&nodes[0], "finn").await;
    rx.wait_kinds("user", "erin", &["user.online", "user.offline"])
        .await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(rx.kinds_of("user", "finn"), ["user.online"]);
    finn.close().await;
    rx.wait_kinds("user", "finn", &["user.online", "user.offline"])
        .await;
    rx.check();
}

/// The memory broker (one node, dev mode): the same events, retried after failures,
/// with a quick reconnect that produces nothing.
#[tokio::test]
async fn memory_broker_single_node() {
    let rx = Receiver::start().await;
    let config = herald_server::Config {
        webhook_url: Some(vec![rx.url()]),
        webhook_secret: Some(SECRET.into()),
        offline_grace_ms: 1000,
        webhook_retry_max_ms: 300,
        ..node::test_config()
    };
    let n = node::TestNode::start(config).await;
    let mut a = Client::hello(&n.ws_url(), &n.token("alice", &["room:*"], &[]), json!({}))
        .await
        .0;
    join(&mut a, "room:1").await;
    rx.wait_kinds("user", "alice", &["user.online"]).await;
    rx.wait_kinds("channel", "room:1", &["channel.occupied"])
        .await;

    // A quick reconnect: nothing.
    a.close().await;
    let a = Client::hello(&n.ws_url(), &n.token("alice", &[], &[]), json!({}))
        .await
        .0;
    // The room's only member left for good: vacated after the grace, while the
    // receiver fails and then recovers.
    rx.fail.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + WAIT;
    while rx.seen.lock().unwrap().refused.is_empty() {
        assert!(Instant::now() < deadline, "no failed attempt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rx.fail.store(false, Ordering::SeqCst);
    rx.wait_kinds(
        "channel",
        "room:1",
        &["channel.occupied", "channel.vacated"],
    )
    .await;
    assert_eq!(rx.kinds_of("user", "alice"), ["user.online"]);
    a.close().await;
    rx.wait_kinds("user", "alice", &["user.online", "user.offline"])
        .await;
    rx.check();
    assert!(n.metric("herald_webhook_events_retried_total").await >= 1.0);
    assert_eq!(n.metric("herald_webhook_events_delivered_total").await, 4.0);
}

/// `message.unacked` end to end: messages to a user who is offline, or who acks only
/// part of them, reach the receiver as signed `message.unacked` events with the
/// message, its deterministic id, and nothing for what was acked. Two nodes sweep; the
/// publishes enter at one, the sessions sit on the other.
#[tokio::test]
async fn unacked_messages_reach_the_webhook() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let prefix = prefix("unacked");
    let env = [
        ("HERALD_REDIS_URL", redis.url()),
        ("HERALD_REDIS_PREFIX", prefix.clone()),
        ("HERALD_WEBHOOK_URL", rx.url()),
        ("HERALD_WEBHOOK_SECRET", SECRET.to_owned()),
        ("HERALD_OFFLINE_GRACE_MS", "2500".to_owned()),
        ("HERALD_WEBHOOK_RETRY_MAX_MS", "400".to_owned()),
        ("HERALD_ACK_TIMEOUT_MS", "600".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let nodes: Vec<NodeProcess> = (0..2)
        .map(|i| NodeProcess::start(&format!("{prefix}n{i}"), &env))
        .collect();
    ready(&nodes).await;
    let publish = |user: &'static str, n: u64| {
        let http = nodes[0].http();
        async move {
            let r = reqwest::Client::new()
                .post(format!("{http}/v1/publish"))
                .bearer_auth(herald_testkit::API_KEY)
                .json(&json!({"channel": format!("user:{user}"), "data": {"n": n}, "from": "app"}))
                .send()
                .await
                .expect("publish");
            assert!(r.status().is_success(), "{}", r.status());
            r.json::<Value>().await.unwrap()
        }
    };
    // Alice is online on the other node and acks her first message only.
    let mut alice = connect(&nodes[1], "alice").await;
    let first = publish("alice", 1).await;
    publish("alice", 2).await;
    let r = alice
        .request(json!({"type": "ack", "channel": "user:alice", "offset": first["offset"]}))
        .await;
    assert!(r.get("error").is_none(), "{r}");
    // Bob is offline: all three are reported.
    for n in 1..=3 {
        publish("bob", n).await;
    }
    rx.wait_until("bob's three and alice's second", |events| {
        events
            .iter()
            .filter(|e| e["type"] == "message.unacked")
            .count()
            >= 4
    })
    .await;
    // Some time for anything extra (a wrong report of alice's acked message).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let unacked: Vec<Value> = rx
        .unique()
        .into_iter()
        .filter(|e| e["type"] == "message.unacked")
        .collect();
    let mut got: Vec<(String, u64, u64)> = unacked
        .iter()
        .map(|e| {
            let user = e["user"].as_str().unwrap().to_owned();
            assert_eq!(e["channel"], format!("user:{user}"));
            assert_eq!(e["from"], "app");
            let epoch = e["epoch"].as_str().unwrap();
            let offset = e["offset"].as_u64().unwrap();
            assert_eq!(
                e["id"],
                format!("unacked:user:{user}:{epoch}:{offset}"),
                "a deterministic id"
            );
            assert!(e["published_at_ms"].as_u64().unwrap() > 1_600_000_000_000);
            (user, offset, e["data"]["n"].as_u64().unwrap())
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("alice".to_owned(), 2, 2),
            ("bob".to_owned(), 1, 1),
            ("bob".to_owned(), 2, 2),
            ("bob".to_owned(), 3, 3),
        ],
        "each unacked message once, the acked one never"
    );
    rx.check();
    alice.close().await;
}

/// A node refuses to start with a bad webhook setting.
#[test]
fn bad_settings_refuse_to_start() {
    for (env, says) in [
        (
            vec![("HERALD_WEBHOOK_URL", "ftp://x/")],
            "HERALD_WEBHOOK_URL",
        ),
        (
            vec![("HERALD_WEBHOOK_URL", "http://127.0.0.1:9/")],
            "HERALD_WEBHOOK_SECRET",
        ),
        (
            vec![
                ("HERALD_WEBHOOK_URL", "http://127.0.0.1:9/"),
                ("HERALD_WEBHOOK_SECRET", "short"),
            ],
            "32 bytes",
        ),
    ] {
        let mut env = env;
        env.extend([
            ("HERALD_LISTEN", "127.0.0.1:0"),
            ("HERALD_JWT_SECRET", herald_testkit::SECRET),
            ("HERALD_API_KEY", herald_testkit::API_KEY),
        ]);
        let r = herald_testkit::process::start_refused(&env);
        assert!(r.stderr.contains(says), "{env:?}: {}", r.stderr);
    }
}

/// The Redis store itself: the log is trimmed to about its retention, a URL whose
/// events were trimmed is told how many it lost (and the rest add up), and only the
/// lease holder reads or moves the cursor.
#[tokio::test]
async fn redis_store_trims_counts_losses_and_respects_the_lease() {
    use herald_server::backend::webhooks::{NewEvent, WebhookStoreSettings};
    let redis = RedisServer::start();
    let (broker, store) = redis_store(
        &redis,
        &prefix("store"),
        WebhookStoreSettings {
            grace: Duration::from_secs(5),
            node_ttl: Duration::from_secs(10),
            lease: Duration::from_secs(10),
            retention: 10,
        },
    )
    .await;
    let append = |i: usize| NewEvent {
        kind: "test.event".into(),
        subject: format!("u:user{i}"),
        extra: format!(r#""i":{i}"#),
        id: None,
    };
    // The connection comes up in the background.
    let deadline = Instant::now() + WAIT;
    while store.append(&append(0)).await.is_err() {
        assert!(Instant::now() < deadline, "Redis never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The target reads the first event and acknowledges it.
    let first = store.read("t", "n1", 10).await.unwrap().unwrap();
    assert_eq!(first.events.len(), 1);
    let v: Value = serde_json::from_str(&first.events[0].json).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["user"].as_str(), v["i"].as_u64()),
        (Some("test.event"), Some("user0"), Some(0))
    );
    assert!(store.ack("t", "n1", first.events[0].n).await.unwrap());
    // Another node neither reads nor acknowledges while n1 holds the lease.
    assert!(store.read("t", "n2", 10).await.unwrap().is_none());
    assert!(!store.claim("t", "n2").await.unwrap());
    assert!(!store.ack("t", "n2", u64::MAX).await.unwrap());

    for i in 1..=600 {
        store.append(&append(i)).await.unwrap();
    }
    let len: usize = redis
        .cli(&["XLEN", &format!("{}{{#webhook}}:log", prefix("store"))])
        .trim()
        .parse()
        .unwrap();
    assert!((10..=200).contains(&len), "the log holds {len}");
    // Every event after the cursor is either delivered or counted as lost.
    let mut delivered = 0u64;
    let mut lost = 0u64;
    let mut last = first.events[0].n;
    loop {
        let b = store.read("t", "n1", 100).await.unwrap().unwrap();
        lost += b.trimmed;
        let Some(end) = b.events.last() else { break };
        for e in &b.events {
            assert!(e.n > last, "in order");
            last = e.n;
        }
        delivered += b.events.len() as u64;
        assert!(store.ack("t", "n1", end.n).await.unwrap());
    }
    assert_eq!(delivered, len as u64);
    assert_eq!(delivered + lost, 600);
    // The holder gives the lease up; another node takes it at once.
    store.release("t", "n1").await.unwrap();
    assert!(store.claim("t", "n2").await.unwrap());
    assert!(store
        .read("t", "n2", 10)
        .await
        .unwrap()
        .unwrap()
        .events
        .is_empty());
    // A malformed subject is refused, not stored.
    let bad = NewEvent {
        kind: "x".into(),
        subject: "nobody".into(),
        extra: String::new(),
        id: None,
    };
    assert!(store.append(&bad).await.is_err());
    broker.shutdown().await;
}

/// A dead node's holdings are let go of in bounded steps (1,000 per sweep call), so a
/// node with thousands of users never holds Redis for one long call; and a node that
/// comes back under the same id in the middle keeps what it holds again: those users
/// end online, everyone else offline, each transition once.
#[tokio::test]
async fn a_dead_node_is_dropped_in_bounded_steps() {
    use herald_server::backend::webhooks::{Holding, WebhookStoreSettings};
    const USERS: usize = 2_500;
    const BACK: usize = 100;
    let redis = RedisServer::start();
    let prefix = prefix("drop");
    let (broker, store) = redis_store(
        &redis,
        &prefix,
        WebhookStoreSettings {
            grace: Duration::ZERO,
            node_ttl: Duration::from_millis(300),
            lease: Duration::from_secs(10),
            retention: 100_000,
        },
    )
    .await;
    let hold = |range: std::ops::Range<usize>| -> Vec<Holding> {
        range
            .map(|i| Holding {
                subject: format!("u:user{i}"),
                held: true,
            })
            .collect()
    };
    let deadline = Instant::now() + WAIT;
    while store.report("dead", &hold(0..USERS)).await.is_err() {
        assert!(Instant::now() < deadline, "Redis never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every user's last event so far, and how many events there were.
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let mut events = 0usize;
    events += apply(&mut last, read_all(&*store).await);
    assert_eq!(events, USERS);

    // "dead" stops reporting; after its TTL the first sweep drops it, in one step of
    // at most 1,000 (DROP_LIMIT).
    tokio::time::sleep(Duration::from_millis(400)).await;
    store.sweep().await.unwrap();
    let first = read_all(&*store).await;
    assert!(
        (1..=1_000).contains(&first.len()),
        "{} users let go of in one call",
        first.len()
    );
    apply(&mut last, first);
    let dropping = format!("{prefix}{{#webhook}}:dropping");
    let drops = redis.cli(&["HGETALL", &dropping]);
    let drops: Vec<&str> = drops.lines().map(str::trim).collect();
    assert_eq!(
        drops.get(1),
        Some(&"dead"),
        "one drop in progress: {drops:?}"
    );
    let left: usize = redis
        .cli(&["SCARD", &format!("{prefix}{{#webhook}}:d:{}", drops[0])])
        .trim()
        .parse()
        .unwrap();
    assert_eq!(left, USERS - 1_000, "the rest waits for the next sweeps");

    // The node comes back under its id and holds the first BACK users again: it is
    // unknown, so it reports everything it holds.
    assert!(store.report("dead", &hold(0..BACK)).await.unwrap(), "fresh");
    let deadline = Instant::now() + WAIT;
    while redis.cli(&["HLEN", &dropping]).trim() != "0" {
        assert!(Instant::now() < deadline, "the drop never ended");
        store.report("dead", &[]).await.unwrap(); // stays alive meanwhile
        store.sweep().await.unwrap();
    }
    apply(&mut last, read_all(&*store).await);
    for i in 0..USERS {
        let expected = if i < BACK {
            "user.online"
        } else {
            "user.offline"
        };
        assert_eq!(last[&format!("user{i}")], expected, "user{i}");
    }
    broker.shutdown().await;
}

/// Every event of target "t" not read yet (as holder "n1"), as (user, type), acked.
async fn read_all(
    store: &dyn herald_server::backend::webhooks::WebhookStore,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    loop {
        let b = store.read("t", "n1", 1_000).await.unwrap().unwrap();
        assert_eq!(b.trimmed, 0);
        let Some(end) = b.events.last().map(|e| e.n) else {
            return out;
        };
        for e in b.events {
            let v: Value = serde_json::from_str(&e.json).unwrap();
            out.push((
                v["user"].as_str().unwrap().to_owned(),
                v["type"].as_str().unwrap().to_owned(),
            ));
        }
        assert!(store.ack("t", "n1", end).await.unwrap());
    }
}

/// Applies events to each user's last event, checking they alternate (online first);
/// returns how many there were.
fn apply(last: &mut BTreeMap<String, String>, batch: Vec<(String, String)>) -> usize {
    let n = batch.len();
    for (user, kind) in batch {
        let before = last.insert(user.clone(), kind.clone());
        let expected = if before.as_deref() == Some("user.online") {
            "user.offline"
        } else {
            "user.online"
        };
        assert_eq!(kind, expected, "{user}: {before:?} then {kind}");
    }
    n
}

/// A Redis broker of node "n1" under `prefix` and its webhook store.
async fn redis_store(
    redis: &RedisServer,
    prefix: &str,
    settings: herald_server::backend::webhooks::WebhookStoreSettings,
) -> (
    herald_server::backend::redis::RedisBackend,
    std::sync::Arc<dyn herald_server::backend::webhooks::WebhookStore>,
) {
    let broker = herald_server::backend::redis::connect(
        &redis.url(),
        prefix,
        "n1",
        herald_server::backend::settings::BackendSettings::from_config(
            &herald_server::Config::default(),
        ),
    )
    .await
    .unwrap();
    let store = broker.webhook_store(settings);
    (broker, store)
}
