//! `broadcast`: one channel, S subscribers spread over the nodes. Messages are published
//! one at a time (a round); each round measures the time from the publish call to the
//! first and to the last subscriber's delivery.
//!
//! Subscribers live in this process or, when there are more than its descriptor limit
//! allows, in worker processes ([`crate::workers`]). Either way a slice reports its
//! per-round delivery times (µs since the epoch, one clock for every process on the
//! machine) and, per offset, how many of its connections got it; the parent, which knows
//! the accepted offsets, turns that into delivered / lost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use herald_protocol::frame::Welcome;
use herald_protocol::StreamPosition;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::task::JoinHandle;

use crate::cli::BroadcastArgs;
use crate::client::{now_us, Counters, Handler, Payload, SessionOptions, Target};
use crate::latency::{self, Latency, Percentiles};
use crate::ledger::{Accepted, Seen};
use crate::publish::{self, Publisher};
use crate::report::{BroadcastStats, ReconnectStats, Report, Round};
use crate::scenario::{per_process_capacity, settings, source_addresses, start_sessions};
use crate::setup::Setup;
use crate::token::Signer;
use crate::workers::{self, Worker};

/// Delivery times of one round, µs since the epoch.
struct RoundTimes {
    first: AtomicU64,
    last: AtomicU64,
    count: AtomicU64,
}

struct BroadcastState {
    channel: String,
    channels: Vec<String>,
    run: String,
    signer: Signer,
    /// Index of this slice's first connection.
    first: usize,
    seen: Vec<Mutex<Seen>>,
    rounds: Vec<RoundTimes>,
    latency: Latency,
}

impl BroadcastState {
    fn seen(&self, idx: usize) -> std::sync::MutexGuard<'_, Seen> {
        self.seen[idx - self.first].lock().expect("seen lock")
    }
}

impl Handler for BroadcastState {
    fn token(&self, idx: usize) -> String {
        self.signer
            .token(&format!("{}-s{idx}", self.run), &self.channels)
    }

    fn resume(&self, idx: usize) -> BTreeMap<String, StreamPosition> {
        // The first hello resumes from (0, ""): offset 0 continues with any epoch, so
        // the server replays whatever the channel holds (nothing: the channel is new
        // for each run and rounds start after every connection is up).
        let seen = self.seen(idx);
        let position = StreamPosition::new(seen.last, seen.epoch.clone());
        BTreeMap::from([(self.channel.clone(), position)])
    }

    fn welcome(&self, idx: usize, welcome: &Welcome, _outage: Option<Duration>) {
        if let Some(sub) = welcome.subscriptions.get(&self.channel) {
            self.seen(idx)
                .welcome(sub.offset, &sub.epoch, sub.recovered);
        }
    }

    fn message(&self, idx: usize, channel: &str, offset: u64, epoch: &str, data: &RawValue) {
        let now = now_us();
        if channel != self.channel || !self.seen(idx).deliver(offset, epoch) {
            return;
        }
        let Ok(p) = serde_json::from_str::<Payload>(data.get()) else {
            return;
        };
        self.latency.record(idx, now.saturating_sub(p.t));
        if let Some(r) = self.rounds.get(p.s as usize) {
            r.first.fetch_min(now, Ordering::Relaxed);
            r.last.fetch_max(now, Ordering::Relaxed);
            r.count.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn resync(&self, idx: usize, _channel: &str, offset: u64, epoch: &str) {
        self.seen(idx).resync(offset, epoch);
    }
}

/// The subscribers one process holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SliceSpec {
    urls: Vec<String>,
    sources: Vec<std::net::IpAddr>,
    first: usize,
    count: usize,
    rate: f64,
    jwt_secret: String,
    run: String,
    channel: String,
    messages: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SliceProgress {
    ready: u64,
    failed: u64,
    /// Deliveries per round so far.
    rounds: Vec<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SliceResult {
    ready: u64,
    failed: u64,
    disconnects: u64,
    reconnects: u64,
    reconnect_peak: u64,
    /// (first µs, last µs, deliveries) per round.
    rounds: Vec<(u64, u64, u64)>,
    /// Offset → connections of this slice that got it.
    offsets: BTreeMap<u64, u64>,
    duplicates: u64,
    reordered: u64,
    resyncs: u64,
    not_recovered: u64,
    latency: Vec<(u64, u64)>,
    outage: Vec<(u64, u64)>,
    errors: BTreeMap<String, u64>,
}

struct Slice {
    state: Arc<BroadcastState>,
    counters: Arc<Counters>,
    starter: Mutex<Option<JoinHandle<Vec<JoinHandle<()>>>>>,
}

impl Slice {
    async fn start(spec: SliceSpec) -> anyhow::Result<Slice> {
        let mut targets = Vec::new();
        for url in &spec.urls {
            targets.push(Target::resolve(url).await?);
        }
        let state = Arc::new(BroadcastState {
            channels: vec![spec.channel.clone()],
            channel: spec.channel,
            run: spec.run,
            signer: Signer::new(&spec.jwt_secret),
            first: spec.first,
            seen: (0..spec.count).map(|_| Mutex::default()).collect(),
            rounds: (0..spec.messages)
                .map(|_| RoundTimes {
                    first: AtomicU64::new(u64::MAX),
                    last: AtomicU64::new(0),
                    count: AtomicU64::new(0),
                })
                .collect(),
            latency: Latency::default(),
        });
        let counters = Arc::new(Counters::default());
        let options = Arc::new(SessionOptions {
            reconnect: true,
            start: Instant::now(),
            ack: None,
        });
        let starter = tokio::spawn(start_sessions(
            Arc::clone(&state),
            Arc::clone(&counters),
            Arc::new(targets),
            Arc::new(spec.sources.clone()),
            spec.first,
            spec.count,
            spec.rate,
            512,
            options,
        ));
        Ok(Slice {
            state,
            counters,
            starter: Mutex::new(Some(starter)),
        })
    }

    fn progress(&self) -> SliceProgress {
        SliceProgress {
            ready: self.counters.ready.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            rounds: self
                .state
                .rounds
                .iter()
                .map(|r| r.count.load(Ordering::Relaxed))
                .collect(),
        }
    }

    async fn finish(&self) -> SliceResult {
        let starter = self.starter.lock().expect("starter lock").take();
        if let Some(starter) = starter {
            starter.abort();
            if let Ok(sessions) = starter.await {
                for s in sessions {
                    s.abort();
                }
            }
        }
        let c = &self.counters;
        let mut r = SliceResult {
            ready: c.ready.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            disconnects: c.disconnects.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
            reconnect_peak: c.reconnect_peak(),
            rounds: self
                .state
                .rounds
                .iter()
                .map(|t| {
                    (
                        t.first.load(Ordering::Relaxed),
                        t.last.load(Ordering::Relaxed),
                        t.count.load(Ordering::Relaxed),
                    )
                })
                .collect(),
            latency: latency::to_pairs(&self.state.latency.merged()),
            outage: latency::to_pairs(&c.outage.merged()),
            errors: c.errors.lock().expect("errors").clone(),
            ..SliceResult::default()
        };
        for seen in &self.state.seen {
            let seen = seen.lock().expect("seen lock");
            for offset in seen.offsets.iter() {
                *r.offsets.entry(offset).or_default() += 1;
            }
            r.duplicates += seen.duplicates;
            r.reordered += seen.reordered;
            r.resyncs += seen.resyncs;
            r.not_recovered += seen.not_recovered;
        }
        r
    }
}

/// The worker side of `broadcast`: holds a slice of subscribers until stdin closes.
pub async fn worker(spec: &str) -> anyhow::Result<()> {
    let spec: SliceSpec = serde_json::from_str(spec).context("worker spec")?;
    let slice = Slice::start(spec).await?;
    workers::serve(
        Duration::from_millis(20),
        || slice.progress(),
        slice.finish(),
    )
    .await
}

enum Running {
    Local(Slice),
    Workers(Vec<Worker>),
}

impl Running {
    fn progress(&self) -> SliceProgress {
        let parts = match self {
            Running::Local(s) => vec![s.progress()],
            Running::Workers(ws) => ws.iter().filter_map(|w| w.progress()).collect(),
        };
        let mut all = SliceProgress::default();
        for p in parts {
            all.ready += p.ready;
            all.failed += p.failed;
            if all.rounds.len() < p.rounds.len() {
                all.rounds.resize(p.rounds.len(), 0);
            }
            for (a, b) in all.rounds.iter_mut().zip(&p.rounds) {
                *a += b;
            }
        }
        all
    }

    async fn finish(self) -> anyhow::Result<Vec<SliceResult>> {
        match self {
            Running::Local(s) => Ok(vec![s.finish().await]),
            Running::Workers(ws) => {
                let mut out = Vec::new();
                for w in ws {
                    out.push(w.finish().await?);
                }
                Ok(out)
            }
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `broadcast`.
pub async fn run(args: &BroadcastArgs) -> anyhow::Result<Report> {
    let setup = Setup::new(&args.common).await?;
    let n = args.subscribers as usize;
    let cap = per_process_capacity() as usize;
    let workers = match args.workers {
        0 => n.div_ceil(cap).max(1),
        w => w,
    };
    if n.div_ceil(workers) > cap {
        anyhow::bail!("{workers} workers cannot hold {n} subscribers (room for {cap} each)");
    }
    let channel = format!("{}-bc", setup.run);
    let sources = source_addresses(&setup, n as u64);
    let messages = args.messages as usize;
    let mut specs = Vec::new();
    let mut first = 0;
    for w in 0..workers {
        let count = n / workers + usize::from(w < n % workers);
        specs.push(SliceSpec {
            urls: setup.targets.iter().map(|t| t.url.clone()).collect(),
            sources: sources.clone(),
            first,
            count,
            rate: args.common.connect_rate / workers as f64,
            jwt_secret: setup.jwt_secret.clone(),
            run: setup.run.clone(),
            channel: channel.clone(),
            messages,
        });
        first += count;
    }
    let running = if workers == 1 {
        Running::Local(Slice::start(specs.remove(0)).await?)
    } else {
        Running::Workers(
            specs
                .iter()
                .map(|s| Worker::spawn("broadcast", s))
                .collect::<anyhow::Result<_>>()?,
        )
    };

    let bar = crate::progress::bar("connecting", n as u64);
    let rate = args.common.connect_rate;
    let expected = if rate > 0.0 { n as f64 / rate } else { 0.0 };
    let deadline = Instant::now() + Duration::from_secs_f64(expected * 3.0 + 60.0);
    let subscribed = loop {
        let p = running.progress();
        bar.set_position(p.ready + p.failed);
        if p.ready + p.failed >= n as u64 || Instant::now() > deadline {
            break p.ready;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    bar.finish_and_clear();

    let publisher = Publisher::new(&setup.apis, &setup.api_key)?;
    let mut accepted = Accepted::default();
    let mut published = vec![0u64; messages];
    let mut errors = BTreeMap::new();
    let mut publish_errors = 0;
    let bar = crate::progress::bar("broadcast", args.messages);
    let pids: Vec<u32> = setup.nodes.iter().filter_map(|n| n.pid).collect();
    let cpu_before = crate::nodes::total_cpu_seconds(&pids);
    let redis_cpu = crate::redis_cpu::RedisCpu::start_async(&setup.redis_info).await;
    let start = Instant::now();
    let timeout = Duration::from_secs_f64(args.round_timeout);
    for (r, published) in published.iter_mut().enumerate() {
        let t = now_us();
        *published = t;
        let body = publish::to_channel(&channel, &Payload::json(t, r as u64));
        match publisher.publish(r, body).await {
            Ok(p) => {
                accepted.insert(p.offset);
                let round_start = Instant::now();
                while running.progress().rounds.get(r).copied().unwrap_or(0) < subscribed
                    && round_start.elapsed() < timeout
                {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            Err(e) => {
                publish_errors += 1;
                *errors.entry(format!("publish: {e:#}")).or_insert(0) += 1;
            }
        }
        bar.inc(1);
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    let node_cpu_s = match (cpu_before, crate::nodes::total_cpu_seconds(&pids)) {
        (Some(b), Some(a)) if !pids.is_empty() && a > b => Some(a - b),
        _ => None,
    };
    let redis_servers = redis_cpu.finish_async().await.unwrap_or_default();
    let results = running.finish().await?;

    // Merge the slices.
    let mut rounds = vec![(u64::MAX, 0u64, 0u64); messages];
    let mut offsets: BTreeMap<u64, u64> = BTreeMap::new();
    let mut lat = latency::new_histogram();
    let mut outage = latency::new_histogram();
    let mut report = Report {
        scenario: "broadcast".into(),
        ..Report::default()
    };
    let mut peak = 0;
    for s in &results {
        for (m, r) in rounds.iter_mut().zip(&s.rounds) {
            m.0 = m.0.min(r.0);
            m.1 = m.1.max(r.1);
            m.2 += r.2;
        }
        for (o, k) in &s.offsets {
            *offsets.entry(*o).or_default() += k;
        }
        latency::add_pairs(&mut lat, &s.latency);
        latency::add_pairs(&mut outage, &s.outage);
        report.connections += s.ready;
        report.connect_failures += s.failed;
        report.disconnects += s.disconnects;
        report.reconnects += s.reconnects;
        report.duplicates += s.duplicates;
        report.reordered += s.reordered;
        report.resyncs += s.resyncs;
        report.not_recovered += s.not_recovered;
        peak = peak.max(s.reconnect_peak);
        for (e, k) in &s.errors {
            *report.errors.entry(e.clone()).or_insert(0) += k;
        }
    }
    for (o, k) in &offsets {
        if accepted.contains(*o) {
            report.delivered += k;
        } else {
            report.unacknowledged += k;
        }
    }
    report.sent = accepted.len();
    report.lost = (report.sent * report.connections).saturating_sub(report.delivered);
    let rows: Vec<Round> = rounds
        .iter()
        .zip(&published)
        .filter(|(r, _)| r.2 > 0)
        .map(|(r, &p)| Round {
            first_ms: r.0.saturating_sub(p) as f64 / 1000.0,
            last_ms: r.1.saturating_sub(p) as f64 / 1000.0,
            delivered: r.2,
        })
        .collect();
    report.broadcast = Some(BroadcastStats {
        subscribers: report.connections,
        first_ms_p50: median(rows.iter().map(|r| r.first_ms).collect()),
        last_ms_p50: median(rows.iter().map(|r| r.last_ms).collect()),
        last_ms_max: rows.iter().map(|r| r.last_ms).fold(0.0, f64::max),
        rounds: rows,
    });
    report.throughput_per_s = report.delivered as f64 / elapsed;
    report.node_cpu_s = node_cpu_s;
    report.deliveries_per_node_cpu_s = node_cpu_s.map(|c| report.delivered as f64 / c);
    if !redis_servers.is_empty() {
        let (total, per) = crate::redis_cpu::totals(&redis_servers, report.sent);
        report.redis_cpu_s = Some(total);
        report.redis_cpu_us_per_message = per;
        report.redis_cpu_per_server = redis_servers;
    }
    report.latency_ms = Percentiles::of(&lat);
    report.duration_s = elapsed;
    report.publish_errors = publish_errors;
    report.reconnect = Some(ReconnectStats {
        time_ms: Percentiles::of(&outage),
        peak_per_s: peak,
    });
    report.errors.extend(errors);
    report.settings = settings(
        &setup,
        &[
            ("subscribers", args.subscribers.into()),
            ("messages", args.messages.into()),
            ("workers", workers.into()),
        ],
    );
    Ok(report)
}
