//! Shared by the SDK's integration tests: real nodes (and Redis), an event recorder
//! standing in for the application, and a publisher that records what the server
//! accepted, so tests can assert "every message once, in order".

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_client::{
    Connected, Disconnected, ErrorBody, Event, Events, Resync, StopReason, Subscription,
};
use herald_testkit::process::NodeProcess;
use herald_testkit::redis::RedisServer;
use herald_testkit::{API_KEY, SECRET};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Generous: the machine may be busy.
pub const WAIT: Duration = Duration::from_secs(30);

/// One delivered message.
#[derive(Debug, Clone)]
pub struct Seen {
    pub offset: u64,
    pub epoch: String,
    pub from: Option<String>,
    pub data: Value,
}

/// Everything the application saw, by kind.
#[derive(Debug, Default)]
pub struct Record {
    pub messages: BTreeMap<String, Vec<Seen>>,
    pub resyncs: Vec<Resync>,
    pub connected: Vec<Connected>,
    pub disconnected: Vec<Disconnected>,
    pub subscribed: Vec<Subscription>,
    pub failed: Vec<(String, ErrorBody)>,
    /// `Event::Ephemeral`: (channel, from, data), in arrival order.
    pub ephemerals: Vec<(String, Option<String>, Value)>,
    /// `Event::Unsubscribed`: (channel, reason).
    pub unsubscribed: Vec<(String, String)>,
    pub stopped: Option<StopReason>,
    pub ended: bool,
}

impl Record {
    /// Offsets delivered on a channel, in order.
    pub fn offsets(&self, channel: &str) -> Vec<u64> {
        self.messages
            .get(channel)
            .map(|m| m.iter().map(|s| s.offset).collect())
            .unwrap_or_default()
    }

    /// The last offset delivered on a channel.
    pub fn last(&self, channel: &str) -> u64 {
        self.offsets(channel).last().copied().unwrap_or(0)
    }
}

/// Reads a client's events like an application would, and records them.
pub struct Recorder {
    record: Arc<Mutex<Record>>,
    changed: Arc<Notify>,
    _task: JoinHandle<()>,
}

impl Recorder {
    pub fn start(mut events: Events) -> Recorder {
        logs();
        let record = Arc::new(Mutex::new(Record::default()));
        let changed = Arc::new(Notify::new());
        let (r, c) = (record.clone(), changed.clone());
        let task = tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                {
                    let mut rec = r.lock().unwrap();
                    match event {
                        Event::Message(m) => {
                            let data = m.decode().expect("JSON data");
                            rec.messages.entry(m.channel).or_default().push(Seen {
                                offset: m.offset,
                                epoch: m.epoch,
                                from: m.from,
                                data,
                            });
                        }
                        Event::Ephemeral(e) => {
                            let data = e.decode().expect("JSON data");
                            rec.ephemerals.push((e.channel, e.from, data));
                        }
                        Event::Resync(x) => rec.resyncs.push(x),
                        Event::Connected(x) => rec.connected.push(x),
                        Event::Disconnected(x) => rec.disconnected.push(x),
                        Event::Subscribed(x) => rec.subscribed.push(x),
                        Event::SubscribeFailed { channel, error } => {
                            rec.failed.push((channel, error))
                        }
                        Event::Unsubscribed { channel, reason } => {
                            rec.unsubscribed.push((channel, reason))
                        }
                        Event::Stopped(x) => rec.stopped = Some(x),
                    }
                }
                c.notify_waiters();
            }
            r.lock().unwrap().ended = true;
            c.notify_waiters();
        });
        Recorder {
            record,
            changed,
            _task: task,
        }
    }

    /// Looks at the record.
    pub fn with<R>(&self, f: impl FnOnce(&Record) -> R) -> R {
        f(&self.record.lock().unwrap())
    }

    /// Waits until `done` holds; panics with `what` after `wait`.
    pub async fn wait(&self, what: &str, wait: Duration, done: impl Fn(&Record) -> bool) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            {
                let rec = self.record.lock().unwrap();
                if done(&rec) {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "timed out waiting for {what}; record: {rec:#?}"
                );
            }
            let _ = tokio::time::timeout_at(deadline, changed).await;
        }
    }
}

/// The SDK's logs, captured per test (shown when a test fails). `RUST_LOG` overrides
/// the default filter.
pub fn logs() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "herald_client=debug".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A token signed with the test secret, valid for `ttl_secs`.
pub fn token_for(user: &str, channels: &[&str], publish: &[&str], ttl_secs: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims =
        json!({"sub": user, "exp": now + ttl_secs, "channels": channels, "publish": publish});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Publishes through a node's HTTP API; returns the accepted offset.
pub async fn publish(http: &str, channel: &str, data: Value) -> u64 {
    let response = reqwest::Client::new()
        .post(format!("{http}/v1/publish"))
        .bearer_auth(API_KEY)
        .json(&json!({"channel": channel, "data": data}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("publish request");
    assert_eq!(response.status(), 200, "publish to {channel}");
    let body: Value = response.json().await.unwrap();
    body["offset"].as_u64().expect("offset in the answer")
}

/// Publishes continuously, round-robin over channels, and records accepted offsets.
pub struct Publisher {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    task: JoinHandle<BTreeMap<String, Vec<(u64, u64)>>>,
}

impl Publisher {
    /// Starts publishing `{"n": n}` every `every` through `http`.
    pub fn start(http: String, channels: Vec<String>, every: Duration) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), count.clone());
        let task = tokio::spawn(async move {
            let mut accepted: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
            let mut n = 0u64;
            while !s.load(Ordering::SeqCst) {
                let channel = &channels[n as usize % channels.len()];
                let offset = publish(&http, channel, json!({ "n": n })).await;
                accepted
                    .entry(channel.clone())
                    .or_default()
                    .push((offset, n));
                n += 1;
                c.store(n, Ordering::SeqCst);
                tokio::time::sleep(every).await;
            }
            accepted
        });
        Publisher { stop, count, task }
    }

    /// How many messages were accepted so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until `n` messages were accepted.
    pub async fn wait_count(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.count() < n {
            assert!(tokio::time::Instant::now() < deadline, "publisher stalled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops; returns channel → [(offset, n)] in publish order.
    pub async fn stop(self) -> BTreeMap<String, Vec<(u64, u64)>> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("publisher task")
    }
}

/// Asserts the application saw exactly the accepted messages of a channel: each once,
/// in offset order, with the published data, and no resync.
pub fn assert_exactly_once(who: &str, record: &Record, channel: &str, accepted: &[(u64, u64)]) {
    let want: Vec<(u64, u64)> = accepted.to_vec();
    let got: Vec<(u64, u64)> = record
        .messages
        .get(channel)
        .map(|m| {
            m.iter()
                .map(|s| (s.offset, s.data["n"].as_u64().unwrap()))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        got, want,
        "{who} on {channel}: not every message once, in order"
    );
    assert!(
        record.resyncs.is_empty(),
        "{who}: unexpected resync {:?}",
        record.resyncs
    );
}

/// A Redis and `n` nodes sharing it (own key prefix per test).
pub struct Cluster {
    pub nodes: Vec<NodeProcess>,
    pub redis: RedisServer,
}

impl Cluster {
    pub async fn start(n: usize, test: &str, env: &[(&str, &str)]) -> Cluster {
        let redis = RedisServer::start();
        let url = redis.url();
        let prefix = format!("t{}:{test}:", std::process::id());
        let mut all = vec![
            ("HERALD_REDIS_URL", url.as_str()),
            ("HERALD_REDIS_PREFIX", prefix.as_str()),
            // The tests check the client, not the history bound: keep every message.
            ("HERALD_HISTORY_SIZE", "10000"),
        ];
        all.extend_from_slice(env);
        let nodes: Vec<NodeProcess> = (0..n)
            .map(|i| NodeProcess::start(&format!("node{i}"), &all))
            .collect();
        for node in &nodes {
            node.wait_ready(WAIT).await;
        }
        Cluster { nodes, redis }
    }
}
