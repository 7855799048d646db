//! A cluster of real `herald` processes sharing a real Redis (standalone and Redis
//! Cluster): cross-node pushes, routing only to subscribed nodes, node and Redis
//! failures without silent loss, presence and registry convergence.

#[path = "support/client.rs"]
mod client;
#[path = "support/follower.rs"]
mod follower;
#[path = "support/node.rs"]
mod node;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use client::Client;
use follower::{Follower, Record};
use herald_testkit::process::NodeProcess;
use herald_testkit::redis::{RedisCluster, RedisOptions, RedisServer};
use serde_json::{json, Value};

fn prefix(test: &str) -> String {
    format!("t{}:{test}:", std::process::id())
}

fn cluster_env<'a>(url: &'a str, prefix: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![("HERALD_REDIS_URL", url), ("HERALD_REDIS_PREFIX", prefix)]
}

async fn start_nodes(n: usize, env: &[(&str, &str)]) -> Vec<NodeProcess> {
    let nodes: Vec<NodeProcess> = (0..n)
        .map(|i| NodeProcess::start(&format!("node{i}"), env))
        .collect();
    for node in &nodes {
        node.wait_ready(Duration::from_secs(15)).await;
    }
    nodes
}

/// A publish through `http`, on a client of its own.
async fn publish(http: &str, body: Value) -> (u16, Value) {
    node::publish_to(&reqwest::Client::new(), http, body).await
}

async fn get(http: &str, path: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!("{http}{path}"))
        .bearer_auth(node::API_KEY)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Asserts a user's personal stream is exactly 1..=last, once each, in order.
fn assert_exact(record: &Record, channel: &str, last: u64) {
    let seen = record.channels.get(channel).expect("channel followed");
    assert!(
        seen.violations.is_empty(),
        "{channel}: order violations {:?}",
        seen.violations
    );
    assert_eq!(
        seen.discontinuities, 0,
        "{channel}: unexpected resync / recovered:false"
    );
    let want: Vec<u64> = (1..=last).collect();
    assert_eq!(
        seen.offsets(),
        want,
        "{channel}: not every message once, in order"
    );
}

async fn cross_node_push(url: &str, prefix: &str) {
    let env = cluster_env(url, prefix);
    let nodes = start_nodes(3, &env).await;
    let tok = node::token("alice", &[], &[]);
    let (mut a0, _) = Client::hello(&nodes[0].ws_url(), &tok, json!({})).await;
    let (mut a1, _) = Client::hello(&nodes[1].ws_url(), &tok, json!({})).await;
    let (mut b2, _) =
        Client::hello(&nodes[2].ws_url(), &node::token("bob", &[], &[]), json!({})).await;
    let (status, body) =
        publish(&nodes[2].http(), json!({"user": "alice", "data": {"n": 1}})).await;
    assert_eq!(status, 200, "{body}");
    for c in [&mut a0, &mut a1] {
        let m = c.next_message().await;
        assert_eq!(m["channel"], "user:alice");
        assert_eq!(m["offset"], body["offset"]);
        assert_eq!(m["data"], json!({"n": 1}));
    }
    assert!(
        b2.silent_for(Duration::from_millis(300)).await,
        "bob got alice's push"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_entering_at_any_node_reaches_every_socket_of_the_user() {
    let redis = RedisServer::start();
    cross_node_push(&redis.url(), &prefix("cross")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_crosses_nodes_on_redis_cluster_too() {
    let cluster = RedisCluster::start();
    cross_node_push(&cluster.url(), &prefix("cross-cluster")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_reach_only_the_nodes_with_subscribers() {
    let redis = RedisServer::start();
    let p = prefix("routing");
    let nodes = start_nodes(3, &cluster_env(&redis.url(), &p)).await;
    let (mut a, _) = Client::hello(
        &nodes[0].ws_url(),
        &node::token("alice", &[], &[]),
        json!({}),
    )
    .await;
    let (_b, _) = Client::hello(&nodes[2].ws_url(), &node::token("bob", &[], &[]), json!({})).await;
    let before: Vec<f64> = {
        let mut v = Vec::new();
        for n in &nodes {
            v.push(
                herald_testkit::metric(&n.http(), "herald_broker_messages_received_total").await,
            );
        }
        v
    };
    for i in 0..20 {
        let (status, _) = publish(&nodes[1].http(), json!({"user": "alice", "data": i})).await;
        assert_eq!(status, 200);
    }
    for _ in 0..20 {
        a.next_message().await;
    }
    let mut after = Vec::new();
    for n in &nodes {
        after
            .push(herald_testkit::metric(&n.http(), "herald_broker_messages_received_total").await);
    }
    assert_eq!(
        after[0] - before[0],
        20.0,
        "the subscribed node takes each message once"
    );
    assert_eq!(
        after[1] - before[1],
        0.0,
        "the publishing node has no subscriber"
    );
    assert_eq!(
        after[2] - before[2],
        0.0,
        "bob's node has no subscriber to user:alice"
    );
}

/// Publishes `count` messages to `users` round-robin through `via`, one every `gap`;
/// returns the last offset per channel (only successful publishes count).
async fn publish_stream(
    via: Vec<String>,
    users: Vec<String>,
    count: usize,
    gap: Duration,
) -> BTreeMap<String, u64> {
    let mut last = BTreeMap::new();
    for i in 0..count {
        let user = &users[i % users.len()];
        let http = &via[i % via.len()];
        let (status, body) = publish(http, json!({"user": user, "data": {"i": i}})).await;
        if status == 200 {
            last.insert(format!("user:{user}"), body["offset"].as_u64().unwrap());
        }
        tokio::time::sleep(gap).await;
    }
    last
}

async fn survive_node_kill(url: &str, prefix: &str) {
    let env = cluster_env(url, prefix);
    let mut nodes = start_nodes(3, &env).await;
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let users: Vec<String> = (0..6).map(|i| format!("u{i}")).collect();
    let followers: Vec<Follower> = users
        .iter()
        .map(|u| Follower::on_nodes(addrs.clone(), node::token(u, &[], &[]), 0))
        .collect();
    follower::assert_joined(&followers, &users, Duration::from_secs(10)).await;
    let via = vec![nodes[1].http(), nodes[2].http()];
    let publisher = tokio::spawn(publish_stream(
        via,
        users.clone(),
        300,
        Duration::from_millis(5),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes[0].kill();
    let last = publisher.await.unwrap();
    follower::assert_caught_up(
        &followers,
        &users,
        |c| Some(last[c]),
        Duration::from_secs(15),
    )
    .await;
    for (f, u) in followers.into_iter().zip(&users) {
        let channel = format!("user:{u}");
        let record = f.stop().await;
        assert!(record.connects() >= 2, "{u} should have reconnected");
        assert_exact(&record, &channel, last[&channel]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_no_message() {
    let redis = RedisServer::start();
    survive_node_kill(&redis.url(), &prefix("kill")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_no_message_on_redis_cluster() {
    let cluster = RedisCluster::start();
    survive_node_kill(&cluster.url(), &prefix("kill-cluster")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_never_gaps_silently() {
    redis_restart(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_with_aof_recovers_every_message() {
    redis_restart(true).await;
}

/// Redis is killed and restarted while messages flow. Without persistence history is
/// lost: clients must be told (`resync`). With AOF every message that was accepted is
/// delivered exactly once, in order.
async fn redis_restart(aof: bool) {
    let mut redis = RedisServer::start_with(RedisOptions {
        aof,
        ..Default::default()
    });
    let p = prefix(if aof {
        "redis-restart-aof"
    } else {
        "redis-restart"
    });
    let nodes = start_nodes(2, &cluster_env(&redis.url(), &p)).await;
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let users: Vec<String> = (0..4).map(|i| format!("r{i}")).collect();
    let followers: Vec<Follower> = users
        .iter()
        .enumerate()
        .map(|(i, u)| Follower::on_nodes(addrs.clone(), node::token(u, &[], &[]), i))
        .collect();
    follower::assert_joined(&followers, &users, Duration::from_secs(10)).await;
    let via: Vec<String> = nodes.iter().map(|n| n.http()).collect();
    let publisher = tokio::spawn(publish_stream(
        via.clone(),
        users.clone(),
        200,
        Duration::from_millis(10),
    ));
    tokio::time::sleep(Duration::from_millis(600)).await;
    redis.kill();
    // While Redis is down, publishing fails loudly and the nodes are not ready.
    let (status, body) = publish(&via[0], json!({"user": "r0", "data": "down"})).await;
    assert_eq!(status, 503, "{body}");
    // The node notices the dead connection within seconds (the probe's 3 s at most).
    let noticed = Instant::now();
    loop {
        let r = reqwest::get(format!("{}/readyz", via[0])).await.unwrap();
        if r.status() == 503 {
            break;
        }
        assert!(
            noticed.elapsed() < Duration::from_secs(5),
            "readyz stayed 200 with Redis down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart();
    let restarted = Instant::now();
    for n in &nodes {
        n.wait_ready(Duration::from_secs(15)).await;
    }
    let ready_after = restarted.elapsed();
    eprintln!("measured: nodes ready {ready_after:?} after the Redis restart (aof: {aof})");
    assert!(
        ready_after < Duration::from_secs(10),
        "ready again after {ready_after:?}"
    );
    let last = publisher.await.unwrap();
    // One more push per user after everything settled: each must arrive.
    let mut final_offsets = BTreeMap::new();
    for (i, u) in users.iter().enumerate() {
        let (status, body) = publish(&via[i % 2], json!({"user": u, "data": "final"})).await;
        assert_eq!(status, 200, "{body}");
        final_offsets.insert(
            format!("user:{u}"),
            (
                body["epoch"].as_str().unwrap().to_owned(),
                body["offset"].as_u64().unwrap(),
            ),
        );
    }
    for (f, u) in followers.iter().zip(&users) {
        let channel = format!("user:{u}");
        let (_, offset) = &final_offsets[&channel];
        assert!(
            f.wait_for(&channel, *offset, Duration::from_secs(15)).await,
            "{channel} missed the final push"
        );
    }
    for (f, u) in followers.into_iter().zip(&users) {
        let channel = format!("user:{u}");
        let record = f.stop().await;
        let seen = &record.channels[&channel];
        assert!(
            seen.violations.is_empty(),
            "{channel}: out of order or gap without resync: {:?}",
            seen.violations
        );
        // No duplicates: each (epoch, offset) at most once.
        let mut pairs = seen.messages.clone();
        let n = pairs.len();
        pairs.sort();
        pairs.dedup();
        assert_eq!(pairs.len(), n, "{channel}: duplicates");
        assert!(
            seen.messages.contains(&final_offsets[&channel]),
            "{channel}: final push missing"
        );
        // History was lost with Redis: the client must have been told.
        let epochs: std::collections::BTreeSet<&String> =
            seen.messages.iter().map(|(e, _)| e).collect();
        if epochs.len() > 1 {
            assert!(
                seen.discontinuities > 0,
                "{channel}: epoch changed without resync"
            );
        }
        if aof {
            // Nothing was lost: every accepted message arrived once, in order.
            assert_eq!(epochs.len(), 1, "{channel}: AOF kept the epoch");
            assert_exact(&record, &channel, final_offsets[&channel].1);
            assert!(last
                .get(&channel)
                .is_none_or(|l| *l < final_offsets[&channel].1));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_registry_converge_after_a_node_dies() {
    let redis = RedisServer::start();
    let p = prefix("presence");
    let mut nodes = start_nodes(3, &cluster_env(&redis.url(), &p)).await;
    let (_a, _) = Client::hello(
        &nodes[0].ws_url(),
        &node::token("alice", &["room:*"], &[]),
        json!({}),
    )
    .await;
    let http = nodes[1].http();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, u) = get(&http, "/v1/users/alice/presence").await;
        let (_, ns) = get(&http, "/v1/nodes").await;
        if u["connections"] == 1 && ns["nodes"].as_array().map(Vec::len) == Some(3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "presence/registry never showed alice and 3 nodes: {u} {ns}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A draining node leaves the registry at once.
    let mut draining = std::mem::replace(
        &mut nodes[2],
        NodeProcess::start("node-extra", &cluster_env(&redis.url(), &p)),
    );
    let term = tokio::task::spawn_blocking(move || draining.terminate(Duration::from_secs(10)));
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (_, ns) = get(&http, "/v1/nodes").await;
        let ids: Vec<&str> = ns["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["id"].as_str().unwrap())
            .collect();
        if !ids.contains(&"node2") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a draining node stayed in the registry: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    term.await.unwrap();
    // A node killed without notice drops out of nodes, connect and presence within 15 s.
    nodes[0].kill();
    let killed = Instant::now();
    loop {
        let (_, u) = get(&http, "/v1/users/alice/presence").await;
        let (_, ns) = get(&http, "/v1/nodes").await;
        let ids: Vec<String> = ns["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["id"].as_str().unwrap().to_owned())
            .collect();
        if u["online"] == false && !ids.contains(&"node0".to_owned()) {
            let (_, c) = get(&http, "/v1/connect").await;
            assert_ne!(c["node"], "node0");
            eprintln!(
                "measured: registry and presence converged {:?} after SIGKILL",
                killed.elapsed()
            );
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "no convergence in 15 s: {u} {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
