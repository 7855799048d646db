//! Redis restarted empty, in every order in which node B's two Redis connections and the
//! first push can come back (a silent stall after Redis restarts).
//!
//! Two nodes: A reaches Redis directly, B through a [`FaultProxy`]. Alice's socket is on
//! B; pushes enter at A. Redis is killed and restarted empty while the proxy holds back
//! B's subscriber connection (from its first `SUBSCRIBE`) and its command connection
//! (from its first script call, `EVAL…`). The test then lets three things happen in a
//! chosen order:
//! - **S**: B's subscriber connection comes back, and B is subscribed again in Redis;
//! - **C**: B's command connection comes back;
//! - **P**: a push for alice is accepted at A.
//!
//! Every one of the six orders, once with alice's channel already published to before
//! the restart (B follows a stream that is now gone) and once with a channel that never
//! had a message (B is seeded at offset 0): alice must get the push or a `resync` that
//! covers it within a bound. Silence is the failure this file exists for.

#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;

use std::time::{Duration, Instant};

use client::Client;
use herald_testkit::proxy::FaultProxy;
use herald_testkit::redis::RedisServer;
use node::{publish_to, test_config, TestNode};
use serde_json::{json, Value};

/// Reconnects (backoff up to 2 s), held commands timing out (2 s) and the probe: slow
/// on a shared machine, so generous.
const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
enum Step {
    /// B's subscriber connection is released, and B is subscribed again.
    Subscriber,
    /// B's command connection is released.
    Commands,
    /// The push for alice is accepted at node A.
    Push,
}

use Step::{Commands as C, Push as P, Subscriber as S};

fn prefix(test: &str) -> String {
    format!("ro{}:{test}:", std::process::id())
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Publishes to alice through `http` until it is accepted; returns `(offset, epoch)`.
async fn push(http: &str, data: &str) -> (u64, String) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) =
            publish_to(&client, http, json!({"user": "alice", "data": data})).await;
        if status == 200 {
            return (
                body["offset"].as_u64().expect("offset"),
                body["epoch"].as_str().expect("epoch").to_owned(),
            );
        }
        assert!(
            Instant::now() < deadline,
            "push never accepted: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Subscribers of alice's pub/sub channel in Redis (only B has a session in it).
fn subscribers(redis: &RedisServer, prefix: &str) -> u64 {
    let name = format!("{prefix}{{user:alice}}:c");
    redis
        .cli(&["pubsub", "numsub", &name])
        .lines()
        .nth(1)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until alice has the push `(offset, epoch, data)` or a `resync` at or past it.
async fn assert_not_silent(alice: &mut Client, offset: u64, epoch: &str, data: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "silence: alice got neither the push ({offset}, {epoch}) nor a resync within \
             {WAIT:?}; she saw {seen:?}"
        );
        if alice.silent_for(Duration::from_millis(200)).await {
            continue;
        }
        let frame = alice.recv().await;
        if frame["channel"] != "user:alice" {
            seen.push(frame);
            continue;
        }
        let delivered = frame["type"] == "message" && frame["data"] == data;
        let resynced = frame["type"] == "resync"
            && frame["epoch"] == epoch
            && frame["offset"].as_u64().is_some_and(|o| o >= offset);
        if delivered || resynced {
            return frame;
        }
        seen.push(frame);
    }
}

/// One run: `published_before` says whether alice's channel had a message before the
/// restart; `order` is the order of S, C and P after it.
async fn run(test: &str, published_before: bool, order: [Step; 3]) {
    init_tracing();
    let mut redis = RedisServer::start();
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", redis.port()).parse().unwrap()).await;
    let prefix = prefix(test);
    let config = |url: String| herald_server::Config {
        redis_url: Some(url),
        redis_prefix: prefix.clone(),
        // The subject is node b's own reconnect order while its links are held; with
        // moves on, b (cut off while a is ready) would move alice away (net_faults).
        cutoff_move_after_ms: 0,
        ..test_config()
    };
    let a = TestNode::start(config(redis.url())).await;
    let b = TestNode::start(config(format!("redis://{}", proxy.addr()))).await;
    let (mut alice, _) =
        Client::hello(&b.ws_url(), &node::token("alice", &[], &[]), json!(null)).await;
    let deadline = Instant::now() + WAIT;
    while subscribers(&redis, &prefix) == 0 {
        assert!(
            Instant::now() < deadline,
            "B never subscribed alice's channel"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if published_before {
        let (offset, epoch) = push(&a.http(), "before").await;
        let frame = assert_not_silent(&mut alice, offset, &epoch, "before").await;
        assert_eq!(frame["type"], "message", "{frame}");
    }

    // From now on B's connections are held back from their first SUBSCRIBE / script.
    let subscriber = proxy.hold_matching(b"SUBSCRIBE");
    let commands = proxy.hold_matching(b"EVAL");
    redis.restart(); // empty: no persistence
    let restarted = Instant::now();
    let mut pushed = None;
    let mut commands_back = false;
    for step in order {
        match step {
            Step::Subscriber => {
                // Let B's subscriber try (and be held) at least once before it is released.
                let deadline = Instant::now() + WAIT;
                while proxy.held(subscriber) == 0 {
                    assert!(
                        Instant::now() < deadline,
                        "B's subscriber never reconnected"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let errors = b.metric("herald_broker_errors_total").await;
                proxy.release(subscriber);
                let deadline = Instant::now() + WAIT;
                while subscribers(&redis, &prefix) == 0 {
                    assert!(Instant::now() < deadline, "B never resubscribed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if !commands_back {
                    // The race itself: B's continuity check after the resubscribe has
                    // met the held command connection at least once (it counts a broker
                    // error) and must keep trying rather than give up.
                    let deadline = Instant::now() + WAIT;
                    while b.metric("herald_broker_errors_total").await <= errors {
                        assert!(
                            Instant::now() < deadline,
                            "B's continuity check never tried while commands were held"
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            Step::Commands => {
                let deadline = Instant::now() + WAIT;
                while proxy.held(commands) == 0 {
                    assert!(
                        Instant::now() < deadline,
                        "B's command connection never sent a script"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                proxy.release(commands);
                commands_back = true;
            }
            Step::Push => {
                // Nobody on B has resubscribed yet unless S came first.
                pushed = Some(push(&a.http(), "after").await);
            }
        }
        eprintln!("{test}: {step:?} at {:?}", restarted.elapsed());
    }
    let (offset, epoch) = pushed.expect("the order has a push");
    let frame = assert_not_silent(&mut alice, offset, &epoch, "after").await;
    eprintln!(
        "measured: {test}: alice got {} {:?} after the restart",
        frame["type"],
        restarted.elapsed()
    );
    drop(proxy);
}

macro_rules! orderings {
    ($($name:ident: $before:expr, [$s1:expr, $s2:expr, $s3:expr];)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            run(stringify!($name), $before, [$s1, $s2, $s3]).await;
        }
    )*};
}

orderings! {
    followed_push_subscriber_commands: true, [P, S, C];
    followed_push_commands_subscriber: true, [P, C, S];
    followed_subscriber_push_commands: true, [S, P, C];
    followed_subscriber_commands_push: true, [S, C, P];
    followed_commands_push_subscriber: true, [C, P, S];
    followed_commands_subscriber_push: true, [C, S, P];
    fresh_push_subscriber_commands: false, [P, S, C];
    fresh_push_commands_subscriber: false, [P, C, S];
    fresh_subscriber_push_commands: false, [S, P, C];
    fresh_subscriber_commands_push: false, [S, C, P];
    fresh_commands_push_subscriber: false, [C, P, S];
    fresh_commands_subscriber_push: false, [C, S, P];
}
