//! The SDK against a scripted fake server, for what a real node does not do on demand:
//! hostile or odd frames (the client must skip them and keep delivering), the v1.1
//! frames (`expiring` → `refresh`, `subscribed`, `unsubscribed`, refused resumes) and
//! the close codes 4410 (kicked: stop) and 4401 "token expired" (a fresh token).
//!
//! The fake is a plain tokio-tungstenite server on 127.0.0.1:0: each accepted
//! connection is handed to the test after its `hello`, and the test sends frames and
//! reads the client's commands.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald_client::{Client, DisconnectReason, Error, ErrorCode, StopReason};
use serde_json::{json, Value};
use support::{Recorder, WAIT};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

/// A fake node: hands over each connection once its `hello` arrived.
struct Fake {
    url: String,
    conns: mpsc::Receiver<Conn>,
    accepted: Arc<AtomicU32>,
}

/// One client connection to the fake.
struct Conn {
    ws: WebSocketStream<TcpStream>,
    hello: Value,
}

impl Fake {
    async fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let (tx, conns) = mpsc::channel(8);
        let accepted = Arc::new(AtomicU32::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    let Some(Ok(WsMessage::Text(text))) = ws.next().await else {
                        return;
                    };
                    let hello: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(hello["type"], "hello");
                    let _ = tx.send(Conn { ws, hello }).await;
                });
            }
        });
        Fake {
            url,
            conns,
            accepted,
        }
    }

    /// The next connection (after its hello).
    async fn next(&mut self) -> Conn {
        tokio::time::timeout(WAIT, self.conns.recv())
            .await
            .expect("a connection in time")
            .expect("the fake server runs")
    }
}

impl Conn {
    async fn send(&mut self, text: impl Into<String>) {
        self.ws
            .send(WsMessage::text(text.into()))
            .await
            .expect("send to the client");
    }

    async fn send_json(&mut self, v: Value) {
        self.send(v.to_string()).await;
    }

    /// `welcome` for alice with these channels (offset 0, epoch "e") and errors.
    async fn welcome(&mut self, channels: &[&str], errors: Value) {
        let mut subs = serde_json::Map::new();
        for c in ["user:alice"].iter().chain(channels) {
            subs.insert(
                (*c).into(),
                json!({"offset": 0, "epoch": "e", "recovered": false}),
            );
        }
        self.send_json(json!({
            "type": "welcome", "session": "s1", "node": "fake", "user": "alice",
            "heartbeat_ms": 25_000, "subscriptions": subs, "errors": errors,
        }))
        .await;
    }

    async fn message(&mut self, channel: &str, offset: u64, data: Value) {
        self.send_json(json!({
            "type": "message", "channel": channel, "offset": offset, "epoch": "e", "data": data,
        }))
        .await;
    }

    /// The client's next command (pongs skipped).
    async fn command(&mut self) -> Value {
        loop {
            let frame = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a command in time");
            match frame {
                Some(Ok(WsMessage::Text(text))) => {
                    let v: Value = serde_json::from_str(&text).unwrap();
                    // Pongs and the personal channel's automatic acks (coalesced,
                    // timed by the client) are not what these tests wait for.
                    if v["type"] != "pong" && v["type"] != "ack" {
                        return v;
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("the client went away: {other:?}"),
            }
        }
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let _ = self
            .ws
            .close(Some(CloseFrame {
                code: WsCloseCode::from(code),
                reason: reason.to_owned().into(),
            }))
            .await;
    }
}

/// `depth` nested arrays around a number.
fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn odd_and_hostile_frames_are_skipped_and_delivery_goes_on() {
    let mut fake = Fake::start().await;
    let (client, events) = Client::builder()
        .url(fake.url.clone())
        .token("t")
        .subscribe("room:1")
        .request_timeout(WAIT)
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    let mut conn = fake.next().await;
    conn.welcome(&["room:1"], json!({})).await;

    // Each odd frame is followed by the next message of room:1, which must arrive.
    let long = "x".repeat(1 << 20);
    let hostile: Vec<String> = vec![
        r#"{"type":"brand-new","x":1}"#.into(),
        "not json".into(),
        String::new(),
        "[1,2]".into(),
        "null".into(),
        "42".into(),
        r#""a string""#.into(),
        r#"{"type":7}"#.into(),
        r#"{"no":"type"}"#.into(),
        r#"{"type":"message"}"#.into(),
        r#"{"type":"message","channel":5,"offset":1,"epoch":"e","data":1}"#.into(),
        r#"{"type":"message","channel":"room:1","offset":-1,"epoch":"e","data":1}"#.into(),
        r#"{"type":"message","channel":"room:1","offset":1e400,"epoch":"e","data":1}"#.into(),
        r#"{"type":"message","channel":"room:1","offset":123456789012345678901234567890,"epoch":"e","data":1}"#.into(),
        r#"{"type":"message","channel":"room:1","offset":"3","epoch":"e","data":1}"#.into(),
        r#"{"type":"message","channel":"room:1","offset":1,"epoch":"e"}"#.into(),
        // Far deeper than the server relays (64): whatever the parser does, no crash.
        format!(r#"{{"type":"message","channel":"room:1","offset":1,"epoch":"e","data":{}}}"#, nested(100_000)),
        r#"{"type":"message","channel":"room:other","offset":1,"epoch":"e","data":1}"#.into(),
        r#"{"type":"message","channel":"user:bob","offset":1,"epoch":"e","data":1}"#.into(),
        r#"{"type":"reply","id":999,"result":{}}"#.into(),
        r#"{"type":"reply","id":"x","result":{}}"#.into(),
        r#"{"type":"reply"}"#.into(),
        r#"{"type":"reply","id":1,"error":{"code":"brand_new","message":"?"}}"#.into(),
        r#"{"type":"welcome"}"#.into(),
        r#"{"type":"welcome","session":"s2","node":"other","user":"mallory","heartbeat_ms":1,"subscriptions":{}}"#.into(),
        r#"{"type":"resync","channel":"room:other","offset":5,"epoch":"x"}"#.into(),
        r#"{"type":"resync","channel":"room:1"}"#.into(),
        r#"{"type":"reconnect","reason":"x","after_ms":18446744073709551615}"#.into(),
        r#"{"type":"expiring","in_ms":18446744073709551615}"#.into(),
        r#"{"type":"expiring","in_ms":-5}"#.into(),
        r#"{"type":"subscribed","channel":"bad name!","offset":1,"epoch":"e"}"#.into(),
        r#"{"type":"subscribed","channel":"room:x"}"#.into(),
        r#"{"type":"unsubscribed","channel":"room:nope","reason":"server"}"#.into(),
        r#"{"type":"unsubscribed"}"#.into(),
        r#"{"type":"ping","extra":{"deep":[1,2,3]}}"#.into(),
    ];
    let mut offset = 0;
    for frame in &hostile {
        conn.send(frame.clone()).await;
        offset += 1;
        conn.message("room:1", offset, json!({ "n": offset })).await;
    }
    conn.ws
        .send(WsMessage::binary(vec![0u8, 1, 2]))
        .await
        .unwrap();
    // Duplicates and old offsets are dropped; unknown fields are fine; data may be any
    // JSON value, 64 levels deep, or a megabyte long.
    conn.message("room:1", offset, json!("duplicate")).await;
    conn.message("room:1", 1, json!("old")).await;
    let datas = vec![
        json!(null),
        json!(true),
        json!(-1.5e300),
        json!(u64::MAX),
        json!("text"),
        json!([]),
        json!({}),
        serde_json::from_str::<Value>(&nested(64)).unwrap(),
        json!(long),
    ];
    for data in &datas {
        offset += 1;
        conn.send_json(json!({
            "type": "message", "channel": "room:1", "offset": offset, "epoch": "e",
            "data": data, "from": "bob", "future_field": {"a": [1, {"b": null}]},
        }))
        .await;
    }
    rec.wait("every good message", WAIT, |r| r.last("room:1") == offset)
        .await;
    rec.with(|r| {
        assert_eq!(r.offsets("room:1"), (1..=offset).collect::<Vec<_>>());
        let seen: Vec<&Value> = r.messages["room:1"].iter().map(|s| &s.data).collect();
        assert_eq!(
            seen[seen.len() - datas.len()..],
            datas.iter().collect::<Vec<_>>()[..]
        );
        assert!(!r.messages.contains_key("room:other") && !r.messages.contains_key("user:bob"));
        assert_eq!(r.connected.len(), 1, "one session all along");
        assert!(r.disconnected.is_empty(), "{:?}", r.disconnected);
        assert!(r.resyncs.is_empty(), "{:?}", r.resyncs);
        assert!(r.unsubscribed.is_empty() && r.stopped.is_none());
        assert!(
            r.subscribed.iter().all(|s| !s.by_server),
            "bad subscribed frames skipped"
        );
    });

    // The client still answers pings and commands.
    conn.send(r#"{"type":"ping"}"#).await;
    let publish = tokio::spawn({
        let client = client.clone();
        async move { client.publish("room:1", &1).await }
    });
    let cmd = conn.command().await;
    assert_eq!(cmd["type"], "publish");
    // A reply of the wrong shape settles the command at once (no wait for the timeout).
    conn.send_json(
        json!({"type": "reply", "id": cmd["id"], "error": {"code": "brand_new", "message": "?"}}),
    )
    .await;
    let e = tokio::time::timeout(Duration::from_secs(5), publish)
        .await
        .expect("settled before the request timeout")
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e}");
    let publish = tokio::spawn({
        let client = client.clone();
        async move { client.publish("room:1", &2).await }
    });
    let cmd = conn.command().await;
    conn.send_json(
        json!({"type": "reply", "id": cmd["id"], "result": {"offset": 99, "epoch": "e"}}),
    )
    .await;
    assert_eq!(publish.await.unwrap().unwrap().offset, 99);
    client.close().await;
}

#[tokio::test]
async fn server_side_subscribe_and_unsubscribe_and_a_refused_resume() {
    let mut fake = Fake::start().await;
    let (client, events) = Client::builder()
        .url(fake.url.clone())
        .token("t")
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    let mut conn = fake.next().await;
    conn.welcome(&[], json!({})).await;

    conn.send_json(json!({"type": "subscribed", "channel": "room:9", "offset": 3, "epoch": "e"}))
        .await;
    conn.send_json(json!({"type": "subscribed", "channel": "room:10", "offset": 0, "epoch": "e"}))
        .await;
    for o in 1..=4 {
        // 1..=3 are at or before the server's position: dropped.
        conn.message("room:9", o, json!({ "n": o })).await;
    }
    conn.message("room:10", 1, json!({"n": 1})).await;
    rec.wait("messages of the server's channels", WAIT, |r| {
        r.last("room:9") == 4 && r.last("room:10") == 1
    })
    .await;
    rec.with(|r| {
        assert_eq!(r.offsets("room:9"), [4]);
        let by_server: Vec<&str> = r
            .subscribed
            .iter()
            .filter(|s| s.by_server)
            .map(|s| s.channel.as_str())
            .collect();
        assert_eq!(by_server, ["room:9", "room:10"]);
    });

    conn.send_json(json!({"type": "unsubscribed", "channel": "room:9", "reason": "server"}))
        .await;
    conn.message("room:9", 5, json!({"n": 5})).await;
    conn.message("room:10", 2, json!({"n": 2})).await;
    rec.wait("unsubscribed event", WAIT, |r| {
        !r.unsubscribed.is_empty() && r.last("room:10") == 2
    })
    .await;
    rec.with(|r| {
        assert_eq!(r.unsubscribed, [("room:9".to_owned(), "server".to_owned())]);
        assert_eq!(r.offsets("room:9"), [4], "nothing after the unsubscribe");
    });

    // The next hello resumes room:10 (not room:9); the node refuses it now.
    conn.close(4503, "node draining").await;
    let mut conn = fake.next().await;
    let resume = &conn.hello["resume"];
    assert_eq!(resume["room:10"], json!({"offset": 2, "epoch": "e"}));
    assert!(resume.get("room:9").is_none(), "{resume}");
    conn.welcome(
        &[],
        json!({"room:10": {"code": "forbidden", "message": "not allowed"}}),
    )
    .await;
    rec.wait("refused resume reported", WAIT, |r| {
        r.failed.iter().any(|(c, _)| c == "room:10")
    })
    .await;
    rec.with(|r| assert_eq!(r.failed[0].1.code, ErrorCode::Forbidden));
    let positions = client.positions().await.unwrap();
    assert!(!positions.contains_key("room:10") && positions.contains_key("user:alice"));
    client.close().await;
}

/// A token callback that hands out "t1", "t2", …, and counts its calls.
type TokenFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, std::io::Error>> + Send>>;

fn numbered_tokens(
    calls: Arc<AtomicU32>,
    slow: Duration,
) -> impl Fn() -> TokenFuture + Send + Sync + 'static {
    move || {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move {
            if n > 1 {
                // A slow backend: messages must keep flowing meanwhile.
                tokio::time::sleep(slow).await;
            }
            Ok(format!("t{n}"))
        })
    }
}

#[tokio::test]
async fn expiring_refreshes_the_token_in_the_session_and_retries_a_refusal() {
    let mut fake = Fake::start().await;
    let calls = Arc::new(AtomicU32::new(0));
    let (client, events) = Client::builder()
        .url(fake.url.clone())
        .token_provider(numbered_tokens(calls.clone(), Duration::from_millis(300)))
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    let mut conn = fake.next().await;
    assert_eq!(conn.hello["token"], "t1");
    conn.welcome(&[], json!({})).await;

    conn.send_json(json!({"type": "expiring", "in_ms": 20_000}))
        .await;
    // While the callback runs, messages are delivered.
    conn.message("user:alice", 1, json!({"n": 1})).await;
    rec.wait("a message during the refresh", WAIT, |r| {
        r.last("user:alice") == 1
    })
    .await;
    let cmd = conn.command().await;
    assert_eq!(
        (cmd["type"].as_str(), cmd["token"].as_str()),
        (Some("refresh"), Some("t2"))
    );
    // Refused: the client asks the callback again after a short backoff.
    conn.send_json(json!({"type": "reply", "id": cmd["id"], "error": {"code": "unauthorized", "message": "token expired"}}))
        .await;
    let cmd = conn.command().await;
    assert_eq!(
        (cmd["type"].as_str(), cmd["token"].as_str()),
        (Some("refresh"), Some("t3"))
    );
    conn.send_json(json!({"type": "reply", "id": cmd["id"], "result": {}}))
        .await;
    // A reply to a refresh is not a message; the session goes on.
    conn.message("user:alice", 2, json!({"n": 2})).await;
    rec.wait("a message after the refresh", WAIT, |r| {
        r.last("user:alice") == 2
    })
    .await;

    // The next hello uses the refreshed token without asking the callback.
    conn.close(4503, "node draining").await;
    let mut conn = fake.next().await;
    assert_eq!(conn.hello["token"], "t3");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    conn.welcome(&[], json!({})).await;

    // A refresh that never succeeds: the server closes 4401 "token expired" at the
    // deadline and the client reconnects with a fresh token.
    conn.send_json(json!({"type": "expiring", "in_ms": 1_000}))
        .await;
    let cmd = conn.command().await;
    assert_eq!(cmd["type"], "refresh");
    conn.send_json(json!({"type": "reply", "id": cmd["id"], "error": {"code": "forbidden", "message": "another user"}}))
        .await;
    conn.close(4401, "token expired").await;
    let conn = fake.next().await;
    let token = conn.hello["token"].as_str().unwrap().to_owned();
    assert!(
        !["t1", "t2", "t3", "t4"].contains(&token.as_str()),
        "a fresh token: {token}"
    );
    rec.with(|r| {
        assert!(r.disconnected.iter().any(|d| matches!(
            &d.reason,
            DisconnectReason::Closed { code: 4401, reason } if reason == "token expired"
        )));
        assert_eq!(r.offsets("user:alice"), [1, 2]);
    });
    client.close().await;
}

#[tokio::test]
async fn kicked_stops_the_client_without_a_reconnect() {
    let mut fake = Fake::start().await;
    let calls = Arc::new(AtomicU32::new(0));
    let (client, events) = Client::builder()
        .url(fake.url.clone())
        .token_provider(numbered_tokens(calls.clone(), Duration::ZERO))
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    let mut conn = fake.next().await;
    conn.welcome(&[], json!({})).await;
    conn.close(4410, "kicked").await;
    rec.wait("stopped", WAIT, |r| r.ended).await;
    rec.with(|r| {
        assert_eq!(
            r.stopped,
            Some(StopReason::Kicked {
                reason: "kicked".into()
            })
        );
        assert_eq!(r.disconnected.len(), 1);
        assert_eq!(r.disconnected[0].retry_in, None);
    });
    assert!(matches!(
        client.state(),
        herald_client::State::Stopped(StopReason::Kicked { .. })
    ));
    assert!(matches!(
        client.publish("room:1", &1).await,
        Err(Error::Closed)
    ));
    assert_eq!(
        fake.accepted.load(Ordering::SeqCst),
        1,
        "no second connection"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "no new token asked for");
}

#[tokio::test]
async fn extreme_durations_in_frames_are_capped() {
    let mut fake = Fake::start().await;
    let (client, events) = Client::builder()
        .url(fake.url.clone())
        .token("t")
        .backoff(Duration::from_millis(10), Duration::from_millis(200))
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    let mut conn = fake.next().await;
    conn.send_json(json!({
        "type": "welcome", "session": "s1", "node": "fake", "user": "alice",
        "heartbeat_ms": u64::MAX,
        "subscriptions": {"user:alice": {"offset": 0, "epoch": "e", "recovered": false}},
    }))
    .await;
    conn.message("user:alice", 1, json!(1)).await;
    rec.wait("a message", WAIT, |r| r.last("user:alice") == 1)
        .await;
    // A drain that asks for a wait of 584 million years: the client caps it at its
    // backoff ceiling and comes back.
    conn.send_json(json!({"type": "reconnect", "reason": "draining", "after_ms": u64::MAX}))
        .await;
    conn.close(4503, "node draining").await;
    let mut conn = fake.next().await;
    conn.welcome(&[], json!({})).await;
    rec.wait("second session", WAIT, |r| r.connected.len() == 2)
        .await;
    rec.with(|r| assert!(r.disconnected[0].retry_in <= Some(Duration::from_millis(200))));
    client.close().await;
}

/// A busy node (`reconnect` with reason `busy`, then 4429, before `welcome`): the
/// client comes back after `after_ms` plus a jitter of up to a second, not after its
/// own (here 10 ms) backoff.
#[tokio::test]
async fn a_busy_answer_is_waited_out_before_the_client_comes_back() {
    let mut fake = Fake::start().await;
    let (client, _events) = Client::builder()
        .url(fake.url.clone())
        .token("t")
        .backoff(Duration::from_millis(10), Duration::from_secs(10))
        .start()
        .unwrap();
    for _ in 0..2 {
        let mut conn = fake.next().await;
        conn.send_json(json!({"type": "reconnect", "reason": "busy", "after_ms": 700}))
            .await;
        conn.close(4429, "busy").await;
        let told = std::time::Instant::now();
        let mut again = fake.next().await;
        let waited = told.elapsed();
        assert!(
            waited >= Duration::from_millis(700) && waited < Duration::from_millis(1_900),
            "came back after {waited:?}"
        );
        again.close(4429, "busy").await;
    }
    client.close().await;
}

/// A node cut off from Redis sends `reconnect` with reason `unavailable`, then 4503:
/// like a drain, the client waits `after_ms` (no backoff of its own, no stop) and
/// resumes from the last offset it delivered.
#[tokio::test]
async fn reason_unavailable_reconnects_after_after_ms_and_resumes() {
    let mut fake = Fake::start().await;
    let (client, events) = Client::builder()
        .url(fake.url.clone())
        .token("t")
        .backoff(Duration::from_secs(5), Duration::from_secs(10))
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    let mut conn = fake.next().await;
    conn.welcome(&[], json!({})).await;
    conn.message("user:alice", 1, json!(1)).await;
    rec.wait("a message", WAIT, |r| r.last("user:alice") == 1)
        .await;
    conn.send_json(json!({"type": "reconnect", "reason": "unavailable", "after_ms": 150}))
        .await;
    conn.close(4503, "node cut off from the broker; reconnect elsewhere")
        .await;
    let started = std::time::Instant::now();
    let conn = fake.next().await;
    let waited = started.elapsed();
    // The server's 150 ms, not the 5 s backoff floor.
    assert!(
        waited < Duration::from_secs(3),
        "reconnected after {waited:?}"
    );
    assert_eq!(
        conn.hello["resume"]["user:alice"]["offset"], 1,
        "{}",
        conn.hello
    );
    rec.with(|r| assert_eq!(r.disconnected[0].retry_in, Some(Duration::from_millis(150))));
    client.close().await;
}
