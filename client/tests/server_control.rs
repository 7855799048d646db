//! The SDK against a real node's v1.1 session control: token refresh on `expiring`
//! (short-lived tokens, one session across several expiries), the server API's
//! disconnect (4401: a new token; 4410: stop), subscribe and unsubscribe.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald_client::{Client, DisconnectReason, StopReason};
use herald_testkit::process::NodeProcess;
use herald_testkit::API_KEY;
use serde_json::{json, Value};
use support::{assert_exactly_once, token_for, Publisher, Recorder, WAIT};

/// `POST {http}{path}` with the API key; returns the JSON answer.
async fn api(http: &str, path: &str, body: Value) -> Value {
    let response = reqwest::Client::new()
        .post(format!("{http}{path}"))
        .bearer_auth(API_KEY)
        .json(&body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("API request");
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.unwrap()
}

/// A token callback for alice whose tokens live `ttl` seconds; counts its calls.
fn short_tokens(
    calls: Arc<AtomicU32>,
    ttl: u64,
) -> impl Fn() -> std::future::Ready<Result<String, std::io::Error>> + Send + Sync + 'static {
    move || {
        calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(token_for("alice", &["room:*"], &[], ttl)))
    }
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_without_a_reconnect() {
    let node = NodeProcess::start("refresh", &[]);
    let calls = Arc::new(AtomicU32::new(0));
    let (client, events) = Client::builder()
        .url(node.ws_url())
        .token_provider(short_tokens(calls.clone(), 4))
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    rec.wait("session", WAIT, |r| r.connected.len() == 1).await;
    let publisher = Publisher::start(
        node.http(),
        vec!["user:alice".into()],
        Duration::from_millis(100),
    );
    // 4 s tokens, each refreshed at half its life: past 9 s the session has outlived
    // its first token twice.
    let deadline = tokio::time::Instant::now() + WAIT;
    while calls.load(Ordering::SeqCst) < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refresh: {} calls",
            calls.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let accepted = publisher.stop().await;
    let last = accepted["user:alice"].last().unwrap().0;
    rec.wait("every message", WAIT, |r| r.last("user:alice") == last)
        .await;
    rec.with(|r| {
        assert_eq!(r.connected.len(), 1, "one session all along");
        assert!(r.disconnected.is_empty(), "{:?}", r.disconnected);
        assert_exactly_once("alice", r, "user:alice", &accepted["user:alice"]);
    });
    client.close().await;
}

#[tokio::test]
async fn server_disconnect_4401_reconnects_with_a_new_token_and_4410_stops() {
    let node = NodeProcess::start("kick", &[]);
    let calls = Arc::new(AtomicU32::new(0));
    let (client, events) = Client::builder()
        .url(node.ws_url())
        .token_provider(short_tokens(calls.clone(), 3600))
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    rec.wait("session", WAIT, |r| r.connected.len() == 1).await;

    let answer = api(
        &node.http(),
        "/v1/users/alice/disconnect",
        json!({"reconnect": true}),
    )
    .await;
    assert_eq!(answer["sessions"], 1);
    rec.wait("second session", WAIT, |r| r.connected.len() == 2)
        .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "a new token for the reconnect"
    );
    rec.with(|r| {
        assert!(matches!(
            r.disconnected[0].reason,
            DisconnectReason::Closed { code: 4401, .. }
        ))
    });

    api(
        &node.http(),
        "/v1/users/alice/disconnect",
        json!({"reconnect": false}),
    )
    .await;
    rec.wait("stopped", WAIT, |r| r.ended).await;
    rec.with(|r| {
        assert!(
            matches!(r.stopped, Some(StopReason::Kicked { .. })),
            "{:?}",
            r.stopped
        );
        assert_eq!(r.connected.len(), 2, "no reconnect after the kick");
        assert_eq!(r.disconnected.last().unwrap().retry_in, None);
    });
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    client.close().await;
}

#[tokio::test]
async fn server_subscribe_and_unsubscribe_reach_the_application() {
    let node = NodeProcess::start("server-sub", &[]);
    let (client, events) = Client::builder()
        .url(node.ws_url())
        .token(token_for("alice", &["room:*"], &[], 3600))
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    rec.wait("session", WAIT, |r| r.connected.len() == 1).await;
    let http = node.http();
    let before = support::publish(&http, "room:9", json!({"n": 0})).await;

    let answer = api(
        &http,
        "/v1/users/alice/subscribe",
        json!({"channel": "room:9"}),
    )
    .await;
    assert_eq!(answer["sessions"], 1);
    rec.wait("subscribed event", WAIT, |r| {
        r.subscribed
            .iter()
            .any(|s| s.channel == "room:9" && s.by_server)
    })
    .await;
    let first = support::publish(&http, "room:9", json!({"n": 1})).await;
    let second = support::publish(&http, "room:9", json!({"n": 2})).await;
    rec.wait("room:9 messages", WAIT, |r| r.last("room:9") == second)
        .await;
    rec.with(|r| {
        assert_eq!(
            r.offsets("room:9"),
            [first, second],
            "after offset {before}"
        );
        let sub = r.subscribed.iter().find(|s| s.by_server).unwrap();
        assert_eq!(sub.position.offset, before);
    });
    assert!(client.positions().await.unwrap().contains_key("room:9"));

    api(
        &http,
        "/v1/users/alice/unsubscribe",
        json!({"channel": "room:9"}),
    )
    .await;
    rec.wait("unsubscribed event", WAIT, |r| !r.unsubscribed.is_empty())
        .await;
    rec.with(|r| assert_eq!(r.unsubscribed[0], ("room:9".into(), "server".into())));
    support::publish(&http, "room:9", json!({"n": 3})).await;
    let personal = support::publish(&http, "user:alice", json!({"n": 4})).await;
    rec.wait("personal message", WAIT, |r| {
        r.last("user:alice") == personal
    })
    .await;
    rec.with(|r| assert_eq!(r.last("room:9"), second, "nothing after the unsubscribe"));
    assert!(!client.positions().await.unwrap().contains_key("room:9"));
    client.close().await;
}
