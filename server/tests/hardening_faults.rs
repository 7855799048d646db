//! Faults between a node and Redis, and of a node itself, while messages flow:
//! the TCP connection cut by a proxy; the subscriber connection black-holed (open
//! but silent: only the liveness probe can tell); a full network partition; Redis paused
//! with SIGSTOP; a burst that overflows the subscriber's buffer (fred's lag); a node
//! killed under load. For each: what the clients see, that nothing is lost silently,
//! and the time to recover (printed as `measured:` lines; docs/operations.md has them).
//!
//! Redis killed and restarted empty is `cluster::redis_restart_never_gaps_silently`.
//!
//! Nodes are real `herald` processes. Node 0 reaches Redis through a
//! [`FaultProxy`]; node 1 directly, and the test publishes through node 1, so the
//! stream goes on while node 0 suffers. Followers (resilient recording clients) sit on
//! node 0 and record exactly what an application would see.

#[path = "support/backend.rs"]
mod backend;
#[path = "support/follower.rs"]
mod follower;
#[path = "support/node.rs"]
mod node;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backend::*;
use follower::{Follower, Record};
use herald_testkit::process::NodeProcess;
use herald_testkit::proxy::FaultProxy;
use herald_testkit::redis::RedisServer;
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn prefix(test: &str) -> String {
    format!("h{}:{test}:", std::process::id())
}

/// Redis, a proxy in front of it, node 0 behind the proxy and node 1 direct.
struct Setup {
    redis: RedisServer,
    proxy: FaultProxy,
    nodes: Vec<NodeProcess>,
    prefix: String,
}

impl Setup {
    async fn start(test: &str, extra: &[(&str, &str)]) -> Setup {
        let redis = RedisServer::start();
        let proxy = FaultProxy::start(format!("127.0.0.1:{}", redis.port()).parse().unwrap()).await;
        let prefix = prefix(test);
        let via_proxy = format!("redis://{}", proxy.addr());
        let mut nodes = Vec::new();
        for (i, url) in [via_proxy, redis.url()].iter().enumerate() {
            let mut env: Vec<(&str, &str)> = vec![
                ("HERALD_REDIS_URL", url),
                ("HERALD_REDIS_PREFIX", &prefix),
                ("HERALD_HISTORY_SIZE", "5000"),
                // These tests are about what clients live through on a node that loses
                // Redis, so node 0 keeps them (no peer takes them: what happens when
                // every node is cut off); moving them to a ready peer is `net_faults`.
                ("HERALD_CUTOFF_MOVE_AFTER_MS", "0"),
            ];
            env.extend_from_slice(extra);
            nodes.push(NodeProcess::start(&format!("{test}{i}"), &env));
        }
        for n in &nodes {
            n.wait_ready(Duration::from_secs(15)).await;
        }
        Setup {
            redis,
            proxy,
            nodes,
            prefix,
        }
    }

    /// The local port of node 0's pub/sub connection as Redis sees it.
    fn subscriber_port(&self) -> u16 {
        let ours = self.proxy.upstream_ports();
        let list = self.redis.cli(&["client", "list"]);
        list.lines()
            .filter(|l| {
                l.split(' ')
                    .any(|f| f.starts_with("flags=") && f.contains('P'))
            })
            .filter_map(|l| {
                let addr = l.split(' ').find_map(|f| f.strip_prefix("addr="))?;
                addr.rsplit(':').next()?.parse::<u16>().ok()
            })
            .find(|p| ours.contains(p))
            .expect("node 0's subscriber connection goes through the proxy")
    }
}

async fn ready(http: &str) -> bool {
    let r = reqwest::Client::new()
        .get(format!("{http}/readyz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    matches!(r, Ok(r) if r.status() == 200)
}

/// Waits until `/readyz` of `http` says `want`; returns how long that took.
async fn wait_readiness(http: &str, want: bool, wait: Duration) -> Duration {
    let started = Instant::now();
    while ready(http).await != want {
        assert!(
            started.elapsed() < wait,
            "{http}/readyz never turned {}",
            if want { "200" } else { "503" }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// Accepted offsets per channel, as the publisher saw them.
type Accepted = Arc<Mutex<BTreeMap<String, Vec<u64>>>>;

/// Publishes to the users' personal channels, round robin, through `http`, every
/// `every`, until `stop`; records which publishes were accepted (200).
fn publish_stream(
    http: String,
    users: Vec<String>,
    every: Duration,
    stop: CancellationToken,
) -> (tokio::task::JoinHandle<()>, Accepted) {
    let accepted: Accepted = Arc::default();
    let record = Arc::clone(&accepted);
    let task = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut i = 0usize;
        while !stop.is_cancelled() {
            let user = &users[i % users.len()];
            i += 1;
            let (status, body) =
                node::publish_to(&client, &http, json!({"user": user, "data": {"i": i}})).await;
            if status == 200 {
                let channel = body["channel"].as_str().unwrap().to_owned();
                let offset = body["offset"].as_u64().unwrap();
                record
                    .lock()
                    .unwrap()
                    .entry(channel)
                    .or_default()
                    .push(offset);
            }
            tokio::time::sleep(every).await;
        }
    });
    (task, accepted)
}

/// Nothing was lost silently on `channel`: in order, no duplicates, every accepted
/// offset delivered; and, when Redis kept its data, no `resync` either.
fn assert_no_silent_loss(record: &Record, channel: &str, accepted: &[u64], kept_data: bool) {
    let seen = record.channels.get(channel).expect("channel followed");
    assert!(
        seen.violations.is_empty(),
        "{channel}: gap or disorder without resync: {:?}",
        seen.violations
    );
    let unique: BTreeSet<&(String, u64)> = seen.messages.iter().collect();
    assert_eq!(unique.len(), seen.messages.len(), "{channel}: duplicates");
    let delivered: BTreeSet<u64> = seen.offsets().into_iter().collect();
    let missing: Vec<&u64> = accepted.iter().filter(|o| !delivered.contains(o)).collect();
    assert!(
        missing.is_empty() || (!kept_data && seen.discontinuities > 0),
        "{channel}: accepted but never delivered: {missing:?} (resyncs: {}, delivered: {:?})",
        seen.discontinuities,
        seen.offsets()
    );
    if kept_data {
        assert_eq!(
            seen.discontinuities, 0,
            "{channel}: resync although Redis kept every message"
        );
        assert!(missing.is_empty(), "{channel}: missing {missing:?}");
    }
}

/// Followers on node 0, a stream through node 1, `fault` in the middle; then every
/// follower must catch up with exactly what was accepted. Returns how long after the
/// fault's end the followers had everything.
async fn with_followers_and_stream<F, Fut>(s: &Setup, users: usize, fault: F) -> Duration
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Instant>,
{
    let users: Vec<String> = (0..users).map(|i| format!("u{i}")).collect();
    let followers: Vec<Follower> = users
        .iter()
        .map(|u| Follower::on_nodes(vec![s.nodes[0].addr], node::token(u, &[], &[]), 0))
        .collect();
    follower::assert_joined(&followers, &users, Duration::from_secs(10)).await;
    let stop = CancellationToken::new();
    let (publisher, accepted) = publish_stream(
        s.nodes[1].http(),
        users.clone(),
        Duration::from_millis(5),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fault_over = fault().await;
    // What was accepted until the fault ended must reach the clients: how long that
    // takes after the end is the recovery time clients see.
    let snapshot = accepted.lock().unwrap().clone();
    follower::assert_caught_up(
        &followers,
        &users,
        |c| snapshot.get(c).and_then(|o| o.last().copied()),
        Duration::from_secs(20),
    )
    .await;
    let caught_up = fault_over.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    publisher.await.unwrap();
    let accepted = accepted.lock().unwrap().clone();
    follower::assert_caught_up(
        &followers,
        &users,
        |c| Some(*accepted[c].last().unwrap()),
        Duration::from_secs(20),
    )
    .await;
    for (f, u) in followers.into_iter().zip(&users) {
        let channel = format!("user:{u}");
        let record = f.stop().await;
        assert_eq!(
            record.connects(),
            1,
            "{channel}: the client was disconnected"
        );
        assert_no_silent_loss(&record, &channel, &accepted[&channel], true);
    }
    caught_up
}

/// The proxy cuts node 0's Redis connections (both) while messages flow. Clients of
/// node 0 stay connected and see every message, late by the reconnect, in order and
/// exactly once (the node repairs the gap from history after resubscribing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connection_cut_loses_nothing() {
    let s = Setup::start("cut", &[]).await;
    let http = s.nodes[0].http();
    let before = s.proxy.accepted_connections();
    let mut ready_again = Duration::ZERO;
    let caught_up = with_followers_and_stream(&s, 4, || async {
        s.proxy.cut();
        let cut_at = Instant::now();
        // Reconnected, resubscribed and probed: ready again.
        while s.proxy.accepted_connections() < before + 2 {
            assert!(cut_at.elapsed() < Duration::from_secs(15), "no reconnect");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ready_again = cut_at.elapsed() + wait_readiness(&http, true, Duration::from_secs(15)).await;
        cut_at
    })
    .await;
    let repaired = herald_testkit::metric(&http, "herald_gaps_repaired_total").await;
    eprintln!(
        "measured: redis connection cut: node ready {ready_again:?} after the cut, clients had \
         everything {caught_up:?} after it (gaps repaired from history: {repaired})"
    );
}

/// Only node 0's subscriber connection is black-holed: open, but nothing arrives. The
/// command connection works, so only the liveness probe can notice: `/readyz` turns 503,
/// the probe forces the subscriber to reconnect, the node resubscribes and repairs.
/// Clients of node 0 stay connected and lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_subscriber_connection_is_detected_by_the_probe() {
    let s = Setup::start("silent", &[]).await;
    let http = s.nodes[0].http();
    let before = s.proxy.accepted_connections();
    let mut detected = Duration::ZERO;
    let mut recovered = Duration::ZERO;
    let caught_up = with_followers_and_stream(&s, 4, || async {
        let port = s.subscriber_port();
        assert!(s.proxy.black_hole_upstream_port(port));
        let silent_at = Instant::now();
        detected = wait_readiness(&http, false, Duration::from_secs(15)).await;
        recovered = wait_readiness(&http, true, Duration::from_secs(20)).await;
        assert!(
            s.proxy.accepted_connections() > before,
            "the probe did not force a reconnect"
        );
        silent_at
    })
    .await;
    s.proxy.restore();
    eprintln!(
        "measured: silent subscriber connection: detected (readyz 503) after {detected:?}, \
         ready again {recovered:?} later, clients had everything {caught_up:?} after it went silent"
    );
}

/// A network partition: every byte between node 0 and Redis is held for 6 s (new
/// connections too), then delivered. Node 0 turns unready, publishes through it fail
/// fast with 503; its clients stay connected, and after the partition heals they get
/// every message in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_partition_to_redis_loses_nothing() {
    let s = Setup::start("partition", &[]).await;
    let http = s.nodes[0].http();
    let mut detected = Duration::ZERO;
    let mut ready_again = Duration::ZERO;
    let caught_up = with_followers_and_stream(&s, 4, || async {
        s.proxy.black_hole();
        let started = Instant::now();
        detected = wait_readiness(&http, false, Duration::from_secs(15)).await;
        // A publish through the partitioned node fails within the command timeout.
        let client = reqwest::Client::new();
        let t = Instant::now();
        let (status, body) =
            node::publish_to(&client, &http, json!({"user": "u0", "data": "x"})).await;
        assert_eq!(status, 503, "{body}");
        let failed_in = t.elapsed();
        eprintln!("measured: partition: publish through the node failed with 503 in {failed_in:?}");
        tokio::time::sleep(Duration::from_secs(6).saturating_sub(started.elapsed())).await;
        s.proxy.restore();
        let healed = Instant::now();
        ready_again = wait_readiness(&http, true, Duration::from_secs(20)).await;
        healed
    })
    .await;
    eprintln!(
        "measured: network partition of 6 s: detected after {detected:?}, node ready \
         {ready_again:?} after it healed, clients had everything {caught_up:?} after it"
    );
}

/// Redis frozen with SIGSTOP for 5 s, then resumed. Both nodes turn unready and
/// publishes fail (503) while it is frozen; clients stay connected; afterwards every
/// accepted message arrives in order, once. (A publish answered 503 may still have been
/// applied when Redis woke up: it then arrives too, with its own offset.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_and_resumed_loses_nothing() {
    let s = Setup::start("pause", &[]).await;
    let http = s.nodes[0].http();
    let mut detected = Duration::ZERO;
    let mut ready_again = Duration::ZERO;
    let caught_up = with_followers_and_stream(&s, 4, || async {
        s.redis.pause();
        let started = Instant::now();
        detected = wait_readiness(&http, false, Duration::from_secs(15)).await;
        tokio::time::sleep(Duration::from_secs(5).saturating_sub(started.elapsed())).await;
        s.redis.resume();
        let resumed = Instant::now();
        ready_again = wait_readiness(&http, true, Duration::from_secs(20)).await;
        wait_readiness(&s.nodes[1].http(), true, Duration::from_secs(20)).await;
        resumed
    })
    .await;
    eprintln!(
        "measured: redis paused 5 s: detected after {detected:?}, ready {ready_again:?} after \
         SIGCONT, clients had everything {caught_up:?} after it"
    );
}

/// A burst larger than the subscriber's buffer arrives at once (held by the proxy, then
/// released), with `HERALD_REDIS_SUBSCRIBER_BUFFER=1`: fred drops what the reader did not
/// take in time (a lag, not a reconnect). The node treats it as loss, repairs from
/// history, and the client gets every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_lag_is_repaired_from_history() {
    const BURST: u64 = 1_000;
    let s = Setup::start(
        "lag",
        &[
            ("HERALD_REDIS_SUBSCRIBER_BUFFER", "1"),
            ("HERALD_SESSION_QUEUE", "8192"),
        ],
    )
    .await;
    let http = s.nodes[0].http();
    let f = Follower::on_nodes(vec![s.nodes[0].addr], node::token("burst", &[], &[]), 0);
    assert!(f.wait_for("user:burst", 0, Duration::from_secs(10)).await);
    // Publishing trims history to the publisher's size: keep the whole burst.
    let mut settings = herald_server::backend::settings::BackendSettings::from_config(
        &herald_server::Config::default(),
    );
    settings.history_size = 5_000;
    let publisher =
        herald_server::backend::redis::connect(&s.redis.url(), &s.prefix, "publisher", settings)
            .await
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !publisher.is_healthy() {
        assert!(Instant::now() < deadline, "publisher never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let accepted_before = s.proxy.accepted_connections();
    let repaired_before = herald_testkit::metric(&http, "herald_gaps_repaired_total").await;
    // Hold node 0's subscriber connection, publish the burst, let it go at once: well
    // within the probe's 3 s, so this is a lag and not a forced reconnect.
    assert!(s.proxy.black_hole_upstream_port(s.subscriber_port()));
    let started = Instant::now();
    let calls = (0..BURST).map(|i| {
        let publisher = &publisher;
        async move {
            Streams::publish(publisher, "user:burst", &i.to_string(), None)
                .await
                .unwrap()
        }
    });
    futures_util::future::join_all(calls).await;
    s.proxy.restore();
    assert!(
        f.wait_for("user:burst", BURST, Duration::from_secs(20))
            .await,
        "the client never got the whole burst"
    );
    let took = started.elapsed();
    let repaired =
        herald_testkit::metric(&http, "herald_gaps_repaired_total").await - repaired_before;
    let record = f.stop().await;
    assert_eq!(
        s.proxy.accepted_connections(),
        accepted_before,
        "a reconnect happened: this test wants a lag (took {took:?})"
    );
    assert!(repaired >= 1.0, "nothing was dropped by the lag?");
    let seen = &record.channels["user:burst"];
    assert_eq!(seen.offsets(), (1..=BURST).collect::<Vec<_>>());
    assert_eq!(seen.discontinuities, 0);
    assert_eq!(record.connects(), 1);
    eprintln!(
        "measured: subscriber lag: a burst of {BURST} through a buffer of 1: {repaired} gap \
         repairs, the client had all {BURST} in order {took:?} after the burst started"
    );
    publisher.shutdown().await;
}

/// A node killed (SIGKILL) while 150 clients are connected to three nodes and messages
/// flow. The killed node's clients reconnect to the others, resume, and get every
/// message once, in order. Measured: time from the kill until all had caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_loses_nothing() {
    const USERS: usize = 150;
    let redis = RedisServer::start();
    let p = prefix("nodekill");
    let env = [
        ("HERALD_REDIS_URL", redis.url()),
        ("HERALD_REDIS_PREFIX", p.clone()),
        ("HERALD_HISTORY_SIZE", "1000".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut nodes: Vec<NodeProcess> = (0..3)
        .map(|i| NodeProcess::start(&format!("kill{i}"), &env))
        .collect();
    for n in &nodes {
        n.wait_ready(Duration::from_secs(15)).await;
    }
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let users: Vec<String> = (0..USERS).map(|i| format!("k{i}")).collect();
    let followers: Vec<Follower> = users
        .iter()
        .enumerate()
        .map(|(i, u)| Follower::on_nodes(addrs.clone(), node::token(u, &[], &[]), i % 3))
        .collect();
    follower::assert_joined(&followers, &users, Duration::from_secs(20)).await;
    let stop = CancellationToken::new();
    let mut streams = Vec::new();
    for via in [nodes[1].http(), nodes[2].http()] {
        streams.push(publish_stream(
            via,
            users.clone(),
            Duration::from_millis(2),
            stop.clone(),
        ));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    nodes[0].kill();
    let killed = Instant::now();
    // The killed node's clients (every third) find another node and resume.
    let moved: Vec<&Follower> = followers.iter().step_by(3).collect();
    loop {
        let done = moved.iter().all(|f| f.connects() >= 2);
        if done {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "not every client of the killed node reconnected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reconnected_in = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let mut accepted: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (task, record) in streams {
        task.await.unwrap();
        for (channel, offsets) in record.lock().unwrap().iter() {
            accepted.entry(channel.clone()).or_default().extend(offsets);
        }
    }
    for offsets in accepted.values_mut() {
        offsets.sort();
    }
    let stopped = Instant::now();
    follower::assert_caught_up(
        &followers,
        &users,
        |c| accepted.get(c).and_then(|o| o.last().copied()),
        Duration::from_secs(30),
    )
    .await;
    let lag = stopped.elapsed();
    let mut reconnected = 0;
    for (f, u) in followers.into_iter().zip(&users) {
        let channel = format!("user:{u}");
        let record = f.stop().await;
        if record.connects() >= 2 {
            reconnected += 1;
        }
        let none = Vec::new();
        assert_no_silent_loss(
            &record,
            &channel,
            accepted.get(&channel).unwrap_or(&none),
            true,
        );
    }
    let total: usize = accepted.values().map(Vec::len).sum();
    eprintln!(
        "measured: node killed under load ({USERS} clients on 3 nodes, {total} messages): \
         all {reconnected} clients of the killed node reconnected and resumed within \
         {reconnected_in:?} of the kill; every client had every message {lag:?} after the \
         stream stopped"
    );
    assert!(reconnected >= USERS / 3, "only {reconnected} reconnected");
}
