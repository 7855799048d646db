//! Recovery is bounded: one `hello` or one `subscribe` recovers at
//! most `HERALD_MAX_RECOVERY_BYTES` of message data. A channel that does not fit is not
//! recovered at all and the reply says so (`recovered: false`, with the current
//! position): never a silent gap. Resume entries take tokens of the command rate.

#[path = "support/bystander.rs"]
mod bystander;
#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;
#[path = "support/panics.rs"]
mod panics;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::time::Duration;

use bystander::{assert_undisturbed, node_and_watcher};
use client::Client;
use herald_server::Config;
use node::TestNode;
use panics::assert_no_server_panic;
use redis_server::RedisServer;
use serde_json::{json, Value};

/// Data of about 1,000 bytes.
fn kilobyte(i: usize) -> Value {
    json!({"i": i, "pad": "k".repeat(980)})
}

/// Publishes `count` messages of about 1 KB to `channel`; returns the epoch.
async fn fill(n: &TestNode, channel: &str, count: usize) -> String {
    let mut epoch = String::new();
    for i in 0..count {
        let (status, body) = n
            .publish(json!({"channel": channel, "data": kilobyte(i)}))
            .await;
        assert_eq!(status, 200, "{body}");
        epoch = body["epoch"].as_str().unwrap().to_owned();
    }
    epoch
}

/// Reads the messages of `channel` that arrive within a short while.
async fn offsets_of(c: &mut Client, channel: &str, want: usize) -> Vec<u64> {
    let mut seen = Vec::new();
    while seen.len() < want {
        let m = c.next_message().await;
        if m["type"] == "message" && m["channel"] == channel {
            seen.push(m["offset"].as_u64().unwrap());
        }
    }
    seen
}

fn budget_config() -> Config {
    Config {
        max_recovery_bytes: 12_000,
        ..node::test_config()
    }
}

async fn subscribe_over_budget(n: &TestNode, w: &mut Client) {
    let epoch_a = fill(n, "room:a", 5).await; // ~5 KB: fits
    let epoch_b = fill(n, "room:b", 20).await; // ~20 KB: does not
    let tok = n.token("alice", &["room:*"], &[]);
    let (mut a, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    let r = a
        .request(json!({"type": "subscribe", "channel": "room:a",
                        "since": {"offset": 0, "epoch": epoch_a}}))
        .await;
    assert_eq!(r["result"]["recovered"], true, "{r}");
    assert_eq!(offsets_of(&mut a, "room:a", 5).await, vec![1, 2, 3, 4, 5]);
    // Each subscribe has a budget of its own: room:b alone is over it.
    let r = a
        .request(json!({"type": "subscribe", "channel": "room:b",
                        "since": {"offset": 0, "epoch": epoch_b}}))
        .await;
    assert_eq!(r["result"]["recovered"], false, "{r}");
    assert_eq!(r["result"]["offset"], 20, "the current position: {r}");
    assert_eq!(r["result"]["epoch"], epoch_b.as_str());
    assert!(
        a.silent_for(Duration::from_millis(300)).await,
        "nothing of room:b was recovered"
    );
    // Live messages go on from the current position.
    n.publish(json!({"channel": "room:b", "data": "live"}))
        .await;
    let m = a.next_message().await;
    assert_eq!(
        (m["channel"].as_str(), m["offset"].as_u64()),
        (Some("room:b"), Some(21))
    );
    assert!(n.metric("herald_recovery_over_budget_total").await >= 1.0);
    assert_undisturbed(n, w).await;
}

#[tokio::test]
async fn a_subscribe_recovers_within_its_budget_or_says_it_did_not() {
    let (n, mut w) = node_and_watcher(budget_config()).await;
    subscribe_over_budget(&n, &mut w).await;
    assert_no_server_panic();
}

/// The same on Redis, where the recovered history is copied out of the broker.
#[tokio::test]
async fn a_subscribe_recovers_within_its_budget_on_redis() {
    let redis = RedisServer::start();
    let config = Config {
        redis_url: Some(redis.url()),
        redis_prefix: format!("rb{}:", std::process::id()),
        ..budget_config()
    };
    let (n, mut w) = node_and_watcher(config).await;
    subscribe_over_budget(&n, &mut w).await;
    assert_no_server_panic();
}

#[tokio::test]
async fn a_hello_resume_shares_one_budget_and_is_honest_about_the_rest() {
    let (n, mut w) = node_and_watcher(budget_config()).await;
    let epoch_a = fill(&n, "room:a", 5).await;
    let epoch_b = fill(&n, "room:b", 5).await;
    let epoch_c = fill(&n, "room:c", 5).await;
    let tok = n.token("alice", &["room:*"], &[]);
    // ~15 KB asked for, 12 KB allowed: in name order, a and b fit, c does not.
    let resume = json!({
        "room:a": {"offset": 0, "epoch": epoch_a},
        "room:b": {"offset": 0, "epoch": epoch_b},
        "room:c": {"offset": 0, "epoch": epoch_c},
    });
    let (mut a, welcome) = Client::hello(&n.ws_url(), &tok, resume).await;
    let subs = &welcome["subscriptions"];
    assert_eq!(subs["room:a"]["recovered"], true, "{welcome}");
    assert_eq!(subs["room:b"]["recovered"], true, "{welcome}");
    assert_eq!(subs["room:c"]["recovered"], false, "{welcome}");
    assert_eq!(subs["room:c"]["offset"], 5, "{welcome}");
    let mut seen = Vec::new();
    for _ in 0..10 {
        let m = a.next_message().await;
        seen.push((
            m["channel"].as_str().unwrap().to_owned(),
            m["offset"].as_u64().unwrap(),
        ));
    }
    let want: Vec<(String, u64)> = ["room:a", "room:b"]
        .iter()
        .flat_map(|c| (1..=5).map(move |o| (c.to_string(), o)))
        .collect();
    assert_eq!(seen, want);
    assert!(
        a.silent_for(Duration::from_millis(300)).await,
        "nothing of room:c"
    );
    // room:c is subscribed, from its current position.
    n.publish(json!({"channel": "room:c", "data": "live"}))
        .await;
    let m = a.next_message().await;
    assert_eq!(
        (m["channel"].as_str(), m["offset"].as_u64()),
        (Some("room:c"), Some(6))
    );
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

#[tokio::test]
async fn resume_entries_take_tokens_of_the_command_rate() {
    let config = Config {
        max_messages_per_sec: 5,
        ..node::test_config()
    };
    let (n, mut w) = node_and_watcher(config).await;
    let tok = n.token("alice", &["room:*"], &[]);
    let mut resume = serde_json::Map::new();
    for i in 0..8 {
        resume.insert(format!("room:{i}"), json!({"offset": 0, "epoch": "x"}));
    }
    // The personal channel is free; the other entries take one token each.
    resume.insert("user:alice".into(), json!({"offset": 0, "epoch": "x"}));
    let (mut a, welcome) = Client::hello(&n.ws_url(), &tok, Value::Object(resume)).await;
    let subs = welcome["subscriptions"].as_object().unwrap();
    let errors = welcome["errors"].as_object().unwrap();
    assert_eq!(subs.len(), 6, "user:alice and 5 rooms: {welcome}");
    assert_eq!(errors.len(), 3, "{welcome}");
    for (channel, e) in errors {
        assert!(channel.starts_with("room:"), "{welcome}");
        assert_eq!(e["code"], "rate_limited", "{welcome}");
    }
    // The bucket is empty but the connection is open; it refills.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let missing = errors.keys().next().unwrap().clone();
    loop {
        let r = a
            .request(json!({"type": "subscribe", "channel": missing}))
            .await;
        if r["result"].is_object() {
            break;
        }
        assert_eq!(r["error"]["code"], "rate_limited", "{r}");
        assert!(tokio::time::Instant::now() < deadline, "never allowed: {r}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}
