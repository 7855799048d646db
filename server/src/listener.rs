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
//! request first), as the pending-handshake budget does for WebSockets: so sockets that
//! sit there silently, or never read their answers, cannot lock real clients out, while
//! the node's file descriptors stay bounded. Only when every connection is younger than
//! that is the newcomer itself closed. A connection leaves the count when it closes or
//! when its WebSocket upgrade completes.
//!
//! The router sees the peer address as `ConnectInfo<SocketAddr>`, as with
//! `into_make_service_with_connect_info`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

/// The bounds of the HTTP phase of a connection.
pub struct Limits {
    /// A request head must be complete within it (and keep-alive idles end with it).
    pub header_read_timeout: Duration,
    /// SO_SNDBUF of each accepted socket; 0 keeps the OS default.
    pub send_buffer: usize,
    /// Connections in their HTTP phase at once (at least 1).
    pub max_http_connections: usize,
    /// Counts the connections closed at accept for that bound.
    pub refused: Counter,
    /// Counts the connections closed to make room for a newcomer.
    pub evicted: Counter,
}

/// How long a connection is safe from eviction: an honest client sends its request
/// within a round trip of connecting.
pub const MIN_AGE: Duration = Duration::from_secs(1);

/// One connection in its HTTP phase.
struct Tracked {
    since: Instant,
    /// It sent a request (a silent one is evicted first).
    requested: AtomicBool,
    /// Closed, upgraded or evicted: no longer counted.
    done: AtomicBool,
    /// Cancelled to evict it.
    evict: CancellationToken,
}

/// The connections in their HTTP phase, oldest first, and how many are alive.
struct HttpPhase {
    max: usize,
    state: Mutex<PhaseState>,
}

#[derive(Default)]
struct PhaseState {
    alive: usize,
    /// Accept order. Finished entries are dropped from the front, and all of them at
    /// once when the queue is twice `max` long, so it stays O(max).
    queue: VecDeque<Arc<Tracked>>,
}

impl HttpPhase {
    fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PhaseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection accepted at `now`, evicting the oldest one old enough if the
    /// phase is full. `None`: full of young connections, refuse the newcomer. The
    /// second value says whether one was evicted.
    fn admit(&self, now: Instant) -> (Option<Arc<Tracked>>, bool) {
        let mut state = self.lock();
        while state
            .queue
            .front()
            .is_some_and(|t| t.done.load(Ordering::Acquire))
        {
            state.queue.pop_front();
        }
        if state.queue.len() >= 2 * self.max {
            state.queue.retain(|t| !t.done.load(Ordering::Acquire));
        }
        let mut evicted = false;
        if state.alive >= self.max {
            let old = |t: &&Arc<Tracked>| {
                !t.done.load(Ordering::Acquire) && now.saturating_duration_since(t.since) >= MIN_AGE
            };
            let victim = state
                .queue
                .iter()
                .filter(old)
                .find(|t| !t.requested.load(Ordering::Acquire))
                .or_else(|| state.queue.iter().find(old))
                .cloned();
            let Some(victim) = victim else {
                return (None, false);
            };
            if !victim.done.swap(true, Ordering::AcqRel) {
                state.alive -= 1;
            }
            victim.evict.cancel();
            evicted = true;
        }
        let tracked = Arc::new(Tracked {
            since: now,
            requested: AtomicBool::new(false),
            done: AtomicBool::new(false),
            evict: CancellationToken::new(),
        });
        state.queue.push_back(Arc::clone(&tracked));
        state.alive += 1;
        (Some(tracked), evicted)
    }

    /// The connection's HTTP phase is over (once; an evicted one was already counted).
    fn finish(&self, tracked: &Tracked) {
        if !tracked.done.swap(true, Ordering::AcqRel) {
            self.lock().alive -= 1;
        }
    }
}

/// Serves `app` on `listener` until `stop` is cancelled; then stops accepting, lets
/// each connection finish its request in flight and returns once all have closed.
/// Upgraded WebSockets are not waited for: they are no longer HTTP connections (the
/// node drains them itself).
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, stop: CancellationToken) {
    let Limits {
        header_read_timeout,
        send_buffer,
        max_http_connections,
        refused,
        evicted,
    } = limits;
    let http_phase = Arc::new(HttpPhase::new(max_http_connections));
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
        // Closed before anything is read: dropping the socket costs nothing more.
        let Some(tracked) = admitted else {
            refused.inc();
            tracing::debug!(%peer, "http connection refused: HERALD_MAX_HTTP_CONNECTIONS reached");
            drop(stream);
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
        connections.spawn(async move {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
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
        assert_eq!(phase.lock().alive, 2);
        let (f, evicted) = phase.admit(t0 + MIN_AGE);
        assert!(f.is_some() && !evicted);
        for _ in 0..100 {
            let (t, _) = phase.admit(t0 + MIN_AGE * 3);
            phase.finish(&t.expect("room after the finish"));
        }
        assert!(phase.lock().queue.len() <= 2 * 3, "bounded");
    }
}
