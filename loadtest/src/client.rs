//! The lean WebSocket client every scenario drives: connect (optionally from a chosen
//! source address), `hello`, then one read loop that answers pings and hands each frame
//! to a [`Handler`]; with reconnect on, it comes back with jitter and resumes.
//!
//! Why not the SDK (`herald-client`): the load generator holds up to 100k sockets on a
//! 2-core machine next to the nodes it measures, so each connection must cost as little
//! as possible — one task, no per-connection channels or timers, a 2 KiB read buffer,
//! no write buffering — and the accounting hooks ([`Handler`]) sit directly in the read
//! loop. The SDK optimises for applications instead (and was written in parallel).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use herald_protocol::frame::{ClientCommand, ServerFrame, Welcome};
use herald_protocol::StreamPosition;
use rand::Rng;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::latency::Latency;

/// A client socket.
pub type Ws = WebSocketStream<TcpStream>;

/// Read buffer per connection. Server frames are small (a message is ~150 bytes); a
/// larger frame still arrives, it just takes more reads.
const READ_BUFFER: usize = 2048;
/// Connect + handshake + `welcome` must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How many times a first connection is tried before it counts as failed.
const FIRST_ATTEMPTS: u32 = 3;
/// Longest wait between two reconnect attempts (before jitter).
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// WebSocket buffers set explicitly: tungstenite allocates 128 KiB per socket by default.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        // Client frames (hello, pong) are written and flushed one by one.
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// A node (or balancer) WebSocket URL with its address resolved once.
#[derive(Debug, Clone)]
pub struct Target {
    /// `ws://host:port/ws`.
    pub url: String,
    /// Where to connect.
    pub addr: SocketAddr,
}

impl Target {
    /// Resolves `url` (`ws://host:port/path`).
    pub async fn resolve(url: &str) -> anyhow::Result<Target> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| anyhow!("{url}: only ws:// URLs are supported"))?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let addr = tokio::net::lookup_host(authority)
            .await
            .with_context(|| format!("resolve {authority}"))?
            .next()
            .ok_or_else(|| anyhow!("{authority} resolves to nothing"))?;
        Ok(Target {
            url: url.to_owned(),
            addr,
        })
    }
}

/// Opens a WebSocket to `target`, from `source` when given (one of several loopback
/// addresses: each source address has its own ~28k ephemeral ports).
pub async fn connect(target: &Target, source: Option<IpAddr>) -> anyhow::Result<Ws> {
    let socket = if target.addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("bind source {ip}"))?;
    }
    socket.set_nodelay(true)?;
    let stream = socket.connect(target.addr).await?;
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(target.url.as_str(), stream, Some(ws_config()))
            .await?;
    Ok(ws)
}

/// Sends `hello` and waits for `welcome` (answering pings meanwhile).
pub async fn hello(
    ws: &mut Ws,
    token: String,
    resume: BTreeMap<String, StreamPosition>,
) -> anyhow::Result<Welcome> {
    let frame = ClientCommand::Hello { token, resume }.to_json();
    ws.send(Message::text(frame)).await?;
    let mut busy_after = None;
    while let Some(msg) = ws.next().await {
        match msg? {
            Message::Text(text) => match ServerFrame::parse(text.as_str()) {
                Ok(ServerFrame::Welcome(w)) => return Ok(w),
                Ok(ServerFrame::Ping) => ws.send(Message::text(pong())).await?,
                Ok(ServerFrame::Reconnect(r)) if r.reason == "busy" => {
                    busy_after = Some(r.after_ms)
                }
                Ok(_) => {}
                Err(e) => bail!("bad frame before welcome: {e}"),
            },
            Message::Close(frame) => {
                let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                match busy_after {
                    Some(after_ms) if code == 4429 => return Err(Busy { after_ms }.into()),
                    _ => bail!("closed before welcome: {code}"),
                }
            }
            _ => {}
        }
    }
    bail!("connection ended before welcome")
}

/// A node's `busy` answer: come back after `after_ms`.
#[derive(Debug)]
pub struct Busy {
    /// What the node said.
    pub after_ms: u64,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "busy: come back in {} ms", self.after_ms)
    }
}

impl std::error::Error for Busy {}

fn pong() -> String {
    ClientCommand::Pong.to_json()
}

/// The fields of a server frame the read loop needs, borrowed from the frame's text
/// (one parse per frame, no allocation for a `message`).
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default)]
    channel: Option<&'a str>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    epoch: Option<&'a str>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    after_ms: Option<u64>,
}

/// What a scenario does with one connection's events. Implementations keep their state
/// per connection index in shared tables, so the connection task itself owns nothing
/// but its socket.
pub trait Handler: Send + Sync + 'static {
    /// The token of connection `idx`.
    fn token(&self, idx: usize) -> String;
    /// Channels to resume at `hello` (the positions seen so far).
    fn resume(&self, idx: usize) -> BTreeMap<String, StreamPosition>;
    /// A `welcome` arrived; `outage` is how long the connection was down (reconnects).
    fn welcome(&self, idx: usize, welcome: &Welcome, outage: Option<Duration>);
    /// A `message` arrived.
    fn message(&self, idx: usize, channel: &str, offset: u64, epoch: &str, data: &RawValue);
    /// A `resync` arrived: the server admits a gap on `channel`.
    fn resync(&self, idx: usize, channel: &str, offset: u64, epoch: &str);
}

/// Connection counters shared by every connection of a run.
#[derive(Default)]
pub struct Counters {
    /// Connections that got their first `welcome`.
    pub ready: AtomicU64,
    /// Connections open right now.
    pub open: AtomicU64,
    /// Connections whose first connect failed (after retries).
    pub failed: AtomicU64,
    /// Connections that ended without reconnecting.
    pub dropped: AtomicU64,
    /// `busy` answers (`reconnect` with reason `busy`, then 4429) waited out.
    pub busy: AtomicU64,
    /// Connect attempts that failed otherwise (a reset, a refused or unanswered
    /// upgrade, a close before `welcome`), retried or not.
    pub connect_errors: AtomicU64,
    /// Disconnects of connections that had a `welcome`.
    pub disconnects: AtomicU64,
    /// Successful reconnects (a `welcome` after a disconnect).
    pub reconnects: AtomicU64,
    /// Handshake time (TCP + WebSocket + hello → welcome) of first connects, µs.
    pub handshake: Latency,
    /// Time from a disconnect to the next `welcome`, µs.
    pub outage: Latency,
    /// Reconnects per second since `start`, to find the peak.
    pub reconnects_per_s: Mutex<BTreeMap<u64, u64>>,
    /// Errors of failed first connects, by text (a few examples for the summary).
    pub errors: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    fn error(&self, e: &anyhow::Error) {
        let mut errors = self.errors.lock().expect("errors lock");
        let key: String = format!("{e:#}").chars().take(120).collect();
        if errors.len() < 20 || errors.contains_key(&key) {
            *errors.entry(key).or_default() += 1;
        }
    }

    /// The largest number of reconnects within one second.
    pub fn reconnect_peak(&self) -> u64 {
        let map = self.reconnects_per_s.lock().expect("reconnects lock");
        map.values().copied().max().unwrap_or(0)
    }
}

/// How a session behaves.
pub struct SessionOptions {
    /// Come back after a disconnect (and resume), instead of counting it as dropped.
    pub reconnect: bool,
    /// Zero point of the reconnects-per-second table.
    pub start: Instant,
    /// Acknowledge personal-channel messages (`ack`), coalesced: at most one frame per
    /// this interval per connection, with the latest offset (what the SDKs do). `None`:
    /// no acks.
    pub ack: Option<Duration>,
}

/// Runs connection `idx` until the task is aborted (or, without reconnect, until the
/// connection ends). Tries `targets` round-robin starting at `idx`.
pub async fn run_session<H: Handler + ?Sized>(
    handler: &H,
    counters: &Counters,
    targets: &[Target],
    source: Option<IpAddr>,
    idx: usize,
    options: &SessionOptions,
) {
    let mut attempt: u32 = 0;
    let mut ever_welcomed = false;
    let mut down_since: Option<Instant> = None;
    let mut wait = Duration::ZERO;
    loop {
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let target = &targets[(idx + attempt as usize) % targets.len()];
        let started = Instant::now();
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let mut ws = connect(target, source).await?;
            let welcome = hello(&mut ws, handler.token(idx), handler.resume(idx)).await?;
            Ok::<_, anyhow::Error>((ws, welcome))
        })
        .await
        .unwrap_or_else(|_| Err(anyhow!("connect timed out")));
        let (ws, welcome) = match connected {
            Ok(ok) => ok,
            // Told when to come back: that time plus a jitter of up to a second, as the
            // SDKs do. Not a failed attempt: the node answered.
            Err(e) if e.downcast_ref::<Busy>().is_some() => {
                let after = e.downcast_ref::<Busy>().map_or(0, |b| b.after_ms);
                counters.busy.fetch_add(1, Ordering::Relaxed);
                down_since.get_or_insert(started);
                wait =
                    Duration::from_millis(after + rand::rng().random_range(0..=after.min(1_000)));
                continue;
            }
            Err(e) => {
                counters.connect_errors.fetch_add(1, Ordering::Relaxed);
                attempt += 1;
                if !ever_welcomed && (attempt >= FIRST_ATTEMPTS || !options.reconnect) {
                    counters.error(&e);
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                down_since.get_or_insert(started);
                wait = backoff(attempt);
                continue;
            }
        };
        counters.open.fetch_add(1, Ordering::Relaxed);
        let outage = down_since.take().map(|t| t.elapsed());
        if ever_welcomed {
            counters.reconnects.fetch_add(1, Ordering::Relaxed);
            if let Some(o) = outage {
                counters.outage.record(idx, o.as_micros() as u64);
            }
            let second = options.start.elapsed().as_secs();
            *counters
                .reconnects_per_s
                .lock()
                .expect("reconnects lock")
                .entry(second)
                .or_default() += 1;
        } else {
            ever_welcomed = true;
            counters.ready.fetch_add(1, Ordering::Relaxed);
            counters
                .handshake
                .record(idx, started.elapsed().as_micros() as u64);
        }
        handler.welcome(idx, &welcome, outage);
        let end = read_loop(ws, handler, idx, options.ack).await;
        counters.open.fetch_sub(1, Ordering::Relaxed);
        counters.disconnects.fetch_add(1, Ordering::Relaxed);
        if !options.reconnect || matches!(end.code, Some(1009 | 4400 | 4403)) {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        down_since = Some(Instant::now());
        // Spread reconnects: a drained node says how long to wait; otherwise a short
        // random delay, so that a killed node's clients do not all return at once.
        let base = end.after_ms.unwrap_or(0);
        wait = Duration::from_millis(base + rand::rng().random_range(0..=250));
        // Start with the next node: the one that just went away is likely gone.
        attempt = 1;
    }
}

/// Full-jitter exponential backoff: 0..min(2 s, 100 ms × 2^attempt).
fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_millis(100)
        .saturating_mul(1 << attempt.min(8))
        .min(MAX_BACKOFF);
    Duration::from_millis(rand::rng().random_range(0..=cap.as_millis() as u64))
}

/// How a connection ended.
struct End {
    code: Option<u16>,
    after_ms: Option<u64>,
}

async fn read_loop<H: Handler + ?Sized>(
    mut ws: Ws,
    handler: &H,
    idx: usize,
    ack: Option<Duration>,
) -> End {
    let mut end = End {
        code: None,
        after_ms: None,
    };
    // The coalesced ack: (channel, offset, epoch) to send at `ack_at`.
    let mut pending: Option<(String, u64, String)> = None;
    let mut ack_at: Option<tokio::time::Instant> = None;
    loop {
        let msg = tokio::select! {
            msg = ws.next() => msg,
            () = tokio::time::sleep_until(ack_at.unwrap_or_else(tokio::time::Instant::now)),
                if ack_at.is_some() => {
                ack_at = None;
                if let Some((channel, offset, epoch)) = pending.take() {
                    let frame = serde_json::json!({
                        "type": "ack", "channel": channel, "offset": offset, "epoch": epoch,
                    });
                    if ws.send(Message::text(frame.to_string())).await.is_err() {
                        break;
                    }
                }
                continue;
            }
        };
        let Some(msg) = msg else { break };
        let text = match msg {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(frame)) => {
                end.code = frame.map(|f| u16::from(f.code));
                continue;
            }
            Ok(_) => continue,
            Err(_) => break,
        };
        let Ok(frame) = serde_json::from_str::<Frame<'_>>(text.as_str()) else {
            continue;
        };
        match (frame.kind, frame.channel, frame.offset, frame.epoch) {
            ("message", Some(channel), Some(offset), Some(epoch)) => {
                if let Some(data) = frame.data {
                    handler.message(idx, channel, offset, epoch, data);
                }
                if let Some(delay) = ack.filter(|_| channel.starts_with("user:")) {
                    pending = Some((channel.to_owned(), offset, epoch.to_owned()));
                    ack_at.get_or_insert_with(|| tokio::time::Instant::now() + delay);
                }
            }
            ("ping", ..) if ws.send(Message::text(pong())).await.is_err() => break,
            ("reconnect", ..) => end.after_ms = frame.after_ms,
            ("resync", Some(channel), Some(offset), Some(epoch)) => {
                handler.resync(idx, channel, offset, epoch)
            }
            _ => {}
        }
    }
    end
}

/// Microseconds since the Unix epoch: the send timestamp inside every message, so that
/// any process on this machine can compute the latency.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The payload every published message carries: send time (µs since the epoch) and a
/// sequence number (per channel for `push`, the round for `broadcast`).
#[derive(Deserialize)]
pub struct Payload {
    /// Send timestamp, µs since the Unix epoch.
    pub t: u64,
    /// Sequence number.
    pub s: u64,
}

impl Payload {
    /// The payload as JSON.
    pub fn json(t: u64, s: u64) -> String {
        format!(r#"{{"t":{t},"s":{s}}}"#)
    }
}
