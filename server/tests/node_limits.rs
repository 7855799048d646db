//! Limits (docs/protocol.md "Close codes": 4429 and 4509): connections per node and per IP,
//! subscriptions per connection, commands per second, and slow consumers. In every case
//! the other sessions of the node are undisturbed.

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
use futures_util::{SinkExt, StreamExt};
use herald_server::Config;
use node::TestNode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Connects and says hello; `Ok(welcome)` or `Err(close)`.
async fn try_hello(n: &TestNode, user: &str) -> (Client, Result<Value, Closed>) {
    let mut c = Client::connect(&n.ws_url()).await;
    let tok = n.token(user, &["room:*"], &["room:*"]);
    let _ = c
        .try_send_text(&json!({"type": "hello", "token": tok}).to_string())
        .await;
    let mut r = c.recv_wire(Duration::from_secs(5)).await;
    // A node with no room says when to come back, then closes 4429.
    if let Ok(v) = &r {
        if v["type"] == "reconnect" {
            assert_eq!(v["reason"], "busy", "{v}");
            assert!(v["after_ms"].as_u64().unwrap() >= 250, "{v}");
            r = c.recv_wire(Duration::from_secs(5)).await;
            assert_eq!(r, Err(Closed::Code(4429)), "busy is followed by 4429");
        }
    }
    (c, r)
}

/// Polls until a new connection gets a welcome (a freed slot), within 5 s.
async fn eventually_admitted(n: &TestNode, user: &str) -> Client {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (c, r) = try_hello(n, user).await;
        match r {
            Ok(w) if w["type"] == "welcome" => return c,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "never admitted again: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn max_connections_closes_4429() {
    let config = Config {
        max_connections: 3,
        ..node::test_config()
    };
    let (n, mut w) = node_and_watcher(config).await;
    let (a, r) = try_hello(&n, "alice").await;
    assert_eq!(r.unwrap()["type"], "welcome");
    let (_b, r) = try_hello(&n, "bob").await;
    assert_eq!(r.unwrap()["type"], "welcome");
    for _ in 0..3 {
        let mut c = Client::connect(&n.ws_url()).await;
        assert_eq!(
            c.expect_close(Duration::from_secs(5)).await,
            Closed::Code(4429)
        );
    }
    assert_eq!(n.metric("herald_connections").await, 3.0);
    assert_undisturbed(&n, &mut w).await;
    // A slot freed by a client that leaves is given back.
    a.close().await;
    let _c = eventually_admitted(&n, "carol").await;
    let mut c = Client::connect(&n.ws_url()).await;
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await,
        Closed::Code(4429)
    );
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

/// A raw client whose TCP connection comes from `local_ip` (any 127.0.0.0/8 address).
async fn hello_from(
    n: &TestNode,
    local_ip: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{local_ip}:0").parse().unwrap())
        .unwrap();
    let stream = socket.connect(n.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(n.ws_url(), stream)
        .await
        .unwrap();
    let hello = json!({"type": "hello", "token": token}).to_string();
    ws.send(Message::Text(hello.into())).await.unwrap();
    ws
}

async fn first_answer(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
) -> Result<Value, u16> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("an answer in time");
        match m {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                // A busy node's `reconnect` comes before its 4429.
                if v["type"] == "reconnect" && v["reason"] == "busy" {
                    continue;
                }
                return Ok(v);
            }
            Some(Ok(Message::Close(Some(f)))) => return Err(u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("no answer: {other:?}"),
        }
    }
}

#[tokio::test]
async fn max_connections_per_ip_closes_4429() {
    let config = Config {
        max_connections_per_ip: 1,
        ..node::test_config()
    };
    // The watcher is 127.0.0.1's one connection.
    let (n, mut w) = node_and_watcher(config).await;
    for _ in 0..2 {
        let (_c, r) = try_hello(&n, "alice").await;
        assert_eq!(r, Err(Closed::Code(4429)));
    }
    assert_undisturbed(&n, &mut w).await;
    // Another address has its own allowance.
    let tok = n.token("bob", &[], &[]);
    let mut other = hello_from(&n, "127.0.0.2", &tok).await;
    assert_eq!(first_answer(&mut other).await.unwrap()["type"], "welcome");
    let mut again = hello_from(&n, "127.0.0.2", &tok).await;
    assert_eq!(first_answer(&mut again).await, Err(4429));
    // The slot comes back when the connection leaves.
    w.close().await;
    let _c = eventually_admitted(&n, "carol").await;
    let (status, body) = n.publish(json!({"user": "bob", "data": 1})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(first_answer(&mut other).await.unwrap()["type"], "message");
    assert_no_server_panic();
}

#[tokio::test]
async fn max_subscriptions_refuses_the_one_over() {
    let config = Config {
        max_subscriptions: 3,
        ..node::test_config()
    };
    let (n, mut w) = node_and_watcher(config).await;
    let (mut a, _) = try_hello(&n, "alice").await;
    // The personal channel counts: two more fit.
    for ch in ["room:1", "room:2"] {
        let r = a.request(json!({"type": "subscribe", "channel": ch})).await;
        assert!(r["result"].is_object(), "{r}");
    }
    let r = a
        .request(json!({"type": "subscribe", "channel": "room:3"}))
        .await;
    assert!(r["error"]["code"].is_string(), "{r}");
    assert!(r.get("result").is_none(), "{r}");
    // The refused subscription delivers nothing.
    n.publish(json!({"channel": "room:3", "data": 1})).await;
    assert!(a.silent_for(Duration::from_millis(200)).await);
    // Leaving one makes room; the connection stayed open.
    let r = a
        .request(json!({"type": "unsubscribe", "channel": "room:1"}))
        .await;
    assert_eq!(r["result"], json!({}), "{r}");
    let r = a
        .request(json!({"type": "subscribe", "channel": "room:3"}))
        .await;
    assert_eq!(r["result"]["offset"], 1, "{r}");
    // Resume at hello obeys the limit too.
    let tok = n.token("bob", &["room:*"], &[]);
    let resume = json!({
        "room:1": {"offset": 0, "epoch": "x"},
        "room:2": {"offset": 0, "epoch": "x"},
        "room:3": {"offset": 0, "epoch": "x"},
    });
    let (_b, welcome) = Client::hello(&n.ws_url(), &tok, resume).await;
    let subs = welcome["subscriptions"].as_object().unwrap();
    assert_eq!(subs.len(), 3, "{welcome}");
    assert!(subs.contains_key("user:bob"), "{welcome}");
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

#[tokio::test]
async fn command_flood_is_rate_limited_then_closed_4429() {
    let config = Config {
        max_messages_per_sec: 10,
        ..node::test_config()
    };
    let (n, mut w) = node_and_watcher(config).await;
    let (mut quiet, _) = try_hello(&n, "bob").await;
    let (mut a, _) = try_hello(&n, "alice").await;
    for id in 1..=60 {
        let cmd = json!({"type": "unsubscribe", "id": id, "channel": "room:1"});
        if !a.try_send_text(&cmd.to_string()).await {
            break;
        }
    }
    let (mut ok, mut limited) = (0, 0);
    let close = loop {
        match a.recv_wire(Duration::from_secs(5)).await {
            Ok(v) if v["type"] == "reply" && v["result"].is_object() => {
                assert_eq!(limited, 0, "an accepted command after a refused one: {v}");
                ok += 1;
            }
            Ok(v) if v["type"] == "reply" => {
                assert_eq!(v["error"]["code"], "rate_limited", "{v}");
                assert!(v["id"].is_u64(), "the refusal names its command: {v}");
                limited += 1;
            }
            Ok(v) => panic!("unexpected frame {v}"),
            Err(c) => break c,
        }
    };
    assert_eq!(close, Closed::Code(4429));
    assert!((1..=11).contains(&ok), "accepted {ok}");
    assert!(limited >= 1, "never refused");
    // The other sessions are fine: commands and pushes.
    let r = quiet
        .request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;
    assert!(r["result"].is_object(), "{r}");
    for i in 0..5 {
        let r = quiet
            .request(json!({"type": "publish", "channel": "room:1", "data": i}))
            .await;
        assert!(r["result"].is_object(), "{r}");
    }
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

#[tokio::test]
async fn rate_limit_refuses_then_recovers_without_closing() {
    let config = Config {
        max_messages_per_sec: 10,
        ..node::test_config()
    };
    let (n, mut w) = node_and_watcher(config).await;
    let (mut a, _) = try_hello(&n, "alice").await;
    for id in 1..=14 {
        a.send(json!({"type": "unsubscribe", "id": id, "channel": "room:1"}))
            .await;
    }
    let mut codes = Vec::new();
    for _ in 1..=14 {
        let v = a.recv().await;
        codes.push(v["error"]["code"].as_str().unwrap_or("ok").to_owned());
    }
    assert!(codes.iter().any(|c| c == "rate_limited"), "{codes:?}");
    // The bucket refills (10 per second): a little later commands pass again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let r = a
            .request(json!({"type": "unsubscribe", "channel": "room:1"}))
            .await;
        if r["result"].is_object() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never allowed again: {r}"
        );
    }
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_consumer_is_closed_4509_and_others_get_everything() {
    const COUNT: u64 = 400;
    let config = Config {
        session_queue: 8,
        ..node::test_config()
    };
    let (n, mut w) = node_and_watcher(config).await;
    let tok = n.token("reader", &["room:*"], &[]);
    let (mut slow, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    let (mut fast, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
    for c in [&mut slow, &mut fast] {
        let r = c
            .request(json!({"type": "subscribe", "channel": "room:big"}))
            .await;
        assert_eq!(r["result"]["offset"], 0, "{r}");
    }
    // The fast client reads everything in its own task.
    let reader = tokio::spawn(async move {
        let mut offsets = Vec::new();
        while (offsets.len() as u64) < COUNT {
            match fast.recv_wire(Duration::from_secs(10)).await {
                Ok(v) if v["type"] == "message" => {
                    assert_eq!(v["data"]["pad"].as_str().map(str::len), Some(32 * 1024));
                    offsets.push(v["offset"].as_u64().unwrap());
                }
                Ok(_) => {}
                Err(c) => panic!("the fast client was closed: {c:?} after {}", offsets.len()),
            }
        }
        offsets
    });
    let publisher = {
        let http = n.http();
        tokio::spawn(async move {
            let pad = "p".repeat(32 * 1024);
            let client = reqwest::Client::new();
            for i in 1..=COUNT {
                let r = client
                    .post(format!("{http}/v1/publish"))
                    .bearer_auth(node::API_KEY)
                    .json(&json!({"channel": "room:big", "data": {"i": i, "pad": pad}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200);
            }
        })
    };
    // As soon as the node gives up on the slow client, the client reads again (as a
    // client that was only briefly stalled would), so that the close frame can reach it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while n.metric("herald_slow_consumer_disconnects_total").await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slow client was never closed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The slow client reads what was buffered, in order without gaps, then the close.
    let mut seen = Vec::new();
    let close = loop {
        match slow.recv_wire(Duration::from_secs(10)).await {
            Ok(v) if v["type"] == "message" => seen.push(v["offset"].as_u64().unwrap()),
            Ok(_) => {}
            Err(c) => break c,
        }
    };
    assert_eq!(close, Closed::Code(4509), "after {} messages", seen.len());
    assert!(
        (seen.len() as u64) < COUNT,
        "the slow client got everything"
    );
    assert_eq!(seen, (1..=seen.len() as u64).collect::<Vec<_>>());
    tokio::time::timeout(Duration::from_secs(20), publisher)
        .await
        .expect("the publisher finishes")
        .expect("the publisher");
    let offsets = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the fast client finishes")
        .expect("the fast client's reader");
    assert_eq!(offsets, (1..=COUNT).collect::<Vec<_>>());
    assert_eq!(
        n.metric("herald_slow_consumer_disconnects_total").await,
        1.0
    );
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

/// Connections that have not finished `hello` have their own budget
/// (`max_pending_handshakes`) and never take authenticated slots: with the budget full
/// of silent sockets a newcomer is closed 4429 at once, but once the silent ones have
/// waited a second (an honest client says hello within a round trip) a real user
/// pushes the oldest out and connects.
#[tokio::test]
async fn silent_sockets_cannot_lock_users_out() {
    let config = Config {
        max_pending_handshakes: 5,
        // The watcher and one more: silent sockets must not take these.
        max_connections: 2,
        ..node::test_config()
    };
    let (n, mut w) = node_and_watcher(config).await;
    let mut silent = Vec::new();
    for _ in 0..5 {
        let (ws, _) = tokio_tungstenite::connect_async(n.ws_url()).await.unwrap();
        silent.push(ws);
    }
    wait_for(&n, &[("herald_pending_handshakes", 5.0)]).await;
    // All five are young: the newcomer is refused at once.
    let mut c = Client::connect(&n.ws_url()).await;
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await,
        Closed::Code(4429)
    );
    // A second later the oldest silent socket makes room for a real user.
    let _alice = eventually_admitted(&n, "alice").await;
    let oldest = first_answer_of(&mut silent[0]).await;
    assert_eq!(oldest, Err(4429), "the oldest silent socket was pushed out");
    assert_eq!(n.metric("herald_pending_evicted_total").await, 1.0);
    // Four silent sockets remain pending; the watcher and alice are authenticated.
    wait_for(
        &n,
        &[
            ("herald_pending_handshakes", 4.0),
            ("herald_connections", 6.0),
        ],
    )
    .await;
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

/// Polls until every metric has its value, within 5 s.
async fn wait_for(n: &TestNode, want: &[(&str, f64)]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for (name, value) in want {
        loop {
            let now = n.metric(name).await;
            if now == *value {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} is {now}, not {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One user cannot take a node's slots: the connection over
/// `max_connections_per_user` is closed 4429 after its hello; other users are not
/// affected, and a freed slot is given back.
#[tokio::test]
async fn connections_per_user_are_limited_after_hello() {
    let config = Config {
        max_connections_per_user: 2,
        ..node::test_config()
    };
    let (n, mut w) = node_and_watcher(config).await;
    let (a1, r) = try_hello(&n, "alice").await;
    assert_eq!(r.unwrap()["type"], "welcome");
    let (_a2, r) = try_hello(&n, "alice").await;
    assert_eq!(r.unwrap()["type"], "welcome");
    for _ in 0..2 {
        let (_c, r) = try_hello(&n, "alice").await;
        assert_eq!(r, Err(Closed::Code(4429)));
    }
    let (_b, r) = try_hello(&n, "bob").await;
    assert_eq!(
        r.unwrap()["type"],
        "welcome",
        "another user is not affected"
    );
    a1.close().await;
    let _a3 = eventually_admitted(&n, "alice").await;
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

/// `pong` frames count against the command rate (they used to bypass it): a flood of
/// them is closed 4429.
#[tokio::test]
async fn a_pong_flood_is_closed_4429() {
    let config = Config {
        max_messages_per_sec: 10,
        ..node::test_config()
    };
    let (n, mut w) = node_and_watcher(config).await;
    let (mut a, _) = try_hello(&n, "alice").await;
    for _ in 0..200 {
        if !a.try_send_text(r#"{"type":"pong"}"#).await {
            break;
        }
    }
    assert_eq!(
        a.expect_close(Duration::from_secs(5)).await,
        Closed::Code(4429)
    );
    assert!(n.metric("herald_rate_limited_total").await >= 1.0);
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

/// WebSocket ping frames are answered by the library, but they are work: they count
/// against the rate too, after hello and before it.
#[tokio::test]
async fn a_websocket_ping_flood_is_closed_4429() {
    let config = Config {
        max_messages_per_sec: 10,
        ..node::test_config()
    };
    let (n, mut w) = node_and_watcher(config).await;
    let tok = n.token("alice", &[], &[]);
    for hello_first in [true, false] {
        let (mut ws, _) = tokio_tungstenite::connect_async(n.ws_url()).await.unwrap();
        if hello_first {
            let hello = json!({"type": "hello", "token": tok}).to_string();
            ws.send(Message::Text(hello.into())).await.unwrap();
            let m = first_answer_of(&mut ws).await;
            assert_eq!(m.unwrap()["type"], "welcome");
        }
        for _ in 0..200 {
            if ws.send(Message::Ping(vec![1u8; 8].into())).await.is_err() {
                break;
            }
        }
        assert_eq!(
            first_answer_of(&mut ws).await,
            Err(4429),
            "hello first: {hello_first}"
        );
    }
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

async fn first_answer_of<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Result<Value, u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("an answer in time");
        match m {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                // A busy node's `reconnect` comes before its 4429.
                if v["type"] == "reconnect" && v["reason"] == "busy" {
                    continue;
                }
                return Ok(v);
            }
            Some(Ok(Message::Close(Some(f)))) => return Err(u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("no answer: {other:?}"),
        }
    }
}
