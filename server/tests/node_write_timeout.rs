//! Every write is bounded in time (`HERALD_WRITE_TIMEOUT_MS`): a client
//! that stops reading is closed with 4509 within the write timeout, whatever the node is
//! writing to it — a recovery after `subscribe` with `since` or after a `hello` resume,
//! or a command reply — and what the stuck session held (the recovered history copies)
//! is freed (reused by the next stuck sessions, not kept).
//!
//! The slow clients connect with a 4 KiB receive buffer (SO_RCVBUF set before connect)
//! and never read, so the node's writes stall after the kernel buffers fill
//! (`HERALD_TCP_SEND_BUFFER`, 64 KiB, doubled by Linux).

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
#[path = "support/redis_server.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use bystander::{assert_undisturbed, node_and_watcher};
use futures_util::SinkExt;
use herald_server::Config;
use panics::assert_no_server_panic;
use process::NodeProcess;
use redis_server::RedisServer;
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Messages in the backlog, and the size of each one's data.
const BACKLOG: usize = 100;
const PAD: usize = 60 * 1024;
/// Slow clients: half recover with `subscribe` + `since`, half with a `hello` resume.
const SLOW: usize = 8;

/// A WebSocket client with a tiny receive buffer.
async fn tiny_client(addr: std::net::SocketAddr, url: &str) -> WebSocketStream<TcpStream> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    ws
}

async fn send(ws: &mut WebSocketStream<TcpStream>, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

async fn wait_until<F, Fut>(what: &str, wait: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + wait;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One round of [`SLOW`] clients that never read, each asking for the whole backlog
/// (half with `subscribe` + `since`, half with a `hello` resume), so that each stuck
/// session holds its own copy of the history. Waits until every one is closed 4509
/// and the connection gauge is back to `connections`. Returns the highest RSS seen
/// and how long the closes took.
async fn stuck_round(node: &NodeProcess, epoch: &str, connections: f64) -> (u64, Duration) {
    let http = node.http();
    let closed_before =
        herald_testkit::metric(&http, "herald_slow_consumer_disconnects_total").await;
    let started = Instant::now();
    let mut slow = Vec::new();
    for i in 0..SLOW {
        let mut ws = tiny_client(node.addr, &node.ws_url()).await;
        let token = node::token(&format!("slow{i}"), &["room:*"], &[]);
        let since = json!({"offset": 0, "epoch": epoch});
        if i % 2 == 0 {
            send(&mut ws, json!({"type": "hello", "token": token})).await;
            let sub = json!({"type": "subscribe", "id": 1, "channel": "room:big", "since": since});
            send(&mut ws, sub).await;
        } else {
            let hello = json!({"type": "hello", "token": token, "resume": {"room:big": since}});
            send(&mut ws, hello).await;
        }
        slow.push(ws); // never read again
    }
    let mut peak = 0;
    wait_until(
        "every slow client closed 4509",
        Duration::from_secs(30),
        || {
            peak = peak.max(node.rss_kib().unwrap_or(0));
            let http = http.clone();
            async move {
                herald_testkit::metric(&http, "herald_slow_consumer_disconnects_total").await
                    >= closed_before + SLOW as f64
            }
        },
    )
    .await;
    let took = started.elapsed();
    wait_until(
        "the connection gauge returns",
        Duration::from_secs(10),
        || async { herald_testkit::metric(&http, "herald_connections").await == connections },
    )
    .await;
    drop(slow);
    (peak, took)
}

/// Eight clients that never read ask for a 6 MB backlog each from a node on Redis. Each
/// is closed 4509 within the write timeout, the connection gauge returns to its value
/// before, and what the stuck sessions held is freed: three such rounds in a row take
/// no more memory than one.
///
/// Freed is checked as *reused*, not as returned to the OS: mimalloc hands a freed span
/// back only when the thread that owns it runs again (docs/benchmarks.md, r4), so an
/// idle node may keep it mapped, ready for the next round. Leaked copies would add a
/// round's worth (~49 MB) per round. The node runs one worker thread so that the next
/// round allocates on the thread that freed the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_a_recovery_are_closed_4509_and_freed() {
    const ROUNDS: usize = 3;
    const COPIES_KIB: u64 = (SLOW * BACKLOG * PAD / 1024) as u64;
    let redis = RedisServer::start();
    let prefix = format!("wt{}:", std::process::id());
    let node = NodeProcess::start(
        "write-timeout",
        &[
            ("HERALD_REDIS_URL", &redis.url()),
            ("HERALD_REDIS_PREFIX", &prefix),
            ("HERALD_HISTORY_SIZE", "200"),
            ("HERALD_MAX_RECOVERY_BYTES", "16777216"),
            ("HERALD_WRITE_TIMEOUT_MS", "3000"),
            ("HERALD_WORKER_THREADS", "1"),
        ],
    );
    node.wait_ready(Duration::from_secs(15)).await;
    let http = node.http();
    let client = reqwest::Client::new();
    let pad = "p".repeat(PAD);
    let mut epoch = String::new();
    for i in 0..BACKLOG {
        let r = client
            .post(format!("{http}/v1/publish"))
            .bearer_auth(node::API_KEY)
            .json(&json!({"channel": "room:big", "data": {"i": i, "pad": pad}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        epoch = r.json::<Value>().await.unwrap()["epoch"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    // Warm-up: clients that read recover the backlog once, so the buffers that grow to
    // the largest answer (the Redis connection's, the allocator's caches) are in the
    // baseline.
    for i in 0..2 {
        let token = node::token(&format!("warm{i}"), &["room:*"], &[]);
        let resume = json!({"room:big": {"offset": 0, "epoch": epoch}});
        let (mut c, _) = client::Client::hello(&node.ws_url(), &token, resume).await;
        for _ in 0..BACKLOG {
            assert_eq!(c.next_message().await["type"], "message");
        }
        c.close().await;
    }
    let connections = herald_testkit::metric(&http, "herald_connections").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = node.rss_kib().unwrap();

    let mut peaks = Vec::new();
    for round in 0..ROUNDS {
        let (peak, took) = stuck_round(&node, &epoch, connections).await;
        // 3 s of write timeout, then the close (1 s at most); the rest is slack for a
        // busy machine. Without the bound the sessions would wait forever.
        assert!(
            took < Duration::from_secs(20),
            "round {round} took {took:?}"
        );
        peaks.push(peak);
    }
    // The copies were there (8 × 6 MB; at least half of them at once: the samples run
    // between other work, and on a loaded machine the first sessions may already be
    // closed when the last ones fill)…
    let held = peaks[0].saturating_sub(rss_before);
    assert!(
        held > COPIES_KIB / 2,
        "the stuck sessions held less than expected: {rss_before} KiB → {peaks:?} KiB"
    );
    // …and were freed: no later round takes a round's worth more than the first one.
    // Leaked copies would raise the last peak by at least (ROUNDS - 1) × COPIES_KIB;
    // reused ones move a peak by at most the half that the first sample may have
    // missed, plus fragmentation (up to 15 MB seen here).
    let highest_later = peaks[1..].iter().copied().max().unwrap_or(0);
    let growth = highest_later.saturating_sub(peaks[0]);
    assert!(
        growth < COPIES_KIB,
        "memory grew round after round: before {rss_before} KiB, peaks {peaks:?} KiB"
    );
    eprintln!(
        "measured: RSS before {rss_before} KiB, peaks per round {peaks:?} KiB, after {:?} KiB",
        node.rss_kib()
    );
}

/// A client that sends commands but never reads their replies is closed 4509 once the
/// replies fill its socket: the reply write is bounded too, and the node is undisturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_replies_is_closed_4509() {
    let config = Config {
        write_timeout_ms: 1_000,
        max_messages_per_sec: 1_000_000,
        ..node::test_config()
    };
    let (n, mut w) = node_and_watcher(config).await;
    let connections_before = n.metric("herald_connections").await;
    let mut ws = tiny_client(n.addr, &n.ws_url()).await;
    send(
        &mut ws,
        json!({"type": "hello", "token": n.token("mute", &[], &[])}),
    )
    .await;
    // Forbidden subscribes: each reply names the 250-byte channel, so a few thousand
    // replies fill any socket buffer. The sends stall once the node stops reading.
    let channel = format!("x:{}", "c".repeat(248));
    let sender = tokio::spawn(async move {
        for id in 0..20_000u64 {
            let cmd = json!({"type": "subscribe", "id": id, "channel": channel});
            let sent = tokio::time::timeout(
                Duration::from_secs(2),
                ws.send(Message::Text(cmd.to_string().into())),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                break;
            }
        }
        ws
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while n.metric("herald_slow_consumer_disconnects_total").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the mute client was never closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while n.metric("herald_connections").await != connections_before {
        assert!(
            Instant::now() < deadline,
            "the connection gauge never returned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let disconnects = n.metric("herald_disconnects_total{code=\"4509\"}").await;
    assert_eq!(disconnects, 1.0);
    drop(sender.await.unwrap());
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}
