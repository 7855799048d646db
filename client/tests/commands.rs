//! The SDK against one real `herald` node (in-memory broker): command replies, typed
//! errors, commands issued while disconnected, and close codes that stop the client.

mod support;

use std::time::Duration;

use herald_client::{Client, DisconnectReason, Error, ErrorCode, ResyncCause, State, StopReason};
use herald_testkit::process::NodeProcess;
use serde_json::json;
use support::{publish, token_for, Recorder, WAIT};

fn alice_token() -> String {
    token_for("alice", &["room:*"], &["room:*"], 3600)
}

#[tokio::test]
async fn commands_resolve_with_replies_and_typed_errors() {
    let node = NodeProcess::start("cmd", &[]);
    let (client, events) = Client::builder()
        .url(node.ws_url())
        .token(alice_token())
        .start()
        .unwrap();
    let rec = Recorder::start(events);

    let sub = client.subscribe("room:1").await.unwrap();
    assert_eq!(sub.channel, "room:1");
    assert!(!sub.resumed && !sub.recovered);
    let position = client.publish("room:1", &json!({"n": 1})).await.unwrap();
    assert_eq!(position.offset, sub.position.offset + 1);
    rec.wait("own message", WAIT, |r| r.last("room:1") == position.offset)
        .await;
    rec.with(|r| {
        let m = &r.messages["room:1"][0];
        assert_eq!(m.data, json!({"n": 1}));
        // Set by the server from the token's sub.
        assert_eq!(m.from.as_deref(), Some("alice"));
    });

    // Nodes batch presence changes (every 100 ms): ask until alice shows.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let users = client.presence("room:1").await.unwrap();
        if users.get("alice") == Some(&1) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{users:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let forbidden = client.subscribe("secret:1").await.unwrap_err();
    assert_eq!(forbidden.code(), Some(ErrorCode::Forbidden), "{forbidden}");
    rec.wait("subscribe failure event", WAIT, |r| {
        r.failed.iter().any(|(c, _)| c == "secret:1")
    })
    .await;
    let e = client.publish("secret:1", &1).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden), "{e}");
    let e = client.presence("user:bob").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden), "{e}");
    let e = client.unsubscribe("user:alice").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden), "{e}");
    assert!(matches!(
        client.subscribe("room:1").await,
        Err(Error::AlreadySubscribed(_))
    ));
    assert!(matches!(
        client.subscribe("bad name").await,
        Err(Error::InvalidChannel { .. })
    ));

    // After unsubscribe, nothing more arrives from the channel: the next message the
    // application sees is the one on the personal channel.
    client.unsubscribe("room:1").await.unwrap();
    client.publish("room:1", &json!({"n": 2})).await.unwrap();
    let personal = publish(&node.http(), "user:alice", json!({"n": 3})).await;
    rec.wait("personal message", WAIT, |r| {
        r.last("user:alice") == personal
    })
    .await;
    rec.with(|r| assert_eq!(r.offsets("room:1"), [position.offset]));
    rec.with(|r| assert_eq!(r.messages["user:alice"][0].from, None, "an API push"));

    let positions = client.positions().await.unwrap();
    assert_eq!(positions["user:alice"].offset, personal);
    assert!(!positions.contains_key("room:1"));

    client.close().await;
    assert_eq!(client.state(), State::Stopped(StopReason::ClientClosed));
    assert!(matches!(
        client.publish("room:1", &1).await,
        Err(Error::Closed)
    ));
    rec.wait("end of events", WAIT, |r| r.ended).await;
    rec.with(|r| assert_eq!(r.stopped, Some(StopReason::ClientClosed)));
}

#[tokio::test]
async fn commands_issued_while_disconnected_apply_at_the_next_hello() {
    let mut node = NodeProcess::start("offline", &[]);
    let (client, events) = Client::builder()
        .url(node.ws_url())
        .token(alice_token())
        .backoff(Duration::from_millis(50), Duration::from_millis(300))
        .request_timeout(WAIT)
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    rec.wait("first session", WAIT, |r| r.connected.len() == 1)
        .await;
    let before = publish(&node.http(), "user:alice", json!({"n": 0})).await;
    rec.wait("first message", WAIT, |r| r.last("user:alice") == before)
        .await;

    node.kill();
    rec.wait("disconnect", WAIT, |r| !r.disconnected.is_empty())
        .await;
    assert_ne!(
        client.state(),
        State::Connected {
            node: "offline".into()
        }
    );

    let subscribe = tokio::spawn({
        let c = client.clone();
        async move { c.subscribe("room:2").await }
    });
    let publish_later = tokio::spawn({
        let c = client.clone();
        async move { c.publish("room:2", &json!({"n": 1})).await }
    });
    // Unsubscribing while disconnected is immediate and local.
    client.unsubscribe("room:9").await.unwrap();

    node.restart();
    let sub = subscribe.await.unwrap().unwrap();
    assert_eq!(sub.channel, "room:2");
    let published = publish_later.await.unwrap().unwrap();
    rec.wait("queued publish delivered", WAIT, |r| {
        r.last("room:2") == published.offset
    })
    .await;
    // The in-memory broker lost the personal channel's history with the restart: the
    // resume is not recovered, and the application is told to reload.
    rec.wait("resync of the personal channel", WAIT, |r| {
        r.resyncs
            .iter()
            .any(|x| x.channel == "user:alice" && x.cause == ResyncCause::NotRecovered)
    })
    .await;
    rec.with(|r| {
        assert!(r.connected.len() >= 2);
        assert!(r
            .subscribed
            .iter()
            .any(|s| s.channel == "user:alice" && s.resumed && !s.recovered));
    });
    client.close().await;
}

#[tokio::test]
async fn publish_waits_for_a_connection_only_as_long_as_the_request_timeout() {
    // Nothing listens at this address.
    let port = herald_testkit::process::free_port();
    let (client, events) = Client::builder()
        .url(format!("ws://127.0.0.1:{port}/ws"))
        .token("unused")
        .request_timeout(Duration::from_millis(300))
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    let e = client.publish("room:1", &1).await.unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    let e = client.presence("room:1").await.unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    rec.wait("failed attempts", WAIT, |r| {
        r.disconnected
            .iter()
            .any(|d| matches!(d.reason, DisconnectReason::ConnectFailed(_)))
    })
    .await;
    // It keeps trying: between attempts it waits (`Reconnecting`), and the next
    // attempt may already have begun (`Connecting`) when the state is read.
    let state = client.state();
    assert!(
        matches!(state, State::Reconnecting | State::Connecting),
        "{state:?}"
    );
    client.close().await;
}

#[tokio::test]
async fn rejections_stop_the_client() {
    let node = NodeProcess::start(
        "reject",
        &[
            ("HERALD_ALLOWED_ORIGINS", "https://good.example"),
            ("HERALD_MAX_FRAME_BYTES", "2048"),
        ],
    );

    // 4403: an origin the node does not allow.
    let (client, events) = Client::builder()
        .url(node.ws_url())
        .token(alice_token())
        .origin("https://evil.example")
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    rec.wait("stop on 4403", WAIT, |r| r.ended).await;
    rec.with(|r| {
        assert!(matches!(
            r.stopped,
            Some(StopReason::Rejected { code: 4403, .. })
        ));
        assert_eq!(r.disconnected.len(), 1, "no second attempt");
        assert_eq!(r.disconnected[0].retry_in, None);
    });
    assert!(matches!(client.state(), State::Stopped(_)));
    assert!(matches!(
        client.subscribe("room:1").await,
        Err(Error::Closed)
    ));

    // 4401 with a fixed token: nothing better to offer, so stop.
    let (_client, events) = Client::builder()
        .url(node.ws_url())
        .token("not-a-jwt")
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    rec.wait("stop on 4401", WAIT, |r| r.ended).await;
    rec.with(|r| {
        assert_eq!(r.stopped, Some(StopReason::Unauthorized));
        assert!(matches!(
            r.disconnected[0].reason,
            DisconnectReason::Closed { code: 4401, .. }
        ));
    });

    // 1009: a frame over the node's limit. The allowed origin passes.
    let (client, events) = Client::builder()
        .url(node.ws_url())
        .token(alice_token())
        .origin("https://good.example")
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    client.subscribe("room:1").await.unwrap();
    let big = "x".repeat(4096);
    let e = client.publish("room:1", &big).await.unwrap_err();
    assert!(matches!(e, Error::ConnectionLost | Error::Closed), "{e}");
    rec.wait("stop on 1009", WAIT, |r| r.ended).await;
    rec.with(|r| {
        assert!(matches!(
            r.stopped,
            Some(StopReason::Rejected { code: 1009, .. })
        ))
    });
}

#[tokio::test]
async fn close_returns_even_when_nobody_reads_the_events() {
    let node = NodeProcess::start("unread", &[]);
    let (client, _unread_events) = Client::builder()
        .url(node.ws_url())
        .token(alice_token())
        .event_buffer(1)
        .start()
        .unwrap();
    for n in 0..5 {
        publish(&node.http(), "user:alice", json!({ "n": n })).await;
    }
    tokio::time::timeout(WAIT, client.close())
        .await
        .expect("close returned");
    assert_eq!(client.state(), State::Stopped(StopReason::ClientClosed));
}

#[tokio::test]
async fn a_channel_refused_at_hello_is_reported_and_forgotten() {
    let node = NodeProcess::start("refused", &[]);
    let (client, events) = Client::builder()
        .url(node.ws_url())
        .token(alice_token())
        .subscribe("room:ok")
        .subscribe("secret:no")
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    rec.wait("welcome applied", WAIT, |r| {
        r.subscribed.iter().any(|s| s.channel == "room:ok")
            && r.failed.iter().any(|(c, _)| c == "secret:no")
    })
    .await;
    rec.with(|r| assert_eq!(r.failed[0].1.code, ErrorCode::Forbidden));
    let positions = client.positions().await.unwrap();
    assert!(positions.contains_key("room:ok") && positions.contains_key("user:alice"));
    assert!(!positions.contains_key("secret:no"));
    // Forgotten: subscribing again is a new request (refused again), not "already".
    let e = client.subscribe("secret:no").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden));
    client.close().await;
}
