//! Accepting TCP connections and serving HTTP/1.1 (and the WebSocket upgrade) on them.
//!
//! This replaces `axum::serve` for one reason: `axum::serve` builds hyper's connection
//! without a timer, so hyper's header read timeout never runs, and a client that opens
//! a connection and sends a request head slowly, partly or not at all (slowloris) holds a
//! socket, a task and a file descriptor forever. Here each connection is served by
//! hyper's HTTP/1 builder with a timer and `header_read_timeout`
//! ([`Config::header_read_timeout_ms`](crate::config::Config::header_read_timeout_ms)):
//! a request head (the upgrade request included) must be complete within it, or the
//! connection is closed. The same timeout closes keep-alive connections that stay idle
//! between requests. Once upgraded, a WebSocket is the session's business (`hello`
//! timeout, heartbeat).
//!
//! Each accepted socket also gets a bounded kernel send buffer
//! ([`Config::tcp_send_buffer`](crate::config::Config::tcp_send_buffer)): with Linux'
//! autotuning a client that stops reading could otherwise pin up to 4 MiB of kernel
//! memory before the node even notices it is slow.
//!
//! At most [`Limits::max_http_connections`] connections are in their HTTP phase at once
//! (accepted, not yet upgraded; see [`HttpPhase`]). When they are all taken, a newcomer
//! closes the oldest one that has been there for [`MIN_AGE`] (one that never sent a
//! request first), with the queue of the pending-handshake budget for WebSockets: so sockets that
//! sit there silently, or never read their answers, cannot lock real clients out, while
//! the node's file descriptors stay bounded. Only when every connection is younger than
//! that is the newcomer itself closed. A connection leaves the count when it closes or
//! when its WebSocket upgrade completes.
//!
//! The first request head is read before hyper, bounded in bytes (see [`head`]).
//!
//! The router sees the peer address as `ConnectInfo<SocketAddr>`, as with
//! `into_make_service_with_connect_info`.

pub mod busy;
pub mod head;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::limits::{Busy, PendingAdmit, PendingQueue};

use busy::{Answerer, BusyAnswers};

/// The bounds of the HTTP phase of a connection.
pub struct Limits {
    /// A request head must be complete within it (and keep-alive idles end with it).
    pub header_read_timeout: Duration,
    /// The most bytes of a request head (at least hyper's minimum buffer, 8,192).
    pub max_request_head: usize,
    /// SO_SNDBUF of each accepted socket; 0 keeps the OS default.
    pub send_buffer: usize,
    /// Connections in their HTTP phase at once (at least 1).
    pub max_http_connections: usize,
    /// Counts the connections closed at accept for that bound.
    pub refused: Counter,
    /// Counts the connections closed to make room for a newcomer.
    pub evicted: Counter,
    /// The `after_ms` of busy answers, shared with the node.
    pub busy: Arc<Busy>,
    /// Counts the evicted connections closed unanswered because no busy answer was
    /// free in time.
    pub dropped: Counter,
    /// Counts the busy answers sent.
    pub busy_answers: Counter,
}

/// How long a connection is safe from eviction: an honest client sends its request
/// within a round trip of connecting.
pub const MIN_AGE: Duration = Duration::from_secs(1);

/// hyper refuses a smaller `max_buf_size` (it panics).
const MIN_HYPER_BUFFER: usize = 8_192;

/// One connection in its HTTP phase.
struct Tracked {
    /// Its number in the phase's queue.
    seq: AtomicU64,
    /// It sent a request (a silent one is evicted first).
    requested: AtomicBool,
    /// Cancelled to evict it.
    evict: CancellationToken,
}

/// The connections in their HTTP phase: the pending-handshake budget's queue
/// ([`PendingQueue`]), preferring silent connections when it evicts.
struct HttpPhase {
    queue: Mutex<PendingQueue<Arc<Tracked>>>,
}

impl HttpPhase {
    fn new(max: usize) -> Self {
        Self {
            queue: Mutex::new(PendingQueue::new(max.max(1), MIN_AGE)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PendingQueue<Arc<Tracked>>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection accepted at `now`, evicting the oldest one old enough if the
    /// phase is full. `None`: full of young connections, refuse the newcomer. The
    /// second value says whether one was evicted.
    fn admit(&self, now: Instant) -> (Option<Arc<Tracked>>, bool) {
        let tracked = Arc::new(Tracked {
            seq: AtomicU64::new(0),
            requested: AtomicBool::new(false),
            evict: CancellationToken::new(),
        });
        let mut queue = self.lock();
        let silent = |t: &Arc<Tracked>| !t.requested.load(Ordering::Acquire);
        let (seq, evicted) = match queue.admit_preferring(now, Arc::clone(&tracked), silent) {
            PendingAdmit::Admitted(seq) => (seq, false),
            PendingAdmit::Evicted(seq, victim) => {
                victim.evict.cancel();
                (seq, true)
            }
            PendingAdmit::Refused => return (None, false),
        };
        // Under the lock, before anyone else holds `tracked`.
        tracked.seq.store(seq, Ordering::Relaxed);
        (Some(tracked), evicted)
    }

    /// The connection's HTTP phase is over (a no-op for an evicted one).
    fn finish(&self, tracked: &Tracked) {
        self.lock().remove(tracked.seq.load(Ordering::Relaxed));
    }
}

/// Serves `app` on `listener` until `stop` is cancelled; then stops accepting, lets
/// each connection finish its request in flight and returns once all have closed.
/// Upgraded WebSockets are not waited for: they are no longer HTTP connections (the
/// node drains them itself).
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, stop: CancellationToken) {
    let Limits {
        header_read_timeout,
        max_request_head,
        send_buffer,
        max_http_connections,
        refused,
        evicted,
        busy,
        dropped,
        busy_answers: answered,
    } = limits;
    let http_phase = Arc::new(HttpPhase::new(max_http_connections));
    let answerer = Answerer {
        answers: Arc::new(BusyAnswers::default()),
        busy,
        answered,
        max_head: max_request_head,
    };
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                accept_error(e).await;
                continue;
            }
        };
        let (admitted, evicted_one) = http_phase.admit(Instant::now());
        if evicted_one {
            evicted.inc();
        }
        // No room: told when to come back (see [`busy`]), or, when even those answers
        // are all taken, closed unread.
        let Some(tracked) = admitted else {
            refused.inc();
            tracing::debug!(%peer, "http connection refused: HERALD_MAX_HTTP_CONNECTIONS reached");
            let slot = tokio::select! {
                _ = stop.cancelled() => break,
                slot = answerer.slot() => slot,
            };
            answerer.spawn(slot, stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        if send_buffer > 0 {
            if let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(send_buffer) {
                tracing::debug!(%peer, error = %e, "could not set the send buffer");
            }
        }
        let router = app.clone();
        let requested = Arc::clone(&tracked);
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            requested.requested.store(true, Ordering::Release);
            request.extensions_mut().insert(ConnectInfo(peer));
            let mut router = router.clone();
            async move { router.call(request.map(Body::new)).await }
        });
        let stop = stop.clone();
        let phase = Arc::clone(&http_phase);
        let answerer = answerer.clone();
        let dropped = dropped.clone();
        connections.spawn(async move {
            let mut stream = stream;
            // The first head, bounded in bytes and in time. Stopped, the connection
            // just closes. Evicted before its head is complete (a newcomer needed the
            // place), it is answered busy if a busy answer is free: it may be an honest
            // client whose head was lost and is being sent again, or a node too loaded
            // to read it within a second. The busy answer waits at most 2 s for the
            // head, so a silent socket still goes soon.
            let mut read = Vec::new();
            let first = tokio::select! {
                head = tokio::time::timeout(
                    header_read_timeout,
                    head::read_into(&mut stream, &mut read, max_request_head),
                ) => head.ok(),
                _ = stop.cancelled() => None,
                () = tracked.evict.cancelled() => {
                    phase.finish(&tracked);
                    if !answerer.answer_here(stream, read).await {
                        dropped.inc();
                    }
                    return;
                }
            };
            let Some(head::Head::Complete(first)) = first else {
                phase.finish(&tracked);
                return;
            };
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_buf_size(max_request_head.max(MIN_HYPER_BUFFER));
            let connection = builder
                .serve_connection(TokioIo::new(head::Prefixed::new(first, stream)), service)
                .with_upgrades();
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
                // Evicted for a newcomer: the socket closes when the connection drops.
                () = tracked.evict.cancelled() => Ok(()),
            };
            // The HTTP phase is over: closed, evicted, or upgraded (the socket now
            // belongs to the WebSocket session and its own budgets).
            phase.finish(&tracked);
            if let Err(e) = result {
                // Timeouts, resets and malformed requests: the client's doing, not ours.
                tracing::debug!(%peer, error = %e, "http connection ended");
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// After a failed `accept`: errors of one connection are ignored; anything else
/// (usually running out of file descriptors) pauses accepting briefly instead of
/// spinning, as `axum::serve` does.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(error = %e, "accept failed; pausing for 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full of young connections: the newcomer is refused. Once they are `MIN_AGE`
    /// old, a newcomer evicts the oldest silent one first, then the oldest of any kind;
    /// finished connections free their place; the queue stays bounded.
    #[test]
    fn the_http_phase_evicts_the_oldest_silent_connection() {
        let phase = HttpPhase::new(3);
        let t0 = Instant::now();
        let a = phase.admit(t0).0.expect("room");
        let b = phase.admit(t0).0.expect("room");
        let c = phase.admit(t0).0.expect("room");
        b.requested.store(true, Ordering::Release);
        assert!(
            phase.admit(t0 + MIN_AGE / 2).0.is_none(),
            "all young: refused"
        );
        // a is the oldest silent one.
        a.requested.store(true, Ordering::Release);
        let (d, evicted) = phase.admit(t0 + MIN_AGE);
        assert!(evicted && d.is_some());
        assert!(
            c.evict.is_cancelled(),
            "the oldest silent one (a and b sent requests)"
        );
        assert!(!a.evict.is_cancelled() && !b.evict.is_cancelled());
        // Everyone left sent a request or is young: the oldest old one goes.
        let d = d.unwrap();
        d.requested.store(true, Ordering::Release);
        let (_e, evicted) = phase.admit(t0 + MIN_AGE);
        assert!(evicted && a.evict.is_cancelled());
        // A connection that ends frees its place (its eviction counted once).
        phase.finish(&c);
        phase.finish(&a);
        phase.finish(&b);
        assert_eq!(phase.lock().len(), 2);
        let (f, evicted) = phase.admit(t0 + MIN_AGE);
        assert!(f.is_some() && !evicted);
        for _ in 0..100 {
            let (t, _) = phase.admit(t0 + MIN_AGE * 3);
            phase.finish(&t.expect("room after the finish"));
        }
        assert!(phase.lock().len() <= 2 * 3, "bounded");
    }
}
