//! `push` and `chaos`: U users, one connection each, spread over the nodes; publishers
//! push to random users through random nodes' HTTP API. Every message carries its send
//! time and a per-user sequence number; accounting is by offset (see [`crate::ledger`]).
//! `chaos` is the same run with node actions on a timeline: clients reconnect with
//! jitter and resume from their last offset, and nothing may be lost or duplicated.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_protocol::frame::Welcome;
use herald_protocol::StreamPosition;
use rand::Rng;
use serde_json::value::RawValue;

use crate::actions::{self, Action};
use crate::cli::PushArgs;
use crate::client::{now_us, Counters, Handler, Payload, SessionOptions};
use crate::latency::{Latency, Percentiles};
use crate::ledger::{AcceptedByEpoch, Seen, Totals};
use crate::publish::{self, Published, Publisher};
use crate::report::{ReconnectStats, Report};
use crate::scenario::{connect_all, settings};
use crate::setup::Setup;
use crate::token::Signer;

/// One user's book: what the API accepted for `user:<name>` and what its connection saw.
#[derive(Default)]
struct Book {
    seen: Seen,
    accepted: AcceptedByEpoch,
}

/// The shared state of a push run; the connection tasks write into it.
struct PushState {
    users: Vec<String>,
    books: Vec<Mutex<Book>>,
    seq: Vec<AtomicU64>,
    signer: Signer,
    latency: Latency,
    /// New (non-duplicate) deliveries, for progress.
    delivered: AtomicU64,
    last_delivery_us: AtomicU64,
}

impl Handler for PushState {
    fn token(&self, idx: usize) -> String {
        self.signer.token(&self.users[idx], &[])
    }

    fn resume(&self, idx: usize) -> BTreeMap<String, StreamPosition> {
        let book = self.books[idx].lock().expect("book lock");
        let mut resume = BTreeMap::new();
        if book.seen.welcomed {
            resume.insert(
                format!("user:{}", self.users[idx]),
                StreamPosition::new(book.seen.last, book.seen.epoch.clone()),
            );
        }
        resume
    }

    fn welcome(&self, idx: usize, welcome: &Welcome, _outage: Option<Duration>) {
        let channel = format!("user:{}", self.users[idx]);
        if let Some(sub) = welcome.subscriptions.get(&channel) {
            let mut book = self.books[idx].lock().expect("book lock");
            book.seen.welcome(sub.offset, &sub.epoch, sub.recovered);
        }
    }

    fn message(&self, idx: usize, _channel: &str, offset: u64, epoch: &str, data: &RawValue) {
        let now = now_us();
        if let Ok(p) = serde_json::from_str::<Payload>(data.get()) {
            self.latency.record(idx, now.saturating_sub(p.t));
        }
        let new = self.books[idx]
            .lock()
            .expect("book lock")
            .seen
            .deliver(offset, epoch);
        if new {
            self.delivered.fetch_add(1, Ordering::Relaxed);
            self.last_delivery_us.fetch_max(now, Ordering::Relaxed);
        }
    }

    fn resync(&self, idx: usize, _channel: &str, offset: u64, epoch: &str) {
        self.books[idx]
            .lock()
            .expect("book lock")
            .seen
            .resync(offset, epoch);
    }
}

impl PushState {
    fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for book in &self.books {
            let b = book.lock().expect("book lock");
            t.add(&b.seen, &b.accepted);
        }
        t
    }
}

/// Runs `push` (no actions) or `chaos` (with actions).
pub async fn run(args: &PushArgs, actions: Vec<Action>, scenario: &str) -> anyhow::Result<Report> {
    let links = actions
        .iter()
        .any(|a| matches!(a.step, actions::Step::Net { .. }));
    let setup = Setup::with_links(&args.common, links).await?;
    let action_target = Arc::new(actions::Target {
        cluster: setup.cluster.clone(),
        nodes: setup.nodes.clone(),
    });
    action_target.check(&actions)?;
    let n = args.users as usize;
    crate::scenario::check_capacity(n as u64)?;
    let state = Arc::new(PushState {
        users: (0..n).map(|i| format!("{}-u{i}", setup.run)).collect(),
        books: (0..n).map(|_| Mutex::default()).collect(),
        seq: (0..n).map(|_| AtomicU64::new(0)).collect(),
        signer: Signer::new(&setup.jwt_secret),
        latency: Latency::default(),
        delivered: AtomicU64::new(0),
        last_delivery_us: AtomicU64::new(0),
    });
    let counters = Arc::new(Counters::default());
    let options = Arc::new(SessionOptions {
        reconnect: true,
        start: Instant::now(),
        ack: args.ack.then_some(Duration::from_millis(100)),
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
    let ready: Vec<usize> = (0..n)
        .filter(|&i| state.books[i].lock().expect("book lock").seen.welcomed)
        .collect();
    if ready.is_empty() {
        anyhow::bail!(
            "no user could connect: {:?}",
            counters.errors.lock().expect("errors")
        );
    }

    // Publish for --duration, with the actions on the same clock.
    let publisher = Arc::new(Publisher::new(&setup.apis, &setup.api_key)?);
    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(ready);
    let duration = Duration::from_secs_f64(args.common.duration);
    let pids: Vec<u32> = setup.nodes.iter().filter_map(|n| n.pid).collect();
    let cpu_before = crate::nodes::total_cpu_seconds(&pids);
    let own_before = crate::nodes::cpu_seconds(std::process::id());
    let redis_cpu = crate::redis_cpu::RedisCpu::start_async(&setup.redis_info).await;
    let start = Instant::now();
    let start_us = now_us();
    let action_task = tokio::spawn(actions::run_all(Arc::clone(&action_target), actions, start));
    let publishers = args.publishers.max(1);
    let batch = args.batch.clamp(1, 1000);
    // Each tick of a publisher sends one request of `batch` messages.
    let period =
        (args.rate > 0.0).then(|| Duration::from_secs_f64((publishers * batch) as f64 / args.rate));
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let (state, publisher, sent, errors, first_error, stop, ready) = (
            Arc::clone(&state),
            Arc::clone(&publisher),
            Arc::clone(&sent),
            Arc::clone(&errors),
            Arc::clone(&first_error),
            Arc::clone(&stop),
            Arc::clone(&ready),
        );
        tasks.push(tokio::spawn(async move {
            let mut tick = period.map(|d| {
                // Publishers start spread over one period, not all at once.
                let offset = d.mul_f64(p as f64 / publishers as f64);
                let mut i = tokio::time::interval_at((Instant::now() + offset).into(), d);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                i
            });
            while !stop.load(Ordering::Relaxed) {
                if let Some(i) = tick.as_mut() {
                    i.tick().await;
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                let (users, node): (Vec<usize>, usize) = {
                    let mut rng = rand::rng();
                    (
                        (0..batch)
                            .map(|_| ready[rng.random_range(0..ready.len())])
                            .collect(),
                        rng.random_range(0..publisher.nodes()),
                    )
                };
                let bodies: Vec<String> = users
                    .iter()
                    .map(|&user| {
                        let seq = state.seq[user].fetch_add(1, Ordering::Relaxed) + 1;
                        publish::to_user(&state.users[user], &Payload::json(now_us(), seq))
                    })
                    .collect();
                let outcomes: Vec<Result<Published, String>> = if batch == 1 {
                    vec![publisher
                        .publish(node, bodies.into_iter().next().expect("one body"))
                        .await
                        .map_err(|e| format!("{e:#}"))]
                } else {
                    match publisher.publish_batch(node, &bodies).await {
                        Ok(results) => results,
                        Err(e) => vec![Err(format!("{e:#}")); batch],
                    }
                };
                for (&user, outcome) in users.iter().zip(outcomes) {
                    match outcome {
                        Ok(published) => {
                            state.books[user]
                                .lock()
                                .expect("book lock")
                                .accepted
                                .entry(published.epoch)
                                .or_default()
                                .insert(published.offset);
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            first_error.lock().expect("error lock").get_or_insert(e);
                        }
                    }
                }
            }
        }));
    }
    let bar = crate::progress::timer("publishing", duration);
    while start.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(200)).await;
        bar.set_position(start.elapsed().as_millis() as u64);
        bar.set_message(format!(
            "sent {} delivered {} errors {} open {} reconnects {}",
            sent.load(Ordering::Relaxed),
            state.delivered.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed),
            counters.open.load(Ordering::Relaxed),
            counters.reconnects.load(Ordering::Relaxed),
        ));
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let publish_s = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let action_logs = action_task.await.unwrap_or_default();

    // Drain: wait until every accepted offset reached its connection, or time out.
    let drain_deadline = Instant::now() + Duration::from_secs_f64(args.drain);
    let mut totals = state.totals();
    while totals.lost > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        totals = state.totals();
    }
    let node_cpu_s = match (cpu_before, crate::nodes::total_cpu_seconds(&pids)) {
        (Some(b), Some(a)) if !pids.is_empty() && a > b => Some(a - b),
        _ => None,
    };
    let redis_servers = redis_cpu.finish_async().await.unwrap_or_default();
    for s in &sessions {
        s.abort();
    }

    let last = state.last_delivery_us.load(Ordering::Relaxed);
    let window = if last > start_us {
        ((last - start_us) as f64 / 1e6).max(publish_s)
    } else {
        publish_s
    };
    let mut report = Report {
        scenario: scenario.into(),
        connections: counters.ready.load(Ordering::Relaxed),
        sent: sent.load(Ordering::Relaxed),
        delivered: totals.delivered,
        lost: totals.lost,
        duplicates: totals.duplicates,
        reordered: totals.reordered,
        throughput_per_s: totals.delivered as f64 / window,
        latency_ms: Percentiles::of(&state.latency.merged()),
        duration_s: window,
        resyncs: totals.resyncs,
        not_recovered: totals.not_recovered,
        resynced_away: totals.resynced_away,
        unacknowledged: totals.unacknowledged,
        publish_errors: errors.load(Ordering::Relaxed),
        connect_failures: counters.failed.load(Ordering::Relaxed),
        disconnects: counters.disconnects.load(Ordering::Relaxed),
        reconnects: counters.reconnects.load(Ordering::Relaxed),
        reconnect: Some(ReconnectStats {
            time_ms: Percentiles::of(&counters.outage.merged()),
            peak_per_s: counters.reconnect_peak(),
        }),
        actions: action_logs,
        node_cpu_s,
        generator_cpu_s: own_before
            .zip(crate::nodes::cpu_seconds(std::process::id()))
            .map(|(b, a)| a - b),
        deliveries_per_node_cpu_s: node_cpu_s.map(|c| totals.delivered as f64 / c),
        redis_cpu_s: (!redis_servers.is_empty())
            .then(|| crate::redis_cpu::totals(&redis_servers, sent.load(Ordering::Relaxed)).0),
        redis_cpu_us_per_message: crate::redis_cpu::totals(
            &redis_servers,
            sent.load(Ordering::Relaxed),
        )
        .1
        .filter(|_| !redis_servers.is_empty()),
        redis_cpu_per_server: redis_servers,
        errors: counters.errors.lock().expect("errors").clone(),
        settings: settings(
            &setup,
            &[
                ("users", args.users.into()),
                ("rate", args.rate.into()),
                ("publishers", publishers.into()),
                ("batch", batch.into()),
            ],
        ),
        ..Report::default()
    };
    if let Some(e) = first_error.lock().expect("error lock").take() {
        report
            .errors
            .insert(format!("publish: {e}"), report.publish_errors);
    }
    Ok(report)
}
