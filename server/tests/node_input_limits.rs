//! Input limits and error hygiene: `data` nested deeper than
//! `herald_protocol::depth::MAX_DATA_DEPTH` (64) is refused on every publish path, and
//! error answers never carry the broker's own error text (addresses, ports, the Redis
//! client's wording): the log keeps that.

#[path = "support/bystander.rs"]
mod bystander;
#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;
#[path = "support/panics.rs"]
mod panics;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::time::Duration;

use bystander::{assert_undisturbed, node_and_watcher};
use client::Client;
use herald_server::Config;
use panics::assert_no_server_panic;
use redis_server::RedisServer;
use serde_json::{json, Value};

/// `depth` levels of arrays around a number.
fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn data_nested_deeper_than_64_levels_is_refused_everywhere() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    let tok = n.token("alice", &["room:*"], &["room:*"]);
    let (mut a, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    a.request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;

    // The socket: a bad_request reply, the connection stays open.
    for depth in [65, 20_000] {
        let frame = format!(
            r#"{{"type":"publish","id":{depth},"channel":"room:1","data":{}}}"#,
            nested(depth)
        );
        a.send_text(&frame).await;
        let r = a.recv().await;
        assert_eq!(r["id"], depth, "{r}");
        assert_eq!(r["error"]["code"], "bad_request", "{r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains("64"),
            "{r}"
        );
    }
    let frame = format!(
        r#"{{"type":"publish","id":64,"channel":"room:1","data":{}}}"#,
        nested(64)
    );
    a.send_text(&frame).await;
    let r = a.recv().await;
    assert_eq!(r["result"]["offset"], 1, "64 levels are fine: {r}");
    let m = a.next_message().await;
    assert_eq!(m["offset"], 1, "only the accepted one is relayed: {m}");

    // `POST /v1/publish`: 400.
    let http = reqwest::Client::new();
    for depth in [65, 20_000] {
        let body = format!(r#"{{"channel":"room:1","data":{}}}"#, nested(depth));
        let r = http
            .post(format!("{}/v1/publish", n.http()))
            .bearer_auth(node::API_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "depth {depth}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "bad_request", "{v}");
    }
    // `POST /v1/publish/batch`: that message's error, the others go through.
    let body = format!(
        r#"{{"messages":[{{"channel":"room:1","data":2}},{{"channel":"room:1","data":{}}}]}}"#,
        nested(65)
    );
    let r = http
        .post(format!("{}/v1/publish/batch", n.http()))
        .bearer_auth(node::API_KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["results"][0]["offset"], 2, "{v}");
    assert_eq!(v["results"][1]["error"]["code"], "bad_request", "{v}");
    let m = a.next_message().await;
    assert_eq!((m["offset"].as_u64(), &m["data"]), (Some(2), &json!(2)));
    assert!(a.silent_for(Duration::from_millis(200)).await);
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

/// Whether an error text leaks broker internals.
fn leaks(text: &str, port: u16) -> bool {
    let lower = text.to_lowercase();
    lower.contains("127.0.0.1")
        || lower.contains(&port.to_string())
        || lower.contains("redis")
        || lower.contains("connection")
        || lower.contains("io error")
        || lower.contains("timeout")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_errors_reach_clients_as_generic_messages() {
    let mut redis = RedisServer::start();
    let port = redis.port();
    let config = Config {
        redis_url: Some(redis.url()),
        redis_prefix: format!("be{}:", std::process::id()),
        ..node::test_config()
    };
    panics::watch_panics();
    let n = node::TestNode::start(config).await;
    let tok = n.token("alice", &["room:*"], &["room:*"]);
    let (mut a, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    redis.kill();

    // The socket's publish reply.
    a.send(json!({"type": "publish", "id": 1, "channel": "room:1", "data": 1}))
        .await;
    let r = loop {
        let v = a.recv_wire(Duration::from_secs(15)).await.expect("a reply");
        if v["type"] == "reply" {
            break v;
        }
    };
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    let message = r["error"]["message"].as_str().unwrap();
    assert_eq!(message, "broker unavailable; try again");
    assert!(!leaks(&r.to_string(), port), "{r}");

    // The HTTP publish.
    let (status, body) = n.publish(json!({"channel": "room:1", "data": 1})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert_eq!(body["error"]["message"], "broker unavailable; try again");
    assert!(!leaks(&body.to_string(), port), "{body}");
    assert_no_server_panic();
}
