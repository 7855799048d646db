//! The happy path of one node: hello, welcome, push by user, subscribe, publish,
//! presence, recovery.

#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;

use std::time::Duration;

use client::Client;
use node::TestNode;
use serde_json::json;

#[tokio::test]
async fn push_to_a_user_reaches_all_their_sockets_and_no_one_else() {
    let n = TestNode::start_default().await;
    let (mut a1, w) = Client::hello(&n.ws_url(), &n.token("alice", &[], &[]), json!({})).await;
    assert_eq!(w["user"], "alice");
    assert_eq!(w["heartbeat_ms"], 25000);
    assert!(w["subscriptions"]["user:alice"]["epoch"].is_string());
    let (mut a2, _) = Client::hello(&n.ws_url(), &n.token("alice", &[], &[]), json!({})).await;
    let (mut b, _) = Client::hello(&n.ws_url(), &n.token("bob", &[], &[]), json!({})).await;

    let (status, body) = n
        .publish(json!({"user": "alice", "data": {"text": "hi"}}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["channel"], "user:alice");
    assert_eq!(body["offset"], 1);
    for c in [&mut a1, &mut a2] {
        let m = c.next_message().await;
        assert_eq!(m["type"], "message");
        assert_eq!(m["channel"], "user:alice");
        assert_eq!(m["offset"], 1);
        assert_eq!(m["epoch"], body["epoch"]);
        assert_eq!(m["data"], json!({"text": "hi"}));
    }
    assert!(b.silent_for(Duration::from_millis(300)).await);
}

#[tokio::test]
async fn subscribe_publish_presence_unsubscribe() {
    let n = TestNode::start_default().await;
    let tok = n.token("alice", &["room:*"], &["room:*"]);
    let (mut a, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    let r = a
        .request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;
    assert_eq!(r["result"]["offset"], 0, "{r}");
    let r = a
        .request(json!({"type": "publish", "channel": "room:1", "data": [1, 2]}))
        .await;
    assert_eq!(r["result"]["offset"], 1, "{r}");
    let m = a.next_message().await;
    assert_eq!(
        (m["channel"].clone(), m["offset"].clone(), m["data"].clone()),
        (json!("room:1"), json!(1), json!([1, 2]))
    );

    // Presence is flushed to the broker in batches: poll with a deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = a
            .request(json!({"type": "presence", "channel": "room:1"}))
            .await;
        if r["result"]["users"]["alice"] == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence never showed alice: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = a
        .request(json!({"type": "unsubscribe", "channel": "room:1"}))
        .await;
    assert_eq!(r["result"], json!({}));
    n.publish(json!({"channel": "room:1", "data": 2})).await;
    assert!(a.silent_for(Duration::from_millis(300)).await);
}

#[tokio::test]
async fn resume_recovers_missed_messages_in_order() {
    let n = TestNode::start_default().await;
    let tok = n.token("alice", &["room:*"], &[]);
    let (mut a, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    let r = a
        .request(json!({"type": "subscribe", "channel": "room:9"}))
        .await;
    assert_eq!(r["result"]["epoch"], "", "never published yet: {r}");
    n.publish(json!({"channel": "room:9", "data": 1})).await;
    let m = a.next_message().await;
    assert_eq!(m["offset"], 1);
    // The first message names the epoch: continue from it.
    let epoch = m["epoch"].clone();
    a.close().await;
    for i in 2..=5 {
        n.publish(json!({"channel": "room:9", "data": i})).await;
    }
    let (mut a, w) = Client::hello(
        &n.ws_url(),
        &tok,
        json!({"room:9": {"offset": 1, "epoch": epoch}}),
    )
    .await;
    assert_eq!(w["subscriptions"]["room:9"]["recovered"], true, "{w}");
    assert_eq!(w["subscriptions"]["room:9"]["offset"], 5);
    for i in 2..=5 {
        let m = a.next_message().await;
        assert_eq!(
            (m["offset"].clone(), m["data"].clone()),
            (json!(i), json!(i))
        );
    }
    n.publish(json!({"channel": "room:9", "data": 6})).await;
    assert_eq!(a.next_message().await["offset"], 6);
}
