//! Bad input on `/ws` (docs/protocol.md "Commands"): a frame that is not a command closes the
//! connection with 4400, a frame over the limit with 1009, and a well-formed command with
//! a bad argument gets a `bad_request` reply while the connection stays. In every case
//! another session on the same node keeps receiving pushes, and the server does not panic.

#[path = "support/bystander.rs"]
mod bystander;
#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;
#[path = "support/panics.rs"]
mod panics;

use bystander::{assert_undisturbed, node_and_watcher};
use panics::assert_no_server_panic;
use std::time::Duration;

use client::{Client, Closed};
use node::TestNode;
use serde_json::{json, Value};

async fn alice(n: &TestNode) -> Client {
    let tok = n.token("alice", &["room:*"], &["room:*"]);
    Client::hello(&n.ws_url(), &tok, json!({})).await.0
}

/// Says hello, sends `frame` and expects the close code `code`.
async fn closes_after_hello(text: &str, code: u16) {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    let mut a = alice(&n).await;
    a.send_text(text).await;
    assert_eq!(
        a.expect_close(Duration::from_secs(5)).await,
        Closed::Code(code),
        "after {text:?}"
    );
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

#[tokio::test]
async fn not_json_closes_4400() {
    closes_after_hello("this is not json", 4400).await;
}

#[tokio::test]
async fn truncated_json_closes_4400() {
    closes_after_hello(r#"{"type":"subscribe","id":1,"channel":"room:1""#, 4400).await;
}

#[tokio::test]
async fn json_that_is_not_an_object_closes_4400() {
    closes_after_hello("[1,2,3]", 4400).await;
    closes_after_hello("42", 4400).await;
}

#[tokio::test]
async fn unknown_type_closes_4400() {
    closes_after_hello(r#"{"type":"explode","id":1,"channel":"room:1"}"#, 4400).await;
}

#[tokio::test]
async fn missing_or_non_string_type_closes_4400() {
    closes_after_hello(r#"{"id":1,"channel":"room:1"}"#, 4400).await;
    closes_after_hello(r#"{"type":7,"id":1}"#, 4400).await;
}

#[tokio::test]
async fn binary_frame_closes_4400() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    let mut a = alice(&n).await;
    let cmd = json!({"type": "subscribe", "id": 1, "channel": "room:1"});
    a.send_binary(cmd.to_string().into_bytes()).await;
    assert_eq!(
        a.expect_close(Duration::from_secs(5)).await,
        Closed::Code(4400)
    );
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

#[tokio::test]
async fn second_hello_closes_4400() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    let mut a = alice(&n).await;
    let tok = n.token("alice", &["room:*"], &[]);
    a.send(json!({"type": "hello", "token": tok})).await;
    assert_eq!(
        a.expect_close(Duration::from_secs(5)).await,
        Closed::Code(4400)
    );
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

/// A first frame other than `hello` closes with 4400, whatever it is.
#[tokio::test]
async fn first_frame_not_hello_closes_4400() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    for first in [
        json!({"type": "subscribe", "id": 1, "channel": "room:1"}).to_string(),
        json!({"type": "pong"}).to_string(),
        "not json".to_string(),
        json!({"type": "nonsense"}).to_string(),
    ] {
        let mut c = Client::connect(&n.ws_url()).await;
        c.send_text(&first).await;
        assert_eq!(
            c.expect_close(Duration::from_secs(5)).await,
            Closed::Code(4400),
            "first frame {first}"
        );
    }
    let mut c = Client::connect(&n.ws_url()).await;
    c.send_binary(b"hello".to_vec()).await;
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await,
        Closed::Code(4400)
    );
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

#[tokio::test]
async fn frame_over_the_limit_closes_1009() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    let mut a = alice(&n).await;
    // 64 KiB is the default limit; this frame is a valid publish of 70 KiB.
    let big =
        json!({"type": "publish", "id": 1, "channel": "room:1", "data": "x".repeat(70 * 1024)});
    let _ = a.try_send_text(&big.to_string()).await;
    assert_eq!(
        a.expect_close(Duration::from_secs(5)).await,
        Closed::Code(1009)
    );
    // Nothing of it was published.
    let (status, h) = n.get("/v1/channels/room:1/history").await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["offset"], 0, "{h}");
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

#[tokio::test]
async fn oversized_hello_closes_1009() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    let mut c = Client::connect(&n.ws_url()).await;
    let big = json!({"type": "hello", "token": "a".repeat(80 * 1024)});
    let _ = c.try_send_text(&big.to_string()).await;
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await,
        Closed::Code(1009)
    );
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

#[tokio::test]
async fn frame_just_under_the_limit_is_accepted() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    let mut a = alice(&n).await;
    let r = a
        .request(json!({"type": "publish", "channel": "room:1", "data": "x".repeat(60 * 1024)}))
        .await;
    assert_eq!(r["result"]["offset"], 1, "{}", &r.to_string()[..200]);
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

fn assert_bad_request(reply: &Value, id: Option<u64>) {
    assert_eq!(reply["type"], "reply", "{reply}");
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
    assert!(reply["error"]["message"].is_string(), "{reply}");
    assert!(reply.get("result").is_none(), "{reply}");
    match id {
        Some(id) => assert_eq!(reply["id"], id, "{reply}"),
        None => assert!(reply["id"].is_null(), "{reply}"),
    }
}

/// Sends a raw command and returns the next reply.
async fn raw_reply(c: &mut Client, cmd: Value) -> Value {
    c.send(cmd).await;
    loop {
        let v = c.recv().await;
        if v["type"] == "reply" {
            return v;
        }
    }
}

/// Bad arguments get a `bad_request` reply; the connection stays and works afterwards.
#[tokio::test]
async fn bad_arguments_get_bad_request_and_the_connection_stays() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    let mut a = alice(&n).await;
    let long = format!("room:{}", "a".repeat(300));
    let cases = [
        // invalid channel names
        json!({"type": "subscribe", "id": 10, "channel": "room 1"}),
        json!({"type": "subscribe", "id": 11, "channel": ""}),
        json!({"type": "subscribe", "id": 12, "channel": long}),
        json!({"type": "subscribe", "id": 13, "channel": "room:*"}),
        json!({"type": "subscribe", "id": 14, "channel": "räum"}),
        json!({"type": "publish", "id": 15, "channel": "room/1", "data": 1}),
        json!({"type": "presence", "id": 16, "channel": "room 1"}),
        json!({"type": "unsubscribe", "id": 17, "channel": "room 1"}),
        // missing or mistyped fields
        json!({"type": "subscribe", "id": 20}),
        json!({"type": "subscribe", "id": 21, "channel": 42}),
        json!({"type": "publish", "id": 22, "channel": "room:1"}),
        json!({"type": "presence", "id": 23}),
        json!({"type": "unsubscribe", "id": 24}),
        json!({"type": "subscribe", "id": 25, "channel": "room:1", "since": {"offset": "x"}}),
        json!({"type": "subscribe", "id": 26, "channel": "room:1", "since": 5}),
    ];
    for cmd in cases {
        let id = cmd["id"].as_u64();
        let reply = raw_reply(&mut a, cmd.clone()).await;
        assert_bad_request(&reply, id);
    }
    // Missing or invalid ids: the reply has no id.
    for cmd in [
        json!({"type": "subscribe", "channel": "room:1"}),
        json!({"type": "subscribe", "id": -1, "channel": "room:1"}),
        json!({"type": "subscribe", "id": "7", "channel": "room:1"}),
        json!({"type": "publish", "id": 1.5, "channel": "room:1", "data": 1}),
    ] {
        let reply = raw_reply(&mut a, cmd).await;
        assert_bad_request(&reply, None);
    }
    // Nothing was subscribed or published by the bad commands.
    let (_, h) = n.get("/v1/channels/room:1/history").await;
    assert_eq!(h["offset"], 0, "{h}");
    // The connection still works.
    let r = a
        .request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;
    assert_eq!(r["result"]["offset"], 0, "{r}");
    let r = a
        .request(json!({"type": "publish", "channel": "room:1", "data": {"ok": true}}))
        .await;
    assert_eq!(r["result"]["offset"], 1, "{r}");
    let m = a.next_message().await;
    assert_eq!(
        (m["channel"].clone(), m["offset"].clone()),
        (json!("room:1"), json!(1))
    );
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

/// `data` may be any JSON value, `null` included; unknown extra fields are ignored.
#[tokio::test]
async fn any_json_data_and_extra_fields_are_accepted() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    let mut a = alice(&n).await;
    a.request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;
    let values = [
        json!(null),
        json!(0),
        json!("s"),
        json!([1, {"a": null}]),
        json!({"nested": {"x": [true]}}),
    ];
    for (i, v) in values.iter().enumerate() {
        let r = a
            .request(json!({"type": "publish", "channel": "room:1", "data": v, "extra": "ignored"}))
            .await;
        assert_eq!(r["result"]["offset"], i + 1, "{r}");
    }
    for (i, v) in values.iter().enumerate() {
        let m = a.next_message().await;
        assert_eq!(m["offset"], i + 1, "{m}");
        assert_eq!(&m["data"], v, "{m}");
    }
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

/// A `pong` without a preceding ping is harmless and gets no reply.
#[tokio::test]
async fn unsolicited_pong_is_harmless() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    let mut a = alice(&n).await;
    a.send(json!({"type": "pong"})).await;
    a.send(json!({"type": "pong", "id": 5})).await;
    assert!(a.silent_for(Duration::from_millis(200)).await);
    let r = a
        .request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;
    assert!(r["result"].is_object(), "{r}");
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

/// Closing without a close frame, or in the middle of the handshake, does not hurt the node.
#[tokio::test]
async fn abrupt_disconnects_do_not_disturb_the_node() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    for _ in 0..5 {
        let c = Client::connect(&n.ws_url()).await;
        drop(c);
        let a = alice(&n).await;
        drop(a);
        let mut s = tokio::net::TcpStream::connect(n.addr).await.unwrap();
        use tokio::io::AsyncWriteExt;
        let _ = s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").await;
        drop(s);
    }
    assert_undisturbed(&n, &mut w).await;
    // The connection gauge goes back to the bystander alone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while n.metric("herald_connections").await != 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections never went back to 1"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_no_server_panic();
}
