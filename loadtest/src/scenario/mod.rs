//! The scenarios, and the connect phase they share.

pub mod broadcast;
pub mod connections;
pub mod push;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::client::{run_session, Counters, Handler, SessionOptions, Target};
use crate::setup::Setup;

/// Descriptors kept free for everything that is not a client socket.
pub const FD_RESERVE: u64 = 256;

/// Client sockets one process can hold under its descriptor limit.
pub fn per_process_capacity() -> u64 {
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    soft.saturating_sub(FD_RESERVE).max(1)
}

/// Fails clearly when `n` sockets do not fit in this process.
pub fn check_capacity(n: u64) -> anyhow::Result<()> {
    let cap = per_process_capacity();
    if n > cap {
        anyhow::bail!(
            "{n} connections do not fit under this process's descriptor limit (room for {cap}); \
             use fewer, or the `connections` scenario, which spreads over worker processes"
        );
    }
    Ok(())
}

/// Starts `n` sessions paced at `rate` per second (0 = unpaced) with at most
/// `in_flight` handshakes at a time, and waits until each one is connected or failed.
#[allow(clippy::too_many_arguments)]
pub async fn start_sessions<H: Handler>(
    handler: Arc<H>,
    counters: Arc<Counters>,
    targets: Arc<Vec<Target>>,
    sources: Arc<Vec<IpAddr>>,
    first: usize,
    n: usize,
    rate: f64,
    in_flight: u64,
    options: Arc<SessionOptions>,
) -> Vec<JoinHandle<()>> {
    let mut sessions = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        // Too many handshakes pending: wait for some to finish.
        while (i as u64)
            .saturating_sub(counters.ready.load(Ordering::Relaxed))
            .saturating_sub(counters.failed.load(Ordering::Relaxed))
            >= in_flight.max(1)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let idx = first + i;
        let (h, c, t, s, o) = (
            Arc::clone(&handler),
            Arc::clone(&counters),
            Arc::clone(&targets),
            Arc::clone(&sources),
            Arc::clone(&options),
        );
        sessions.push(tokio::spawn(async move {
            let source = (!s.is_empty()).then(|| s[idx % s.len()]);
            run_session(&*h, &c, &t, source, idx, &o).await;
        }));
    }
    sessions
}

/// Connections per source address when `--sources` is 0.
const PER_SOURCE: u64 = 1_000;
/// Most source addresses chosen automatically.
const MAX_AUTO_SOURCES: u64 = 250;

/// The source addresses for `n` connections (see `--sources`).
pub fn source_addresses(setup: &Setup, n: u64) -> Vec<IpAddr> {
    let k = match setup.sources {
        0 if n > PER_SOURCE => n.div_ceil(PER_SOURCE).min(MAX_AUTO_SOURCES) as u32,
        k => k,
    };
    let base = u32::from(setup.source_base);
    (0..k)
        .map(|i| IpAddr::V4(std::net::Ipv4Addr::from(base + i)))
        .collect()
}

/// The connect phase of `push`, `chaos` and `broadcast`: `n` resilient sessions, with a
/// progress bar, returned once all are connected or failed (or after a generous timeout).
pub async fn connect_all<H: Handler>(
    handler: Arc<H>,
    counters: Arc<Counters>,
    setup: &Setup,
    n: usize,
    rate: f64,
    options: Arc<SessionOptions>,
) -> Vec<JoinHandle<()>> {
    let bar = crate::progress::bar("connecting", n as u64);
    let targets = Arc::new(setup.targets.clone());
    let c = Arc::clone(&counters);
    let starter = tokio::spawn(start_sessions(
        handler,
        c,
        targets,
        Arc::new(source_addresses(setup, n as u64)),
        0,
        n,
        rate,
        512,
        options,
    ));
    let expected = if rate > 0.0 { n as f64 / rate } else { 0.0 };
    let deadline = Instant::now() + Duration::from_secs_f64(expected * 3.0 + 60.0);
    loop {
        let done = counters.ready.load(Ordering::Relaxed) + counters.failed.load(Ordering::Relaxed);
        bar.set_position(done);
        if done >= n as u64 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bar.finish_and_clear();
    starter.await.unwrap_or_default()
}

/// The `settings` block of a report.
pub fn settings(
    setup: &Setup,
    extra: &[(&str, serde_json::Value)],
) -> BTreeMap<String, serde_json::Value> {
    let mut s = BTreeMap::new();
    s.insert(
        "urls".into(),
        setup
            .targets
            .iter()
            .map(|t| t.url.clone())
            .collect::<Vec<_>>()
            .into(),
    );
    s.insert("apis".into(), setup.apis.clone().into());
    s.insert("spawned_cluster".into(), setup.cluster.is_some().into());
    for (k, v) in extra {
        s.insert((*k).into(), v.clone());
    }
    s
}
