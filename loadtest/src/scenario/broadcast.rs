//! `broadcast`: one channel, S subscribers spread over the nodes. Messages are published
//! one at a time (a round); each round measures the time from the publish call to the
//! first and to the last subscriber's delivery.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_protocol::frame::Welcome;
use herald_protocol::StreamPosition;
use serde_json::value::RawValue;

use crate::cli::BroadcastArgs;
use crate::client::{now_us, Counters, Handler, Payload, SessionOptions};
use crate::latency::{Latency, Percentiles};
use crate::ledger::{Accepted, Seen, Totals};
use crate::publish::{self, Publisher};
use crate::report::{BroadcastStats, ReconnectStats, Report, Round};
use crate::scenario::{connect_all, settings};
use crate::setup::Setup;
use crate::token::Signer;

/// Delivery times of one round, µs since the epoch.
#[derive(Default)]
struct RoundTimes {
    published: AtomicU64,
    first: AtomicU64,
    last: AtomicU64,
    count: AtomicU64,
}

struct BroadcastState {
    channel: String,
    channels: Vec<String>,
    run: String,
    signer: Signer,
    seen: Vec<Mutex<Seen>>,
    rounds: Vec<RoundTimes>,
    latency: Latency,
}

impl Handler for BroadcastState {
    fn token(&self, idx: usize) -> String {
        self.signer
            .token(&format!("{}-s{idx}", self.run), &self.channels)
    }

    fn resume(&self, idx: usize) -> BTreeMap<String, StreamPosition> {
        // The first hello subscribes with an unknown epoch: the server answers
        // `recovered: false` with the current position, which is where we start.
        let seen = self.seen[idx].lock().expect("seen lock");
        let position = StreamPosition::new(seen.last, seen.epoch.clone());
        BTreeMap::from([(self.channel.clone(), position)])
    }

    fn welcome(&self, idx: usize, welcome: &Welcome, _outage: Option<Duration>) {
        if let Some(sub) = welcome.subscriptions.get(&self.channel) {
            let mut seen = self.seen[idx].lock().expect("seen lock");
            let first = seen.epoch.is_empty();
            seen.welcome(sub.offset, &sub.epoch, sub.recovered || first);
        }
    }

    fn message(&self, idx: usize, channel: &str, offset: u64, epoch: &str, data: &RawValue) {
        let now = now_us();
        if channel != self.channel {
            return;
        }
        if !self.seen[idx]
            .lock()
            .expect("seen lock")
            .deliver(offset, epoch)
        {
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
        self.seen[idx]
            .lock()
            .expect("seen lock")
            .resync(offset, epoch);
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
    crate::scenario::check_capacity(n as u64)?;
    let channel = format!("{}-bc", setup.run);
    let state = Arc::new(BroadcastState {
        channels: vec![channel.clone()],
        channel: channel.clone(),
        run: setup.run.clone(),
        signer: Signer::new(&setup.jwt_secret),
        seen: (0..n).map(|_| Mutex::default()).collect(),
        rounds: (0..args.messages)
            .map(|_| RoundTimes {
                first: AtomicU64::new(u64::MAX),
                ..RoundTimes::default()
            })
            .collect(),
        latency: Latency::default(),
    });
    let counters = Arc::new(Counters::default());
    let options = Arc::new(SessionOptions {
        reconnect: true,
        start: Instant::now(),
    });
    let sessions = connect_all(
        Arc::clone(&state),
        Arc::clone(&counters),
        &setup,
        n,
        args.common.connect_rate,
        Arc::clone(&options),
    )
    .await;
    let subscribed = counters.ready.load(Ordering::Relaxed);

    let publisher = Publisher::new(&setup.apis, &setup.api_key)?;
    let mut accepted = Accepted::default();
    let mut errors = BTreeMap::new();
    let mut publish_errors = 0;
    let bar = crate::progress::bar("broadcast", args.messages);
    let start = Instant::now();
    let timeout = Duration::from_secs_f64(args.round_timeout);
    for r in 0..args.messages as usize {
        let t = now_us();
        state.rounds[r].published.store(t, Ordering::Relaxed);
        let body = publish::to_channel(&channel, &Payload::json(t, r as u64));
        match publisher.publish(r, body).await {
            Ok(p) => {
                accepted.insert(p.offset);
                let round_start = Instant::now();
                while state.rounds[r].count.load(Ordering::Relaxed) < subscribed
                    && round_start.elapsed() < timeout
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
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
    for s in &sessions {
        s.abort();
    }

    let mut totals = Totals::default();
    for seen in &state.seen {
        totals.add(&seen.lock().expect("seen lock"), &accepted);
    }
    let rounds: Vec<Round> = state
        .rounds
        .iter()
        .filter(|r| r.count.load(Ordering::Relaxed) > 0)
        .map(|r| {
            let p = r.published.load(Ordering::Relaxed);
            let ms = |t: &AtomicU64| t.load(Ordering::Relaxed).saturating_sub(p) as f64 / 1000.0;
            Round {
                first_ms: ms(&r.first),
                last_ms: ms(&r.last),
                delivered: r.count.load(Ordering::Relaxed),
            }
        })
        .collect();
    let stats = BroadcastStats {
        subscribers: subscribed,
        first_ms_p50: median(rounds.iter().map(|r| r.first_ms).collect()),
        last_ms_p50: median(rounds.iter().map(|r| r.last_ms).collect()),
        last_ms_max: rounds.iter().map(|r| r.last_ms).fold(0.0, f64::max),
        rounds,
    };
    let mut all_errors = counters.errors.lock().expect("errors").clone();
    all_errors.extend(errors);
    Ok(Report {
        scenario: "broadcast".into(),
        connections: subscribed,
        sent: accepted.len(),
        delivered: totals.delivered,
        lost: totals.lost,
        duplicates: totals.duplicates,
        reordered: totals.reordered,
        throughput_per_s: totals.delivered as f64 / elapsed,
        latency_ms: Percentiles::of(&state.latency.merged()),
        duration_s: elapsed,
        resyncs: totals.resyncs,
        not_recovered: totals.not_recovered,
        unacknowledged: totals.unacknowledged,
        publish_errors,
        connect_failures: counters.failed.load(Ordering::Relaxed),
        disconnects: counters.disconnects.load(Ordering::Relaxed),
        reconnects: counters.reconnects.load(Ordering::Relaxed),
        reconnect: Some(ReconnectStats {
            time_ms: Percentiles::of(&counters.outage.merged()),
            peak_per_s: counters.reconnect_peak(),
        }),
        broadcast: Some(stats),
        errors: all_errors,
        settings: settings(
            &setup,
            &[
                ("subscribers", args.subscribers.into()),
                ("messages", args.messages.into()),
            ],
        ),
        ..Report::default()
    })
}
