//! The server API's answers are exact under concurrency: concurrent
//! `POST /v1/users/{user}/subscribe|unsubscribe|disconnect` calls together report as
//! many sessions as they changed, on one node (memory broker) and on two nodes over
//! Redis, with the calls entering at both.

#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;
#[path = "support/panics.rs"]
mod panics;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::collections::BTreeMap;
use std::time::Duration;

use client::{Client, Closed};
use herald_server::Config;
use node::TestNode;
use panics::assert_no_server_panic;
use redis_server::RedisServer;
use serde_json::{json, Value};

/// Concurrent calls per round.
const CALLS: usize = 16;

/// `POST {http}{path}` with the API key; the answer's `sessions`.
async fn post(http: String, path: String, body: Value) -> u64 {
    let r = reqwest::Client::new()
        .post(format!("{http}{path}"))
        .bearer_auth(node::API_KEY)
        .json(&body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("API call");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("JSON");
    v["sessions"].as_u64().expect("sessions")
}

/// The calls of one round, entering at the nodes in turn, all at once; the sum of
/// their answers.
async fn concurrently(nodes: &[TestNode], op: &str, bodies: Vec<Value>) -> u64 {
    let calls: Vec<_> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let http = nodes[i % nodes.len()].http();
            tokio::spawn(post(http, format!("/v1/users/alice/{op}"), body))
        })
        .collect();
    let mut sum = 0;
    for c in calls {
        sum += c.await.expect("call");
    }
    sum
}

/// Frames of `kind` each client received, by channel, until it has been quiet a while.
async fn received(clients: &mut [Client], kind: &str) -> BTreeMap<String, u64> {
    let mut seen = BTreeMap::new();
    for c in clients.iter_mut() {
        while !c.silent_for(Duration::from_millis(300)).await {
            let f = c.recv().await;
            if f["type"] == kind {
                *seen
                    .entry(f["channel"].as_str().unwrap().to_owned())
                    .or_insert(0) += 1;
            }
        }
    }
    seen
}

fn total(seen: &BTreeMap<String, u64>) -> u64 {
    seen.values().sum()
}

/// alice has three sessions (spread over `nodes`), each with room for two channels
/// besides its personal one.
async fn scenario(nodes: &[TestNode]) {
    let tok = nodes[0].token("alice", &[], &[]);
    let mut clients = Vec::new();
    for i in 0..3 {
        let url = nodes[i % nodes.len()].ws_url();
        clients.push(Client::hello(&url, &tok, json!({})).await.0);
    }

    // Sixteen calls for one channel: each session joins once, so 3 in all.
    let same = vec![json!({"channel": "room:same"}); CALLS];
    let reported = concurrently(nodes, "subscribe", same).await;
    let joined = received(&mut clients, "subscribed").await;
    assert_eq!(joined.get("room:same"), Some(&3), "{joined:?}");
    assert_eq!(
        reported, 3,
        "reported {reported} sessions, {joined:?} joined"
    );

    // Sixteen channels at once, with room for one more each: 3 joins in all.
    let many = (0..CALLS)
        .map(|i| json!({"channel": format!("room:{i}")}))
        .collect();
    let reported = concurrently(nodes, "subscribe", many).await;
    let joined = received(&mut clients, "subscribed").await;
    assert_eq!(total(&joined), 3, "{joined:?}");
    assert_eq!(
        reported, 3,
        "reported {reported} sessions, {joined:?} joined"
    );

    // Sixteen leaves of one channel: each session leaves once.
    let same = vec![json!({"channel": "room:same"}); CALLS];
    let reported = concurrently(nodes, "unsubscribe", same).await;
    let left = received(&mut clients, "unsubscribed").await;
    assert_eq!(left.get("room:same"), Some(&3), "{left:?}");
    assert_eq!(reported, 3, "reported {reported} sessions, {left:?} left");

    // Sixteen disconnects: each session is closed once.
    let kicks = vec![json!({"reconnect": false}); CALLS];
    let reported = concurrently(nodes, "disconnect", kicks).await;
    for c in &mut clients {
        assert_eq!(
            c.expect_close(Duration::from_secs(5)).await,
            Closed::Code(4410)
        );
    }
    assert_eq!(reported, 3, "reported {reported} closes");
}

fn config() -> Config {
    Config {
        max_subscriptions: 3,
        ..node::test_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_user_commands_count_exactly_on_one_node() {
    let n = TestNode::start(config()).await;
    scenario(std::slice::from_ref(&n)).await;
    n.shutdown().await;
    assert_no_server_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_user_commands_count_exactly_on_two_nodes_over_redis() {
    let redis = RedisServer::start();
    let prefix = format!("t{}:counts:", std::process::id());
    let redis_config = || Config {
        redis_url: Some(redis.url()),
        redis_prefix: prefix.clone(),
        ..config()
    };
    let nodes = [
        TestNode::start(redis_config()).await,
        TestNode::start(redis_config()).await,
    ];
    scenario(&nodes).await;
    for n in nodes {
        n.shutdown().await;
    }
    assert_no_server_panic();
}
