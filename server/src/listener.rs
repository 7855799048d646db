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
//! (accepted, not yet upgraded): one more is closed as soon as it is accepted. A
//! connection leaves the count when it closes or when its WebSocket upgrade completes.
//!
//! The router sees the peer address as `ConnectInfo<SocketAddr>`, as with
//! `into_make_service_with_connect_info`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
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
    } = limits;
    let http_phase = Arc::new(Semaphore::new(max_http_connections.max(1)));
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
        // Closed before anything is read: dropping the socket costs nothing more.
        let Ok(permit) = Arc::clone(&http_phase).try_acquire_owned() else {
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
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            let mut router = router.clone();
            async move { router.call(request.map(Body::new)).await }
        });
        let stop = stop.clone();
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
            };
            // The HTTP phase is over: closed, or upgraded (the socket now belongs to
            // the WebSocket session and its own budgets).
            drop(permit);
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
