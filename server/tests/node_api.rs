//! The HTTP API of docs/protocol.md on one node: every endpoint, its authentication, its
//! answers and its errors (`{"error":{"code":…,"message":…}}` with a proper status).

#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;
#[path = "support/panics.rs"]
mod panics;

use panics::{assert_no_server_panic, watch_panics};
use std::time::Duration;

use client::Client;
use node::TestNode;
use serde_json::{json, Value};

async fn start() -> TestNode {
    watch_panics();
    TestNode::start_default().await
}

/// A request with an optional `Authorization` header value; returns status and JSON body.
async fn call(
    method: reqwest::Method,
    url: &str,
    auth: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    if let Some((content_type, bytes)) = body {
        req = req.header("Content-Type", content_type).body(bytes);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn post_raw(n: &TestNode, body: &str) -> (u16, Value) {
    post_to(n, "/v1/publish", body).await
}

/// POSTs a JSON body with the API key to `path`.
async fn post_to(n: &TestNode, path: &str, body: &str) -> (u16, Value) {
    let auth = format!("Bearer {}", node::API_KEY);
    call(
        reqwest::Method::POST,
        &format!("{}{path}", n.http()),
        Some(&auth),
        Some(("application/json", body.as_bytes().to_vec())),
    )
    .await
}

fn assert_error(status: u16, body: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

/// Polls `f` until it returns `Some`, for at most 5 s.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not in time"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

const KEYED: [(&str, &str); 6] = [
    ("POST", "/v1/publish"),
    ("POST", "/v1/publish/batch"),
    ("GET", "/v1/users/alice/presence"),
    ("GET", "/v1/channels/room:1/presence"),
    ("GET", "/v1/channels/room:1/history"),
    ("GET", "/v1/nodes"),
];

#[tokio::test]
async fn server_api_needs_the_key() {
    let n = start().await;
    let wrong = [
        None,
        Some("Bearer wrong-key".to_string()),
        Some(node::API_KEY.to_string()),
        Some(format!("Basic {}", node::API_KEY)),
        Some(format!("Bearer {}x", node::API_KEY)),
        Some(format!(
            "Bearer {}",
            &node::API_KEY[..node::API_KEY.len() - 1]
        )),
        Some("Bearer ".to_string()),
        Some("Bearer".to_string()),
    ];
    for (method, path) in KEYED {
        let method: reqwest::Method = method.parse().unwrap();
        let body = json!({"channel": "room:1", "data": 1})
            .to_string()
            .into_bytes();
        for auth in &wrong {
            let (status, b) = call(
                method.clone(),
                &format!("{}{path}", n.http()),
                auth.as_deref(),
                Some(("application/json", body.clone())),
            )
            .await;
            assert_error(status, &b, 401, "unauthorized");
        }
    }
    // Nothing was published by the refused calls.
    let (_, h) = n.get("/v1/channels/room:1/history").await;
    assert_eq!(h["offset"], 0, "{h}");
    assert_no_server_panic();
}

#[tokio::test]
async fn publish_by_channel_and_by_user() {
    let n = start().await;
    let tok = n.token("alice", &["room:*"], &[]);
    let (mut a, welcome) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    let r = a
        .request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;
    // Never published: offset 0, the empty epoch; the first publish starts the epoch.
    assert_eq!(
        r["result"],
        json!({"offset": 0, "epoch": "", "recovered": false})
    );
    let mut epoch = Value::Null;

    for i in 1..=3 {
        let (status, body) = n
            .publish(json!({"channel": "room:1", "data": {"n": i}}))
            .await;
        assert_eq!(status, 200, "{body}");
        if i == 1 {
            epoch = body["epoch"].clone();
            assert_ne!(epoch, "", "{body}");
        }
        assert_eq!(
            body,
            json!({"channel": "room:1", "offset": i, "epoch": epoch})
        );
        let m = a.next_message().await;
        assert_eq!(
            m,
            json!({"type": "message", "channel": "room:1", "offset": i, "epoch": epoch, "data": {"n": i}})
        );
    }
    let (status, body) = n.publish(json!({"user": "alice", "data": "direct"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["channel"], "user:alice");
    assert_eq!(body["offset"], 1);
    assert_eq!(
        welcome["subscriptions"]["user:alice"],
        json!({"offset": 0, "epoch": "", "recovered": false})
    );
    assert_ne!(body["epoch"], "");
    let m = a.next_message().await;
    assert_eq!(
        (m["channel"].clone(), m["data"].clone()),
        (json!("user:alice"), json!("direct"))
    );
    // Publishing to a personal channel by name is the same stream.
    let (status, body) = n
        .publish(json!({"channel": "user:alice", "data": "by name"}))
        .await;
    assert_eq!((status, body["offset"].clone()), (200, json!(2)), "{body}");
    assert_eq!(a.next_message().await["offset"], 2);
    // `data` may be null.
    let (status, body) = n.publish(json!({"channel": "room:1", "data": null})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(a.next_message().await["data"], Value::Null);
    assert_no_server_panic();
}

async fn post_batch(n: &TestNode, body: &str) -> (u16, Value) {
    post_to(n, "/v1/publish/batch", body).await
}

#[tokio::test]
async fn batch_publish_answers_each_message_in_order() {
    let n = start().await;
    let (mut a, _) = Client::hello(&n.ws_url(), &n.token("alice", &[], &[]), json!({})).await;
    let (mut b, _) = Client::hello(&n.ws_url(), &n.token("bob", &[], &[]), json!({})).await;
    let mut messages: Vec<Value> = (1..=20)
        .map(|i| json!({"user": if i % 2 == 0 { "alice" } else { "bob" }, "data": {"n": i}}))
        .collect();
    // Bad messages are answered in place and do not stop the others.
    messages.insert(3, json!({"user": "alice"}));
    messages.insert(7, json!({"channel": "bad channel!", "data": 1}));
    let big = "x".repeat(70_000);
    messages.insert(9, json!({"user": "alice", "data": big}));
    let (status, body) = post_batch(&n, &json!({ "messages": messages }).to_string()).await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 23, "{body}");
    assert_eq!(results[3]["error"]["code"], "bad_request", "{body}");
    assert_eq!(results[7]["error"]["code"], "bad_request", "{body}");
    assert_eq!(results[9]["error"]["code"], "too_large", "{body}");
    let ok: Vec<&Value> = results.iter().filter(|r| r["offset"].is_u64()).collect();
    assert_eq!(ok.len(), 20);
    // Per user, offsets follow the batch order, and every message arrives in it.
    for (client, user, parity) in [(&mut a, "alice", 0), (&mut b, "bob", 1)] {
        let mine: Vec<&&Value> = ok
            .iter()
            .filter(|r| r["channel"] == format!("user:{user}"))
            .collect();
        assert_eq!(mine.len(), 10);
        for (k, r) in mine.iter().enumerate() {
            assert_eq!(r["offset"], k as u64 + 1, "{body}");
            let m = client.next_message().await;
            assert_eq!(m["offset"], k as u64 + 1);
            assert_eq!(m["data"]["n"], (2 * k + 2 - parity) as u64, "{m}");
        }
    }
    // Whole-batch errors: empty, too many, not a batch.
    let (status, body) = post_batch(&n, r#"{"messages":[]}"#).await;
    assert_error(status, &body, 400, "bad_request");
    let many: Vec<Value> = (0..1001).map(|_| json!({"user": "a", "data": 1})).collect();
    let (status, body) = post_batch(&n, &json!({ "messages": many }).to_string()).await;
    assert_error(status, &body, 400, "bad_request");
    let (status, body) = post_batch(&n, r#"{"user":"alice","data":1}"#).await;
    assert_error(status, &body, 400, "bad_request");
    // Every message refused: the first error's status.
    let (status, body) = post_batch(&n, r#"{"messages":[{"user":"a b","data":1}]}"#).await;
    assert_error(status, &body, 400, "bad_request");
    assert_no_server_panic();
}

#[tokio::test]
async fn malformed_publish_bodies_are_400() {
    let n = start().await;
    let tok = n.token("watcher", &["room:*"], &[]);
    let (mut w, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    w.request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;
    let long = format!("room:{}", "a".repeat(300));
    let bodies = [
        "",
        "{",
        "not json",
        "[]",
        "42",
        "null",
        r#"{"channel":"room:1","user":"alice","data":1}"#,
        r#"{"data":1}"#,
        r#"{"channel":"room:1"}"#,
        r#"{"user":"alice"}"#,
        r#"{"channel":"room 1","data":1}"#,
        r#"{"channel":"","data":1}"#,
        r#"{"channel":"room:*","data":1}"#,
        &format!(r#"{{"channel":"{long}","data":1}}"#),
        r#"{"channel":42,"data":1}"#,
        r#"{"user":"a:b","data":1}"#,
        r#"{"user":"","data":1}"#,
        r#"{"user":"a b","data":1}"#,
        r#"{"user":["alice"],"data":1}"#,
        r#"{"channel":"room:1","data":}"#,
        r#"{"channel":"room:1","data":1} trailing"#,
    ];
    for body in bodies {
        let (status, b) = post_raw(&n, body).await;
        assert_error(status, &b, 400, "bad_request");
    }
    // None of them published anything: the subscriber sees the next good one as offset 1.
    let (status, b) = post_raw(&n, r#"{"channel":"room:1","data":"good"}"#).await;
    assert_eq!((status, b["offset"].clone()), (200, json!(1)), "{b}");
    let m = w.next_message().await;
    assert_eq!(
        (m["offset"].clone(), m["data"].clone()),
        (json!(1), json!("good"))
    );
    assert_no_server_panic();
}

#[tokio::test]
async fn oversized_publish_body_is_413() {
    let n = start().await;
    let tok = n.token("watcher", &["room:*"], &[]);
    let (mut w, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    w.request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;
    let big = json!({"channel": "room:1", "data": "x".repeat(70 * 1024)}).to_string();
    let (status, body) = post_raw(&n, &big).await;
    assert_eq!(
        status,
        413,
        "{}",
        &body.to_string()[..body.to_string().len().min(300)]
    );
    assert!(body["error"]["code"].is_string(), "{body}");
    // Much larger: still 413 (or the connection is cut early), and the node lives.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/publish", n.http()))
        .bearer_auth(node::API_KEY)
        .header("Content-Type", "application/json")
        .body(vec![b'x'; 4 * 1024 * 1024])
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status().as_u16(), 413);
    }
    // Just under the limit is accepted.
    let fits = json!({"channel": "room:1", "data": "x".repeat(60 * 1024)}).to_string();
    let (status, body) = post_raw(&n, &fits).await;
    assert_eq!((status, body["offset"].clone()), (200, json!(1)), "{body}");
    assert_eq!(w.next_message().await["offset"], 1);
    assert_no_server_panic();
}

#[tokio::test]
async fn user_and_channel_presence() {
    let n = start().await;
    let (status, body) = n.get("/v1/users/alice/presence").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"user": "alice", "online": false, "connections": 0, "nodes": {}})
    );
    let (status, body) = n.get("/v1/channels/room:1/presence").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"channel": "room:1", "users": {}}));

    let tok = n.token("alice", &["room:*"], &[]);
    let (mut a1, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    let (a2, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    let tok_b = n.token("bob", &["room:*"], &[]);
    let (mut b, _) = Client::hello(&n.ws_url(), &tok_b, json!({})).await;
    a1.request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;
    b.request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;

    eventually("alice online with 2 connections", || async {
        let (_, body) = n.get("/v1/users/alice/presence").await;
        // `nodes`: both sessions on this (random-id) node.
        let nodes: Vec<&serde_json::Value> = body["nodes"].as_object()?.values().collect();
        (body["online"] == true && body["connections"] == 2 && nodes == [&json!(2)]).then_some(())
    })
    .await;
    eventually("room:1 has alice and bob", || async {
        let (_, body) = n.get("/v1/channels/room:1/presence").await;
        (body == json!({"channel": "room:1", "users": {"alice": 1, "bob": 1}})).then_some(())
    })
    .await;
    // Leaving shows up too.
    a2.close().await;
    b.request(json!({"type": "unsubscribe", "channel": "room:1"}))
        .await;
    eventually("alice down to 1 connection", || async {
        let (_, body) = n.get("/v1/users/alice/presence").await;
        (body["connections"] == 1).then_some(())
    })
    .await;
    eventually("bob left room:1", || async {
        let (_, body) = n.get("/v1/channels/room:1/presence").await;
        (body["users"] == json!({"alice": 1})).then_some(())
    })
    .await;
    // Invalid names are 400.
    for path in [
        "/v1/users/a:b/presence",
        "/v1/users/a%20b/presence",
        "/v1/channels/a%20b/presence",
        "/v1/channels/room*/presence",
    ] {
        let (status, body) = n.get(path).await;
        assert_error(status, &body, 400, "bad_request");
    }
    assert_no_server_panic();
}

#[tokio::test]
async fn history_with_since_and_limit() {
    let n = start().await;
    let (status, body) = n.get("/v1/channels/room:h/history").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["offset"], 0, "{body}");
    assert_eq!(body["messages"], json!([]));
    let mut epoch = Value::Null;
    for i in 1..=5 {
        let (_, b) = n
            .publish(json!({"channel": "room:h", "data": {"i": i}}))
            .await;
        epoch = b["epoch"].clone();
    }
    let offsets = |b: &Value| -> Vec<u64> {
        b["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect()
    };
    let (status, body) = n.get("/v1/channels/room:h/history").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            body["channel"].clone(),
            body["epoch"].clone(),
            body["offset"].clone()
        ),
        (json!("room:h"), epoch.clone(), json!(5))
    );
    assert_eq!(offsets(&body), vec![1, 2, 3, 4, 5]);
    assert_eq!(body["messages"][0], json!({"offset": 1, "data": {"i": 1}}));
    let (_, body) = n.get("/v1/channels/room:h/history?since=2").await;
    assert_eq!(offsets(&body), vec![3, 4, 5]);
    let (_, body) = n.get("/v1/channels/room:h/history?since=2&limit=2").await;
    assert_eq!(offsets(&body), vec![3, 4]);
    assert_eq!(
        body["offset"], 5,
        "offset is the latest, whatever the limit"
    );
    let (_, body) = n.get("/v1/channels/room:h/history?limit=1").await;
    assert_eq!(offsets(&body), vec![1]);
    let (_, body) = n.get("/v1/channels/room:h/history?since=5").await;
    assert_eq!(offsets(&body), Vec::<u64>::new());
    let (_, body) = n.get("/v1/channels/room:h/history?since=99").await;
    assert_eq!(offsets(&body), Vec::<u64>::new());
    for q in [
        "since=abc",
        "since=-1",
        "limit=x",
        "limit=-2",
        "since=1.5",
        "since=",
    ] {
        let (status, body) = n.get(&format!("/v1/channels/room:h/history?{q}")).await;
        assert_error(status, &body, 400, "bad_request");
    }
    let (status, body) = n.get("/v1/channels/room%201/history").await;
    assert_error(status, &body, 400, "bad_request");
    assert_no_server_panic();
}

#[tokio::test]
async fn history_keeps_the_configured_size() {
    watch_panics();
    let n = TestNode::start(herald_server::Config {
        history_size: 3,
        ..node::test_config()
    })
    .await;
    for i in 1..=7 {
        n.publish(json!({"channel": "room:s", "data": i})).await;
    }
    let (_, body) = n.get("/v1/channels/room:s/history").await;
    assert_eq!(body["offset"], 7);
    let offsets: Vec<u64> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![5, 6, 7]);
    assert_no_server_panic();
}

#[tokio::test]
async fn nodes_and_connect() {
    let n = start().await;
    let node = eventually("this node in /v1/nodes", || async {
        let (status, body) = n.get("/v1/nodes").await;
        assert_eq!(status, 200, "{body}");
        body["nodes"]
            .as_array()?
            .iter()
            .find(|x| x["url"] == n.ws_url().as_str())
            .cloned()
    })
    .await;
    assert!(node["id"].is_string(), "{node}");
    assert_eq!(node["draining"], false, "{node}");
    assert!(node["connections"].is_u64(), "{node}");
    // A connected client is counted (refreshed periodically).
    let (_c, welcome) = Client::hello(&n.ws_url(), &n.token("alice", &[], &[]), json!({})).await;
    assert_eq!(welcome["node"], node["id"]);
    eventually("connections counted in /v1/nodes", || async {
        let (_, body) = n.get("/v1/nodes").await;
        (body["nodes"][0]["connections"] == 1).then_some(())
    })
    .await;
    // /v1/connect needs no key and names this node.
    let (status, body) = call(
        reqwest::Method::GET,
        &format!("{}/v1/connect", n.http()),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["url"], n.ws_url().as_str(), "{body}");
    assert_eq!(body["node"], node["id"], "{body}");
    assert_no_server_panic();
}

#[tokio::test]
async fn public_url_and_node_id_are_what_the_config_says() {
    watch_panics();
    let n = TestNode::start(herald_server::Config {
        node_id: Some("node-a".into()),
        public_url: Some("wss://push.example/ws".into()),
        ..node::test_config()
    })
    .await;
    let (status, body) = call(
        reqwest::Method::GET,
        &format!("{}/v1/connect", n.http()),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"node": "node-a", "url": "wss://push.example/ws"})
    );
    let (_, welcome) = Client::hello(&n.ws_url(), &n.token("alice", &[], &[]), json!({})).await;
    assert_eq!(welcome["node"], "node-a");
    assert_no_server_panic();
}

#[tokio::test]
async fn health_readiness_and_metrics_need_no_key() {
    let n = start().await;
    for path in ["/healthz", "/readyz"] {
        let (status, body) = call(
            reqwest::Method::GET,
            &format!("{}{path}", n.http()),
            None,
            None,
        )
        .await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let tok = n.token("alice", &["room:*"], &[]);
    let (mut a, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    a.request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;
    n.publish(json!({"channel": "room:1", "data": 1})).await;
    a.next_message().await;

    let r = reqwest::get(format!("{}/metrics", n.http())).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    for name in [
        "herald_connections",
        "herald_messages_published_total",
        "herald_messages_delivered_total",
        "herald_broker_messages_received_total",
        "herald_slow_consumer_disconnects_total",
    ] {
        let present = text.lines().any(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        });
        assert!(present, "metric {name} missing from:\n{text}");
    }
    assert_eq!(node::metric_value(&text, "herald_connections"), 1.0);
    // The process collector's standard names (the test node runs in this process).
    let rss = node::metric_value(&text, "process_resident_memory_bytes");
    assert!(rss > 1_000_000.0, "resident memory {rss}");
    assert!(node::metric_value(&text, "process_open_fds") >= 3.0);
    assert!(node::metric_value(&text, "herald_messages_published_total") >= 1.0);
    assert!(node::metric_value(&text, "herald_messages_delivered_total") >= 1.0);
    assert!(node::metric_value(&text, "herald_broker_messages_received_total") >= 1.0);
    assert_eq!(
        node::metric_value(&text, "herald_slow_consumer_disconnects_total"),
        0.0
    );
    // Client publishes count as published too.
    let before = n.metric("herald_messages_published_total").await;
    let tok = n.token("bob", &[], &["room:*"]);
    let (mut b, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    b.request(json!({"type": "publish", "channel": "room:1", "data": 2}))
        .await;
    assert_eq!(
        n.metric("herald_messages_published_total").await,
        before + 1.0
    );
    assert_no_server_panic();
}

#[tokio::test]
async fn unknown_paths_are_404_json() {
    let n = start().await;
    // `/` is the demo page (node_web.rs); anything unknown is a JSON 404.
    for path in [
        "/nope",
        "/herald.jsx",
        "/v1",
        "/v1/publishx",
        "/v1/users/alice",
        "/v2/publish",
        "/ws/x",
    ] {
        let auth = format!("Bearer {}", node::API_KEY);
        let (status, body) = call(
            reqwest::Method::GET,
            &format!("{}{path}", n.http()),
            Some(&auth),
            None,
        )
        .await;
        assert_error(status, &body, 404, "not_found");
    }
    assert_no_server_panic();
}

#[tokio::test]
async fn a_wrong_method_is_405_json() {
    let n = start().await;
    let auth = format!("Bearer {}", node::API_KEY);
    for (method, path) in [
        (reqwest::Method::GET, "/v1/publish"),
        (reqwest::Method::POST, "/v1/nodes"),
        (reqwest::Method::DELETE, "/healthz"),
    ] {
        let (status, body) = call(method, &format!("{}{path}", n.http()), Some(&auth), None).await;
        assert_error(status, &body, 405, "bad_request");
    }
    assert_no_server_panic();
}

/// A path segment that is not valid UTF-8 once percent-decoded is refused with the JSON
/// error body of every other API error, not axum's `text/plain` rejection.
#[tokio::test]
async fn a_path_that_is_not_utf8_gets_a_json_400() {
    let n = start().await;
    let auth = format!("Bearer {}", node::API_KEY);
    for path in [
        "/v1/users/%FF/presence",
        "/v1/users/%C3%28/unread",
        "/v1/channels/%FF/history",
        "/v1/channels/%FF/presence",
    ] {
        let (status, body) = call(
            reqwest::Method::GET,
            &format!("{}{path}", n.http()),
            Some(&auth),
            None,
        )
        .await;
        assert_error(status, &body, 400, "bad_request");
    }
    let (status, body) = post_to(&n, "/v1/users/%FF/disconnect", r#"{"reconnect":true}"#).await;
    assert_error(status, &body, 400, "bad_request");
}
