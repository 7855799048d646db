//! Herald behind the HAProxy configurations we ship (`deploy/haproxy-l4.cfg` and
//! `deploy/haproxy-l7.cfg`, unchanged, on free loopback ports): clients connect through
//! the balancer, pushes sent through the balancer reach users on every node, and the
//! clients of a killed node land on the others and resume without loss.
//!
//! Clients connect from many loopback source addresses (127.0.1.x), as real users do,
//! so that the L4 configuration's `balance source` spreads them over the nodes.

#[path = "support/follower.rs"]
mod follower;
#[path = "support/haproxy.rs"]
mod haproxy;
#[path = "support/ledger.rs"]
mod ledger;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use follower::{Follower, Options};
use haproxy::Haproxy;
use herald_testkit::process::NodeProcess;
use herald_testkit::redis::RedisServer;
use herald_testkit::{token, API_KEY};
use ledger::Ledger;
use serde_json::json;

const NODES: [&str; 3] = ["node1", "node2", "node3"];

/// Redis, three node processes named like HAProxy's servers, and HAProxy with the
/// shipped configuration `kind`, all servers UP.
async fn cluster(kind: &str, test: &str) -> (RedisServer, Vec<NodeProcess>, Haproxy) {
    let redis = RedisServer::start();
    let url = redis.url();
    let prefix = format!("t{}:{test}:", std::process::id());
    let env = [
        ("HERALD_REDIS_URL", url.as_str()),
        ("HERALD_REDIS_PREFIX", prefix.as_str()),
    ];
    let nodes: Vec<NodeProcess> = NODES
        .iter()
        .map(|id| NodeProcess::start(id, &env))
        .collect();
    for node in &nodes {
        node.wait_ready(Duration::from_secs(20)).await;
    }
    let lb = Haproxy::start(kind, [nodes[0].addr, nodes[1].addr, nodes[2].addr]);
    for name in NODES {
        lb.wait_status(name, "UP", Duration::from_secs(20)).await;
    }
    (redis, nodes, lb)
}

/// The i-th client's source address: 127.0.1.1, 127.0.1.2, …
fn source(i: usize) -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        1 + (i / 250) as u8,
        1 + (i % 250) as u8,
    )))
}

fn user(i: usize) -> String {
    format!("u{i}")
}

/// Starts `n` followers through the balancer, each on its personal channel and `room`,
/// and waits until each has its first welcome and a position in the room.
async fn followers(lb: &Haproxy, n: usize, room: &str) -> Vec<Follower> {
    let followers: Vec<Follower> = (0..n)
        .map(|i| {
            Follower::start(Options {
                targets: vec![lb.addr],
                source: source(i),
                token: token(&user(i), &["room:*"], &[]),
                extra: vec![room.to_owned()],
                jitter: true,
                ..Options::default()
            })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for f in &followers {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(
            f.wait_for(room, 0, left).await,
            "a follower did not join {room} through the balancer"
        );
    }
    followers
}

fn channels(i: usize, room: &str) -> Vec<String> {
    vec![format!("user:{}", user(i)), room.to_owned()]
}

async fn pushes_through_the_balancer_reach_users_on_every_node(kind: &str) {
    let (_redis, _nodes, lb) = cluster(kind, &format!("push-{kind}")).await;
    let room = "room:everyone";
    let n = 30;
    let followers = followers(&lb, n, room).await;
    let on: BTreeSet<String> = followers
        .iter()
        .filter_map(|f| f.snapshot().node().map(str::to_owned))
        .collect();
    assert_eq!(
        on,
        NODES.iter().map(|s| s.to_string()).collect(),
        "{kind}: the balancer did not spread clients over every node"
    );

    let ledger = Ledger::default();
    let http = reqwest::Client::new();
    for i in 0..n {
        let body = json!({"user": user(i), "data": {"to": i}});
        assert!(ledger.publish(&http, &lb.http(), API_KEY, &body).await);
    }
    for k in 0..3 {
        let body = json!({"channel": room, "data": {"k": k}});
        assert!(ledger.publish(&http, &lb.http(), API_KEY, &body).await);
    }
    ledger
        .wait_caught_up(&followers, |i| channels(i, room), Duration::from_secs(20))
        .await;

    let records = follower::stop_all(followers).await;
    let tally = ledger.tally(&records, |i| channels(i, room));
    assert_eq!(tally.expected, (n + 3 * n) as u64);
    assert_eq!(
        (tally.lost, tally.duplicates, tally.violations),
        (0, 0, 0),
        "{tally:?}"
    );
    assert_eq!(tally.delivered, tally.expected, "{tally:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l4_pushes_through_haproxy_reach_users_on_every_node() {
    pushes_through_the_balancer_reach_users_on_every_node("l4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_pushes_through_haproxy_reach_users_on_every_node() {
    pushes_through_the_balancer_reach_users_on_every_node("l7").await;
}

/// Publishes `rounds` rounds through the balancer: one push to every user, one to the room.
async fn publish_rounds(ledger: &Ledger, lb: &Haproxy, n: usize, room: &str, rounds: usize) {
    let http = reqwest::Client::new();
    for _ in 0..rounds {
        for i in 0..n {
            let body = json!({"user": user(i), "data": {"to": i}});
            ledger.publish(&http, &lb.http(), API_KEY, &body).await;
        }
        let body = json!({"channel": room, "data": {}});
        ledger.publish(&http, &lb.http(), API_KEY, &body).await;
    }
}

async fn a_killed_node_behind_haproxy_loses_no_message(kind: &str) {
    let (_redis, mut nodes, lb) = cluster(kind, &format!("kill-{kind}")).await;
    let room = "room:kill";
    let n = 60;
    let followers = followers(&lb, n, room).await;
    let victims: Vec<usize> = (0..n)
        .filter(|&i| followers[i].snapshot().node() == Some("node2"))
        .collect();
    assert!(!victims.is_empty(), "{kind}: no client landed on node2");

    let ledger = Ledger::default();
    publish_rounds(&ledger, &lb, n, room, 3).await;
    nodes[1].kill();
    // Pushes go on while HAProxy notices (its /readyz check fails within ~1.25 s).
    publish_rounds(&ledger, &lb, n, room, 3).await;
    lb.wait_status("node2", "DOWN", Duration::from_secs(20))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for &i in &victims {
        loop {
            let r = followers[i].snapshot();
            if r.connects() >= 2 {
                assert_ne!(
                    r.node(),
                    Some("node2"),
                    "client {i} came back to a dead node"
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "client {i} of the killed node did not reconnect through the balancer"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    publish_rounds(&ledger, &lb, n, room, 3).await;
    ledger
        .wait_caught_up(&followers, |i| channels(i, room), Duration::from_secs(30))
        .await;

    let records = follower::stop_all(followers).await;
    let tally = ledger.tally(&records, |i| channels(i, room));
    println!(
        "measured: {kind} kill of node2 behind haproxy: {} clients moved, {} pushes accepted, \
         {} unconfirmed, lost {}, duplicates {}",
        victims.len(),
        ledger.total(),
        ledger.unconfirmed(),
        tally.lost,
        tally.duplicates
    );
    tally.assert_exact();
    // Nodes other than node2 kept their clients: only node2's moved.
    for (i, r) in records.iter().enumerate() {
        if !victims.contains(&i) {
            assert_eq!(r.connects(), 1, "client {i} of a live node reconnected");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l4_a_killed_node_behind_haproxy_loses_no_message() {
    a_killed_node_behind_haproxy_loses_no_message("l4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_a_killed_node_behind_haproxy_loses_no_message() {
    a_killed_node_behind_haproxy_loses_no_message("l7").await;
}
