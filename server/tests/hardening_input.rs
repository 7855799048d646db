//! Hostile input: random and mutated frames over a real WebSocket, checked
//! against the protocol parser as an oracle; invalid UTF-8 and broken framing; deep JSON
//! nesting and huge numbers that must travel intact; thousands of subscribe commands;
//! slowloris clients that open connections and send their upgrade request partly, slowly
//! or not at all. In every case the node does not panic and other sessions are fine.
//!
//! The command flood and the per-address connection limit are in `node_limits`
//! (`command_flood_is_rate_limited_then_closed_4429`, `max_connections_per_ip_closes_4429`).

#[path = "support/bystander.rs"]
mod bystander;
#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;
#[path = "support/panics.rs"]
mod panics;
#[path = "support/process.rs"]
mod process;

use std::time::{Duration, Instant};

use bystander::{assert_undisturbed, node_and_watcher};
use client::{Client, Closed};
use futures_util::{SinkExt, StreamExt};
use herald_protocol::depth::MAX_DATA_DEPTH;
use herald_protocol::frame::{ClientCommand, ParseError};
use herald_server::Config;
use node::TestNode;
use panics::assert_no_server_panic;
use process::NodeProcess;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The head of a server frame. `data` is never parsed into a `Value` (serde_json skips
/// unknown fields without recursion), so a message nested 10 000 deep reads fine.
#[derive(Deserialize, Debug)]
struct Head {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    result: Option<Box<RawValue>>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

/// What the node did with one frame.
#[derive(Debug)]
enum Outcome {
    Reply(Head),
    Closed(Option<u16>),
    Silent,
}

async fn connect_alice(url: &str) -> Ws {
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    let token = node::token("alice", &["room:*", "fuzz:*"], &["room:*", "fuzz:*"]);
    let hello = json!({"type": "hello", "token": token}).to_string();
    ws.send(Message::Text(hello.into())).await.unwrap();
    let welcome = next_head(&mut ws, Duration::from_secs(5)).await;
    assert!(
        matches!(&welcome, Outcome::Reply(h) if h.kind == "welcome"),
        "{welcome:?}"
    );
    ws
}

/// The next frame that is not a message, ping or resync; `Silent` after `wait`.
async fn next_head(ws: &mut Ws, wait: Duration) -> Outcome {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Err(_) => return Outcome::Silent,
            Ok(Some(Ok(Message::Text(t)))) => {
                let head: Head = serde_json::from_str(&t).expect("server frames are JSON");
                if matches!(head.kind.as_str(), "message" | "ping" | "resync") {
                    continue;
                }
                return Outcome::Reply(head);
            }
            Ok(Some(Ok(Message::Close(f)))) => return Outcome::Closed(f.map(|f| f.code.into())),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => return Outcome::Closed(None),
        }
    }
}

/// Valid commands the mutations start from.
fn seeds() -> Vec<String> {
    [
        json!({"type": "subscribe", "id": 1, "channel": "room:1", "since": {"offset": 3, "epoch": "e"}}),
        json!({"type": "publish", "id": 2, "channel": "fuzz:1", "data": {"a": [1, 2, {"b": null}], "s": "x"}}),
        json!({"type": "unsubscribe", "id": 3, "channel": "room:1"}),
        json!({"type": "presence", "id": 4, "channel": "room:1"}),
        json!({"type": "pong"}),
        json!({"type": "subscribe", "id": 5, "channel": "user:bob"}),
    ]
    .iter()
    .map(Value::to_string)
    .collect()
}

fn nested(depth: usize, open: &str, close: &str, inner: &str) -> String {
    format!("{}{inner}{}", open.repeat(depth), close.repeat(depth))
}

/// One random text frame: random characters, a mutated command, deep nesting or huge
/// numbers in every position a number can take.
fn random_text(rng: &mut StdRng, seeds: &[String]) -> String {
    let seed = &seeds[rng.random_range(0..seeds.len())];
    match rng.random_range(0..8) {
        0 => {
            let len = rng.random_range(0..200);
            (0..len).map(|_| rng.random::<char>()).collect()
        }
        1 | 2 => {
            // Byte flips, kept only when the result is still UTF-8.
            let mut bytes = seed.clone().into_bytes();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..bytes.len());
                bytes[i] = rng.random_range(0x20..0x7f);
            }
            String::from_utf8(bytes).unwrap_or_default()
        }
        3 => {
            // Truncated, or cut and spliced with another seed.
            let cut = rng.random_range(0..seed.len());
            let other = &seeds[rng.random_range(0..seeds.len())];
            let from = rng.random_range(0..other.len());
            format!("{}{}", &seed[..cut], &other[from..])
        }
        4 => {
            // Deep nesting: at the top level, and inside `data` (which is legal JSON).
            let depth = rng.random_range(1..10_000);
            if rng.random_bool(0.5) {
                nested(depth, "[", "]", "1")
            } else {
                let data = nested(depth, "{\"a\":", "}", "[]");
                format!(r#"{{"type":"publish","id":7,"channel":"fuzz:deep","data":{data}}}"#)
            }
        }
        5 => {
            // Huge, negative, fractional and exponent numbers in every numeric field.
            let n = [
                "1e400",
                "-1",
                "1.5",
                "18446744073709551616",
                "123456789012345678901234567890",
                "-0",
                "0.0000000000000000000000001",
                "9007199254740993",
            ][rng.random_range(0..8)];
            match rng.random_range(0..3) {
                0 => format!(r#"{{"type":"subscribe","id":{n},"channel":"room:1"}}"#),
                1 => format!(
                    r#"{{"type":"subscribe","id":8,"channel":"room:2","since":{{"offset":{n},"epoch":"e"}}}}"#
                ),
                _ => format!(r#"{{"type":"publish","id":9,"channel":"fuzz:num","data":{n}}}"#),
            }
        }
        6 => {
            // Odd strings: escapes, surrogate escapes, control characters, NUL.
            let s = [
                r#"\ud800"#,
                r#"\u0000"#,
                "\\\"",
                r#"\udfff\ud800"#,
                "\u{0}\u{1}\u{7f}",
                "room:1\n",
            ][rng.random_range(0..6)];
            format!(r#"{{"type":"subscribe","id":10,"channel":"{s}"}}"#)
        }
        _ => {
            // A random JSON object with a real type and random fields.
            let kinds = [
                "hello",
                "subscribe",
                "publish",
                "presence",
                "unsubscribe",
                "pong",
                "ack",
                "Subscribe",
                "",
            ];
            let kind = kinds[rng.random_range(0..kinds.len())];
            let mut obj = json!({"type": kind});
            for field in [
                "id", "channel", "since", "data", "token", "resume", "offset",
            ] {
                if rng.random_bool(0.5) {
                    let v = match rng.random_range(0..5) {
                        0 => json!(rng.random::<u32>()),
                        1 => json!("room:9"),
                        2 => json!(null),
                        3 => json!({"offset": 1, "epoch": "e"}),
                        _ => json!([1, "x"]),
                    };
                    obj[field] = v;
                }
            }
            obj.to_string()
        }
    }
}

/// What the parser (the oracle) says the node must do with a text frame after hello.
fn expected(text: &str) -> Expect {
    match ClientCommand::parse(text) {
        Err(ParseError::NotACommand(_)) | Ok(ClientCommand::Hello { .. }) => Expect::Close4400,
        Err(ParseError::BadArgument { id, .. }) => Expect::BadRequest(id),
        Ok(ClientCommand::Pong) => Expect::Nothing,
        Ok(
            ClientCommand::Subscribe { id, .. }
            | ClientCommand::Unsubscribe { id, .. }
            | ClientCommand::Publish { id, .. }
            | ClientCommand::Presence { id, .. }
            | ClientCommand::Refresh { id, .. }
            | ClientCommand::Ack { id: Some(id), .. },
        ) => Expect::Reply(id),
        // An ack without id is answered only when refused (no id in the error reply).
        Ok(ClientCommand::Ack { id: None, .. }) => Expect::SilentOrError,
    }
}

#[derive(Debug)]
enum Expect {
    Close4400,
    BadRequest(Option<u64>),
    Reply(u64),
    Nothing,
    SilentOrError,
}

/// Random and mutated frames over a real WebSocket: for each text frame the node does
/// exactly what the protocol parser says (close 4400, a `bad_request` reply, or a reply
/// to the command's id); invalid UTF-8, binary frames and broken framing close with 4400;
/// nothing panics, the bystander keeps receiving, and every connection is released.
/// The seed is printed; `HERALD_FUZZ_SEED` replays one, `HERALD_FUZZ_FRAMES` runs longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_mutated_frames_never_hurt_the_node() {
    let seed: u64 = std::env::var("HERALD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let frames: usize = std::env::var("HERALD_FUZZ_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    eprintln!("fuzz seed {seed} ({frames} frames); replay with HERALD_FUZZ_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let config = Config {
        // The rate limits are node_limits' and user_limits' business; here every frame
        // must be judged, and alice reconnects after every frame that closes her.
        max_messages_per_sec: 1_000_000,
        max_frames_per_sec: 2_000_000,
        max_user_connects_per_min: 0,
        max_user_subscribes_per_sec: 0,
        ..node::test_config()
    };
    let (n, mut w) = node_and_watcher(config).await;
    let seeds = seeds();
    let mut ws = connect_alice(&n.ws_url()).await;
    let mut counts = [0usize; 4];
    for i in 0..frames {
        let kind = rng.random_range(0..20);
        let outcome = if kind < 17 {
            let text = random_text(&mut rng, &seeds);
            let expect = expected(&text);
            ws.send(Message::Text(text.clone().into())).await.unwrap();
            let wait = match expect {
                Expect::Nothing | Expect::SilentOrError => Duration::from_millis(20),
                _ => Duration::from_secs(5),
            };
            let outcome = next_head(&mut ws, wait).await;
            let short: String = text.chars().take(120).collect();
            match (&expect, &outcome) {
                (Expect::Close4400, Outcome::Closed(Some(4400))) => counts[0] += 1,
                (Expect::BadRequest(id), Outcome::Reply(h)) => {
                    assert_eq!(h.kind, "reply", "#{i} {short}");
                    assert_eq!(
                        h.error.as_ref().map(|e| e["code"].clone()),
                        Some(json!("bad_request")),
                        "#{i} {short}: {h:?}"
                    );
                    assert_eq!(h.id.as_ref().and_then(Value::as_u64), *id, "#{i} {short}");
                    counts[1] += 1;
                }
                (Expect::Reply(id), Outcome::Reply(h)) => {
                    assert_eq!(h.kind, "reply", "#{i} {short}");
                    assert_eq!(
                        h.id.as_ref().and_then(Value::as_u64),
                        Some(*id),
                        "#{i} {short}"
                    );
                    assert!(h.error.is_some() != h.result.is_some(), "#{i} {h:?}");
                    counts[2] += 1;
                }
                (Expect::Nothing | Expect::SilentOrError, Outcome::Silent) => counts[3] += 1,
                (Expect::SilentOrError, Outcome::Reply(h)) => {
                    assert!(h.id.is_none() && h.error.is_some(), "#{i} {h:?}");
                    counts[1] += 1;
                }
                _ => panic!("#{i} {short}: expected {expect:?}, got {outcome:?}"),
            }
            outcome
        } else {
            // Below the JSON layer: a text frame that is not UTF-8, a binary frame, or a
            // frame that breaks the framing rules. Each closes with 4400.
            let frame = match kind {
                17 => {
                    let mut bytes = br#"{"type":"pong","x":""#.to_vec();
                    bytes.extend([0xff, 0xfe, 0xc3, 0x28, b'"', b'}']);
                    Frame::message(bytes, OpCode::Data(Data::Text), true)
                }
                18 => Frame::message(
                    seeds[0].clone().into_bytes(),
                    OpCode::Data(Data::Binary),
                    true,
                ),
                _ => Frame::message(b"x".to_vec(), OpCode::Data(Data::Continue), true),
            };
            ws.send(Message::Frame(frame)).await.unwrap();
            let outcome = next_head(&mut ws, Duration::from_secs(5)).await;
            assert!(
                matches!(outcome, Outcome::Closed(Some(4400))),
                "#{i} frame kind {kind}: {outcome:?}"
            );
            outcome
        };
        if matches!(outcome, Outcome::Closed(_)) {
            ws = connect_alice(&n.ws_url()).await;
        }
    }
    eprintln!(
        "measured: fuzz frames: {} closed 4400, {} bad_request, {} replies, {} silent (pong)",
        counts[0], counts[1], counts[2], counts[3]
    );
    drop(ws);
    assert_undisturbed(&n, &mut w).await;
    wait_for_metric(&n, "herald_connections", 1.0).await;
    assert_no_server_panic();
}

async fn wait_for_metric(n: &TestNode, name: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = n.metric(name).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed at {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Data nested as deep as allowed (`MAX_DATA_DEPTH`, 64 levels: deeper is refused, see
/// node_input_limits.rs), huge integers, numbers out of f64's range and odd escapes are
/// legal JSON: they reach subscribers byte for byte, over the WebSocket and in the
/// history API, whichever way they were published.
#[tokio::test]
async fn deep_and_huge_data_travels_byte_for_byte() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    let mut sub = connect_alice(&n.ws_url()).await;
    let r = json!({"type": "subscribe", "id": 1, "channel": "fuzz:data"}).to_string();
    sub.send(Message::Text(r.into())).await.unwrap();
    assert!(
        matches!(next_head(&mut sub, Duration::from_secs(5)).await, Outcome::Reply(h) if h.result.is_some())
    );
    let mut publisher = connect_alice(&n.ws_url()).await;
    let values = [
        nested(MAX_DATA_DEPTH, "[", "]", "0"),
        nested(MAX_DATA_DEPTH, "{\"k\":", "}", "\"v\""),
        "123456789012345678901234567890".to_string(),
        "1e400".to_string(),
        "-0.0000000000000000000000000001".to_string(),
        "[18446744073709551616,9007199254740993,-9223372036854775809]".to_string(),
        r#""\ud83d\ude00 \u0000 \"""#.to_string(),
    ];
    let mut offset = 0;
    for (i, data) in values.iter().enumerate() {
        // Alternately from a client and through the HTTP API.
        if i % 2 == 0 {
            let cmd =
                format!(r#"{{"type":"publish","id":{i},"channel":"fuzz:data","data":{data}}}"#);
            publisher.send(Message::Text(cmd.into())).await.unwrap();
            match next_head(&mut publisher, Duration::from_secs(5)).await {
                Outcome::Reply(h) => assert!(h.result.is_some(), "#{i}: {h:?}"),
                other => panic!("#{i}: {other:?}"),
            }
        } else {
            let body = format!(r#"{{"channel":"fuzz:data","data":{data}}}"#);
            let r = reqwest::Client::new()
                .post(format!("{}/v1/publish", n.http()))
                .bearer_auth(node::API_KEY)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "#{i}");
        }
        offset += 1;
        let got = loop {
            match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let h: Head = serde_json::from_str(&t).unwrap();
                    if h.kind == "message" {
                        break h;
                    }
                }
                other => panic!("#{i}: {other:?}"),
            }
        };
        assert_eq!(got.channel.as_deref(), Some("fuzz:data"));
        assert_eq!(
            got.data.as_ref().map(|d| d.get()),
            Some(data.as_str()),
            "#{i} changed on the way"
        );
    }
    // The history API gives the same bytes back.
    let text = reqwest::Client::new()
        .get(format!("{}/v1/channels/fuzz:data/history", n.http()))
        .bearer_auth(node::API_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    #[derive(Deserialize)]
    struct History {
        offset: u64,
        messages: Vec<Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        offset: u64,
        data: Box<RawValue>,
    }
    let h: History = serde_json::from_str(&text).expect("history is JSON");
    assert_eq!(h.offset, offset);
    assert_eq!(h.messages.len(), values.len());
    for (m, data) in h.messages.iter().zip(&values) {
        assert_eq!(
            m.data.get(),
            data.as_str(),
            "history of offset {}",
            m.offset
        );
    }
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

/// Thousands of subscribe commands from one connection: the first ones up to
/// `HERALD_MAX_SUBSCRIPTIONS` (128 by default, the personal channel included) succeed,
/// every other one gets an error reply, the connection stays, and the node holds no
/// broker subscription for the refused channels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_subscribes_stop_at_the_limit() {
    const COMMANDS: usize = 3_000;
    let config = Config {
        // Otherwise the rate limit closes the connection first (see node_limits).
        max_messages_per_sec: 1_000_000,
        ..node::test_config()
    };
    let limit = config.max_subscriptions;
    let (n, mut w) = node_and_watcher(config).await;
    let ws = connect_alice(&n.ws_url()).await;
    let started = Instant::now();
    let sender = {
        let (mut sink, stream) = ws.split();
        let send = tokio::spawn(async move {
            for i in 0..COMMANDS {
                let cmd = json!({"type": "subscribe", "id": i, "channel": format!("room:{i}")});
                sink.send(Message::Text(cmd.to_string().into()))
                    .await
                    .unwrap();
            }
            sink
        });
        (send, stream)
    };
    let (send, mut stream) = sender;
    let (mut ok, mut refused) = (0usize, 0usize);
    while ok + refused < COMMANDS {
        let m = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a reply in time")
            .expect("open")
            .expect("a frame");
        let Message::Text(t) = m else { continue };
        let h: Head = serde_json::from_str(&t).unwrap();
        if h.kind != "reply" {
            continue;
        }
        if h.result.is_some() {
            assert_eq!(refused, 0, "a subscribe accepted after the limit: {h:?}");
            ok += 1;
        } else {
            let e = h.error.unwrap();
            assert_eq!(e["code"], "bad_request", "{e}");
            assert!(e["message"].as_str().unwrap().contains("limit"), "{e}");
            refused += 1;
        }
    }
    let sink = send.await.unwrap();
    let mut ws = sink.reunite(stream).unwrap();
    eprintln!(
        "measured: {COMMANDS} subscribe commands answered in {:?}: {ok} accepted, {refused} refused",
        started.elapsed()
    );
    assert_eq!(ok, limit - 1, "the personal channel counts");
    assert_eq!(refused, COMMANDS - ok);
    // The node is subscribed to alice's channels and the bystander's, nothing more.
    assert_eq!(n.metric("herald_subscriptions").await, (limit + 1) as f64);
    assert_eq!(n.metric("herald_broker_channels").await, (limit + 1) as f64);
    // The connection still works.
    let cmd = json!({"type": "unsubscribe", "id": 1, "channel": "room:0"}).to_string();
    ws.send(Message::Text(cmd.into())).await.unwrap();
    assert!(
        matches!(next_head(&mut ws, Duration::from_secs(5)).await, Outcome::Reply(h) if h.result.is_some())
    );
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

/// Slowloris: hundreds of TCP connections that send nothing, half an upgrade request,
/// or an upgrade request one byte at a time. Each is closed once
/// `HERALD_HEADER_READ_TIMEOUT_MS` has passed, whatever it still sends; none of them
/// takes a connection slot (`HERALD_MAX_CONNECTIONS` is 3 here and real clients still
/// get in while they hang); and the node's file descriptors go back to where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_cut_and_hold_nothing() {
    const EACH: usize = 100;
    const TIMEOUT_MS: u64 = 1_000;
    let node = NodeProcess::start(
        "slowloris",
        &[
            ("HERALD_HEADER_READ_TIMEOUT_MS", &TIMEOUT_MS.to_string()),
            ("HERALD_MAX_CONNECTIONS", "3"),
        ],
    );
    node.wait_ready(Duration::from_secs(10)).await;
    let fds_before = node.open_fds().expect("/proc");
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        node.addr
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for kind in 0..3 {
        for _ in 0..EACH {
            let mut s = TcpStream::connect(node.addr).await.unwrap();
            let head = head.clone();
            tasks.push(tokio::spawn(async move {
                match kind {
                    0 => {}
                    1 => s.write_all(&head.as_bytes()[..40]).await.unwrap(),
                    _ => {}
                }
                // Trickle one byte every 100 ms (kind 2) and wait for the node to close.
                let mut sent = 0;
                let mut buf = [0u8; 512];
                loop {
                    let read = tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf));
                    match read.await {
                        Ok(Ok(0) | Err(_)) => return (kind, started.elapsed()),
                        Ok(Ok(_)) => {} // hyper may answer 408 before closing
                        Err(_) => {
                            if kind == 2 && sent < head.len() - 4 {
                                if s.write_all(&head.as_bytes()[sent..sent + 1]).await.is_err() {
                                    return (kind, started.elapsed());
                                }
                                sent += 1;
                            }
                        }
                    }
                    assert!(
                        started.elapsed() < Duration::from_secs(30),
                        "a slowloris connection of kind {kind} was never closed"
                    );
                }
            }));
        }
    }
    // While they hang, real clients connect: the slowloris sockets hold no slot.
    let tok = node::token("alice", &[], &[]);
    let mut real = Vec::new();
    for _ in 0..3 {
        real.push(Client::hello(&node.ws_url(), &tok, json!({})).await.0);
    }
    let mut fourth = Client::connect(&node.ws_url()).await;
    assert_eq!(
        fourth.expect_close(Duration::from_secs(5)).await,
        Closed::Code(4429),
        "the limit still holds"
    );
    let mut slowest = [Duration::ZERO; 3];
    for t in tasks {
        let (kind, at) = t.await.unwrap();
        slowest[kind] = slowest[kind].max(at);
    }
    eprintln!(
        "measured: slowloris ({EACH} each, header timeout {TIMEOUT_MS} ms): silent closed by {:?}, \
         partial head by {:?}, trickling by {:?}",
        slowest[0], slowest[1], slowest[2]
    );
    for (kind, at) in slowest.iter().enumerate() {
        assert!(
            *at >= Duration::from_millis(TIMEOUT_MS) - Duration::from_millis(100),
            "kind {kind} closed before the timeout: {at:?}"
        );
    }
    // Real sessions are untouched by all this, and the descriptors are given back.
    drop(real);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fds = node.open_fds().unwrap();
        if fds <= fds_before {
            eprintln!("measured: node fds {fds_before} before, {fds} after the slowloris wave");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node still holds {fds} fds (was {fds_before})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_c, welcome) = Client::hello(&node.ws_url(), &tok, json!({})).await;
    assert_eq!(welcome["type"], "welcome");
}

/// Sockets in their HTTP phase are counted: `HERALD_MAX_HTTP_CONNECTIONS` silent
/// sockets fill it, and then a newcomer closes the oldest of them (once it is a second
/// old) instead of being locked out, so the node's descriptors stay bounded and real
/// clients still get in. Upgraded WebSockets are not in that count (more sessions than
/// the bound get in) and keep working. (Refusing a newcomer when every connection is
/// younger than a second is `listener::tests`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_phase_connections_are_bounded() {
    const MAX: usize = 20;
    let node = NodeProcess::start(
        "http-budget",
        &[
            ("HERALD_MAX_HTTP_CONNECTIONS", &MAX.to_string()),
            ("HERALD_HEADER_READ_TIMEOUT_MS", "30000"),
        ],
    );
    node.wait_ready(Duration::from_secs(10)).await;
    let tok = node::token("alice", &["room:*"], &["room:*"]);
    let mut sessions = Vec::new();
    for _ in 0..MAX + 5 {
        sessions.push(Client::hello(&node.ws_url(), &tok, json!({})).await.0);
    }
    let fds_before = node.open_fds().expect("/proc");
    let mut silent = Vec::new();
    for _ in 0..MAX {
        silent.push(TcpStream::connect(node.addr).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.open_fds().unwrap() < fds_before + MAX {
        assert!(
            Instant::now() < deadline,
            "the node did not accept the silent sockets"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    // Full of old silent sockets: real clients get in, each closing the oldest one.
    // The clients are kept, so their keep-alive connections stay in the phase.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let client = reqwest::Client::new();
        let answer = client
            .get(format!("{}/healthz", node.http()))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .expect("served while the silent sockets hold the phase");
        assert_eq!(answer.status().as_u16(), 200);
        clients.push(client);
    }
    let (_late, welcome) = Client::hello(&node.ws_url(), &tok, json!({})).await;
    assert_eq!(welcome["type"], "welcome");
    // An evicted connection may still send its head and be answered busy, for 2 s
    // (`listener::busy`); silent ones are closed then. Wait for them all at once.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let mut closed = 0;
    for s in &mut silent {
        let mut buf = [0u8; 16];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert!(
        (4..=MAX).contains(&closed),
        "{closed} silent sockets closed for the newcomers"
    );
    assert!(
        node.open_fds().unwrap() <= fds_before + MAX + 4,
        "descriptors stay bounded"
    );
    // Sessions are not in the count and still work.
    let reply = sessions[0]
        .request(json!({"type": "subscribe", "id": 1, "channel": "room:1"}))
        .await;
    assert!(reply.get("result").is_some(), "{reply}");
    drop(silent);
    let text = reqwest::get(format!("{}/metrics", node.http()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let evicted = herald_testkit::metric_value(&text, "herald_http_connections_evicted_total");
    assert!(evicted >= 4.0, "{evicted} evictions counted");
    assert_no_server_panic();
}

/// A slowloris on the body: a publish whose head arrives at once and whose body never
/// completes is answered 408 once `HERALD_HEADER_READ_TIMEOUT_MS` has passed, and its
/// connection ends; a normal publish meanwhile goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_completes_is_cut() {
    const TIMEOUT_MS: u64 = 1_000;
    let node = NodeProcess::start(
        "slow-body",
        &[("HERALD_HEADER_READ_TIMEOUT_MS", &TIMEOUT_MS.to_string())],
    );
    node.wait_ready(Duration::from_secs(10)).await;
    let fds_before = node.open_fds().expect("/proc");
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(node.addr).await.unwrap();
        let head = format!(
            "POST /v1/publish HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"user\":",
            node.addr,
            node::API_KEY
        );
        s.write_all(head.as_bytes()).await.unwrap();
        slow.push(tokio::spawn(async move {
            // Trickle a byte every 200 ms and read what the node says.
            let mut answer = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => return (answer, started.elapsed()),
                    Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
                    Err(_) => {
                        let _ = s.write_all(b" ").await;
                    }
                }
                assert!(started.elapsed() < Duration::from_secs(20), "never cut");
            }
        }));
    }
    // Meanwhile a real publish works.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/publish", node.http()))
        .bearer_auth(node::API_KEY)
        .json(&json!({"user": "bob", "data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (mut first, mut last) = (Duration::MAX, Duration::ZERO);
    for task in slow {
        let (answer, after) = task.await.unwrap();
        (first, last) = (first.min(after), last.max(after));
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "answer: {answer}");
        assert!(
            answer.contains("request body not received"),
            "answer: {answer}"
        );
        assert!(
            after >= Duration::from_millis(TIMEOUT_MS) && after < Duration::from_secs(5),
            "cut after {after:?}"
        );
    }
    eprintln!("measured: slow bodies: 20 answered 408 and cut after {first:?}..{last:?} (timeout {TIMEOUT_MS} ms)");
    // The node holds nothing for them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.open_fds().expect("/proc") > fds_before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node.open_fds().expect("/proc") <= fds_before);
}
