//! Sessions that end when they should, and the backend's control over users, on one
//! node (in-memory broker): token expiry (`expiring`, 4401 "token expired"), `refresh`,
//! and the server API's disconnect, subscribe, unsubscribe and revoke.

#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;

use std::time::Duration;

use client::{Client, Closed};
use futures_util::StreamExt;
use herald_server::auth::{now_secs, Claims, TokenSigner};
use node::{test_config, TestNode, API_KEY, SECRET};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// A token for `user` expiring in `ttl` seconds, issued `age` seconds ago.
fn token(user: &str, channels: &[&str], ttl: u64, age: u64) -> String {
    let now = now_secs();
    TokenSigner::hs256(SECRET.as_bytes()).sign(&Claims {
        sub: user.into(),
        channels: Some(channels.iter().map(|s| s.to_string()).collect()),
        publish: Some(vec!["*".into()]),
        ..alice(now + ttl, Some(now - age))
    })
}

/// Claims of alice with this `exp` and `iat`, and no permission patterns.
fn alice(exp: u64, iat: Option<u64>) -> Claims {
    Claims {
        sub: "alice".into(),
        exp,
        nbf: None,
        iat,
        channels: None,
        publish: None,
    }
}

/// [`alice`], signed with the node's secret.
fn alice_token(exp: u64, iat: Option<u64>) -> String {
    TokenSigner::hs256(SECRET.as_bytes()).sign(&alice(exp, iat))
}

async fn api(node: &TestNode, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", node.http()))
        .bearer_auth(API_KEY)
        .json(&body)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("API call");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Reads raw frames until the close frame; returns (code, reason).
async fn raw_close(url: &str, hello: Value, wait: Duration) -> (u16, String) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    futures_util::SinkExt::send(&mut ws, Message::Text(hello.to_string().into()))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    }
}

#[tokio::test]
async fn expiring_then_closed_4401_token_expired() {
    let node = TestNode::start(test_config()).await;
    // 3 s left: `expiring` comes at half of it (the notice is at most half the
    // remaining lifetime), the close at exp.
    let t = token("alice", &[], 3, 0);
    let started = tokio::time::Instant::now();
    let (code, reason) = raw_close(
        &node.ws_url(),
        json!({"type":"hello","token":t}),
        Duration::from_secs(8),
    )
    .await;
    assert_eq!((code, reason.as_str()), (4401, "token expired"));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "closed at exp, not before: {took:?}"
    );

    let (mut c, _) = Client::hello(&node.ws_url(), &token("alice", &[], 4, 0), json!({})).await;
    let f = c.recv_wire(Duration::from_secs(4)).await.expect("expiring");
    assert_eq!(f["type"], "expiring", "{f}");
    let in_ms = f["in_ms"].as_u64().unwrap();
    assert!(
        (1_000..=2_100).contains(&in_ms),
        "about half of 4 s left: {in_ms}"
    );
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await,
        Closed::Code(4401)
    );
    node.shutdown().await;
}

#[tokio::test]
async fn refresh_keeps_the_session_past_exp() {
    let node = TestNode::start(test_config()).await;
    // One connection throughout: a close would fail the requests below.
    let (mut c, _) = Client::hello(
        &node.ws_url(),
        &token("alice", &["room:*"], 3, 0),
        json!({}),
    )
    .await;
    c.request(json!({"type":"subscribe","channel":"room:1"}))
        .await;
    for _ in 0..2 {
        // Wait for the notice, then refresh with a fresh 3 s token.
        loop {
            let f = c.recv_wire(Duration::from_secs(4)).await.expect("expiring");
            if f["type"] == "expiring" {
                break;
            }
        }
        let r = c
            .request(json!({"type":"refresh","token":token("alice", &["room:*"], 3, 0)}))
            .await;
        assert_eq!(r["result"], json!({}), "{r}");
    }
    // Past the first two tokens' exp: still the same session, still delivering.
    let (status, _) = node
        .publish(json!({"channel":"room:1","data":"still here"}))
        .await;
    assert_eq!(status, 200);
    let m = c.next_message().await;
    assert_eq!(
        (m["type"].as_str(), m["data"].as_str()),
        (Some("message"), Some("still here"))
    );
    node.shutdown().await;
}

#[tokio::test]
async fn refresh_refusals_leave_the_session_as_it_was() {
    let node = TestNode::start(test_config()).await;
    let (mut c, _) = Client::hello(
        &node.ws_url(),
        &token("alice", &["room:*"], 60, 0),
        json!({}),
    )
    .await;
    let bob = c
        .request(json!({"type":"refresh","token":token("bob", &["room:*"], 60, 0)}))
        .await;
    assert_eq!(bob["error"]["code"], "forbidden", "{bob}");
    let bad = c
        .request(json!({"type":"refresh","token":"not.a.token"}))
        .await;
    assert_eq!(bad["error"]["code"], "unauthorized", "{bad}");
    let signer = TokenSigner::hs256(b"another-secret-that-is-long-enough!!");
    let forged = signer.sign(&alice(now_secs() + 60, None));
    let forged = c.request(json!({"type":"refresh","token":forged})).await;
    assert_eq!(forged["error"]["code"], "unauthorized", "{forged}");
    // The old token still holds: the session works.
    let r = c
        .request(json!({"type":"subscribe","channel":"room:2"}))
        .await;
    assert!(r["result"].is_object(), "{r}");
    node.shutdown().await;
}

#[tokio::test]
async fn refresh_applies_new_permissions_at_once() {
    let node = TestNode::start(test_config()).await;
    let (mut c, _) = Client::hello(
        &node.ws_url(),
        &token("alice", &["room:*", "news"], 60, 0),
        json!({}),
    )
    .await;
    for ch in ["room:1", "news"] {
        c.request(json!({"type":"subscribe","channel":ch})).await;
    }
    // The backend also put alice in team:1; a token refresh must not take that away.
    let (status, body) = api(
        &node,
        "/v1/users/alice/subscribe",
        json!({"channel":"team:1"}),
    )
    .await;
    assert_eq!((status, &body), (200, &json!({"sessions": 1})));
    let f = c.recv().await;
    assert_eq!(
        (f["type"].as_str(), f["channel"].as_str()),
        (Some("subscribed"), Some("team:1"))
    );

    let r = c
        .request(json!({"type":"refresh","token":token("alice", &["news"], 60, 0)}))
        .await;
    assert_eq!(r["result"], json!({}), "{r}");
    let f = c.recv().await;
    assert_eq!(
        (
            f["type"].as_str(),
            f["channel"].as_str(),
            f["reason"].as_str()
        ),
        (Some("unsubscribed"), Some("room:1"), Some("permissions")),
        "{f}"
    );
    // room:1 no longer delivers; news and team:1 do.
    for ch in ["room:1", "news", "team:1"] {
        node.publish(json!({"channel":ch,"data":ch})).await;
    }
    let a = c.next_message().await;
    let b = c.next_message().await;
    let mut got = vec![a["channel"].clone(), b["channel"].clone()];
    got.sort_by_key(|v| v.to_string());
    assert_eq!(got, vec![json!("news"), json!("team:1")]);
    assert!(c.silent_for(Duration::from_millis(300)).await);
    let denied = c
        .request(json!({"type":"subscribe","channel":"room:1"}))
        .await;
    assert_eq!(denied["error"]["code"], "forbidden");
    node.shutdown().await;
}

#[tokio::test]
async fn server_api_controls_the_users_sessions() {
    let node = TestNode::start(test_config()).await;
    let (mut a1, _) = Client::hello(&node.ws_url(), &token("alice", &[], 600, 0), json!({})).await;
    let (mut a2, _) = Client::hello(&node.ws_url(), &token("alice", &[], 600, 0), json!({})).await;
    let (mut bob, _) = Client::hello(&node.ws_url(), &token("bob", &[], 600, 0), json!({})).await;

    // Subscribe: both of alice's sessions join and are told; bob is untouched.
    let (status, body) = api(
        &node,
        "/v1/users/alice/subscribe",
        json!({"channel":"group:7"}),
    )
    .await;
    assert_eq!((status, body), (200, json!({"sessions": 2})));
    for c in [&mut a1, &mut a2] {
        let f = c.recv().await;
        assert_eq!(f["type"], "subscribed", "{f}");
        assert_eq!(f["channel"], "group:7");
        assert!(f["offset"].is_u64() && f["epoch"].is_string(), "{f}");
    }
    // Members the backend added see the channel's presence, though their tokens do not
    // name it; a non-member with the same token does not.
    let r = a1
        .request(json!({"type":"presence","channel":"group:7"}))
        .await;
    assert!(r["result"]["users"].is_object(), "{r}");
    let r = bob
        .request(json!({"type":"presence","channel":"group:7"}))
        .await;
    assert_eq!(r["error"]["code"], "forbidden", "{r}");
    // Again: nobody new joins.
    let (_, body) = api(
        &node,
        "/v1/users/alice/subscribe",
        json!({"channel":"group:7"}),
    )
    .await;
    assert_eq!(body, json!({"sessions": 0}));
    node.publish(json!({"channel":"group:7","data":1})).await;
    for c in [&mut a1, &mut a2] {
        assert_eq!(c.next_message().await["channel"], "group:7");
    }
    assert!(bob.silent_for(Duration::from_millis(200)).await);

    // Unsubscribe.
    let (_, body) = api(
        &node,
        "/v1/users/alice/unsubscribe",
        json!({"channel":"group:7"}),
    )
    .await;
    assert_eq!(body, json!({"sessions": 2}));
    for c in [&mut a1, &mut a2] {
        let f = c.recv().await;
        assert_eq!(
            (f["type"].as_str(), f["reason"].as_str()),
            (Some("unsubscribed"), Some("server"))
        );
    }

    // Bad requests.
    for (path, body) in [
        ("/v1/users/alice/subscribe", json!({"channel":"user:bob"})),
        ("/v1/users/alice/subscribe", json!({"channel":"bad name"})),
        ("/v1/users/alice/subscribe", json!({})),
        (
            "/v1/users/alice/unsubscribe",
            json!({"channel":"user:alice"}),
        ),
        ("/v1/users/bad%20user/disconnect", json!({})),
        ("/v1/users/alice/disconnect", json!({"reconnect":"yes"})),
        ("/v1/users/alice/revoke", json!({})),
        ("/v1/users/alice/revoke", json!({"before": 0})),
        (
            "/v1/users/alice/revoke",
            json!({"before": now_secs() + 10 * 86_400}),
        ),
    ] {
        let (status, answer) = api(&node, path, body.clone()).await;
        assert_eq!(status, 400, "{path} {body}: {answer}");
        assert_eq!(answer["error"]["code"], "bad_request");
    }
    let unauth = reqwest::Client::new()
        .post(format!("{}/v1/users/alice/disconnect", node.http()))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauth.status(), 401);

    // Disconnect with reconnect: 4401 for both; kick: 4410.
    let (_, body) = api(
        &node,
        "/v1/users/alice/disconnect",
        json!({"reconnect": true}),
    )
    .await;
    assert_eq!(body, json!({"sessions": 2}));
    assert_eq!(
        a1.expect_close(Duration::from_secs(3)).await,
        Closed::Code(4401)
    );
    assert_eq!(
        a2.expect_close(Duration::from_secs(3)).await,
        Closed::Code(4401)
    );
    let (mut a3, _) = Client::hello(&node.ws_url(), &token("alice", &[], 600, 0), json!({})).await;
    let (_, body) = api(
        &node,
        "/v1/users/alice/disconnect",
        json!({"reconnect": false}),
    )
    .await;
    assert_eq!(body, json!({"sessions": 1}));
    assert_eq!(
        a3.expect_close(Duration::from_secs(3)).await,
        Closed::Code(4410)
    );
    // Nobody left: 0.
    let (_, body) = api(&node, "/v1/users/alice/disconnect", json!({})).await;
    assert_eq!(body, json!({"sessions": 0}));
    // Bob never noticed.
    let r = bob
        .request(json!({"type":"presence","channel":"user:bob"}))
        .await;
    assert!(r["result"].is_object(), "{r}");
    node.shutdown().await;
}

#[tokio::test]
async fn revoke_closes_old_tokens_and_refuses_them_from_now_on() {
    let node = TestNode::start(test_config()).await;
    let old = token("alice", &[], 600, 100);
    let (mut c, _) = Client::hello(&node.ws_url(), &old, json!({})).await;
    // A session of a token issued after the cut survives.
    let now = now_secs();
    let fresh = alice_token(now + 600, Some(now + 1));
    let (mut survivor, _) = Client::hello(&node.ws_url(), &fresh, json!({})).await;
    let (status, body) = api(&node, "/v1/users/alice/revoke", json!({"before": now})).await;
    assert_eq!((status, body), (200, json!({"sessions": 1})));
    assert_eq!(
        c.expect_close(Duration::from_secs(3)).await,
        Closed::Code(4401)
    );
    let (code, reason) = raw_close(
        &node.ws_url(),
        json!({"type":"hello","token":old}),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!((code, reason.as_str()), (4401, "token revoked"));
    // A token without `iat` counts as issued at exp - max lifetime: revoked too.
    let no_iat = alice_token(now + 600, None);
    let (code, _) = raw_close(
        &node.ws_url(),
        json!({"type":"hello","token":no_iat}),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(code, 4401);
    // A refresh with a revoked token is refused; the survivor stays.
    let r = survivor
        .request(json!({"type":"refresh","token":token("alice", &[], 600, 100)}))
        .await;
    assert_eq!(r["error"]["code"], "unauthorized", "{r}");
    let r = survivor
        .request(json!({"type":"presence","channel":"user:alice"}))
        .await;
    assert!(r["result"].is_object(), "{r}");
    // Other users are not affected.
    let (_bob, welcome) =
        Client::hello(&node.ws_url(), &token("bob", &[], 600, 100), json!({})).await;
    assert_eq!(welcome["user"], "bob");
    node.shutdown().await;
}

#[tokio::test]
async fn tokens_longer_than_the_lifetime_bound_are_refused() {
    let node = TestNode::start(herald_server::Config {
        max_token_lifetime_secs: 600,
        ..test_config()
    })
    .await;
    let (code, _) = raw_close(
        &node.ws_url(),
        json!({"type":"hello","token":token("alice", &[], 601, 0)}),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(code, 4401);
    let (_c, welcome) =
        Client::hello(&node.ws_url(), &token("alice", &[], 600, 0), json!({})).await;
    assert_eq!(welcome["user"], "alice");
    node.shutdown().await;
}

/// A server subscribe to a channel the session is already in by its own subscribe
/// (answered `sessions: 0`) still hands the membership to the backend: a refresh with a
/// token that no longer allows the channel keeps it, as for any server subscription.
#[tokio::test]
async fn server_subscribe_of_a_joined_channel_survives_a_narrowing_refresh() {
    let node = TestNode::start(test_config()).await;
    let (mut c, _) = Client::hello(
        &node.ws_url(),
        &token("alice", &["room:*"], 60, 0),
        json!({}),
    )
    .await;
    let r = c
        .request(json!({"type":"subscribe","channel":"room:1"}))
        .await;
    assert!(r["result"].is_object(), "{r}");
    let (status, body) = api(
        &node,
        "/v1/users/alice/subscribe",
        json!({"channel":"room:1"}),
    )
    .await;
    assert_eq!(
        (status, &body),
        (200, &json!({"sessions": 0})),
        "already in it"
    );
    // The session's queue is in order: once this message arrives, the server subscribe
    // queued before it has been applied.
    node.publish(json!({"channel":"room:1","data":1})).await;
    let m = c.next_message().await;
    assert_eq!(
        (m["type"].as_str(), m["data"].as_i64()),
        (Some("message"), Some(1)),
        "{m}"
    );

    let r = c
        .request(json!({"type":"refresh","token":token("alice", &[], 60, 0)}))
        .await;
    assert_eq!(r["result"], json!({}), "{r}");
    node.publish(json!({"channel":"room:1","data":2})).await;
    let m = c.next_message().await;
    assert_eq!(
        (
            m["type"].as_str(),
            m["channel"].as_str(),
            m["data"].as_i64()
        ),
        (Some("message"), Some("room:1"), Some(2)),
        "the channel stays, no `unsubscribed`: {m}"
    );
    node.shutdown().await;
}

/// A token whose `iat` lies in the future beyond the clock skew (here milliseconds
/// instead of seconds) would escape every revocation (`iat < before` never holds): it
/// is refused, at hello (4401) and in `refresh` (`unauthorized`).
#[tokio::test]
async fn tokens_issued_in_the_future_are_refused() {
    let node = TestNode::start(test_config()).await;
    let now = now_secs();
    let future = |iat: u64| alice_token(now + 600, Some(iat));
    let millis = future(now * 1000);
    let (code, _) = raw_close(
        &node.ws_url(),
        json!({"type":"hello","token":millis}),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(code, 4401);
    let (mut c, _) = Client::hello(&node.ws_url(), &token("alice", &[], 600, 0), json!({})).await;
    let r = c.request(json!({"type":"refresh","token":millis})).await;
    assert_eq!(r["error"]["code"], "unauthorized", "{r}");
    // Within the skew (a backend clock a little ahead) the token is fine.
    let r = c
        .request(json!({"type":"refresh","token":future(now + 30)}))
        .await;
    assert_eq!(r["result"], json!({}), "{r}");
    node.shutdown().await;
}

/// A client that stops reading while its channel is busy: the session still ends at the
/// token's `exp` (4401 "token expired"), not only when the stalled write times out
/// after two heartbeats (here 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_at_exp() {
    let node = TestNode::start(herald_server::Config {
        heartbeat_ms: 30_000,
        ..test_config()
    })
    .await;
    let (mut c, _) = Client::hello(
        &node.ws_url(),
        &token("alice", &["room:*"], 3, 0),
        json!({}),
    )
    .await;
    let r = c
        .request(json!({"type":"subscribe","channel":"room:1"}))
        .await;
    assert!(r["result"].is_object(), "{r}");
    // The client reads nothing from now on; 300 × 60 KB fill every buffer on the way.
    let big = "x".repeat(60_000);
    for i in 0..300 {
        let (status, _) = node
            .publish(json!({"channel":"room:1","data":{"i":i,"pad":big}}))
            .await;
        assert_eq!(status, 200);
    }
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(20);
    loop {
        let expired = node.metric("herald_disconnects_total{code=\"4401\"}").await;
        if expired >= 1.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the session outlived its token while its writes were stalled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        node.metric("herald_slow_consumer_disconnects_total").await,
        0.0
    );
    drop(c);
    node.shutdown().await;
}

/// A session at its subscription limit does not join a server subscribe, and the
/// answer does not count it; once it has room again, it does.
#[tokio::test]
async fn server_subscribe_counts_only_sessions_with_room() {
    let node = TestNode::start(herald_server::Config {
        max_subscriptions: 2,
        ..test_config()
    })
    .await;
    let (mut c, _) = Client::hello(
        &node.ws_url(),
        &token("alice", &["room:*"], 600, 0),
        json!({}),
    )
    .await;
    let r = c
        .request(json!({"type":"subscribe","channel":"room:1"}))
        .await;
    assert!(r["result"].is_object(), "{r}");
    // user:alice + room:1: full.
    let (_, body) = api(
        &node,
        "/v1/users/alice/subscribe",
        json!({"channel":"group:1"}),
    )
    .await;
    assert_eq!(body, json!({"sessions": 0}));
    assert!(c.silent_for(Duration::from_millis(300)).await);
    c.request(json!({"type":"unsubscribe","channel":"room:1"}))
        .await;
    let (_, body) = api(
        &node,
        "/v1/users/alice/subscribe",
        json!({"channel":"group:1"}),
    )
    .await;
    assert_eq!(body, json!({"sessions": 1}));
    assert_eq!(c.recv().await["type"], "subscribed");
    node.shutdown().await;
}
