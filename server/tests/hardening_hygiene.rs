//! Resource hygiene: after a run of many connects, subscriptions, publishes
//! and disconnects (clean and abrupt), a real node backed by a real Redis returns to
//! idle: no connection, subscription or broker channel left in its gauges, its memory
//! back near its idle level, and Redis holds no pub/sub subscription of the node beyond
//! its liveness probe and no key beyond the registry once the configured history TTLs
//! have passed.

#[path = "support/node.rs"]
mod node;
#[path = "support/process.rs"]
mod process;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use process::NodeProcess;
use redis_server::RedisServer;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const ROUNDS: usize = 10;
const CLIENTS: usize = 40;
const CHANNELS: usize = 100;

/// One client's life: hello, three subscriptions, a publish, then a clean close or an
/// abrupt drop of the TCP connection.
async fn client_life(url: String, i: usize) {
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let token = node::token(&format!("h{}", i % 25), &["room:*"], &["room:*"]);
    let mut frames = vec![json!({"type": "hello", "token": token})];
    for k in 0..3 {
        let channel = format!("room:{}", (i * 7 + k * 13) % CHANNELS);
        frames.push(json!({"type": "subscribe", "id": k + 1, "channel": channel}));
    }
    frames.push(
        json!({"type": "publish", "id": 9, "channel": format!("room:{}", i % CHANNELS), "data": i}),
    );
    for f in frames {
        ws.send(Message::Text(f.to_string().into())).await.unwrap();
    }
    // Wait for the publish reply: everything before it was done.
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("replies in time")
            .expect("open")
            .expect("a frame");
        if let Message::Text(t) = m {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "reply" && v["id"] == 9 {
                assert!(v["result"].is_object(), "{v}");
                break;
            }
        }
    }
    if i.is_multiple_of(2) {
        let _ = ws.close(None).await;
    } else {
        drop(ws); // no close frame
    }
}

async fn wait_until<F, Fut>(what: &str, wait: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + wait;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_churn_the_node_and_redis_return_to_idle() {
    let redis = RedisServer::start();
    let prefix = format!("hy{}:", std::process::id());
    let node = NodeProcess::start(
        "hygiene",
        &[
            ("HERALD_REDIS_URL", &redis.url()),
            ("HERALD_REDIS_PREFIX", &prefix),
            ("HERALD_UNSUBSCRIBE_DELAY_MS", "200"),
            ("HERALD_HISTORY_TTL_SECS", "2"),
            ("HERALD_HISTORY_META_TTL_SECS", "3"),
        ],
    );
    node.wait_ready(Duration::from_secs(15)).await;
    let url = node.ws_url();
    // One warm-up round, so lazily built state is in the idle figure too.
    let warm: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client_life(url.clone(), i)))
        .collect();
    for t in warm {
        t.await.unwrap();
    }
    wait_until("idle after warm-up", Duration::from_secs(15), || async {
        herald_testkit::metric(&node.http(), "herald_connections").await == 0.0
            && herald_testkit::metric(&node.http(), "herald_broker_channels").await == 0.0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_before = node.rss_kib().unwrap();
    let fds_before = node.open_fds().unwrap();

    let started = Instant::now();
    for round in 0..ROUNDS {
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|i| tokio::spawn(client_life(url.clone(), round * CLIENTS + i)))
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    let churn = started.elapsed();
    let peak_connections =
        herald_testkit::metric(&node.http(), "herald_connections_accepted_total").await;

    // The node forgets everything…
    wait_until(
        "node gauges back to zero",
        Duration::from_secs(15),
        || async {
            herald_testkit::metric(&node.http(), "herald_connections").await == 0.0
                && herald_testkit::metric(&node.http(), "herald_subscriptions").await == 0.0
                && herald_testkit::metric(&node.http(), "herald_broker_channels").await == 0.0
        },
    )
    .await;
    // …Redis has no subscription of it but its probe and the server API's control
    // channel (both for the node's whole life)…
    let pattern = format!("{prefix}*");
    wait_until(
        "only the probe and control channels subscribed",
        Duration::from_secs(15),
        || async {
            let channels = redis.cli(&["pubsub", "channels", &pattern]);
            channels
                .lines()
                .all(|c| c.contains("probe") || c.contains("{#control}"))
        },
    )
    .await;
    // …and once the history TTLs passed, no key but the registry.
    let expired = Instant::now();
    wait_until(
        "only the registry key left",
        Duration::from_secs(20),
        || async {
            let keys = redis.cli(&["--scan", "--pattern", &pattern]);
            keys.lines().all(|k| k == format!("{prefix}nodes"))
        },
    )
    .await;
    let keys_gone = expired.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_after = node.rss_kib().unwrap();
    let fds_after = node.open_fds().unwrap();
    eprintln!(
        "measured: hygiene: {} connections accepted in all (a warm-up round of {CLIENTS}, then \
         {ROUNDS} rounds of {CLIENTS}, 3 subscriptions and a publish each, half closed \
         abruptly; the rounds took {churn:?}); node RSS idle {} KiB before, {} KiB \
         after (+{} KiB); fds {fds_before} before, {fds_after} after; Redis keys gone {keys_gone:?} \
         after the node went idle",
        peak_connections,
        idle_before,
        idle_after,
        idle_after.saturating_sub(idle_before),
    );
    assert!(
        fds_after <= fds_before + 2,
        "fds {fds_before} -> {fds_after}"
    );
    assert!(
        idle_after < idle_before + 16 * 1024,
        "idle memory grew from {idle_before} KiB to {idle_after} KiB"
    );
}
