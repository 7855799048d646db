//! Unacked detection across real node processes on one Redis: every node sweeps, each
//! unacked message is reported once cluster-wide, and a node killed (SIGKILL) between
//! a publish and its timeout leaves the report to the survivors.

use std::time::{Duration, Instant};

use herald_testkit::process::NodeProcess;
use herald_testkit::redis::RedisServer;
use serde_json::{json, Value};

fn prefix(test: &str) -> String {
    format!("t{}:{test}:", std::process::id())
}

fn start(n: usize, redis: &RedisServer, prefix: &str, ack_timeout_ms: &str) -> Vec<NodeProcess> {
    let url = redis.url();
    // Unacked detection runs only with a webhook; nothing needs to listen there (the
    // reports go to the webhook log in Redis either way).
    let env = [
        ("HERALD_REDIS_URL", url.as_str()),
        ("HERALD_REDIS_PREFIX", prefix),
        ("HERALD_ACK_TIMEOUT_MS", ack_timeout_ms),
        ("HERALD_WEBHOOK_URL", "http://127.0.0.1:9/hook"),
        (
            "HERALD_WEBHOOK_SECRET",
            "receipts-test-webhook-secret-of-32-bytes-or-more",
        ),
    ];
    (0..n)
        .map(|i| NodeProcess::start(&format!("node{i}"), &env))
        .collect()
}

async fn publish(http: &str, user: &str, data: Value) {
    let r = reqwest::Client::new()
        .post(format!("{http}/v1/publish"))
        .bearer_auth(herald_testkit::API_KEY)
        .json(&json!({"user": user, "data": data}))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("publish");
    assert_eq!(r.status().as_u16(), 200);
}

async fn reported(nodes: &[&NodeProcess]) -> f64 {
    let mut sum = 0.0;
    for n in nodes {
        sum += herald_testkit::metric(&n.http(), "herald_unacked_messages_total").await;
    }
    sum
}

async fn wait_reported(nodes: &[&NodeProcess], want: f64, wait: Duration) {
    let deadline = Instant::now() + wait;
    loop {
        let got = reported(nodes).await;
        if got >= want {
            return;
        }
        assert!(Instant::now() < deadline, "{got} of {want} reports in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Three nodes sweep the same due set: 30 messages to 6 offline users are reported
/// 30 times in total, not more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_sweeps_and_each_message_is_reported_once() {
    let redis = RedisServer::start();
    let nodes = start(3, &redis, &prefix("sweep3"), "1000");
    for n in &nodes {
        n.wait_ready(Duration::from_secs(15)).await;
    }
    for i in 0..30 {
        let n = &nodes[i % 3];
        publish(&n.http(), &format!("off{}", i % 6), json!(i)).await;
    }
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    wait_reported(&all, 30.0, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(reported(&all).await, 30.0);
}

/// The node that accepted the publishes is killed at once; the survivor reports them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_its_reports_to_another_node() {
    let redis = RedisServer::start();
    // Long enough that the first node cannot report anything before it is killed,
    // even on a busy machine.
    let mut nodes = start(2, &redis, &prefix("kill"), "3000");
    for n in &nodes {
        n.wait_ready(Duration::from_secs(15)).await;
    }
    for i in 0..5 {
        publish(&nodes[0].http(), "dave", json!(i)).await;
    }
    nodes[0].kill();
    wait_reported(&[&nodes[1]], 5.0, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(reported(&[&nodes[1]]).await, 5.0);
}

/// `HERALD_ACK_TIMEOUT_MS` out of its range (and not 0) is a startup error that names it.
#[test]
fn an_ack_timeout_out_of_range_refuses_to_start() {
    for bad in ["50", "3600001", "soon"] {
        let r = herald_testkit::process::start_refused(&[
            ("HERALD_LISTEN", "127.0.0.1:0"),
            ("HERALD_ACK_TIMEOUT_MS", bad),
        ]);
        assert!(!r.status.success(), "{bad}");
        assert!(
            r.stderr.contains("ack-timeout-ms") || r.stderr.contains("ACK_TIMEOUT"),
            "{bad}: {}",
            r.stderr
        );
    }
}
