//! Limits per user, not per socket (docs/operations.md "Limits per user"): one token
//! that reconnects in a loop gets its user's connect and subscribe rates on a node, not
//! a fresh allowance per connection, and the Redis work it causes stays bounded. The
//! budgets' table is bounded, and a drain that moves every connection of a user to
//! another node fits in the bursts.

#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;
#[path = "support/panics.rs"]
mod panics;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use client::{Client, Closed};
use herald_server::Config;
use node::TestNode;
use panics::assert_no_server_panic;
use redis_server::RedisServer;
use serde_json::{json, Value};

/// Resumed channels per hello in the loop.
const RESUMED: usize = 10;

/// What a reconnect loop got.
#[derive(Debug, Default)]
struct Looped {
    /// Hellos answered with `welcome`.
    welcomed: u64,
    /// Hellos closed 4429.
    refused: u64,
    /// Resumed channels subscribed (the personal channel not counted).
    resumed: u64,
    /// Resumed channels answered `rate_limited`.
    limited: u64,
}

/// One connection after the other with one token for `run`, each resuming
/// [`RESUMED`] channels and leaving at once.
async fn reconnect_loop(url: String, token: String, run: Duration) -> Looped {
    let mut resume = serde_json::Map::new();
    for i in 0..RESUMED {
        resume.insert(format!("room:{i}"), json!({"offset": 0, "epoch": ""}));
    }
    let hello = json!({"type": "hello", "token": token, "resume": resume});
    let mut got = Looped::default();
    let end = Instant::now() + run;
    while Instant::now() < end {
        let mut c = Client::connect(&url).await;
        c.send(hello.clone()).await;
        match c.recv_wire(Duration::from_secs(5)).await {
            Ok(w) if w["type"] == "welcome" => {
                got.welcomed += 1;
                let subs = w["subscriptions"].as_object().expect("subscriptions");
                got.resumed += subs.keys().filter(|k| k.starts_with("room:")).count() as u64;
                let errors = w["errors"].as_object().cloned().unwrap_or_default();
                for e in errors.values() {
                    assert_eq!(e["code"], "rate_limited", "{w}");
                    got.limited += 1;
                }
                c.close().await;
            }
            Err(Closed::Code(4429)) => got.refused += 1,
            other => panic!("unexpected answer to hello: {other:?}"),
        }
    }
    got
}

/// Two connections of one user reconnecting in a loop (the shape of the report: 2
/// connections per user), summed.
async fn two_loops(n: &TestNode, run: Duration) -> Looped {
    let token = n.token("mallory", &["room:*"], &[]);
    let loops: Vec<_> = (0..2)
        .map(|_| tokio::spawn(reconnect_loop(n.ws_url(), token.clone(), run)))
        .collect();
    let mut sum = Looped::default();
    for l in loops {
        let l = l.await.expect("loop");
        sum.welcomed += l.welcomed;
        sum.refused += l.refused;
        sum.resumed += l.resumed;
        sum.limited += l.limited;
    }
    sum
}

/// Commands Redis has processed so far.
fn redis_commands(redis: &RedisServer) -> u64 {
    let info = redis.cli(&["INFO", "stats"]);
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_commands_processed in INFO stats")
}

fn redis_config(redis: &RedisServer, prefix: &str) -> Config {
    Config {
        redis_url: Some(redis.url()),
        redis_prefix: format!("t{}:{prefix}:", std::process::id()),
        // Not the limit the loop runs into: its hellos may arrive before the server has
        // seen the previous connection go.
        max_connections_per_user: 3,
        max_subscriptions: 11,
        ..node::test_config()
    }
}

/// The report's measurement, bounded: 2 connections of one user reconnecting as fast
/// as they can, each resuming 10 channels. Without per-user budgets every connect
/// refills the allowance; with them the user gets its rates (connects 10/s, burst 4;
/// channels 20/s, burst 40), and Redis sees a small fraction of the commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_loop_gets_the_users_rate_not_one_per_connection() {
    let redis = RedisServer::start();
    let run = Duration::from_secs(3);

    // Without per-user budgets (the behaviour before them), for comparison.
    let unlimited = TestNode::start(Config {
        max_user_connects_per_min: 0,
        max_user_subscribes_per_sec: 0,
        ..redis_config(&redis, "unlimited")
    })
    .await;
    let before = redis_commands(&redis);
    let started = Instant::now();
    let free = two_loops(&unlimited, run).await;
    let free_secs = started.elapsed().as_secs_f64();
    let free_commands = redis_commands(&redis) - before;
    unlimited.shutdown().await;

    let limited = TestNode::start(Config {
        max_user_connects_per_min: 600,
        max_user_connect_burst: 4,
        max_user_subscribes_per_sec: 20,
        max_user_subscribe_burst: 40,
        ..redis_config(&redis, "limited")
    })
    .await;
    let before = redis_commands(&redis);
    let started = Instant::now();
    let got = two_loops(&limited, run).await;
    let secs = started.elapsed().as_secs_f64();
    let commands = redis_commands(&redis) - before;
    eprintln!(
        "without per-user budgets: {free:?} in {free_secs:.1} s, {:.0} resumed channels/s, \
         {:.0} Redis commands/s",
        free.resumed as f64 / free_secs,
        free_commands as f64 / free_secs
    );
    eprintln!(
        "with them: {got:?} in {secs:.1} s, {:.1} connects/s, {:.1} resumed channels/s, \
         {:.0} Redis commands/s",
        got.welcomed as f64 / secs,
        got.resumed as f64 / secs,
        commands as f64 / secs
    );

    // The rates hold for the user, however many connections it opens: burst + rate × t
    // (+1 for a token refilled while the last hello was on its way).
    let connects_bound = 4.0 + 10.0 * secs + 1.0;
    let resumed_bound = 40.0 + 20.0 * secs + 1.0;
    assert!(got.welcomed as f64 <= connects_bound, "{got:?}");
    assert!(got.resumed as f64 <= resumed_bound, "{got:?}");
    assert!(
        got.refused > 0 && got.limited > 0,
        "the loop hit both: {got:?}"
    );
    // And they are used, not just refused.
    assert!(got.welcomed >= 4 && got.resumed >= 40, "{got:?}");
    // Without them the same loop resumes many times more, which is what the bound
    // is for (the loop's speed depends on the machine, so only the direction is fixed).
    assert!(free.resumed > 4 * got.resumed, "{free:?} vs {got:?}");
    // The Redis work follows the budgets: a small fraction of the unbounded loop's.
    let per_sec = commands as f64 / secs;
    let free_per_sec = free_commands as f64 / free_secs;
    assert!(per_sec * 4.0 < free_per_sec, "{per_sec} vs {free_per_sec}");
    // Refused connects did no Redis work: what Redis saw is bounded by what was granted
    // (each connect and each channel a few commands, plus the node's own heartbeats).
    let granted = got.welcomed * 20 + got.resumed * 6 + 40 * secs.ceil() as u64;
    assert!(commands <= granted, "{commands} Redis commands for {got:?}");
    let refused = limited.metric("herald_user_limited_total").await;
    assert!(refused >= (got.refused + got.limited) as f64, "{refused}");
    limited.shutdown().await;
    assert_no_server_panic();
}

/// The budgets' table holds at most `HERALD_MAX_TRACKED_USERS` users; a newcomer to a
/// full table pushes out the user nearest to a full budget, never one who spent it.
#[tokio::test]
async fn the_budget_table_is_bounded() {
    let n = TestNode::start(Config {
        max_tracked_users: 4,
        max_connections_per_user: 2,
        // 0.1 connect per second: a spent budget stays spent through the test.
        max_user_connects_per_min: 6,
        max_user_connect_burst: 2,
        ..node::test_config()
    })
    .await;
    let tok = n.token("mallory", &[], &[]);
    for _ in 0..2 {
        Client::hello(&n.ws_url(), &tok, json!({}))
            .await
            .0
            .close()
            .await;
    }
    let mut c = Client::connect(&n.ws_url()).await;
    c.send(json!({"type": "hello", "token": tok})).await;
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await,
        Closed::Code(4429)
    );
    for i in 0..12 {
        let t = n.token(&format!("user{i}"), &[], &[]);
        let (c, w) = Client::hello(&n.ws_url(), &t, json!({})).await;
        assert_eq!(w["type"], "welcome", "a full table never refuses: {w}");
        c.close().await;
        let tracked = n.metric("herald_tracked_users").await;
        assert!((1.0..=4.0).contains(&tracked), "{tracked} users tracked");
    }
    // mallory spent the budget: newcomers pushed out users nearer to full instead.
    let mut c = Client::connect(&n.ws_url()).await;
    c.send(json!({"type": "hello", "token": tok})).await;
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await,
        Closed::Code(4429),
        "a full table must not refill a spent budget"
    );
    n.shutdown().await;
    assert_no_server_panic();
}

/// A drain moves every connection of a user at once. On the node they land on, the
/// bursts are at least what the user may hold there (connections per user, and as
/// many channels each as a connection may have), so even with strict rates every
/// connection is welcomed and resumes every channel.
#[tokio::test]
async fn a_drain_does_not_use_up_the_users_budget() {
    let strict = Config {
        max_connections_per_user: 4,
        max_subscriptions: 6,
        // Far below what the move needs: only the bursts can let it through.
        max_user_connects_per_min: 1,
        max_user_connect_burst: 1,
        max_user_subscribes_per_sec: 1,
        max_user_subscribe_burst: 1,
        ..node::test_config()
    };
    let mut a = TestNode::start(strict.clone()).await;
    let b = TestNode::start(strict).await;
    let tok = a.token("alice", &["room:*"], &[]);
    let mut resume = serde_json::Map::new();
    for i in 0..5 {
        resume.insert(format!("room:{i}"), json!({"offset": 0, "epoch": ""}));
    }
    let resume = Value::Object(resume);
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (c, w) = Client::hello(&a.ws_url(), &tok, resume.clone()).await;
        assert_eq!(w["subscriptions"].as_object().unwrap().len(), 6, "{w}");
        clients.push(c);
    }
    let stopping = a.begin_shutdown();
    for c in &mut clients {
        assert_eq!(
            c.expect_close(Duration::from_secs(5)).await,
            Closed::Code(4503)
        );
    }
    // All four at once, as after a drain.
    let hellos: Vec<_> = (0..4)
        .map(|_| {
            let (url, tok, resume) = (b.ws_url(), tok.clone(), resume.clone());
            tokio::spawn(async move { Client::hello(&url, &tok, resume).await })
        })
        .collect();
    for h in hellos {
        let (_c, w) = h.await.expect("hello");
        assert_eq!(w["subscriptions"].as_object().unwrap().len(), 6, "{w}");
        assert!(w["errors"].as_object().is_none_or(|e| e.is_empty()), "{w}");
    }
    assert_eq!(b.metric("herald_user_limited_total").await, 0.0);
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .expect("drained in time")
        .expect("node task");
    b.shutdown().await;
    assert_no_server_panic();
}

/// `subscribe` on `c`; the reply.
async fn subscribe(c: &mut Client, channel: &str) -> Value {
    c.request(json!({"type": "subscribe", "channel": channel}))
        .await
}

/// A `subscribe` draws on the user's budget as a resumed channel does, across
/// connections; over it the reply is `rate_limited` and the connection stays open.
/// Server subscribes through the API draw nothing.
#[tokio::test]
async fn subscribes_share_the_users_budget_across_connections() {
    let n = TestNode::start(Config {
        max_connections_per_user: 1,
        max_subscriptions: 4,
        // A burst of 4 (the floor: 1 connection × 4 channels), refilling once a second.
        max_user_subscribes_per_sec: 1,
        max_user_subscribe_burst: 1,
        ..node::test_config()
    })
    .await;
    let tok = n.token("alice", &["room:*"], &[]);
    let (mut a, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    for ch in ["room:1", "room:2"] {
        let r = subscribe(&mut a, ch).await;
        assert!(r["result"].is_object(), "{r}");
    }
    // Refused for the permission: nothing drawn.
    let r = subscribe(&mut a, "secret:1").await;
    assert_eq!(r["error"]["code"], "forbidden", "{r}");
    a.close().await;
    // A new connection of the same user has what is left: 2, not a fresh 4.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut b = loop {
        let mut c = Client::connect(&n.ws_url()).await;
        c.send(json!({"type": "hello", "token": tok})).await;
        match c.recv_wire(Duration::from_secs(5)).await {
            Ok(w) if w["type"] == "welcome" => break c,
            // The node has not seen the first connection go yet (one per user).
            other => assert!(Instant::now() < deadline, "not admitted: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut refused = 0;
    for ch in ["room:3", "room:4", "room:5"] {
        let r = subscribe(&mut b, ch).await;
        if r["error"]["code"] == "rate_limited" {
            refused += 1;
        } else {
            assert!(r["result"].is_object(), "{r}");
        }
    }
    // Two tokens were left (one more may have refilled if the machine was slow).
    assert!(refused >= 1, "a reconnect refilled the budget");
    for ch in ["room:3", "room:4"] {
        b.request(json!({"type": "unsubscribe", "channel": ch}))
            .await;
    }
    // The backend's subscribe is not the client's: it joins whatever the budget says.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/users/alice/subscribe", n.http()))
        .bearer_auth(node::API_KEY)
        .json(&json!({"channel": "room:granted"}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("API call");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["sessions"], 1, "{v}");
    // The budget refills: a refused subscribe succeeds a moment later.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = subscribe(&mut b, "room:6").await;
        if r["result"].is_object() {
            break;
        }
        assert_eq!(r["error"]["code"], "rate_limited", "{r}");
        assert!(Instant::now() < deadline, "never refilled");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    n.shutdown().await;
    assert_no_server_panic();
}
