//! A resilient test client: follows its personal channel (and others) across
//! reconnects, like a well-behaved application, and records exactly what the
//! application would see, so tests can assert "every message once, in order" and count
//! lost and duplicated messages exactly.
//!
//! It connects to nodes directly (each reconnect to the next node of its list) or to a
//! balancer (optionally from its own loopback source address, so HAProxy's
//! `balance source` spreads clients). After a `reconnect` frame it waits the frame's
//! `after_ms`, otherwise a short backoff; then it resumes from the last offsets it saw.
//! It also records when each (re)connect happened, so tests can report the rate.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// What one channel delivered.
#[derive(Debug, Default, Clone)]
pub struct Channel {
    /// (epoch, offset) of every delivered message, in arrival order (replays and live
    /// messages alike).
    pub messages: Vec<(String, u64)>,
    /// Last (offset, epoch) seen.
    pub position: Option<(u64, String)>,
    /// Offsets that did not follow the previous one (same stream, not previous + 1)
    /// without a resync before them: (last, got).
    pub violations: Vec<(u64, u64)>,
    /// `recovered: false` answers to a resume or subscribe, and `resync` frames.
    pub discontinuities: u32,
}

impl Channel {
    /// The offsets delivered, in arrival order.
    pub fn offsets(&self) -> Vec<u64> {
        self.messages.iter().map(|(_, o)| *o).collect()
    }
}

/// Everything a follower saw.
#[derive(Debug, Default, Clone)]
pub struct Record {
    /// Per channel.
    pub channels: BTreeMap<String, Channel>,
    /// When each `welcome` arrived and from which node.
    pub welcomes: Vec<(Instant, String)>,
    /// When each connection attempt (TCP connect, WebSocket handshake, hello) began.
    pub attempts: Vec<Instant>,
    /// Close codes received.
    pub closes: Vec<u16>,
    /// Errors the node answered: per-channel errors of a `welcome`, error replies.
    pub errors: Vec<String>,
    /// When each `reconnect` frame arrived, with its reason.
    pub reconnects: Vec<(Instant, String)>,
}

impl Record {
    /// Completed hellos (1 = never reconnected).
    pub fn connects(&self) -> usize {
        self.welcomes.len()
    }

    /// The node of the latest welcome.
    pub fn node(&self) -> Option<&str> {
        self.welcomes.last().map(|(_, n)| n.as_str())
    }

    /// The last offset seen on a channel.
    pub fn offset(&self, channel: &str) -> u64 {
        self.channels
            .get(channel)
            .and_then(|c| c.position.as_ref())
            .map_or(0, |p| p.0)
    }
}

/// How a follower connects.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Where to connect: nodes, or one balancer. The first connection goes to
    /// `targets[start % len]`, every later attempt to the next one.
    pub targets: Vec<SocketAddr>,
    /// See `targets`.
    pub start: usize,
    /// Connect from this local address (any 127.x.y.z works on Linux).
    pub source: Option<IpAddr>,
    /// The client token.
    pub token: String,
    /// Channels to subscribe besides the personal one.
    pub extra: Vec<String>,
    /// Back off a random 50–500 ms before reconnecting (100–500 ms after a failed
    /// connect), so that the clients of a killed node do not all come back in the same
    /// millisecond; without it, always the shortest of these.
    pub jitter: bool,
    /// A connection silent for this long is dead (no FIN, no reset): the follower
    /// drops it and reconnects. Default 40 s (the node pings after 25 s of silence);
    /// with a short `HERALD_HEARTBEAT_MS`, about twice the heartbeat.
    pub idle: Option<Duration>,
}

/// A running follower.
pub struct Follower {
    /// What it saw so far.
    record: Arc<Mutex<Record>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Follower {
    /// Starts following.
    pub fn start(options: Options) -> Follower {
        assert!(
            !options.targets.is_empty(),
            "a follower needs somewhere to connect"
        );
        let record = Arc::new(Mutex::new(Record::default()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(options, record.clone(), stop.clone()));
        Follower { record, stop, task }
    }

    /// Starts following its personal channel on `nodes` directly: first `nodes[start]`,
    /// on every disconnect the next node, after a fixed short pause.
    pub fn on_nodes(nodes: Vec<SocketAddr>, token: String, start: usize) -> Follower {
        Follower::start(Options {
            targets: nodes,
            start,
            token,
            ..Options::default()
        })
    }

    /// A copy of the record.
    pub fn snapshot(&self) -> Record {
        self.record.lock().unwrap().clone()
    }

    /// Number of welcomes so far.
    pub fn connects(&self) -> usize {
        self.record.lock().unwrap().connects()
    }

    /// Waits until the follower has a position of at least `offset` on `channel` (0:
    /// any position, it joined the channel), within `wait`.
    pub async fn wait_for(&self, channel: &str, offset: u64, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let at = {
                let r = self.record.lock().unwrap();
                r.channels
                    .get(channel)
                    .and_then(|s| s.position.as_ref().map(|p| p.0))
            };
            if at.is_some_and(|o| o >= offset) {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops and returns the record.
    pub async fn stop(self) -> Record {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        let r = self.record.lock().unwrap();
        r.clone()
    }
}

/// Stops every follower, in order, and returns their records.
pub async fn stop_all(followers: Vec<Follower>) -> Vec<Record> {
    let mut records = Vec::with_capacity(followers.len());
    for f in followers {
        records.push(f.stop().await);
    }
    records
}

/// Asserts that the follower of each user (in order) joins the user's personal channel
/// `user:<name>` within `wait` (each).
pub async fn assert_joined(followers: &[Follower], users: &[String], wait: Duration) {
    for (f, u) in followers.iter().zip(users) {
        assert!(
            f.wait_for(&format!("user:{u}"), 0, wait).await,
            "the follower of {u} never joined user:{u}"
        );
    }
}

/// Asserts that the follower of each user (in order) reaches offset `last(channel)` of
/// the user's personal channel, where it is `Some`, within `wait` (each).
pub async fn assert_caught_up(
    followers: &[Follower],
    users: &[String],
    last: impl Fn(&str) -> Option<u64>,
    wait: Duration,
) {
    for (f, u) in followers.iter().zip(users) {
        let channel = format!("user:{u}");
        if let Some(last) = last(&channel) {
            assert!(
                f.wait_for(&channel, last, wait).await,
                "{channel} never caught up to {last}"
            );
        }
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(target: SocketAddr, source: Option<IpAddr>) -> Option<Ws> {
    let socket = TcpSocket::new_v4().ok()?;
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0)).ok()?;
    }
    let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(target))
        .await
        .ok()?
        .ok()?;
    let _ = stream.set_nodelay(true);
    let url = format!("ws://{target}/ws");
    // Small buffers: thousands of these live in one test process, and tungstenite's
    // default read buffer is 128 KiB each.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async_with_config(url, stream, Some(config)),
    )
    .await
    .ok()?
    .ok()?;
    Some(ws)
}

/// A pause of `from_ms`, or with `jitter` a random one in `from_ms..to_ms`.
fn backoff(options: &Options, from_ms: u64, to_ms: u64) -> Duration {
    if options.jitter {
        Duration::from_millis(rand::rng().random_range(from_ms..to_ms))
    } else {
        Duration::from_millis(from_ms)
    }
}

async fn run(options: Options, record: Arc<Mutex<Record>>, stop: CancellationToken) {
    let mut next = options.start;
    while !stop.is_cancelled() {
        let target = options.targets[next % options.targets.len()];
        next += 1;
        record.lock().unwrap().attempts.push(Instant::now());
        let Some(mut ws) = connect(target, options.source).await else {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff(&options, 100, 500)) => continue,
            }
        };
        let resume: BTreeMap<String, Value> = {
            let r = record.lock().unwrap();
            r.channels
                .iter()
                .filter_map(|(c, s)| {
                    s.position
                        .as_ref()
                        .map(|(o, e)| (c.clone(), json!({"offset": o, "epoch": e})))
                })
                .collect()
        };
        let hello = json!({"type": "hello", "token": options.token, "resume": resume});
        let wait = match session(&mut ws, hello, &options, &record, &stop).await {
            Some(after) => after,
            None => return,
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One connection, until it ends. Returns how long to wait before reconnecting, or
/// `None` when the follower was stopped.
async fn session(
    ws: &mut Ws,
    hello: Value,
    options: &Options,
    record: &Arc<Mutex<Record>>,
    stop: &CancellationToken,
) -> Option<Duration> {
    if ws
        .send(Message::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        return Some(backoff(options, 50, 250));
    }
    // Subscribe commands sent on this connection: id -> channel.
    let mut pending: HashMap<u64, String> = HashMap::new();
    let mut next_id = 1u64;
    let mut after: Option<Duration> = None;
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => return None,
            // The node pings after 25 s of silence: 40 s without a frame is a dead link.
            f = tokio::time::timeout(options.idle.unwrap_or(Duration::from_secs(40)), ws.next()) => f,
        };
        let text = match frame {
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(Message::Close(f)))) => {
                if let Some(f) = f {
                    record.lock().unwrap().closes.push(u16::from(f.code));
                }
                break;
            }
            Ok(Some(Ok(_))) => continue,
            _ => break,
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            break;
        };
        let mut to_send: Vec<String> = Vec::new();
        {
            let mut r = record.lock().unwrap();
            match v["type"].as_str().unwrap_or("") {
                "welcome" => {
                    let node = v["node"].as_str().unwrap_or("").to_owned();
                    r.welcomes.push((Instant::now(), node));
                    let subs = v["subscriptions"].as_object().cloned().unwrap_or_default();
                    for (channel, sub) in &subs {
                        let seen = r.channels.entry(channel.clone()).or_default();
                        let pos = (
                            sub["offset"].as_u64().unwrap_or(0),
                            sub["epoch"].as_str().unwrap_or("").to_owned(),
                        );
                        let recovered = sub["recovered"] == true;
                        if seen.position.is_some() && !recovered {
                            seen.discontinuities += 1;
                        }
                        // recovered: the missed messages follow; keep our own position.
                        if seen.position.is_none() || !recovered {
                            seen.position = Some(pos);
                        }
                    }
                    if let Some(errors) = v["errors"].as_object() {
                        for (channel, e) in errors {
                            r.errors.push(format!("welcome {channel}: {e}"));
                        }
                    }
                    for channel in &options.extra {
                        if !subs.contains_key(channel) {
                            // Not (or no longer) subscribed: subscribe, from where we are.
                            let mut cmd =
                                json!({"type": "subscribe", "id": next_id, "channel": channel});
                            if let Some((offset, epoch)) =
                                r.channels.get(channel).and_then(|c| c.position.clone())
                            {
                                cmd["since"] = json!({"offset": offset, "epoch": epoch});
                            }
                            pending.insert(next_id, channel.clone());
                            next_id += 1;
                            to_send.push(cmd.to_string());
                        }
                    }
                }
                "reply" => {
                    let id = v["id"].as_u64().unwrap_or(0);
                    let channel = pending.remove(&id);
                    if let Some(e) = v.get("error") {
                        r.errors.push(format!("reply {channel:?}: {e}"));
                        // Subscribe again on a new connection, a moment later.
                        after = Some(backoff(options, 100, 500));
                        break;
                    }
                    if let (Some(channel), Some(result)) = (channel, v.get("result")) {
                        let seen = r.channels.entry(channel).or_default();
                        let recovered = result["recovered"] == true;
                        if seen.position.is_some() && !recovered {
                            seen.discontinuities += 1;
                        }
                        // recovered: the missed messages follow; keep our own position.
                        if seen.position.is_none() || !recovered {
                            seen.position = Some((
                                result["offset"].as_u64().unwrap_or(0),
                                result["epoch"].as_str().unwrap_or("").to_owned(),
                            ));
                        }
                    }
                }
                "message" => {
                    let channel = v["channel"].as_str().unwrap_or("").to_owned();
                    let offset = v["offset"].as_u64().unwrap_or(0);
                    let epoch = v["epoch"].as_str().unwrap_or("").to_owned();
                    let seen = r.channels.entry(channel).or_default();
                    if let Some((last, e)) = &seen.position {
                        // From offset 0 any epoch continues (herald_protocol::same_stream).
                        if herald_protocol::same_stream(*last, e, &epoch) && offset != last + 1 {
                            seen.violations.push((*last, offset));
                        }
                    }
                    seen.messages.push((epoch.clone(), offset));
                    seen.position = Some((offset, epoch));
                }
                "resync" => {
                    let seen = r
                        .channels
                        .entry(v["channel"].as_str().unwrap_or("").to_owned())
                        .or_default();
                    seen.discontinuities += 1;
                    seen.position = Some((
                        v["offset"].as_u64().unwrap_or(0),
                        v["epoch"].as_str().unwrap_or("").to_owned(),
                    ));
                }
                "reconnect" => {
                    let reason = v["reason"].as_str().unwrap_or("").to_owned();
                    r.reconnects.push((Instant::now(), reason));
                    after = Some(Duration::from_millis(v["after_ms"].as_u64().unwrap_or(0)));
                }
                "ping" => to_send.push(r#"{"type":"pong"}"#.to_owned()),
                _ => {}
            }
        }
        for text in to_send {
            let _ = ws.send(Message::Text(text.into())).await;
        }
    }
    // A planned close: wait what the node asked. Otherwise a short backoff.
    Some(after.unwrap_or_else(|| backoff(options, 50, 500)))
}
