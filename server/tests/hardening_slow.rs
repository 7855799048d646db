//! Slow consumers: hundreds of clients stop reading while messages flow.
//! The node (a real `herald` process, default limits) must keep its memory bounded, close
//! each of them with 4509 once its queue (`HERALD_SESSION_QUEUE`, 1024) is full, and keep
//! delivering every message, in order, to the clients that read.
//!
//! The bound: a slow session holds at most its queue (1024 entries of a pointer each,
//! ~32 KiB) plus its WebSocket buffers (4 KiB read, 8 KiB write, one frame in flight);
//! the frames in the queues are shared by all sessions of a channel, so all slow
//! sessions together keep at most the channel's last 1024 frames alive. For 200 slow
//! clients and 1 KiB messages that is ~10 MiB plus ~1 MiB; the test measures the node's
//! resident memory (VmRSS) and fails above 64 MiB of growth. In the kernel, each slow
//! socket holds at most its send buffer (`HERALD_TCP_SEND_BUFFER`, 64 KiB, doubled by
//! Linux): without that bound Linux autotunes it up to 4 MiB per socket (2.8 MiB was
//! seen here), and a slow client absorbed ~2 700 messages before its queue even began
//! to fill.

#[path = "support/node.rs"]
mod node;
#[path = "support/process.rs"]
mod process;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use process::NodeProcess;
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

const SLOW: usize = 200;
const FAST: usize = 10;
const MESSAGES: u64 = 3_000;
const PAD: usize = 1_024;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A client subscribed to `room:flood`. A slow one gets a 4 KiB receive buffer, so
/// that the kernel absorbs little and the node's own queue is what fills.
async fn subscriber(node: &NodeProcess, user: &str, slow: bool) -> Ws {
    let socket = TcpSocket::new_v4().unwrap();
    if slow {
        socket.set_recv_buffer_size(4096).unwrap();
    }
    let stream = socket.connect(node.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(node.ws_url(), stream)
        .await
        .unwrap();
    let token = node::token(user, &["room:*"], &[]);
    for frame in [
        json!({"type": "hello", "token": token}),
        json!({"type": "subscribe", "id": 1, "channel": "room:flood"}),
    ] {
        ws.send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }
    // welcome, then the subscribe reply
    let mut seen = 0;
    while seen < 2 {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => seen += 1,
            Ok(Some(Ok(_))) => {}
            other => panic!("{user}: no welcome/reply: {other:?}"),
        }
    }
    ws
}

/// 200 clients stop reading while 3 000 messages of 1 KiB flow to them and to 10
/// clients that read: the slow ones are closed with 4509, the node's memory growth stays
/// under the bound, and each reading client gets all 3 000 messages in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_slow_consumers_are_cut_and_memory_stays_bounded() {
    let node = NodeProcess::start("slow", &[]);
    node.wait_ready(Duration::from_secs(10)).await;
    let mut slow = Vec::new();
    for i in 0..SLOW {
        slow.push(subscriber(&node, &format!("slow{i}"), true).await);
    }
    let mut readers = Vec::new();
    for i in 0..FAST {
        let mut ws = subscriber(&node, &format!("fast{i}"), false).await;
        readers.push(tokio::spawn(async move {
            let mut offsets = Vec::with_capacity(MESSAGES as usize);
            let mut latencies = Vec::with_capacity(MESSAGES as usize);
            while (offsets.len() as u64) < MESSAGES {
                let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
                    .await
                    .expect("a reading client waits no longer than 30 s");
                let Some(Ok(Message::Text(t))) = m else {
                    if matches!(m, Some(Ok(Message::Ping(_) | Message::Pong(_)))) {
                        continue;
                    }
                    panic!("a reading client was closed: {m:?}");
                };
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "message" {
                    offsets.push(v["offset"].as_u64().unwrap());
                    latencies.push(now_ms().saturating_sub(v["data"]["t"].as_u64().unwrap()));
                }
            }
            (offsets, latencies)
        }));
    }
    // Let the node settle after the connection storm, then take the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = node.rss_kib().unwrap();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(baseline));
    let sampling = {
        let peak = Arc::clone(&peak);
        let pid = node.pid().unwrap();
        tokio::spawn(async move {
            loop {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status"));
                let Ok(status) = status else { return };
                if let Some(kib) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    peak.fetch_max(kib, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let started = Instant::now();
    let pad = "p".repeat(PAD);
    let mut publishers = Vec::new();
    for p in 0..4u64 {
        let http = node.http();
        let pad = pad.clone();
        publishers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for _ in 0..MESSAGES / 4 {
                let r = client
                    .post(format!("{http}/v1/publish"))
                    .bearer_auth(node::API_KEY)
                    .json(&json!({"channel": "room:flood", "data": {"t": now_ms(), "p": p, "pad": pad}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    let published_in = started.elapsed();
    let mut latencies = Vec::new();
    for r in readers {
        let (offsets, l) = tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("reading clients finish")
            .unwrap();
        assert_eq!(offsets, (1..=MESSAGES).collect::<Vec<_>>());
        latencies.extend(l);
    }
    // Every slow client was cut.
    let deadline = Instant::now() + Duration::from_secs(30);
    while herald_testkit::metric(&node.http(), "herald_slow_consumer_disconnects_total").await
        < SLOW as f64
    {
        assert!(
            Instant::now() < deadline,
            "only {} slow clients were closed",
            herald_testkit::metric(&node.http(), "herald_slow_consumer_disconnects_total").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    sampling.abort();
    // What the slow clients see when they read again: what was buffered, in order,
    // then the close (4509 if the close frame got through within the node's 1 s close
    // timeout; otherwise the connection just ends: the node never waits on a socket).
    let mut with_frame = 0;
    let mut buffered = Vec::new();
    for mut ws in slow {
        let mut last = 0;
        let mut count = 0u64;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "message" {
                        let o = v["offset"].as_u64().unwrap();
                        assert_eq!(o, last + 1, "a slow client saw a gap");
                        last = o;
                        count += 1;
                    }
                }
                Ok(Some(Ok(Message::Close(Some(f))))) => {
                    assert_eq!(u16::from(f.code), 4509);
                    with_frame += 1;
                    break;
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) => break,
                Err(_) => panic!("a slow client's connection was never closed"),
            }
        }
        assert!(count < MESSAGES, "a slow client got everything");
        buffered.push(count);
    }
    let after = node.rss_kib().unwrap();
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    buffered.sort_unstable();
    eprintln!(
        "measured: slow consumers: {SLOW} slow + {FAST} reading clients, {MESSAGES} messages of \
         {PAD} B published in {published_in:?}; node RSS {} MiB before, peak {} MiB (+{} MiB), \
         {} MiB after; {SLOW} closed with 4509 ({with_frame} saw the close frame); slow clients \
         had received {}..{} messages; reading clients' latency p50 {} ms, p99 {} ms, max {} ms",
        baseline / 1024,
        peak / 1024,
        (peak - baseline) / 1024,
        after / 1024,
        buffered[0],
        buffered[buffered.len() - 1],
        pct(0.5),
        pct(0.99),
        latencies[latencies.len() - 1],
    );
    assert!(
        peak - baseline < 64 * 1024,
        "memory grew by {} MiB with slow consumers",
        (peak - baseline) / 1024
    );
    assert_eq!(
        herald_testkit::metric(&node.http(), "herald_slow_consumer_disconnects_total").await,
        SLOW as f64
    );
    // The reading clients are gone too (their tasks ended): every slot is given back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while herald_testkit::metric(&node.http(), "herald_connections").await != 0.0 {
        assert!(Instant::now() < deadline, "connections were not released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
