//! The SDK against a cluster of real `herald` processes sharing a real Redis: a node
//! killed, drained or frozen under clients that receive a steady stream, and a token
//! that expires. The application must see every published message exactly once, in
//! order, on whichever node it ends up. (Token refresh within a session is in
//! `server_control.rs`.)

mod support;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_client::{Client, DisconnectReason, Events};
use serde_json::json;
use support::{assert_exactly_once, publish, token_for, Cluster, Publisher, Recorder, WAIT};

fn token(user: &str) -> String {
    token_for(user, &["room:*"], &[], 3600)
}

#[derive(Clone, Copy, Debug)]
enum Failure {
    Kill,
    Drain,
}

/// Two clients sit on node 0: alice with a URL list, bob with node 0's URL and then
/// `/v1/connect` of the others. Node 0 fails while a publisher on node 2 sends to both
/// personal channels and a shared room.
async fn node_failure(failure: Failure) {
    let mut cluster = Cluster::start(3, &format!("{failure:?}"), &[]).await;
    let [n0, n1, n2] = [0, 1, 2].map(|i| &cluster.nodes[i]);
    let room = "room:flow";
    let start = |b: herald_client::ClientBuilder, user: &str| -> (Client, Events) {
        b.token(token(user))
            .subscribe(room)
            .backoff(Duration::from_millis(100), Duration::from_secs(1))
            .start()
            .unwrap()
    };
    let (alice, events) = start(
        Client::builder()
            .url(n0.ws_url())
            .url(n1.ws_url())
            .url(n2.ws_url()),
        "alice",
    );
    let alice_rec = Recorder::start(events);
    let (bob, events) = start(
        Client::builder()
            .url(n0.ws_url())
            .discover(n1.http())
            .discover(n2.http()),
        "bob",
    );
    let bob_rec = Recorder::start(events);
    for rec in [&alice_rec, &bob_rec] {
        rec.wait("subscribed on node0", WAIT, |r| {
            r.connected.len() == 1
                && r.connected[0].node == "node0"
                && r.subscribed.iter().any(|s| s.channel == room)
        })
        .await;
    }

    let channels = vec!["user:alice".to_owned(), "user:bob".to_owned(), room.into()];
    let publisher = Publisher::start(n2.http(), channels, Duration::from_millis(5));
    alice_rec
        .wait("messages flowing", WAIT, |r| {
            r.offsets("user:alice").len() >= 10
        })
        .await;

    let failed_at = Instant::now();
    let n0 = cluster.nodes.remove(0);
    let stopped = match failure {
        Failure::Kill => {
            let mut n0 = n0;
            n0.kill();
            None
        }
        Failure::Drain => Some(tokio::task::spawn_blocking(move || {
            let mut n0 = n0;
            n0.terminate(Duration::from_secs(10));
        })),
    };
    for (who, rec) in [("alice", &alice_rec), ("bob", &bob_rec)] {
        rec.wait("a session on another node", WAIT, |r| {
            r.connected.len() >= 2 && r.connected.last().unwrap().node != "node0"
        })
        .await;
        let moved = rec.with(|r| r.connected.last().cloned().unwrap());
        println!(
            "{who}: {failure:?} → on {} after {:?}",
            moved.node,
            failed_at.elapsed()
        );
        assert!(moved.node_changed);
    }
    if let Some(stopped) = stopped {
        stopped.await.unwrap();
    }
    // Keep publishing a little on the new sessions, then stop.
    publisher.wait_count(publisher.count() + 30).await;
    let accepted = publisher.stop().await;

    for (who, rec) in [("alice", &alice_rec), ("bob", &bob_rec)] {
        for channel in [format!("user:{who}"), room.to_owned()] {
            let last = accepted[&channel].last().unwrap().0;
            rec.wait(&format!("{who} to reach {channel} #{last}"), WAIT, |r| {
                r.last(&channel) >= last
            })
            .await;
            rec.with(|r| assert_exactly_once(who, r, &channel, &accepted[&channel]));
        }
        rec.with(|r| {
            let closes: Vec<&DisconnectReason> = r.disconnected.iter().map(|d| &d.reason).collect();
            if let Failure::Drain = failure {
                // Back at once, after the server's spread (`after_ms` < 1 s), no backoff.
                let drained = r
                    .disconnected
                    .iter()
                    .find(|d| matches!(d.reason, DisconnectReason::Closed { code: 4503, .. }));
                let drained = drained.unwrap_or_else(|| panic!("{who}: no 4503: {closes:?}"));
                assert!(drained.retry_in.unwrap() < Duration::from_secs(1));
            }
            // Every resumed channel was recovered.
            assert!(r.subscribed.iter().all(|s| !s.resumed || s.recovered));
        });
    }
    alice.close().await;
    bob.close().await;
}

#[tokio::test]
async fn a_killed_node_costs_the_application_no_message_and_no_duplicate() {
    node_failure(Failure::Kill).await;
}

#[tokio::test]
async fn a_drained_node_moves_its_clients_without_loss() {
    node_failure(Failure::Drain).await;
}

#[tokio::test]
async fn a_frozen_node_is_declared_dead_by_the_heartbeat_watchdog() {
    let cluster = Cluster::start(2, "frozen", &[("HERALD_HEARTBEAT_MS", "500")]).await;
    let [n0, n1] = [0, 1].map(|i| &cluster.nodes[i]);
    let (client, events) = Client::builder()
        .url(n0.ws_url())
        .url(n1.ws_url())
        .token(token("alice"))
        .connect_timeout(Duration::from_secs(2))
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    rec.wait("session on node0", WAIT, |r| r.connected.len() == 1)
        .await;
    let first = publish(&n1.http(), "user:alice", json!({"n": 0})).await;
    rec.wait("first message", WAIT, |r| r.last("user:alice") == first)
        .await;

    n0.pause();
    let paused = Instant::now();
    // Sent while the client still sits on the frozen node: recovered on the new one.
    let second = publish(&n1.http(), "user:alice", json!({"n": 1})).await;
    rec.wait("watchdog", WAIT, |r| !r.disconnected.is_empty())
        .await;
    let detected = paused.elapsed();
    rec.wait("session on node1", WAIT, |r| {
        r.connected.last().is_some_and(|c| c.node == "node1")
    })
    .await;
    println!(
        "frozen node (heartbeat 500 ms) declared dead after {detected:?}, moved after {:?}",
        paused.elapsed()
    );
    rec.wait("second message", WAIT, |r| r.last("user:alice") == second)
        .await;
    rec.with(|r| {
        assert_eq!(r.disconnected[0].reason, DisconnectReason::HeartbeatTimeout);
        assert_exactly_once("alice", r, "user:alice", &[(first, 0), (second, 1)]);
    });
    n0.resume();
    client.close().await;
}

#[tokio::test]
async fn a_token_that_cannot_be_refreshed_ends_with_4401_and_the_callback_reconnects() {
    let cluster = Cluster::start(1, "token", &[]).await;
    let calls = Arc::new(AtomicU32::new(0));
    let refusing = Arc::new(AtomicBool::new(true));
    let (counter, refuse) = (calls.clone(), refusing.clone());
    // The first token lives 2 s. Then the backend fails (so every refresh attempt
    // fails) until the test lets it hand out hour-long tokens.
    let provider = move || {
        let call = counter.fetch_add(1, Ordering::SeqCst);
        let token = if call == 0 {
            Ok(token_for("alice", &[], &[], 2))
        } else if refuse.load(Ordering::SeqCst) {
            Err(std::io::Error::other("token backend down"))
        } else {
            Ok(token_for("alice", &[], &[], 3600))
        };
        async move { token }
    };
    let (client, events) = Client::builder()
        .url(cluster.nodes[0].ws_url())
        .token_provider(provider)
        .backoff(Duration::from_millis(100), Duration::from_secs(1))
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    rec.wait("session", WAIT, |r| r.connected.len() == 1).await;
    let http = cluster.nodes[0].http();
    let first = publish(&http, "user:alice", json!({"n": 0})).await;
    rec.wait("first message", WAIT, |r| r.last("user:alice") == first)
        .await;

    // No refresh succeeds: at `exp` the node closes the session.
    rec.wait("4401 token expired", WAIT, |r| {
        r.disconnected.iter().any(|d| {
            matches!(&d.reason, DisconnectReason::Closed { code: 4401, reason } if reason == "token expired")
        })
    })
    .await;
    let second = publish(&http, "user:alice", json!({"n": 1})).await;
    refusing.store(false, Ordering::SeqCst);
    rec.wait("second session", WAIT, |r| r.connected.len() == 2)
        .await;
    rec.wait("second message", WAIT, |r| r.last("user:alice") == second)
        .await;
    rec.with(|r| assert_exactly_once("alice", r, "user:alice", &[(first, 0), (second, 1)]));
    assert!(
        calls.load(Ordering::SeqCst) >= 3,
        "first token, a failed refresh, the reconnect's token"
    );
    client.close().await;
}

#[tokio::test]
async fn a_subscribe_refused_while_redis_is_down_is_retried_once_it_is_back() {
    let mut cluster = Cluster::start(1, "redis-down", &[]).await;
    let (client, events) = Client::builder()
        .url(cluster.nodes[0].ws_url())
        .token(token("alice"))
        .request_timeout(WAIT)
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    rec.wait("session", WAIT, |r| r.connected.len() == 1).await;

    cluster.redis.kill();
    let readyz = format!("{}/readyz", cluster.nodes[0].http());
    let deadline = Instant::now() + WAIT;
    while reqwest::get(&readyz).await.unwrap().status() == 200 {
        assert!(
            Instant::now() < deadline,
            "the node did not notice Redis is gone"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let subscribe = tokio::spawn({
        let client = client.clone();
        async move { client.subscribe("room:later").await }
    });
    // The node answers `unavailable` while Redis is down; the client keeps the channel
    // and asks again until Redis is back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.redis.restart();
    let sub = subscribe
        .await
        .unwrap()
        .expect("subscribed once Redis is back");
    assert_eq!(sub.channel, "room:later");
    rec.with(|r| assert!(r.failed.is_empty(), "{:?}", r.failed));
    client.close().await;
}
