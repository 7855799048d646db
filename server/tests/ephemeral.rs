//! Ephemeral messages (`"ephemeral":true`), through real sockets on real nodes.
//!
//! - Delivered only to the sessions subscribed at that moment, as
//!   `{"type":"message","channel":…,"ephemeral":true,"from":…,"data":…}` (no offset, no
//!   epoch), on every node of a cluster.
//! - Never stored: not in history, not recovered by `since` or `resume`, no broker
//!   state created (no Redis key, no memory stream).
//! - The channel's ordinary messages are undisturbed: offsets continue without a gap,
//!   no `resync`.
//! - `from` is the publisher's user for a socket publish (a client cannot forge it);
//!   the API may set it.
//! - Bounds: the ephemeral rate (`max_ephemeral_per_sec`) and the general command
//!   rate; bad input is `bad_request`.
//!
//! Memory broker, two nodes on one Redis, and two nodes on a Redis Cluster.

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
use node::{TestNode, API_KEY};
use panics::{assert_no_server_panic, watch_panics};
use redis_server::{RedisCluster, RedisServer};
use serde_json::{json, Value};

/// Generous: the machine is shared.
const WAIT: Duration = Duration::from_secs(30);
/// How long a client must see nothing to count as "not delivered".
const QUIET: Duration = Duration::from_millis(500);

fn config() -> Config {
    Config {
        // The bursts below send as fast as the node answers; the rate test sets its own.
        max_ephemeral_per_sec: 1_000_000,
        max_messages_per_sec: 1_000_000,
        ..node::test_config()
    }
}

fn redis_config(url: String, prefix: &str) -> Config {
    Config {
        redis_url: Some(url),
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
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn publisher_token(n: &TestNode) -> String {
    n.token("alice", &["room:*"], &["room:*"])
}

fn reader_token(n: &TestNode, user: &str) -> String {
    n.token(user, &["room:*"], &[])
}

async fn subscribe(c: &mut Client, channel: &str) -> Value {
    let r = c
        .request(json!({"type": "subscribe", "channel": channel}))
        .await;
    assert!(r["result"].is_object(), "{r}");
    r["result"].clone()
}

async fn publish(c: &mut Client, channel: &str, data: Value, ephemeral: bool) -> Value {
    let mut cmd = json!({"type": "publish", "channel": channel, "data": data});
    if ephemeral {
        cmd["ephemeral"] = json!(true);
    }
    c.request(cmd).await
}

/// The whole contract on `nodes`: alice publishes on the first node, bob reads on the
/// last one, carol joins later on the last one.
async fn ephemeral_contract(nodes: &[&TestNode]) {
    let (first, last) = (nodes[0], nodes[nodes.len() - 1]);
    let (mut alice, _) = Client::hello(&first.ws_url(), &publisher_token(first), json!({})).await;
    let (mut bob, _) = Client::hello(&last.ws_url(), &reader_token(last, "bob"), json!({})).await;
    subscribe(&mut bob, "room:1").await;

    let r = publish(&mut alice, "room:1", json!({"n": 1}), false).await;
    let epoch = r["result"]["epoch"].clone();
    assert_eq!(r["result"]["offset"], 1, "{r}");
    // A client-sent `from` is ignored: the server sets the publisher.
    let r = alice
        .request(
            json!({"type": "publish", "channel": "room:1", "data": {"typing": true},
                        "ephemeral": true, "from": "mallory"}),
        )
        .await;
    assert_eq!(r["result"], json!({"ephemeral": true}), "{r}");
    let r = publish(&mut alice, "room:1", json!({"n": 2}), false).await;
    assert_eq!(
        r["result"]["offset"], 2,
        "the ephemeral took no offset: {r}"
    );

    let m = bob.next_message().await;
    assert_eq!(
        (m["offset"].clone(), m["data"].clone()),
        (json!(1), json!({"n": 1})),
        "{m}"
    );
    let e = bob.next_message().await;
    assert_eq!(
        e,
        json!({"type": "message", "channel": "room:1", "ephemeral": true, "from": "alice",
               "data": {"typing": true}}),
    );
    let m = bob.next_message().await;
    assert_eq!(m["type"], "message", "no resync: {m}");
    assert_eq!(
        (m["offset"].clone(), m["epoch"].clone(), m.get("ephemeral")),
        (json!(2), epoch.clone(), None),
        "{m}"
    );

    // Carol was not subscribed at that moment: recovering from 0 gives the two
    // ordinary messages and nothing else.
    let (mut carol, _) =
        Client::hello(&last.ws_url(), &reader_token(last, "carol"), json!({})).await;
    let r = carol
        .request(
            json!({"type": "subscribe", "channel": "room:1", "since": {"offset": 0, "epoch": ""}}),
        )
        .await;
    assert_eq!(r["result"]["recovered"], true, "{r}");
    assert_eq!(carol.next_message().await["offset"], 1);
    assert_eq!(carol.next_message().await["offset"], 2);
    assert!(carol.silent_for(QUIET).await, "nothing more is recovered");

    // Bob leaves; an ephemeral meanwhile is gone for good: a resume gets nothing of it.
    bob.close().await;
    let r = publish(&mut alice, "room:1", json!("while away"), true).await;
    assert_eq!(r["result"], json!({"ephemeral": true}), "{r}");
    let resume = json!({"room:1": {"offset": 2, "epoch": epoch}});
    let (mut bob, w) = Client::hello(&last.ws_url(), &reader_token(last, "bob"), resume).await;
    assert_eq!(w["subscriptions"]["room:1"]["recovered"], true, "{w}");
    assert_eq!(w["subscriptions"]["room:1"]["offset"], 2, "{w}");
    assert!(
        bob.silent_for(QUIET).await,
        "an ephemeral is never recovered"
    );
    // Carol (subscribed now) did get that one.
    let e = carol.next_message().await;
    assert_eq!(
        (e["ephemeral"].clone(), e["data"].clone()),
        (json!(true), json!("while away")),
        "{e}"
    );

    // History holds the two ordinary messages only.
    let (status, h) = first.get("/v1/channels/room:1/history").await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["offset"], 2, "{h}");
    let offsets: Vec<Value> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].clone())
        .collect();
    assert_eq!(offsets, vec![json!(1), json!(2)], "{h}");

    // API publish: `from` as the backend says, no offset in the answer.
    let (status, r) = first
        .publish(json!({"channel": "room:1", "data": {"x": 1}, "ephemeral": true, "from": "bot"}))
        .await;
    assert_eq!(
        (status, r.clone()),
        (200, json!({"channel": "room:1", "ephemeral": true}))
    );
    for c in [&mut bob, &mut carol] {
        let e = c.next_message().await;
        assert_eq!(
            e,
            json!({"type": "message", "channel": "room:1", "ephemeral": true, "from": "bot", "data": {"x": 1}})
        );
    }
    let r = publish(&mut alice, "room:1", json!({"n": 3}), false).await;
    assert_eq!(r["result"]["offset"], 3, "{r}");
    for c in [&mut bob, &mut carol] {
        let m = c.next_message().await;
        assert_eq!(
            (m["type"].clone(), m["offset"].clone()),
            (json!("message"), json!(3)),
            "{m}"
        );
    }
    for c in [alice, bob, carol] {
        c.close().await;
    }
}

/// An ephemeral to a channel never published to, with a subscriber: delivered, and no
/// state created (the caller checks the broker).
async fn ephemeral_only_channel(n: &TestNode, reader: &TestNode, channel: &str) {
    let (mut alice, _) = Client::hello(&n.ws_url(), &publisher_token(n), json!({})).await;
    let (mut bob, _) =
        Client::hello(&reader.ws_url(), &reader_token(reader, "bob"), json!({})).await;
    assert_eq!(subscribe(&mut bob, channel).await["offset"], 0);
    for i in 0..20 {
        let r = publish(&mut alice, channel, json!(i), true).await;
        assert_eq!(r["result"], json!({"ephemeral": true}), "{r}");
    }
    for i in 0..20 {
        assert_eq!(bob.next_message().await["data"], json!(i));
    }
    let (_, h) = n.get(&format!("/v1/channels/{channel}/history")).await;
    assert_eq!(
        (h["offset"].clone(), h["epoch"].clone()),
        (json!(0), json!("")),
        "{h}"
    );
    alice.close().await;
    bob.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_node_delivers_ephemeral_to_current_subscribers_only() {
    let n = start(config()).await;
    ephemeral_contract(&[&n]).await;
    ephemeral_only_channel(&n, &n, "room:typing").await;
    // Only room:1 has a stream: the ephemeral-only channel created none.
    n.publish(json!({"channel": "room:marker", "data": 1}))
        .await;
    let streams = eventually("the streams gauge counts the marker", async || {
        let v = n.metric("herald_memory_streams").await;
        (v >= 2.0).then_some(v)
    })
    .await;
    assert_eq!(streams, 2.0);
    assert!(n.metric("herald_ephemeral_published_total").await >= 23.0);
    assert!(n.metric("herald_ephemeral_delivered_total").await >= 24.0);
    assert_eq!(n.metric("herald_resyncs_total").await, 0.0);
    assert_no_server_panic();
}

/// Keys under `prefix` that belong to `channel`'s stream (offset/epoch or history).
fn stream_keys(keys: &[String], channel: &str) -> Vec<String> {
    keys.iter()
        .filter(|k| k.contains(&format!("{{{channel}}}:")))
        .cloned()
        .collect()
}

fn redis_keys(redis: &RedisServer, prefix: &str) -> Vec<String> {
    redis
        .cli(&["--scan", "--pattern", &format!("{prefix}*")])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_redis_route_ephemeral_without_storing_it() {
    let redis = RedisServer::start();
    let prefix = "eph:";
    let a = start(redis_config(redis.url(), prefix)).await;
    let b = start(redis_config(redis.url(), prefix)).await;
    ephemeral_contract(&[&a, &b]).await;
    ephemeral_only_channel(&a, &b, "room:typing").await;
    let keys = redis_keys(&redis, prefix);
    assert!(
        stream_keys(&keys, "room:typing").is_empty(),
        "an ephemeral creates no stream key: {keys:?}"
    );
    assert_eq!(stream_keys(&keys, "room:1").len(), 2, "{keys:?}");
    // The offset key still says 3: ephemerals did not move it.
    let (_, h) = b.get("/v1/channels/room:1/history").await;
    assert_eq!(h["offset"], 3, "{h}");

    // Exactly no key: the key set before and after a burst of ephemerals is the same
    // (the sessions' presence is written before the snapshot).
    let (mut alice, _) = Client::hello(&a.ws_url(), &publisher_token(&a), json!({})).await;
    let (mut bob, _) = Client::hello(&b.ws_url(), &reader_token(&b, "bob"), json!({})).await;
    subscribe(&mut bob, "room:burst").await;
    // Presence is written in the background (batched): wait for all three keys.
    let before = eventually(
        "alice's, bob's and room:burst's presence is stored",
        async || {
            let keys = redis_keys(&redis, prefix);
            [
                "presence:{room:burst}",
                "presence:{user:alice}",
                "presence:{user:bob}",
            ]
            .iter()
            .all(|want| keys.iter().any(|k| k.contains(want)))
            .then_some(keys)
        },
    )
    .await;
    redis.cli(&["config", "resetstat"]);
    const BURST: usize = 200;
    for i in 0..BURST {
        let r = publish(&mut alice, "room:burst", json!({"typing": i}), true).await;
        assert_eq!(r["result"], json!({"ephemeral": true}), "{r}");
    }
    for i in 0..BURST {
        assert_eq!(bob.next_message().await["data"], json!({"typing": i}));
    }
    let stats = redis.cli(&["info", "commandstats"]);
    for i in 0..BURST {
        let r = publish(&mut alice, "room:burst", json!({"n": i}), false).await;
        assert_eq!(r["result"]["offset"], i + 1, "{r}");
    }
    let after_ordinary = redis.cli(&["info", "commandstats"]);
    let mut after = redis_keys(&redis, prefix);
    let mut before = before;
    // The ordinary burst created the stream's two keys, nothing else did.
    after.retain(|k| !k.contains("{room:burst}:"));
    before.sort();
    after.sort();
    assert_eq!(before, after, "ephemerals wrote no key");
    eprintln!(
        "measured: Redis per ephemeral publish: {}; per ordinary publish (script): {}",
        command_stat(&stats, "publish"),
        command_stat(&after_ordinary, "evalsha")
    );
    alice.close().await;
    bob.close().await;
    for n in [&a, &b] {
        assert_eq!(n.metric("herald_resyncs_total").await, 0.0);
        assert_eq!(n.metric("herald_gaps_repaired_total").await, 0.0);
    }
    assert_no_server_panic();
}

/// `calls=…,usec_per_call=…` of one command from `INFO commandstats`.
fn command_stat(info: &str, command: &str) -> String {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("cmdstat_{command}:")))
        .map(|rest| {
            rest.split(',')
                .filter(|f| f.starts_with("calls=") || f.starts_with("usec_per_call="))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_else(|| "none".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_redis_cluster_route_ephemeral_with_sharded_pubsub() {
    let cluster = RedisCluster::start();
    let prefix = "ephc:";
    let a = start(redis_config(cluster.url(), prefix)).await;
    let b = start(redis_config(cluster.url(), prefix)).await;
    ephemeral_contract(&[&a, &b]).await;
    ephemeral_only_channel(&a, &b, "room:typing").await;
    let keys: Vec<String> = cluster
        .cli_all(&["--scan", "--pattern", &format!("{prefix}*")])
        .iter()
        .flat_map(|out| {
            out.lines()
                .map(str::trim)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|l| !l.is_empty())
        .collect();
    assert!(stream_keys(&keys, "room:typing").is_empty(), "{keys:?}");
    assert_no_server_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_rate_has_its_own_bound_and_counts_against_the_command_rate() {
    let n = start(Config {
        max_ephemeral_per_sec: 3,
        max_messages_per_sec: 1_000,
        ..node::test_config()
    })
    .await;
    let (mut alice, _) = Client::hello(&n.ws_url(), &publisher_token(&n), json!({})).await;
    let mut codes = Vec::new();
    for i in 0..6 {
        let r = publish(&mut alice, "room:1", json!(i), true).await;
        codes.push(r["error"]["code"].as_str().unwrap_or("ok").to_owned());
    }
    // A burst of 3, then refusals (the bucket refills 3 per second; the loop is far
    // faster than 333 ms per publish even on a busy machine, but allow one refill).
    let ok = codes.iter().filter(|c| *c == "ok").count();
    assert!((3..=4).contains(&ok), "{codes:?}");
    assert_eq!(codes[..3], ["ok", "ok", "ok"], "{codes:?}");
    assert!(
        codes.iter().skip(3).any(|c| c == "rate_limited"),
        "{codes:?}"
    );
    // Ordinary publishes have their own budget: still fine, and the session is open.
    let r = publish(&mut alice, "room:1", json!("ordinary"), false).await;
    assert_eq!(r["result"]["offset"], 1, "{r}");
    // The bucket refills: an ephemeral goes through again within a second or so.
    eventually("the ephemeral bucket refills", async || {
        let r = publish(&mut alice, "room:1", json!("again"), true).await;
        (r["result"] == json!({"ephemeral": true})).then_some(())
    })
    .await;
    assert!(n.metric("herald_rate_limited_total").await >= 1.0);
    alice.close().await;

    // The general command rate applies to ephemeral publishes too.
    let n = start(Config {
        max_ephemeral_per_sec: 1_000,
        max_messages_per_sec: 4,
        ..node::test_config()
    })
    .await;
    let (mut alice, _) = Client::hello(&n.ws_url(), &publisher_token(&n), json!({})).await;
    let mut refused = 0;
    for i in 0..6 {
        let r = publish(&mut alice, "room:1", json!(i), true).await;
        if r["error"]["code"] == "rate_limited" {
            refused += 1;
        }
    }
    assert!(refused >= 1, "the command rate refused some");
    alice.close().await;
    assert_no_server_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_forbidden_ephemeral_publishes_get_error_replies() {
    let n = start(config()).await;
    let (mut alice, _) = Client::hello(&n.ws_url(), &publisher_token(&n), json!({})).await;
    for wrong in [json!("yes"), json!(1), json!({}), json!([true])] {
        let r = alice
            .request(json!({"type": "publish", "channel": "room:1", "data": 1, "ephemeral": wrong}))
            .await;
        assert_eq!(r["error"]["code"], "bad_request", "{r}");
    }
    // Same permission as an ordinary publish.
    let r = publish(&mut alice, "news:1", json!(1), true).await;
    assert_eq!(r["error"]["code"], "forbidden", "{r}");
    let (mut bob, _) = Client::hello(&n.ws_url(), &reader_token(&n, "bob"), json!({})).await;
    let r = publish(&mut bob, "room:1", json!(1), true).await;
    assert_eq!(r["error"]["code"], "forbidden", "{r}");
    // The connection stays open and works.
    let r = publish(&mut alice, "room:1", json!(1), true).await;
    assert_eq!(r["result"], json!({"ephemeral": true}), "{r}");

    // HTTP: key required, bad types refused, size limit as for ordinary publishes.
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/publish", n.http()))
        .json(&json!({"channel": "room:1", "data": 1, "ephemeral": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let (status, r) = n
        .publish(json!({"channel": "room:1", "data": 1, "ephemeral": "yes"}))
        .await;
    assert_eq!(status, 400, "{r}");
    let (status, r) = n
        .publish(json!({"channel": "room:1", "data": 1, "ephemeral": true, "from": "bad:id"}))
        .await;
    assert_eq!(status, 400, "{r}");
    let big = "x".repeat(n.config.max_publish_bytes + 1);
    let (status, r) = n
        .publish(json!({"channel": "room:1", "data": big, "ephemeral": true}))
        .await;
    assert_eq!(status, 413, "{r}");
    // Batches accept ephemeral items, answered without an offset.
    let r: Value = http
        .post(format!("{}/v1/publish/batch", n.http()))
        .bearer_auth(API_KEY)
        .json(&json!({"messages": [
            {"channel": "room:b", "data": 1},
            {"channel": "room:b", "data": 2, "ephemeral": true},
            {"channel": "room:b", "data": 3},
        ]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let results = r["results"].as_array().unwrap();
    assert_eq!(results[0]["offset"], 1, "{r}");
    assert_eq!(
        results[1],
        json!({"channel": "room:b", "ephemeral": true}),
        "{r}"
    );
    assert_eq!(results[2]["offset"], 2, "{r}");
    alice.close().await;
    bob.close().await;
    assert_no_server_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_drops_ephemerals_instead_of_being_closed() {
    const COUNT: usize = 300;
    let n = start(Config {
        session_queue: 8,
        write_timeout_ms: 60_000,
        ..config()
    })
    .await;
    let (mut slow, _) = Client::hello(&n.ws_url(), &reader_token(&n, "slow"), json!({})).await;
    subscribe(&mut slow, "room:big").await;
    // The client stops reading; 32 KiB ephemerals fill its socket buffers, then its
    // queue, whose second half they may not take.
    let pad = "p".repeat(32 * 1024);
    for i in 0..COUNT {
        let (status, r) = n
            .publish(
                json!({"channel": "room:big", "data": {"i": i, "pad": pad}, "ephemeral": true}),
            )
            .await;
        assert_eq!(status, 200, "{r}");
    }
    let dropped = eventually("ephemerals dropped for the stalled reader", async || {
        let v = n.metric("herald_ephemeral_dropped_total").await;
        (v >= 1.0).then_some(v)
    })
    .await;
    // The queue still has room for ordinary messages: this one is not lost and the
    // session is not closed.
    let (status, r) = n
        .publish(json!({"channel": "room:big", "data": "ordinary"}))
        .await;
    assert_eq!(status, 200, "{r}");
    let mut ephemerals = 0;
    loop {
        let v = slow.next_message().await;
        if v.get("ephemeral").is_some() {
            ephemerals += 1;
            continue;
        }
        assert_eq!(
            (v["offset"].clone(), v["data"].clone()),
            (json!(1), json!("ordinary")),
            "{v}"
        );
        break;
    }
    eprintln!("measured: stalled reader got {ephemerals} of {COUNT} ephemerals; {dropped} dropped");
    assert!(ephemerals < COUNT);
    assert_eq!(
        n.metric("herald_slow_consumer_disconnects_total").await,
        0.0
    );
    // Still open and working.
    let r = slow
        .request(json!({"type": "presence", "channel": "room:big"}))
        .await;
    assert!(r["result"]["users"]["slow"].is_number(), "{r}");
    slow.close().await;
    assert_no_server_panic();
}
