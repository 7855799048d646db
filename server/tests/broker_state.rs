//! What the broker stores, seen through real sockets on real nodes.
//!
//! - No client can grow Redis or memory without bound: subscribing to (or resuming)
//!   channels that were never published to stores nothing, so a client that loops
//!   subscribe/unsubscribe over new names leaves O(1) keys in Redis and O(1) streams in
//!   the memory broker. Such a channel reads as `(0, "")`, and offset 0 continues with
//!   any epoch (docs/protocol.md, "Positions").
//! - `from`: a socket publish carries the publisher's user id, set by the server; an
//!   API publish may set it; it is stored, so recovered messages and the history API
//!   carry it too.
//!
//! Memory-broker and Redis-broker variants of each; every wait has a deadline.

#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;
#[path = "support/panics.rs"]
mod panics;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::ops::AsyncFnMut;
use std::time::{Duration, Instant};

use client::Client;
use herald_server::Config;
use node::TestNode;
use panics::{assert_no_server_panic, watch_panics};
use redis_server::RedisServer;
use serde_json::{json, Value};

/// Subscribe/unsubscribe rounds of the churn tests.
const CHURN: usize = 2_000;
/// Generous: the machine is shared.
const WAIT: Duration = Duration::from_secs(30);

fn config() -> Config {
    Config {
        // The churn loop sends 2 commands per round as fast as the node answers.
        max_messages_per_sec: 1_000_000,
        max_subscriptions: 10,
        ..node::test_config()
    }
}

fn redis_config(redis: &RedisServer, prefix: &str) -> Config {
    Config {
        redis_url: Some(redis.url()),
        redis_prefix: prefix.to_owned(),
        ..config()
    }
}

async fn start(config: Config) -> TestNode {
    watch_panics();
    TestNode::start(config).await
}

/// Polls `check` until it returns `Some`, within [`WAIT`].
async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    eventually_or(what, async || check().await.ok_or(())).await
}

/// [`eventually`] for a check that says what it saw: a timeout names the last `Err`.
async fn eventually_or<T, E: std::fmt::Debug>(
    what: &str,
    mut check: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what} (last seen: {last:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `CHURN` rounds of subscribe + unsubscribe of a fresh name on one socket; every
/// other subscribe asks to recover (`since`), which reads history.
async fn churn(c: &mut Client, tag: &str) {
    for i in 0..CHURN {
        let channel = format!("room:{tag}-{i}");
        let mut cmd = json!({"type": "subscribe", "channel": channel});
        if i % 2 == 1 {
            cmd["since"] = json!({"offset": i % 5, "epoch": "old"});
        }
        let r = c.request(cmd).await;
        assert_eq!(
            r["result"],
            json!({"offset": 0, "epoch": "", "recovered": i % 2 == 1 && i % 5 == 0}),
            "{r}"
        );
        let r = c
            .request(json!({"type": "unsubscribe", "channel": channel}))
            .await;
        assert_eq!(r["result"], json!({}), "{r}");
    }
}

/// Keys under `prefix` in `redis` (SCAN, so no KEYS on a shared server).
fn redis_keys(redis: &RedisServer, prefix: &str) -> Vec<String> {
    let out = redis.cli(&["--scan", "--pattern", &format!("{prefix}*")]);
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------
// §6: nothing stored for channels never published to.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_node_stores_nothing_for_channels_never_published() {
    let n = start(config()).await;
    n.publish(json!({"channel": "room:kept", "data": 1})).await;
    let tok = n.token("alice", &["room:*"], &[]);
    let (mut a, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    churn(&mut a, "m").await;
    // Resumes of new names at hello, and history API reads, store nothing either.
    let resume: serde_json::Map<String, Value> = (0..9)
        .map(|i| (format!("room:r{i}"), json!({"offset": i, "epoch": "x"})))
        .collect();
    let (b, w) = Client::hello(&n.ws_url(), &tok, Value::Object(resume)).await;
    assert_eq!(w["subscriptions"]["room:r3"]["epoch"], "", "{w}");
    for i in 0..50 {
        let (status, h) = n.get(&format!("/v1/channels/room:h{i}/history")).await;
        assert_eq!(status, 200, "{h}");
        assert_eq!(
            (h["offset"].clone(), h["epoch"].clone()),
            (json!(0), json!(""))
        );
    }
    b.close().await;
    // A marker publish: once the gauge counts it, it counts everything before it.
    n.publish(json!({"channel": "room:marker", "data": 1}))
        .await;
    let streams = eventually("the streams gauge counts the marker", async || {
        let v = n.metric("herald_memory_streams").await;
        (v >= 2.0).then_some(v)
    })
    .await;
    assert_eq!(streams, 2.0, "only the two published channels have state");
    // The hub drops its entries after the unsubscribe delay: only user:alice is left.
    eventually("hub entries reaped", async || {
        (n.metric("herald_broker_channels").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(n.metric("herald_subscriptions").await, 1.0);
    a.close().await;
    assert_no_server_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_node_keeps_o1_keys_after_a_subscribe_loop_over_new_names() {
    let redis = RedisServer::start();
    let prefix = "churn:";
    let n = start(redis_config(&redis, prefix)).await;
    let tok = n.token("alice", &["room:*"], &[]);
    let (mut a, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    churn(&mut a, "r").await;
    let resume: serde_json::Map<String, Value> = (0..9)
        .map(|i| (format!("room:r{i}"), json!({"offset": i, "epoch": "x"})))
        .collect();
    let (b, _) = Client::hello(&n.ws_url(), &tok, Value::Object(resume)).await;
    b.close().await;
    // Presence is flushed every 100 ms and broker unsubscribes follow the delay: wait
    // for the node to settle (its own subscriptions back to the personal channel).
    eventually("hub entries reaped", async || {
        (n.metric("herald_broker_channels").await == 1.0).then_some(())
    })
    .await;
    let keys = eventually_or("presence of the churned channels removed", async || {
        let keys = redis_keys(&redis, prefix);
        if keys.iter().any(|k| k.contains("room:")) {
            Err(keys)
        } else {
            Ok(keys)
        }
    })
    .await;
    eprintln!(
        "measured: {} keys under the prefix after {CHURN} subscribe/unsubscribe rounds: {keys:?}",
        keys.len()
    );
    assert!(keys.len() < 20, "{} keys: {keys:?}", keys.len());
    let dbsize: usize = redis.cli(&["dbsize"]).trim().parse().unwrap();
    assert!(dbsize < 20, "DBSIZE {dbsize}");
    // No broker subscription is left behind either (only the personal channel's and
    // the node's probe).
    let channels = redis.cli(&["pubsub", "channels", &format!("{prefix}*")]);
    assert!(
        !channels.contains("room:"),
        "pub/sub subscriptions left: {channels}"
    );
    a.close().await;
    assert_no_server_panic();
}

// ---------------------------------------------------------------------------------
// The offset-0 rule, end to end.

async fn offset_zero_continues_with_any_epoch(n: &TestNode) {
    let tok = n.token("alice", &["room:*"], &[]);
    // Subscribed before the first publish: (0, ""), and offset 1 of the new epoch
    // follows without a resync.
    let (mut a, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    let r = a
        .request(json!({"type": "subscribe", "channel": "room:z"}))
        .await;
    assert_eq!(
        r["result"],
        json!({"offset": 0, "epoch": "", "recovered": false})
    );
    let mut epoch = Value::Null;
    for i in 1..=3 {
        let (status, body) = n.publish(json!({"channel": "room:z", "data": i})).await;
        assert_eq!(status, 200, "{body}");
        epoch = body["epoch"].clone();
        let m = a.next_message().await;
        assert_eq!(
            m["type"], "message",
            "no resync before the first message: {m}"
        );
        assert_eq!(
            (m["offset"].clone(), m["epoch"].clone()),
            (json!(i), epoch.clone())
        );
    }
    assert_ne!(epoch, "");
    // A `since` at offset 0 in any epoch recovers from the start of the history.
    for since_epoch in ["", "some-other-epoch"] {
        let (mut b, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
        let r = b
            .request(json!({"type": "subscribe", "channel": "room:z",
                            "since": {"offset": 0, "epoch": since_epoch}}))
            .await;
        assert_eq!(
            r["result"],
            json!({"offset": 3, "epoch": epoch, "recovered": true}),
            "{r}"
        );
        for i in 1..=3 {
            assert_eq!(b.next_message().await["offset"], i);
        }
        b.close().await;
    }
    // The same at hello.
    let (mut c, w) = Client::hello(
        &n.ws_url(),
        &tok,
        json!({"room:z": {"offset": 0, "epoch": ""}}),
    )
    .await;
    assert_eq!(w["subscriptions"]["room:z"]["recovered"], true, "{w}");
    for i in 1..=3 {
        assert_eq!(c.next_message().await["offset"], i);
    }
    // Beyond offset 0 the epoch must match.
    let (mut d, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    let r = d
        .request(json!({"type": "subscribe", "channel": "room:z",
                        "since": {"offset": 1, "epoch": ""}}))
        .await;
    assert_eq!(
        r["result"],
        json!({"offset": 3, "epoch": epoch, "recovered": false}),
        "{r}"
    );
    assert!(
        d.silent_for(Duration::from_millis(150)).await,
        "nothing replayed"
    );
    a.close().await;
    c.close().await;
    d.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_offset_zero_continues_with_any_epoch() {
    let n = start(config()).await;
    offset_zero_continues_with_any_epoch(&n).await;
    assert_no_server_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_offset_zero_continues_with_any_epoch() {
    let redis = RedisServer::start();
    let n = start(redis_config(&redis, "zero:")).await;
    offset_zero_continues_with_any_epoch(&n).await;
    assert_no_server_panic();
}

/// Redis lost everything (FLUSHALL, as a restart without persistence): a client at
/// (3, E1) is not recovered and continues from (0, ""); the next publish starts a new
/// epoch whose offset 1 continues that position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_redis_state_reads_as_empty_and_the_next_epoch_continues_it() {
    let redis = RedisServer::start();
    let n = start(redis_config(&redis, "lost:")).await;
    let tok = n.token("alice", &["room:*"], &[]);
    let mut e1 = Value::Null;
    for i in 1..=3 {
        e1 = n.publish(json!({"channel": "room:l", "data": i})).await.1["epoch"].clone();
    }
    redis.cli(&["flushall"]);
    let (mut a, w) = Client::hello(
        &n.ws_url(),
        &tok,
        json!({"room:l": {"offset": 3, "epoch": e1}}),
    )
    .await;
    assert_eq!(
        w["subscriptions"]["room:l"],
        json!({"offset": 0, "epoch": "", "recovered": false}),
        "{w}"
    );
    let (_, body) = n.publish(json!({"channel": "room:l", "data": 1})).await;
    assert_eq!(body["offset"], 1, "{body}");
    assert!(body["epoch"] != e1 && body["epoch"] != "", "{body}");
    let m = a.next_message().await;
    assert_eq!(m["type"], "message", "no resync: (0, \"\") continues: {m}");
    assert_eq!(
        (m["offset"].clone(), m["epoch"].clone()),
        (json!(1), body["epoch"].clone())
    );
    a.close().await;
    assert_no_server_panic();
}

// ---------------------------------------------------------------------------------
// §8: `from`.

async fn socket_publish_carries_the_publisher(n: &TestNode) {
    let (mut bob, _) =
        Client::hello(&n.ws_url(), &n.token("bob", &["room:*"], &[]), json!({})).await;
    bob.request(json!({"type": "subscribe", "channel": "room:f"}))
        .await;
    let (mut alice, _) = Client::hello(
        &n.ws_url(),
        &n.token("alice", &["room:*"], &["room:*"]),
        json!({}),
    )
    .await;
    // A `from` in the frame is ignored: the server's value wins.
    let r = alice
        .request(
            json!({"type": "publish", "channel": "room:f", "from": "server",
                        "data": {"text": "hi"}}),
        )
        .await;
    assert_eq!(r["result"]["offset"], 1, "{r}");
    let m = bob.next_message().await;
    assert_eq!(m["from"], "alice", "{m}");
    assert_eq!(m["data"], json!({"text": "hi"}));
    // The publisher sees its own message with `from` too.
    alice
        .request(json!({"type": "subscribe", "channel": "room:f"}))
        .await;
    alice
        .request(json!({"type": "publish", "channel": "room:f", "data": 2}))
        .await;
    assert_eq!(bob.next_message().await["from"], "alice");
    assert_eq!(alice.next_message().await["from"], "alice");
    // API publishes: with a valid `from`, delivered with it; without, no `from` key.
    let (status, body) = n
        .publish(json!({"channel": "room:f", "from": "notifier", "data": 3}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(bob.next_message().await["from"], "notifier");
    let (status, _) = n.publish(json!({"channel": "room:f", "data": 4})).await;
    assert_eq!(status, 200);
    let m = bob.next_message().await;
    assert_eq!(m["offset"], 4, "{m}");
    assert!(m.get("from").is_none(), "no publisher, no key: {m}");
    // Invalid `from`: 400, nothing published.
    for bad in [
        json!("a:b"),
        json!(""),
        json!("x".repeat(129)),
        json!(7),
        json!("é"),
    ] {
        let (status, body) = n
            .publish(json!({"channel": "room:f", "from": bad, "data": 0}))
            .await;
        assert_eq!(status, 400, "from {bad}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{body}");
    }
    // Batch: each message may set its own; an invalid one fails alone.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/publish/batch", n.http()))
        .bearer_auth(node::API_KEY)
        .json(&json!({"messages": [
            {"channel": "room:f", "from": "svc.a", "data": 5},
            {"channel": "room:f", "from": "bad:id", "data": 0},
            {"channel": "room:f", "data": 6},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["results"][0]["offset"], 5, "{body}");
    assert_eq!(body["results"][1]["error"]["code"], "bad_request", "{body}");
    assert_eq!(body["results"][2]["offset"], 6, "{body}");
    let m = bob.next_message().await;
    assert_eq!(
        (m["offset"].clone(), m["from"].clone()),
        (json!(5), json!("svc.a"))
    );
    let m = bob.next_message().await;
    assert_eq!(m["offset"], 6);
    assert!(m.get("from").is_none(), "{m}");
    assert!(
        bob.silent_for(Duration::from_millis(150)).await,
        "nothing else"
    );

    // Recovery carries `from` (it is stored with the message).
    let (mut carol, w) = Client::hello(
        &n.ws_url(),
        &n.token("carol", &["room:*"], &[]),
        json!({"room:f": {"offset": 0, "epoch": ""}}),
    )
    .await;
    assert_eq!(w["subscriptions"]["room:f"]["recovered"], true, "{w}");
    let froms: Vec<Value> = {
        let mut v = Vec::new();
        for _ in 0..6 {
            v.push(
                carol
                    .next_message()
                    .await
                    .get("from")
                    .cloned()
                    .unwrap_or(Value::Null),
            );
        }
        v
    };
    assert_eq!(
        froms,
        vec![
            json!("alice"),
            json!("alice"),
            json!("notifier"),
            Value::Null,
            json!("svc.a"),
            Value::Null
        ]
    );
    // So does the history API.
    let (status, h) = n.get("/v1/channels/room:f/history").await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(
        h["messages"][0],
        json!({"offset": 1, "from": "alice", "data": {"text": "hi"}})
    );
    assert_eq!(
        h["messages"][3],
        json!({"offset": 4, "data": 4}),
        "no `from` key"
    );
    alice.close().await;
    bob.close().await;
    carol.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_from_is_set_by_the_server_and_stored() {
    let n = start(config()).await;
    socket_publish_carries_the_publisher(&n).await;
    assert_no_server_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_from_is_set_by_the_server_and_stored() {
    let redis = RedisServer::start();
    let n = start(redis_config(&redis, "from:")).await;
    socket_publish_carries_the_publisher(&n).await;
    assert_no_server_panic();
}
