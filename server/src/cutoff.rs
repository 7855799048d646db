//! A node cut off from the broker moves its clients to a peer that is ready.
//!
//! While Redis cannot be reached the node delivers nothing: its clients would sit on an
//! open socket that stays silent until the partition heals. So once the broker has
//! been unhealthy (`/readyz` 503) for `HERALD_CUTOFF_MOVE_AFTER_MS`, the node asks its
//! peers whether one of them is ready, and if one is, every local session gets
//! `{"type":"reconnect","reason":"unavailable","after_ms":N}` (N random below
//! `HERALD_CUTOFF_MOVE_SPREAD_MS`, so the peers are not hit at once) and close 4503;
//! the clients resume on another node from history. Sessions that arrive while the
//! node stays cut off are moved the same way at the next check.
//!
//! The node cannot ask Redis who is alive, so it remembers the peers of the registry
//! while it is healthy and asks their `/readyz` over HTTP directly (at the address
//! derived from each peer's public URL). When no peer answers 200 (every node lost
//! Redis, or the peers are unreachable too), nobody moves: moving would only start a
//! reconnect storm towards nodes that cannot serve either. A short loss that heals
//! within the grace (a reset connection reconnects in a few hundred ms) moves nobody.
//!
//! A peer counts only if it has been ready (its `ready_for_ms`) since before this node
//! lost Redis, or for [`PEER_STABLE`] at least. So when Redis comes back for everybody,
//! the node that happens to recover a moment after its peer does not move its clients
//! there: it recovers itself well within that time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_protocol::codes::CloseCode;
use tokio_util::sync::CancellationToken;

use crate::backend::health::Health;
use crate::backend::nodes::NodeRegistry;
use crate::mailbox::CloseReason;
use crate::users::Users;

/// How often the broker's health is looked at.
const TICK: Duration = Duration::from_millis(100);
/// How often the list of peers is read from the registry while the node is healthy.
const PEERS_EVERY: Duration = Duration::from_secs(2);
/// How long a peer's `/readyz` may take to answer.
const PEER_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a peer's answer counts, while the node stays cut off.
const PEER_CHECK_EVERY: Duration = Duration::from_secs(1);

/// A peer ready for this long counts, however long this node has been cut off.
pub const PEER_STABLE: Duration = Duration::from_secs(2);

/// Since when the broker has been healthy, as the watcher saw it (every [`TICK`]).
#[derive(Debug)]
pub struct Readiness {
    start: Instant,
    /// Milliseconds after `start` when the broker turned healthy, plus one; 0: not
    /// healthy (or not watched).
    since: AtomicU64,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            since: AtomicU64::new(0),
        }
    }
}

impl Readiness {
    /// How long the broker has been healthy; `None` when it is not.
    pub fn healthy_for(&self) -> Option<Duration> {
        let since = self.since.load(Ordering::Acquire).checked_sub(1)?;
        Some(
            self.start
                .elapsed()
                .saturating_sub(Duration::from_millis(since)),
        )
    }

    fn set(&self, healthy: bool) {
        if !healthy {
            self.since.store(0, Ordering::Release);
        } else if self.since.load(Ordering::Acquire) == 0 {
            let now = self.start.elapsed().as_millis() as u64;
            self.since.store(now + 1, Ordering::Release);
        }
    }
}

/// What the watcher needs of its node.
pub struct Watch {
    /// This node's id (left out of the peers).
    pub node_id: String,
    /// The broker's health.
    pub health: Arc<dyn Health>,
    /// Where the peers are, read while the broker is healthy.
    pub registry: Arc<dyn NodeRegistry>,
    /// The sessions to move.
    pub users: Arc<Users>,
    /// Where the watcher records since when the broker is healthy.
    pub readiness: Arc<Readiness>,
    /// How long the broker must have been unhealthy before clients move; zero: never.
    pub after: Duration,
}

/// `/readyz` of a node whose public WebSocket URL is `url` (`ws://h:p/ws` →
/// `http://h:p/readyz`; `wss` → `https`). `None` for a URL that is not ws(s).
pub fn readyz_url(url: &str) -> Option<String> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("wss://") {
        ("https", rest)
    } else {
        ("http", url.strip_prefix("ws://")?)
    };
    let base = rest
        .strip_suffix("/ws")
        .unwrap_or(rest)
        .trim_end_matches('/');
    let authority = base.split('/').next().unwrap_or("");
    if authority.is_empty() {
        return None;
    }
    Some(format!("{scheme}://{base}/readyz"))
}

/// Whether a peer's `/readyz` answer counts, with this node cut off for `cut_off`: 200,
/// and ready since before the cut (or for [`PEER_STABLE`]). A peer that does not say
/// how long (an older version) counts.
fn counts(status: u16, ready_for_ms: Option<u64>, cut_off: Duration) -> bool {
    let needed = cut_off.min(PEER_STABLE).as_millis() as u64;
    status == 200 && ready_for_ms.is_none_or(|ms| ms >= needed)
}

/// Whether any of `peers` (their `/readyz` URLs) counts, asked within [`PEER_TIMEOUT`].
async fn any_ready(http: &reqwest::Client, peers: &[String], cut_off: Duration) -> bool {
    let asks = peers.iter().map(|url| async move {
        let Ok(r) = http.get(url).send().await else {
            return false;
        };
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        counts(status, body["ready_for_ms"].as_u64(), cut_off)
    });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .any(|ready| ready)
}

/// Watches the broker until `stop`; see the module doc.
pub async fn run(watch: Watch, stop: CancellationToken) {
    let http = match reqwest::Client::builder()
        .timeout(PEER_TIMEOUT)
        .connect_timeout(PEER_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "no HTTP client to ask peers; clients will not be moved");
            return;
        }
    };
    let mut peers: Vec<String> = Vec::new();
    let mut peers_read: Option<Instant> = None;
    let mut unhealthy_since: Option<Instant> = None;
    // The last answer of the peers: (when, whether one was ready).
    let mut checked: Option<(Instant, bool)> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        let now = Instant::now();
        let healthy = watch.health.is_healthy();
        watch.readiness.set(healthy);
        if watch.after.is_zero() {
            continue;
        }
        if healthy {
            if unhealthy_since.take().is_some() {
                checked = None;
            }
            if peers_read.is_none_or(|t| now.duration_since(t) >= PEERS_EVERY) {
                let read = tokio::time::timeout(PEER_TIMEOUT, watch.registry.nodes()).await;
                if let Ok(Ok(nodes)) = read {
                    peers = nodes
                        .iter()
                        .filter(|n| n.id != watch.node_id && !n.draining)
                        .filter_map(|n| readyz_url(&n.url))
                        .collect();
                    peers_read = Some(now);
                }
            }
            continue;
        }
        let since = *unhealthy_since.get_or_insert(now);
        if now.duration_since(since) < watch.after || peers.is_empty() {
            continue;
        }
        let ready = match checked {
            Some((at, ready)) if now.duration_since(at) < PEER_CHECK_EVERY => ready,
            _ => {
                let ready = any_ready(&http, &peers, now.duration_since(since)).await;
                if !ready && checked.is_none_or(|(_, was)| was) {
                    tracing::warn!(
                        peers = peers.len(),
                        "cut off from the broker, and no peer is ready: clients stay"
                    );
                }
                checked = Some((Instant::now(), ready));
                ready
            }
        };
        if !ready || watch.health.is_healthy() {
            continue;
        }
        let moved = watch.users.index().for_all(|_, handle| {
            // Sessions already asked to close (by an earlier round) don't count again.
            let fresh = handle.code.load(Ordering::Acquire) == 0;
            handle.close_with(CloseCode::Draining.code(), CloseReason::Unavailable);
            fresh
        });
        if moved > 0 {
            tracing::warn!(
                sessions = moved,
                cut_off_ms = now.duration_since(since).as_millis() as u64,
                "cut off from the broker: moving clients to a ready peer"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_counts_if_it_worked_while_this_node_was_cut_off() {
        let s = Duration::from_secs;
        assert!(counts(200, Some(60_000), s(3)), "ready all along");
        assert!(
            !counts(200, Some(500), s(1)),
            "recovered after this node was cut off"
        );
        assert!(counts(200, Some(2_000), s(30)), "ready for PEER_STABLE");
        assert!(!counts(503, Some(60_000), s(3)));
        assert!(counts(200, None, s(3)), "an older peer");
    }

    #[test]
    fn readiness_counts_from_the_first_healthy_look() {
        let r = Readiness::default();
        assert_eq!(r.healthy_for(), None);
        r.set(true);
        let first = r.healthy_for().unwrap();
        r.set(true);
        assert!(r.healthy_for().unwrap() >= first);
        r.set(false);
        assert_eq!(r.healthy_for(), None);
    }

    #[test]
    fn readyz_from_the_public_url() {
        let r = |u: &str| readyz_url(u);
        assert_eq!(
            r("ws://10.0.0.2:8080/ws").as_deref(),
            Some("http://10.0.0.2:8080/readyz")
        );
        assert_eq!(
            r("wss://node1.example/ws").as_deref(),
            Some("https://node1.example/readyz")
        );
        assert_eq!(
            r("ws://h:1/herald/ws").as_deref(),
            Some("http://h:1/herald/readyz")
        );
        assert_eq!(r("ws://h:1").as_deref(), Some("http://h:1/readyz"));
        assert_eq!(r("http://h:1/ws"), None);
        assert_eq!(r("ws:///ws"), None);
    }
}
