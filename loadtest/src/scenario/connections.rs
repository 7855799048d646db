//! `connections`: open N idle authenticated connections at a set rate, hold them, and
//! measure the connect rate and the nodes' memory per connection.
//!
//! Two limits shape it. Each source address has ~28k ephemeral ports, so connections are
//! spread over source addresses 127.0.0.2, 127.0.0.3, … (the socket is bound before it
//! connects). And one process may hold only as many sockets as its descriptor limit
//! (20,000 here, not raisable), so above that the binary re-executes itself as worker
//! processes ([`crate::workers`]), each with a slice of the connections.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use herald_protocol::frame::Welcome;
use herald_protocol::StreamPosition;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::task::JoinHandle;

use crate::cli::ConnectionsArgs;
use crate::client::{now_us, Counters, Handler, SessionOptions, Target};
use crate::latency::{self, Percentiles};
use crate::report::{ConnectStats, Report};
use crate::scenario::{per_process_capacity, settings, source_addresses, start_sessions};
use crate::setup::Setup;
use crate::token::Signer;
use crate::workers::{self, Worker};

/// The work of one process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SliceSpec {
    urls: Vec<String>,
    sources: Vec<IpAddr>,
    first: usize,
    count: usize,
    rate: f64,
    in_flight: u64,
    jwt_secret: String,
    run: String,
}

/// Progress of a slice.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Progress {
    ready: u64,
    failed: u64,
    open: u64,
}

/// The outcome of a slice.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SliceResult {
    ready: u64,
    failed: u64,
    dropped: u64,
    open: u64,
    start_us: u64,
    last_welcome_us: u64,
    handshake: Vec<(u64, u64)>,
    errors: BTreeMap<String, u64>,
    #[serde(default)]
    busy: u64,
    #[serde(default)]
    connect_errors: u64,
}

/// Idle connections: nothing to resume, nothing to count but the welcome.
struct Idle {
    run: String,
    signer: Signer,
    last_welcome_us: AtomicU64,
}

impl Handler for Idle {
    fn token(&self, idx: usize) -> String {
        self.signer.token(&format!("{}-c{idx}", self.run), &[])
    }
    fn resume(&self, _: usize) -> BTreeMap<String, StreamPosition> {
        BTreeMap::new()
    }
    fn welcome(&self, _: usize, _: &Welcome, _: Option<Duration>) {
        self.last_welcome_us.fetch_max(now_us(), Ordering::Relaxed);
    }
    fn message(&self, _: usize, _: &str, _: u64, _: &str, _: &RawValue) {}
    fn resync(&self, _: usize, _: &str, _: u64, _: &str) {}
}

/// A slice running in this process.
struct Slice {
    idle: Arc<Idle>,
    counters: Arc<Counters>,
    starter: Mutex<Option<JoinHandle<Vec<JoinHandle<()>>>>>,
    start_us: u64,
}

impl Slice {
    async fn start(spec: SliceSpec) -> anyhow::Result<Slice> {
        let mut targets = Vec::new();
        for url in &spec.urls {
            targets.push(Target::resolve(url).await?);
        }
        let idle = Arc::new(Idle {
            run: spec.run.clone(),
            signer: Signer::new(&spec.jwt_secret),
            last_welcome_us: AtomicU64::new(0),
        });
        let counters = Arc::new(Counters::default());
        let options = Arc::new(SessionOptions {
            reconnect: false,
            start: Instant::now(),
            ack: None,
        });
        let start_us = now_us();
        let starter = tokio::spawn(start_sessions(
            Arc::clone(&idle),
            Arc::clone(&counters),
            Arc::new(targets),
            Arc::new(spec.sources.clone()),
            spec.first,
            spec.count,
            spec.rate,
            spec.in_flight,
            options,
        ));
        Ok(Slice {
            idle,
            counters,
            starter: Mutex::new(Some(starter)),
            start_us,
        })
    }

    fn progress(&self) -> Progress {
        let c = &self.counters;
        Progress {
            ready: c.ready.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            open: c.open.load(Ordering::Relaxed),
        }
    }

    /// Closes every connection and returns the outcome.
    async fn finish(&self) -> SliceResult {
        let p = self.progress();
        let c = &self.counters;
        let result = SliceResult {
            ready: p.ready,
            failed: p.failed,
            dropped: c.dropped.load(Ordering::Relaxed),
            open: p.open,
            start_us: self.start_us,
            last_welcome_us: self.idle.last_welcome_us.load(Ordering::Relaxed),
            handshake: latency::to_pairs(&c.handshake.merged()),
            errors: c.errors.lock().expect("errors").clone(),
            busy: c.busy.load(Ordering::Relaxed),
            connect_errors: c.connect_errors.load(Ordering::Relaxed),
        };
        let starter = self.starter.lock().expect("starter lock").take();
        if let Some(starter) = starter {
            starter.abort();
            if let Ok(sessions) = starter.await {
                for s in sessions {
                    s.abort();
                }
            }
        }
        result
    }
}

/// The worker side of `connections`: runs a slice until stdin closes.
pub async fn worker(spec: &str) -> anyhow::Result<()> {
    let spec: SliceSpec = serde_json::from_str(spec).context("worker spec")?;
    let slice = Slice::start(spec).await?;
    workers::serve(
        Duration::from_millis(200),
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
    fn progress(&self) -> Progress {
        match self {
            Running::Local(s) => s.progress(),
            Running::Workers(ws) => ws.iter().fold(Progress::default(), |a, w| {
                let p: Progress = w.progress().unwrap_or_default();
                Progress {
                    ready: a.ready + p.ready,
                    failed: a.failed + p.failed,
                    open: a.open + p.open,
                }
            }),
        }
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

/// Runs `connections`.
pub async fn run(args: &ConnectionsArgs) -> anyhow::Result<Report> {
    let setup = Setup::new(&args.common).await?;
    let n = args.connections;
    let sources: Vec<IpAddr> = source_addresses(&setup, n);
    let cap = per_process_capacity();
    let workers = match args.workers {
        0 => n.div_ceil(cap).max(1) as usize,
        w => w,
    };
    if n.div_ceil(workers as u64) > cap {
        anyhow::bail!("{workers} workers cannot hold {n} connections (room for {cap} each)");
    }
    let http = reqwest::Client::new();
    let before = crate::nodes::snapshot(&http, &setup.nodes).await;

    let mut specs = Vec::new();
    let mut first = 0usize;
    for w in 0..workers {
        let count = (n as usize / workers) + usize::from(w < n as usize % workers);
        specs.push(SliceSpec {
            urls: setup.targets.iter().map(|t| t.url.clone()).collect(),
            sources: sources.clone(),
            first,
            count,
            rate: args.rate / workers as f64,
            in_flight: (args.concurrency / workers as u64).max(1),
            jwt_secret: setup.jwt_secret.clone(),
            run: setup.run.clone(),
        });
        first += count;
    }
    let running = if workers == 1 {
        Running::Local(Slice::start(specs.remove(0)).await?)
    } else {
        Running::Workers(
            specs
                .iter()
                .map(|s| Worker::spawn("connections", s))
                .collect::<anyhow::Result<_>>()?,
        )
    };

    let bar = crate::progress::bar("connecting", n);
    let expected = if args.rate > 0.0 {
        n as f64 / args.rate
    } else {
        0.0
    };
    let deadline = Instant::now() + Duration::from_secs_f64(expected * 3.0 + 60.0);
    loop {
        let p = running.progress();
        bar.set_position(p.ready + p.failed);
        bar.set_message(format!("failed {}", p.failed));
        if p.ready + p.failed >= n || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();
    // Let the nodes settle (allocator, registry refresh) before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = crate::nodes::snapshot(&http, &setup.nodes).await;
    let hold = Duration::from_secs_f64(args.common.duration);
    let timer = crate::progress::timer("holding", hold);
    let held = Instant::now();
    while held.elapsed() < hold {
        tokio::time::sleep(Duration::from_millis(200)).await;
        timer.set_position(held.elapsed().as_millis() as u64);
        timer.set_message(format!("open {}", running.progress().open));
    }
    timer.finish_and_clear();
    let results = running.finish().await?;

    let mut handshake = latency::new_histogram();
    let mut errors = BTreeMap::new();
    let (mut ready, mut failed, mut dropped, mut open) = (0, 0, 0, 0);
    let (mut busy, mut connect_errors) = (0, 0);
    let start_us = results.iter().map(|r| r.start_us).min().unwrap_or(0);
    let last_us = results.iter().map(|r| r.last_welcome_us).max().unwrap_or(0);
    for r in &results {
        latency::add_pairs(&mut handshake, &r.handshake);
        ready += r.ready;
        failed += r.failed;
        dropped += r.dropped;
        open += r.open;
        busy += r.busy;
        connect_errors += r.connect_errors;
        for (e, k) in &r.errors {
            *errors.entry(e.clone()).or_insert(0) += k;
        }
    }
    let ramp_s = last_us.saturating_sub(start_us) as f64 / 1e6;
    let rate = if ramp_s > 0.0 {
        ready as f64 / ramp_s
    } else {
        0.0
    };
    Ok(Report {
        scenario: "connections".into(),
        connections: ready,
        throughput_per_s: rate,
        latency_ms: Percentiles::of(&handshake),
        duration_s: ramp_s,
        connect_failures: failed,
        disconnects: dropped,
        connect: Some(ConnectStats {
            requested: n,
            connect_rate_per_s: rate,
            ramp_s,
            dropped_while_held: dropped,
            open_at_end: open,
            busy_answers: busy,
            connect_errors,
            sources: sources.iter().map(|s| s.to_string()).collect(),
            workers,
        }),
        node_memory: crate::nodes::memory(&setup.nodes, &before, &after),
        errors,
        settings: settings(
            &setup,
            &[
                ("connections", n.into()),
                ("rate", args.rate.into()),
                ("hold_s", args.common.duration.into()),
            ],
        ),
        ..Report::default()
    })
}
