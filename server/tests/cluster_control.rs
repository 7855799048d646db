//! The server API's control over users, cluster-wide: alice has sessions on three
//! nodes, every call enters at a fourth, on one Redis and on Redis Cluster. Subscribe,
//! unsubscribe, disconnect (4401), kick (4410) and revoke reach every session and
//! answer how many sessions they affected.

#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;

use std::time::Duration;

use client::{Client, Closed};
use herald_server::auth::{now_secs, Claims, TokenSigner};
use herald_testkit::process::NodeProcess;
use herald_testkit::redis::{RedisCluster, RedisServer};
use serde_json::{json, Value};

fn prefix(test: &str) -> String {
    format!("t{}:{test}:", std::process::id())
}

async fn start_nodes(url: &str, prefix: &str) -> Vec<NodeProcess> {
    let env = [("HERALD_REDIS_URL", url), ("HERALD_REDIS_PREFIX", prefix)];
    let nodes: Vec<NodeProcess> = (0..4)
        .map(|i| NodeProcess::start(&format!("node{i}"), &env))
        .collect();
    for n in &nodes {
        n.wait_ready(Duration::from_secs(15)).await;
    }
    nodes
}

/// A token for `user`, issued `age` seconds ago.
fn token(user: &str, age: u64) -> String {
    let now = now_secs();
    TokenSigner::hs256(node::SECRET.as_bytes()).sign(&Claims {
        sub: user.into(),
        exp: now + 600,
        nbf: None,
        iat: Some(now - age),
        channels: Some(vec!["room:*".into()]),
        publish: Some(vec!["room:*".into()]),
    })
}

async fn post(http: &str, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{http}{path}"))
        .bearer_auth(node::API_KEY)
        .json(&body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("API call");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn ws(n: &NodeProcess) -> String {
    format!("ws://{}/ws", n.addr)
}

fn http(n: &NodeProcess) -> String {
    format!("http://{}", n.addr)
}

/// alice on nodes 0..3 (one session each), bob on node 0.
async fn sessions(nodes: &[NodeProcess], age: u64) -> Vec<Client> {
    let mut out = Vec::new();
    for n in &nodes[..3] {
        out.push(
            Client::hello(&ws(n), &token("alice", age), json!({}))
                .await
                .0,
        );
    }
    out
}

async fn scenario(url: &str, prefix: &str) {
    let nodes = start_nodes(url, prefix).await;
    let api = http(&nodes[3]);
    let mut alice = sessions(&nodes, 0).await;
    let (mut bob, _) = Client::hello(&ws(&nodes[0]), &token("bob", 0), json!({})).await;

    // Subscribe: every session of alice joins, on every node.
    let (status, body) = post(
        &api,
        "/v1/users/alice/subscribe",
        json!({"channel":"group:1"}),
    )
    .await;
    assert_eq!((status, body), (200, json!({"sessions": 3})));
    for c in &mut alice {
        let f = c.recv().await;
        assert_eq!(
            (f["type"].as_str(), f["channel"].as_str()),
            (Some("subscribed"), Some("group:1")),
            "{f}"
        );
    }
    // A push entering at the fourth node reaches all three.
    let (status, _) = node::publish_to(
        &reqwest::Client::new(),
        &api,
        json!({"channel":"group:1","data":"hi"}),
    )
    .await;
    assert_eq!(status, 200);
    for c in &mut alice {
        let m = c.next_message().await;
        assert_eq!(
            (m["channel"].as_str(), m["data"].as_str()),
            (Some("group:1"), Some("hi"))
        );
    }

    // Unsubscribe.
    let (_, body) = post(
        &api,
        "/v1/users/alice/unsubscribe",
        json!({"channel":"group:1"}),
    )
    .await;
    assert_eq!(body, json!({"sessions": 3}));
    for c in &mut alice {
        let f = c.recv().await;
        assert_eq!(
            (f["type"].as_str(), f["reason"].as_str()),
            (Some("unsubscribed"), Some("server"))
        );
    }

    // Disconnect with reconnect: 4401 on every node.
    let (_, body) = post(
        &api,
        "/v1/users/alice/disconnect",
        json!({"reconnect": true}),
    )
    .await;
    assert_eq!(body, json!({"sessions": 3}));
    for c in &mut alice {
        assert_eq!(
            c.expect_close(Duration::from_secs(5)).await,
            Closed::Code(4401)
        );
    }

    // Kick: 4410 on every node.
    let mut alice = sessions(&nodes, 0).await;
    let (_, body) = post(
        &api,
        "/v1/users/alice/disconnect",
        json!({"reconnect": false}),
    )
    .await;
    assert_eq!(body, json!({"sessions": 3}));
    for c in &mut alice {
        assert_eq!(
            c.expect_close(Duration::from_secs(5)).await,
            Closed::Code(4410)
        );
    }

    // Revoke: sessions with older tokens close; the old token is refused on every node,
    // a token issued after the cut is not.
    let mut alice = sessions(&nodes, 30).await;
    let before = now_secs() - 10;
    let (_, body) = post(&api, "/v1/users/alice/revoke", json!({"before": before})).await;
    assert_eq!(body, json!({"sessions": 3}));
    for c in &mut alice {
        assert_eq!(
            c.expect_close(Duration::from_secs(5)).await,
            Closed::Code(4401)
        );
    }
    let old = token("alice", 30);
    for n in &nodes {
        let mut c = Client::connect(&ws(n)).await;
        c.send(json!({"type":"hello","token":old})).await;
        assert_eq!(
            c.expect_close(Duration::from_secs(5)).await,
            Closed::Code(4401),
            "{}",
            n.id
        );
        let (_, welcome) = Client::hello(&ws(n), &token("alice", 0), json!({})).await;
        assert_eq!(welcome["user"], "alice");
    }
    // A node that starts later learns the revocation from Redis.
    let late = NodeProcess::start(
        "late",
        &[("HERALD_REDIS_URL", url), ("HERALD_REDIS_PREFIX", prefix)],
    );
    late.wait_ready(Duration::from_secs(15)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Client::connect(&ws(&late)).await;
        c.send(json!({"type":"hello","token":old})).await;
        match c.recv_wire(Duration::from_secs(5)).await {
            Err(Closed::Code(4401)) => break,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "late node accepted a revoked token: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    // Bob was never touched.
    let r = bob
        .request(json!({"type":"presence","channel":"user:bob"}))
        .await;
    assert!(r["result"].is_object(), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_commands_across_four_nodes_on_redis() {
    let redis = RedisServer::start();
    scenario(&redis.url(), &prefix("control")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_commands_across_four_nodes_on_redis_cluster() {
    let cluster = RedisCluster::start();
    scenario(&cluster.url(), &prefix("control-cluster")).await;
}

/// A node cut off from Redis while a revocation is made misses the command, but loads
/// the revocation when it reconnects: that also closes its sessions holding a revoked
/// token (4401), not only refuses new hellos.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_missed_while_cut_off_closes_the_sessions_on_reconnect() {
    use herald_testkit::proxy::FaultProxy;
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", redis.port()).parse().unwrap()).await;
    let prefix = prefix("missedrevoke");
    let via_proxy = format!("redis://{}", proxy.addr());
    let cut = NodeProcess::start(
        "cut",
        &[
            ("HERALD_REDIS_URL", &via_proxy),
            ("HERALD_REDIS_PREFIX", &prefix),
        ],
    );
    let direct = NodeProcess::start(
        "direct",
        &[
            ("HERALD_REDIS_URL", &redis.url()),
            ("HERALD_REDIS_PREFIX", &prefix),
        ],
    );
    for n in [&cut, &direct] {
        n.wait_ready(Duration::from_secs(15)).await;
    }
    let (mut alice, _) = Client::hello(&ws(&cut), &token("alice", 30), json!({})).await;

    proxy.reject();
    let before = now_secs();
    let (status, body) = post(
        &http(&direct),
        "/v1/users/alice/revoke",
        json!({"before": before}),
    )
    .await;
    assert_eq!(
        (status, &body),
        (200, &json!({"sessions": 0})),
        "the cut-off node missed it"
    );
    proxy.restore();

    assert_eq!(
        alice.expect_close(Duration::from_secs(30)).await,
        Closed::Code(4401),
        "closed once the node reconnects and loads the revocation"
    );
}
