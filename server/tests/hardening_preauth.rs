//! Work a client gets out of a node before it is authenticated, or below the commands
//! it is counted by, is bounded:
//! - the request head (`HERALD_MAX_REQUEST_HEAD_BYTES`): over it a 431 with the JSON
//!   error body, and a connection that never finishes its head holds at most that much
//!   memory, so the HTTP-phase budget (4,096) of them stays within a known bound;
//! - every WebSocket frame, of every kind and in every state, counts against the frame
//!   rate (`HERALD_MAX_FRAMES_PER_SEC`): empty continuation frames of a message that
//!   never ends, and pings, close the connection 4429 long before the hello timeout;
//! - a fragmented message is bounded in frames (64: close 1009) and in time (5 s:
//!   close 4408), besides its size (`HERALD_MAX_FRAME_BYTES`: 1009).
//!
//! In every case other sessions keep working and nothing panics.

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
use futures_util::{SinkExt, StreamExt};
use node::test_config;
use panics::assert_no_server_panic;
use process::NodeProcess;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The default `HERALD_MAX_REQUEST_HEAD_BYTES`.
const HEAD_LIMIT: usize = 32_768;

/// Reads an HTTP response until the peer closes (or 5 s pass): status and body.
async fn response(s: &mut TcpStream) -> (u16, Vec<(String, String)>, String) {
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole response head");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// A request head over the limit, on the upgrade path and on the API, gets a 431 with
/// the error body every other HTTP error has; one just under it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_the_limit_gets_a_json_431() {
    let (n, mut watcher) = node_and_watcher(test_config()).await;
    for (path, pad) in [
        ("/ws", 300 * 1024),
        ("/healthz", HEAD_LIMIT),
        ("/healthz", 40_000),
    ] {
        let mut s = TcpStream::connect(n.addr).await.unwrap();
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(pad)
        );
        // The node answers as soon as it has seen too much: the rest may be refused.
        let _ = s.write_all(head.as_bytes()).await;
        let (status, headers, body) = response(&mut s).await;
        assert_eq!(status, 431, "{path} with {pad} bytes of header");
        assert!(
            headers.contains(&("content-type".into(), "application/json".into())),
            "{headers:?}"
        );
        let body: Value = serde_json::from_str(&body).expect("a JSON body");
        assert_eq!(body["error"]["code"], "too_large", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("HERALD_MAX_REQUEST_HEAD_BYTES"),
            "{body}"
        );
    }
    // Just under the limit: served.
    let mut s = TcpStream::connect(n.addr).await.unwrap();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(HEAD_LIMIT - 200)
    );
    s.write_all(head.as_bytes()).await.unwrap();
    assert_eq!(response(&mut s).await.0, 200);
    assert_undisturbed(&n, &mut watcher).await;
    assert_no_server_panic();
}

/// 4,096 connections (the whole HTTP-phase budget) each send a request head they never
/// finish: just under the limit (the most a connection can hold), and far over it (300
/// KiB, which used to hold about half a MiB each). The node's resident memory grows by
/// at most 40 KiB per connection (160 MiB), and a real client still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_request_heads_hold_a_bounded_amount_of_memory() {
    const CONNECTIONS: usize = 4_096;
    const BOUND_PER_CONNECTION: u64 = 40 * 1024;
    let node = NodeProcess::start("long-heads", &[("HERALD_HEADER_READ_TIMEOUT_MS", "60000")]);
    node.wait_ready(Duration::from_secs(10)).await;
    let baseline = node.rss_kib().unwrap() * 1024;
    let mut held = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let pad = if i % 2 == 0 {
            HEAD_LIMIT - 100
        } else {
            300 * 1024
        };
        let mut s = TcpStream::connect(node.addr).await.unwrap();
        let head = format!("GET /ws HTTP/1.1\r\nHost: x\r\nX-Pad: {}", "a".repeat(pad));
        held.push(tokio::spawn(async move {
            // Over the limit the node answers 431 and closes, so the write may fail.
            let _ = s.write_all(head.as_bytes()).await;
            s
        }));
    }
    let mut sockets = Vec::with_capacity(CONNECTIONS);
    for h in held {
        sockets.push(
            tokio::time::timeout(Duration::from_secs(60), h)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    // Let the node read what was sent.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = (node.rss_kib().unwrap() * 1024).saturating_sub(baseline);
    eprintln!(
        "measured: {CONNECTIONS} unfinished heads (half of {} bytes, half of 300 KiB): node RSS \
         grew {} KiB, {} bytes per connection",
        HEAD_LIMIT - 100,
        grown / 1024,
        grown / CONNECTIONS as u64
    );
    assert!(
        grown <= BOUND_PER_CONNECTION * CONNECTIONS as u64,
        "node RSS grew {} KiB for {CONNECTIONS} unfinished heads",
        grown / 1024
    );
    // The node still serves.
    let tok = node::token("alice", &[], &[]);
    drop(sockets);
    let (_c, welcome) = client::Client::hello(&node.ws_url(), &tok, json!({})).await;
    assert_eq!(welcome["type"], "welcome");
}

/// A WebSocket to `url`, upgraded but without `hello`.
async fn upgraded(url: &str) -> Ws {
    tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade")
        .0
}

fn fragment(first: bool, fin: bool, payload: &[u8]) -> Message {
    let opcode = if first {
        OpCode::Data(Data::Text)
    } else {
        OpCode::Data(Data::Continue)
    };
    Message::Frame(Frame::message(payload.to_vec(), opcode, fin))
}

/// Sends `frames` on one task while another waits for the close; the close code and
/// when it came.
async fn flood_until_closed(
    ws: Ws,
    frames: impl Iterator<Item = Message> + Send + 'static,
) -> (Option<u16>, Duration) {
    let started = Instant::now();
    let (mut sink, mut stream) = ws.split();
    let sender = tokio::spawn(async move {
        let mut sent = 0u64;
        for f in frames {
            if sink.feed(f).await.is_err() {
                break;
            }
            sent += 1;
            if sent & 255 == 0 && sink.flush().await.is_err() {
                break;
            }
        }
        let _ = sink.flush().await;
        sent
    });
    let code = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(m) = stream.next().await {
            if let Ok(Message::Close(frame)) = m {
                return frame.map(|f| u16::from(f.code));
            }
            if let Err(e) = m {
                eprintln!("the flood ended with {e}");
                return None;
            }
        }
        None
    })
    .await
    .expect("closed within 20 s");
    let at = started.elapsed();
    sender.abort();
    (code, at)
}

/// Before `hello`, a message that never ends: one first fragment, then empty
/// continuation frames as fast as the client can send them. Each is a frame, so the
/// frame rate closes the connection 4429 within a second, long before the hello
/// timeout (10 s), instead of letting it take a core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_continuation_frames_before_hello_are_closed_4429() {
    let (n, mut watcher) = node_and_watcher(test_config()).await;
    let ws = upgraded(&n.ws_url()).await;
    let frames = std::iter::once(fragment(true, false, b"{"))
        .chain(std::iter::repeat_with(|| fragment(false, false, b"")).take(10_000_000));
    let (code, at) = flood_until_closed(ws, frames).await;
    eprintln!("measured: empty continuation flood closed with {code:?} after {at:?}");
    // A fragmented message's own bound (64 frames) comes first when the frames are
    // continuations; either way the node closes at once.
    assert!(matches!(code, Some(4429) | Some(1009)), "{code:?}");
    assert!(at < Duration::from_secs(3), "closed after {at:?}");
    // Pings, which are not part of any message, meet the frame rate itself.
    let ws = upgraded(&n.ws_url()).await;
    let pings = std::iter::repeat_with(|| Message::Ping(Vec::new().into())).take(10_000_000);
    let (code, at) = flood_until_closed(ws, pings).await;
    eprintln!("measured: ping flood before hello closed with {code:?} after {at:?}");
    assert_eq!(code, Some(4429));
    assert!(at < Duration::from_secs(3), "closed after {at:?}");
    assert_undisturbed(&n, &mut watcher).await;
    assert_no_server_panic();
}

/// After `hello` too: an authenticated session that sends pongs as fast as it can is
/// closed 4429 by the frame rate (the command rate never sees pongs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_frames_after_hello_count_against_the_frame_rate() {
    let (n, mut watcher) = node_and_watcher(test_config()).await;
    let mut ws = upgraded(&n.ws_url()).await;
    let hello = json!({"type": "hello", "token": n.token("mallory", &[], &[])});
    ws.send(Message::Text(hello.to_string().into()))
        .await
        .unwrap();
    let welcome = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap();
    assert!(matches!(welcome, Some(Ok(Message::Text(_)))), "{welcome:?}");
    let pongs = std::iter::repeat_with(|| Message::Pong(Vec::new().into())).take(10_000_000);
    let (code, at) = flood_until_closed(ws, pongs).await;
    eprintln!("measured: pong flood after hello closed with {code:?} after {at:?}");
    assert_eq!(code, Some(4429));
    assert_undisturbed(&n, &mut watcher).await;
    assert_no_server_panic();
}

/// A fragmented message with more than 64 frames is closed 1009 even when the frames
/// come slower than the frame rate and are far under the size limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragmented_message_of_too_many_frames_is_closed_1009() {
    let (n, mut watcher) = node_and_watcher(test_config()).await;
    let ws = upgraded(&n.ws_url()).await;
    let frames = std::iter::once(fragment(true, false, b"{"))
        .chain(std::iter::repeat_with(|| fragment(false, false, b" ")).take(100));
    let (code, _) = flood_until_closed(ws, frames).await;
    assert_eq!(code, Some(1009));
    assert_undisturbed(&n, &mut watcher).await;
    assert_no_server_panic();
}

/// A fragmented message still unfinished 5 s after its first frame is closed 4408,
/// when its next frame (here a continuation every 700 ms, well within the rate and the
/// frame count) arrives, although the hello timeout is far away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragmented_message_that_never_ends_is_closed_4408() {
    let mut config = test_config();
    config.hello_timeout_ms = 60_000;
    let (n, mut watcher) = node_and_watcher(config).await;
    let ws = upgraded(&n.ws_url()).await;
    let (mut sink, mut stream) = ws.split();
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        sink.send(fragment(true, false, b"{")).await.unwrap();
        loop {
            tokio::time::sleep(Duration::from_millis(700)).await;
            if sink.send(fragment(false, false, b" ")).await.is_err() {
                return;
            }
        }
    });
    let code = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(Ok(m)) = stream.next().await {
            if let Message::Close(frame) = m {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await
    .expect("closed within 15 s");
    let at = started.elapsed();
    sender.abort();
    eprintln!("measured: an unfinished fragmented message closed with {code:?} after {at:?}");
    assert_eq!(code, Some(4408));
    assert!(
        at >= Duration::from_secs(5) && at < Duration::from_secs(8),
        "{at:?}"
    );
    assert_undisturbed(&n, &mut watcher).await;
    assert_no_server_panic();
}
