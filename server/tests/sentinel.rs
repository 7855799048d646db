//! Redis Sentinel: a failover never costs a silent gap or a reused offset.
//!
//! - The publish and history scripts, called directly on real Redis servers, start a
//!   new epoch when a replica is promoted (its replication id changes) and only then;
//!   without the Sentinel flag they would hand out offsets the old primary had already
//!   given to other messages.
//! - Three real nodes on a real Sentinel topology (one primary, one replica, three
//!   sentinels), clients following their channels under a steady publish load, and
//!   the primary killed with SIGKILL: the nodes are ready again on the promoted
//!   replica (time printed as `measured:`), and every accepted message reached every
//!   client exactly once, or the client was told (`resync` / `recovered: false`).

#[path = "support/follower.rs"]
mod follower;
#[path = "support/node.rs"]
mod node;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use follower::{Follower, Record};
use herald_testkit::process::NodeProcess;
use herald_testkit::redis::RedisServer;
use herald_testkit::sentinel::RedisSentinel;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const PUBLISH: &str = include_str!("../src/backend/redis/publish.lua");
const HISTORY: &str = include_str!("../src/backend/redis/history.lua");

/// Runs publish.lua on `redis` for channel `c`; returns (offset, epoch).
fn publish(redis: &RedisServer, c: &str, data: &str, epoch: &str, flag: &str) -> (u64, String) {
    let (meta, stream, pubsub) = (
        format!("t:{{{c}}}:m"),
        format!("t:{{{c}}}:h"),
        format!("t:{{{c}}}:c"),
    );
    // One channel with one message (publish.lua takes batches: see its header).
    let out = redis.cli(&[
        "eval", PUBLISH, "2", &meta, &stream, "100", "60000", "120000", "PUBLISH", flag, epoch,
        &pubsub, "1", "", data,
    ]);
    let mut lines = out.lines();
    let offset = lines
        .next()
        .unwrap_or_default()
        .parse()
        .unwrap_or_else(|_| panic!("{out}"));
    (offset, lines.next().unwrap_or_default().to_owned())
}

/// Runs history.lua on `redis`: (offset, epoch, entries after `since`).
fn history(redis: &RedisServer, c: &str, since: u64, flag: &str) -> (u64, String, usize) {
    let (meta, stream) = (format!("t:{{{c}}}:m"), format!("t:{{{c}}}:h"));
    let first = format!("{}-0", since + 1);
    let out = redis.cli(&[
        "eval", HISTORY, "2", &meta, &stream, "120000", &first, "100", "60000", flag,
    ]);
    let lines: Vec<&str> = out.lines().collect();
    let offset = lines[0].parse().unwrap_or_else(|_| panic!("{out}"));
    let epoch = lines.get(1).copied().unwrap_or_default().to_owned();
    // (id, data, from) triples after the position; count the ids (`<offset>-0`), since
    // the output of an empty `from` may be trimmed away.
    let ids = lines
        .iter()
        .skip(2)
        .filter(|l| {
            l.strip_suffix("-0")
                .is_some_and(|n| n.parse::<u64>().is_ok())
        })
        .count();
    (offset, epoch, ids)
}

fn replid(redis: &RedisServer) -> String {
    let info = redis.cli(&["info", "replication"]);
    info.lines()
        .find_map(|l| l.strip_prefix("master_replid:"))
        .expect("master_replid")
        .trim()
        .to_owned()
}

/// A promoted replica lacks the old primary's last writes. Without the Sentinel flag
/// the scripts go back to an offset clients already saw, in the same epoch (the
/// hazard); with it, the first read on the promoted replica finds the channel lost
/// (the empty position, its keys dropped) and the first publish starts a new epoch,
/// offsets from 1, which later calls keep. The old primary, whose replication id did
/// not change, keeps its epoch.
#[test]
fn scripts_start_a_new_epoch_when_the_replication_id_changes() {
    let primary = RedisServer::start();
    let replica = RedisServer::start();
    let port = primary.port().to_string();
    assert_eq!(replica.cli(&["replicaof", "127.0.0.1", &port]), "OK");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !replica
        .cli(&["info", "replication"])
        .contains("master_link_status:up")
    {
        assert!(Instant::now() < deadline, "replica never synced");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Offsets 1..3 under epoch E, replicated.
    for i in 1..=3u64 {
        let (o, e) = publish(&primary, "a", "{}", "E", "1");
        assert_eq!((o, e.as_str()), (i, "E"));
    }
    assert_eq!(primary.cli(&["wait", "1", "5000"]), "1");
    // The replica is promoted; the old primary still takes two writes: lost writes.
    let before = replid(&replica);
    assert_eq!(replica.cli(&["replicaof", "no", "one"]), "OK");
    assert_ne!(
        replid(&replica),
        before,
        "a promotion changes the replication id"
    );
    for i in 4..=5u64 {
        assert_eq!(publish(&primary, "a", "{}", "X", "1"), (i, "E".to_owned()));
    }
    // The hazard without the flag: offset 3 again in epoch E, offset 4 would be reused.
    assert_eq!(history(&replica, "a", 0, ""), (3, "E".to_owned(), 3));
    // With the flag: the stream reads as lost, and nothing of it is retained.
    let (offset, epoch, entries) = history(&replica, "a", 0, "1");
    assert_eq!((offset, epoch.as_str(), entries), (0, "", 0));
    assert_eq!(replica.cli(&["exists", "t:{a}:m", "t:{a}:h"]), "0");
    assert_eq!(publish(&replica, "a", "{}", "F", "1"), (1, "F".to_owned()));
    assert_eq!(publish(&replica, "a", "{}", "H", "1"), (2, "F".to_owned()));
    assert_eq!(history(&replica, "a", 0, "1"), (2, "F".to_owned(), 2));
    // The old primary kept its replication id, so its epochs stay.
    assert_eq!(publish(&primary, "a", "{}", "K", "1"), (6, "E".to_owned()));
    // A channel written without the flag (another mode before) gets one new epoch.
    publish(&replica, "c", "{}", "L", "");
    assert_eq!(publish(&replica, "c", "{}", "M", "1"), (1, "M".to_owned()));
    assert_eq!(publish(&replica, "c", "{}", "N", "1"), (2, "M".to_owned()));
}

/// `HERALD_REDIS_WAIT_REPLICAS=1` on a Redis without a replica: the publish is
/// answered 503 `unavailable` (generic text) once the wait times out (not after the 2 s command
/// timeout); with a replica attached the same publish is answered 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_no_replica_acknowledged_answers_503() {
    let primary = RedisServer::start();
    let prefix = format!("h{}:wait:", std::process::id());
    let url = primary.url();
    let node = NodeProcess::start(
        "wait0",
        &[
            ("HERALD_REDIS_URL", url.as_str()),
            ("HERALD_REDIS_PREFIX", prefix.as_str()),
            ("HERALD_REDIS_WAIT_REPLICAS", "1"),
            ("HERALD_REDIS_WAIT_TIMEOUT_MS", "300"),
        ],
    );
    node.wait_ready(Duration::from_secs(15)).await;
    let client = reqwest::Client::new();
    let body = json!({"channel": "room:w", "data": {"n": 1}});
    let started = Instant::now();
    let (status, answer) = node::publish_to(&client, &node.http(), body.clone()).await;
    let took = started.elapsed();
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    // The reason ("0 of 1 redis replicas acknowledged…") is in the node's log; clients
    // get the generic text of every broker failure.
    assert_eq!(
        answer["error"]["message"], "broker unavailable; try again",
        "{answer}"
    );
    assert!(took < Duration::from_millis(1_900), "took {took:?}");

    let replica = RedisServer::start();
    let port = primary.port().to_string();
    assert_eq!(replica.cli(&["replicaof", "127.0.0.1", &port]), "OK");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, answer) = node::publish_to(&client, &node.http(), body.clone()).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{answer}");
        assert!(
            Instant::now() < deadline,
            "publishes never acknowledged: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Accepted publishes per channel: (epoch, offset).
type Accepted = Arc<Mutex<BTreeMap<String, Vec<(String, u64)>>>>;

/// Publishes to the users' channels, round robin over `https`, until `stop`.
/// Returns the task, what was accepted, and how many publishes failed.
fn publish_stream(
    https: Vec<String>,
    users: Vec<String>,
    every: Duration,
    stop: CancellationToken,
) -> (tokio::task::JoinHandle<u64>, Accepted) {
    let accepted: Accepted = Arc::default();
    let record = Arc::clone(&accepted);
    let task = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut failed = 0;
        let mut i = 0usize;
        while !stop.is_cancelled() {
            let user = &users[i % users.len()];
            let http = &https[i % https.len()];
            i += 1;
            let (status, body) =
                node::publish_to(&client, http, json!({"user": user, "data": {"i": i}})).await;
            if status == 200 {
                let channel = body["channel"].as_str().unwrap().to_owned();
                let offset = body["offset"].as_u64().unwrap();
                let epoch = body["epoch"].as_str().unwrap().to_owned();
                record
                    .lock()
                    .unwrap()
                    .entry(channel)
                    .or_default()
                    .push((epoch, offset));
            } else {
                failed += 1;
            }
            tokio::time::sleep(every).await;
        }
        failed
    });
    (task, accepted)
}

/// What one client saw of its channel against what was accepted.
#[derive(Debug, Default)]
struct Tally {
    accepted: u64,
    delivered: u64,
    /// Accepted, never delivered, and no resync after the client's last message of
    /// that epoch: a silent loss.
    lost: u64,
    /// Accepted, never delivered, but the client was told (it moved to a later epoch
    /// through `resync` / `recovered: false`).
    told: u64,
    duplicates: u64,
    /// Gaps or disorder inside an epoch without a resync.
    violations: u64,
    discontinuities: u64,
}

fn tally(record: &Record, channel: &str, accepted: &[(String, u64)], t: &mut Tally) {
    let seen = record.channels.get(channel).cloned().unwrap_or_default();
    let delivered: BTreeSet<&(String, u64)> = seen.messages.iter().collect();
    t.accepted += accepted.len() as u64;
    t.delivered += seen.messages.len() as u64;
    t.duplicates += (seen.messages.len() - delivered.len()) as u64;
    t.violations += seen.violations.len() as u64;
    t.discontinuities += u64::from(seen.discontinuities);
    // The first offset delivered in each epoch, and the epochs in order: a client may
    // only move to another epoch when told (resync / recovered: false).
    let mut first: BTreeMap<&str, u64> = BTreeMap::new();
    let mut epochs: Vec<&str> = Vec::new();
    for (e, o) in &seen.messages {
        first.entry(e.as_str()).or_insert(*o);
        if epochs.last() != Some(&e.as_str()) {
            epochs.push(e);
        }
    }
    let switches = epochs.len().saturating_sub(1) as u64;
    if switches > u64::from(seen.discontinuities) {
        eprintln!(
            "{channel}: moved epochs without a resync: {:?}",
            seen.messages
        );
        t.violations += switches - u64::from(seen.discontinuities);
    }
    let (at, last_epoch) = seen.position.clone().unwrap_or_default();
    for m in accepted {
        if delivered.contains(m) {
            continue;
        }
        // Missing: acceptable only when a resync told the client it is past it: it
        // left that epoch, or a resync placed it in that epoch after the message.
        let told = seen.discontinuities > 0
            && (m.0 != last_epoch || first.get(m.0.as_str()).map_or(m.1 <= at, |f| m.1 < *f));
        if told {
            t.told += 1;
        } else {
            eprintln!(
                "{channel}: accepted {m:?} never delivered; saw {:?}, at {:?}, {} resyncs",
                seen.messages, seen.position, seen.discontinuities
            );
            t.lost += 1;
        }
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

/// Three nodes on a Sentinel topology, `users` followers spread over them, a publish
/// stream through every node; the primary is SIGKILLed. Asserts no silent loss and no
/// duplicate, and prints the measurements.
async fn failover_under_load(name: &str, wait_replicas: &str) {
    let mut topology = RedisSentinel::start();
    let url = topology.url();
    let prefix = format!("h{}:{name}:", std::process::id());
    let env = [
        ("HERALD_REDIS_URL", url.as_str()),
        ("HERALD_REDIS_PREFIX", prefix.as_str()),
        ("HERALD_HISTORY_SIZE", "5000"),
        ("HERALD_REDIS_WAIT_REPLICAS", wait_replicas),
    ];
    let nodes: Vec<NodeProcess> = (0..3)
        .map(|i| NodeProcess::start(&format!("{name}{i}"), &env))
        .collect();
    for n in &nodes {
        n.wait_ready(Duration::from_secs(20)).await;
    }
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
    let https: Vec<String> = nodes.iter().map(NodeProcess::http).collect();
    let users: Vec<String> = (0..30).map(|i| format!("u{i}")).collect();
    let followers: Vec<Follower> = users
        .iter()
        .enumerate()
        .map(|(i, u)| Follower::on_nodes(addrs.clone(), node::token(u, &[], &[]), i))
        .collect();
    follower::assert_joined(&followers, &users, Duration::from_secs(15)).await;

    let stop = CancellationToken::new();
    let (publisher, accepted) = publish_stream(
        https.clone(),
        users.clone(),
        Duration::from_millis(5),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let killed_at = Instant::now();
    let old = topology.kill_primary();
    let promoted = topology.wait_promoted(old, Duration::from_secs(30));
    let promoted_after = killed_at.elapsed();
    // The killed server comes back (empty); the sentinels make it a replica of the new
    // primary. With WAIT 1 publishes need it: the promoted replica was the only one.
    topology.servers[old].restart();
    // Every node ready again (connected to the new primary, subscribed, probe back).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ready_after = Duration::ZERO;
    for http in &https {
        while !ready(http).await {
            assert!(Instant::now() < deadline, "{http} never became ready again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ready_after = killed_at.elapsed();
    }
    // Publishes succeed again.
    let accepted_before = accepted
        .lock()
        .unwrap()
        .values()
        .map(Vec::len)
        .sum::<usize>();
    while accepted
        .lock()
        .unwrap()
        .values()
        .map(Vec::len)
        .sum::<usize>()
        < accepted_before + 30
    {
        assert!(Instant::now() < deadline, "publishes never succeeded again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let publishing_after = killed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let failed = publisher.await.unwrap();
    let accepted = accepted.lock().unwrap().clone();

    // Every client reaches the last accepted (epoch, offset) of its channel.
    let deadline = Instant::now() + Duration::from_secs(30);
    for (f, u) in followers.iter().zip(&users) {
        let channel = format!("user:{u}");
        let Some(last) = accepted.get(&channel).and_then(|a| a.last().cloned()) else {
            continue;
        };
        loop {
            let at = f
                .snapshot()
                .channels
                .get(&channel)
                .and_then(|c| c.position.clone());
            if at
                .as_ref()
                .is_some_and(|(o, e)| *e == last.0 && *o >= last.1)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{channel} never reached {last:?}: {at:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut t = Tally::default();
    for (f, u) in followers.into_iter().zip(&users) {
        let channel = format!("user:{u}");
        let record = f.stop().await;
        tally(
            &record,
            &channel,
            accepted.get(&channel).map_or(&[][..], Vec::as_slice),
            &mut t,
        );
    }
    eprintln!(
        "measured: redis failover (SIGKILL of the primary, WAIT {wait_replicas}): replica \
         {promoted} promoted after {promoted_after:?}, all 3 nodes ready after \
         {ready_after:?}, publishing again after {publishing_after:?}; accepted {}, \
         failed publishes {failed}, delivered {}, lost {}, duplicates {}, violations \
         {}, resyncs {}, accepted but replaced by a resync {}",
        t.accepted, t.delivered, t.lost, t.duplicates, t.violations, t.discontinuities, t.told
    );
    assert_eq!((t.lost, t.duplicates, t.violations), (0, 0, 0), "{t:?}");
    assert!(t.accepted > 0 && t.delivered > 0, "{t:?}");
    // Every channel was written before the failover: every client moved to a new epoch
    // and was told.
    assert!(t.discontinuities >= users.len() as u64, "{t:?}");
}

/// With `WAIT 1`: acknowledged publishes were on the replica when it was promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_with_wait_loses_nothing_silently() {
    failover_under_load("sntw", "1").await;
}

/// Without `WAIT`: a publish answered 200 may be missing on the promoted replica;
/// clients are told with a resync, never left with a silent gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_without_wait_never_gaps_silently() {
    failover_under_load("snt0", "0").await;
}
