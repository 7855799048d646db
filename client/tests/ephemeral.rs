//! Ephemeral messages through the SDK against a real `herald` node: handed to the
//! application as `Event::Ephemeral`, apart from ordinary messages, without touching
//! the channel's positions (no resync, no gap, offsets unchanged); published with
//! `publish_ephemeral`, which is never queued while offline.

mod support;

use herald_client::{Client, Error, ErrorCode};
use herald_testkit::process::NodeProcess;
use serde_json::json;
use support::{publish, token_for, Recorder, WAIT};

#[tokio::test]
async fn ephemeral_messages_reach_the_application_apart_from_the_stream() {
    let node = NodeProcess::start("eph", &[]);
    let start = |user: &str, publish: &[&str]| {
        Client::builder()
            .url(node.ws_url())
            .token(token_for(user, &["room:*"], publish, 3600))
            .start()
            .unwrap()
    };
    let (alice, alice_events) = start("alice", &["room:*"]);
    let (bob, bob_events) = start("bob", &[]);
    let _alice_rec = Recorder::start(alice_events);
    let rec = Recorder::start(bob_events);
    bob.subscribe("room:1").await.unwrap();

    let first = alice.publish("room:1", &json!({"n": 1})).await.unwrap();
    alice
        .publish_ephemeral("room:1", &json!({"typing": true}))
        .await
        .unwrap();
    let second = alice.publish("room:1", &json!({"n": 2})).await.unwrap();
    assert_eq!(
        second.offset,
        first.offset + 1,
        "the ephemeral took no offset"
    );
    // Through the API too, with a backend-chosen `from`.
    publish_ephemeral_api(&node.http(), json!({"x": 1})).await;

    rec.wait("two messages and two ephemerals", WAIT, |r| {
        r.last("room:1") == second.offset && r.ephemerals.len() == 2
    })
    .await;
    rec.with(|r| {
        assert_eq!(r.offsets("room:1"), vec![first.offset, second.offset]);
        assert_eq!(
            r.ephemerals[0],
            (
                "room:1".into(),
                Some("alice".into()),
                json!({"typing": true})
            )
        );
        assert_eq!(
            r.ephemerals[1],
            ("room:1".into(), Some("bot".into()), json!({"x": 1}))
        );
        assert!(r.resyncs.is_empty(), "{:?}", r.resyncs);
    });
    // The tracked position is the last ordinary message's.
    let positions = bob.positions().await.unwrap();
    assert_eq!(positions["room:1"], second);
    // Later ordinary messages continue without a gap.
    let third = publish(&node.http(), "room:1", json!({"n": 3})).await;
    rec.wait("third message", WAIT, |r| r.last("room:1") == third)
        .await;
    rec.with(|r| {
        assert_eq!(r.offsets("room:1").len(), 3);
        assert!(r.resyncs.is_empty());
    });

    // Typed errors: permission, and the server's rate bound (default 10 per second).
    let e = bob.publish_ephemeral("room:1", &1).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden), "{e}");
    let mut limited = false;
    for i in 0..30 {
        if let Err(e) = alice.publish_ephemeral("room:2", &i).await {
            assert_eq!(e.code(), Some(ErrorCode::RateLimited), "{e}");
            limited = true;
            break;
        }
    }
    assert!(
        limited,
        "30 ephemerals in a row hit the default bound of 10/s"
    );
    alice.close().await;
    bob.close().await;
}

#[tokio::test]
async fn ephemeral_publish_is_not_queued_while_offline() {
    // Nothing listens there: the client stays disconnected.
    let (client, _events) = Client::builder()
        .url("ws://127.0.0.1:9/ws")
        .token(token_for("alice", &["room:*"], &["room:*"], 3600))
        .start()
        .unwrap();
    let e = client.publish_ephemeral("room:1", &1).await.unwrap_err();
    assert!(matches!(e, Error::NotConnected), "{e}");
    client.close().await;
}

async fn publish_ephemeral_api(http: &str, data: serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{http}/v1/publish"))
        .bearer_auth(herald_testkit::API_KEY)
        .json(&json!({"channel": "room:1", "data": data, "ephemeral": true, "from": "bot"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body, json!({"channel": "room:1", "ephemeral": true}));
}
