//! Delivery receipts in the SDK, against a real node (in-memory broker): messages of
//! the personal channel are acked on their own once handed to the application, a burst
//! costs one `ack` frame, and with auto-ack off nothing is acked until `Client::ack`.

mod support;

use std::time::Duration;

use herald_client::{Client, ErrorCode};
use herald_testkit::process::NodeProcess;
use serde_json::{json, Value};
use support::{publish, token_for, Recorder, WAIT};

async fn unread(http: &str, user: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{http}/v1/users/{user}/unread"))
        .bearer_auth(herald_testkit::API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn wait_acked(http: &str, user: &str, acked: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let u = unread(http, user).await;
        if u["acked"] == acked {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "acked {acked}? {u}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn messages_of_the_personal_channel_are_acked_automatically_and_coalesced() {
    let node = NodeProcess::start("ack-auto", &[]);
    let (client, events) = Client::builder()
        .url(node.ws_url())
        .token(token_for("alice", &[], &[], 3600))
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    rec.wait("connected", WAIT, |r| !r.connected.is_empty())
        .await;
    let before = herald_testkit::metric(&node.http(), "herald_acks_received_total").await;
    // One batch request: the 20 messages arrive as one burst.
    let messages: Vec<Value> = (0..20)
        .map(|i| json!({"channel": "user:alice", "data": i}))
        .collect();
    let r: Value = reqwest::Client::new()
        .post(format!("{}/v1/publish/batch", node.http()))
        .bearer_auth(herald_testkit::API_KEY)
        .json(&json!({ "messages": messages }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let last = 20;
    assert_eq!(r["results"][19]["offset"], last, "{r}");
    rec.wait("20 messages", WAIT, |r| r.last("user:alice") == last)
        .await;
    wait_acked(&node.http(), "alice", last).await;
    let frames = herald_testkit::metric(&node.http(), "herald_acks_received_total").await - before;
    assert!(
        (1.0..=5.0).contains(&frames),
        "a burst of 20 is acked in a few frames, not {frames}"
    );
    let u = unread(&node.http(), "alice").await;
    assert_eq!(u["messages"], json!([]));
    client.close().await;
}

#[tokio::test]
async fn with_auto_ack_off_only_manual_acks_count() {
    let node = NodeProcess::start("ack-manual", &[]);
    let (client, events) = Client::builder()
        .url(node.ws_url())
        .token(token_for("bob", &[], &[], 3600))
        .auto_ack(false)
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    rec.wait("connected", WAIT, |r| !r.connected.is_empty())
        .await;
    for i in 0..3 {
        publish(&node.http(), "user:bob", json!(i)).await;
    }
    rec.wait("3 messages", WAIT, |r| r.last("user:bob") == 3)
        .await;
    tokio::time::sleep(Duration::from_millis(400)).await; // several auto-ack delays
    assert_eq!(unread(&node.http(), "bob").await["acked"], 0);

    client.ack(2).await.unwrap();
    wait_acked(&node.http(), "bob", 2).await;
    assert_eq!(
        unread(&node.http(), "bob").await["messages"],
        json!([{"offset": 3, "data": 2}])
    );
    // Beyond what this connection delivered: refused by the server.
    let e = client.ack(9).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
    client.ack(3).await.unwrap();
    wait_acked(&node.http(), "bob", 3).await;
    client.close().await;
}
