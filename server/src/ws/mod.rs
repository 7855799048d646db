//! `GET /ws`: the WebSocket upgrade, admission and the end of a connection.
//!
//! The module is split by concern: this file takes a connection from the upgrade to
//! its authenticated session and closes it; [`session`] is one session's state and
//! main loop (delivery, recovery, timers, writes); [`commands`] answers the client's
//! commands and the server API's user commands; [`rate`] is the pure command rate limit.
//!
//!
//! One task per connection runs the whole session: it reads commands, drains the
//! session's bounded queue in batches (one flush per batch), sends heartbeats and obeys
//! close requests from the hub (4509) and the node (4503). One task, not a reader and a
//! writer, keeps a connection's memory small; a write that stalls is raced against the
//! close request, so a stuck socket cannot hold the session forever.
//!
//! Per channel the session keeps the last offset it delivered, which makes delivery
//! exact: messages at or below it are dropped (duplicates after a recovery), a message
//! from another epoch or beyond a gap first produces a `resync` (or a repair from
//! history), so the client never sees a silent gap.

mod commands;
mod error;
pub mod frames;
mod rate;
mod session;
mod socket;
mod upgrade;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use herald_protocol::codes::CloseCode;
use herald_protocol::frame::{ClientCommand, Reconnect, ServerFrame};
use herald_protocol::StreamPosition;
use rand::Rng;
use tokio::time::timeout;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, Utf8Bytes};

use crate::clock::now_secs;
use crate::limits::UserLimit;
use crate::mailbox::CloseReason;
use crate::node::{Node, Pending};

use session::Session;
use socket::Socket;

/// How long an authenticated connection may wait to start before it is told `busy`.
pub(super) const START_WAIT: Duration = Duration::from_secs(3);

/// How long a close frame may take to send.
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The upgrade handler: checks the handshake, origin and admission, then runs the
/// session.
pub async fn upgrade(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
) -> Response {
    let on_upgrade = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>();
    let accepted = match upgrade::accept(request.method(), request.headers(), on_upgrade) {
        Ok(accepted) => accepted,
        Err(refused) => return refused.into_response(),
    };
    let origin_ok = origin_allowed(node.config.allowed_origins.as_deref(), request.headers());
    drop(request);
    let admission = node.admit(peer.ip());
    let tracker = node.sessions.clone();
    // The task runs `run`'s future directly: a wrapping `async` block would store the
    // socket twice in every connection's task.
    tokio::spawn(tracker.track_future(run(node, accepted.on_upgrade, admission, origin_ok)));
    accepted.response
}

/// Whether the request's `Origin` is allowed. Without a list every origin is; a request
/// without `Origin` (not a browser) is allowed too, since only browsers send it and a
/// non-browser client could forge any value.
pub(super) fn origin_allowed(allowed: Option<&[String]>, headers: &HeaderMap) -> bool {
    let Some(allowed) = allowed else { return true };
    match headers.get(header::ORIGIN) {
        None => true,
        Some(origin) => {
            let origin = origin.to_str().unwrap_or("");
            allowed
                .iter()
                .any(|a| a.trim().eq_ignore_ascii_case(origin))
        }
    }
}

pub(super) async fn send_text(
    socket: &mut dyn Socket,
    text: impl Into<Utf8Bytes>,
) -> Result<(), tungstenite::Error> {
    socket.send(Message::Text(text.into())).await
}

pub(super) async fn send_reconnect(socket: &mut dyn Socket) -> Result<(), tungstenite::Error> {
    let after_ms = rand::rng().random_range(0..1000);
    send_reconnect_frame(socket, "draining", after_ms).await
}

async fn send_reconnect_frame(
    socket: &mut dyn Socket,
    reason: &str,
    after_ms: u64,
) -> Result<(), tungstenite::Error> {
    let frame = ServerFrame::Reconnect(Reconnect {
        reason: reason.into(),
        after_ms,
    });
    send_text(socket, frame.to_json()).await
}

/// A node with no room for this connection (its pending budget, its connections, or
/// the client's address are full): `reconnect` with reason `busy` and the time to come
/// back, then close 4429. A browser can't read why an upgrade failed, but it can read
/// this.
pub(super) async fn busy(node: &Node, socket: &mut dyn Socket) -> End {
    let after_ms = node.busy.refuse();
    node.metrics.busy_answers.inc();
    let _ = timeout(
        CLOSE_TIMEOUT,
        send_reconnect_frame(socket, "busy", after_ms),
    )
    .await;
    End::Close(CloseCode::TooMany)
}

/// Sends a close frame and waits for the client's answer, both bounded in time.
pub(super) async fn close(socket: &mut dyn Socket, code: CloseCode, reason: CloseReason) {
    let frame = CloseFrame {
        code: code.code().into(),
        reason: reason.text(code).into(),
    };
    let _ = timeout(CLOSE_TIMEOUT, async {
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        // Read (and drop) whatever the client still sends, up to its close answer.
        // Dropping a socket with unread bytes makes the kernel answer with a reset,
        // and a reset can destroy our close frame before the client reads it: a
        // client that flooded us would never learn why it was closed.
        while let Some(Ok(_)) = socket.next().await {}
    })
    .await;
}

/// How a read error ends the session. A frame over the limit closes with 1009; a text
/// frame that is not UTF-8, or a frame that breaks the WebSocket framing rules (reserved
/// opcodes or bits, an unmasked or fragmented control frame, a stray continuation) is
/// not a command at all and closes with 4400, so the client learns it must not retry
/// the same bytes. A bound of the frame meter ([`frames`]) closes with its own code.
/// Anything else (a reset, an EOF) means the client is gone.
pub(super) fn read_error(err: &tungstenite::Error) -> End {
    match err {
        tungstenite::Error::Capacity(_) => End::Close(CloseCode::TooLarge),
        tungstenite::Error::Utf8(_) => End::Close(CloseCode::BadRequest),
        tungstenite::Error::Io(e) => match frames::violation(e) {
            Some(v) => End::Close(v.close_code()),
            None => End::Gone,
        },
        tungstenite::Error::Protocol(p) => {
            use tungstenite::error::ProtocolError as P;
            match p {
                P::NonZeroReservedBits
                | P::UnmaskedFrameFromClient
                | P::FragmentedControlFrame
                | P::ControlFrameTooBig
                | P::UnknownControlFrameType(_)
                | P::UnknownDataFrameType(_)
                | P::UnexpectedContinueFrame
                | P::ExpectedFragment(_)
                | P::InvalidOpcode(_)
                | P::InvalidCloseSequence => End::Close(CloseCode::BadRequest),
                // A reset without a close frame, and the like: the client is gone.
                _ => End::Gone,
            }
        }
        _ => End::Gone,
    }
}

/// How a session ended.
pub(super) enum End {
    /// Close with this code.
    Close(CloseCode),
    /// Close with this code and a reason other than the code's own.
    CloseWith(CloseCode, CloseReason),
    /// The client closed or the connection broke: nothing more to send.
    Gone,
}

/// Reads the first frame, which must be `hello`, within the hello timeout. WebSocket
/// ping and pong frames before it are answered by the library but cost work, so at most
/// `max_control` of them are tolerated (the command rate of one second): more is a
/// flood, closed with 4429.
pub(super) async fn read_hello(
    socket: &mut dyn Socket,
    max_control: u32,
) -> Result<(String, BTreeMap<String, StreamPosition>), End> {
    let mut control = 0u32;
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                return match ClientCommand::parse(&text) {
                    Ok(ClientCommand::Hello { token, resume }) => Ok((token, resume)),
                    _ => Err(End::Close(CloseCode::BadRequest)),
                };
            }
            Some(Ok(Message::Binary(_))) => return Err(End::Close(CloseCode::BadRequest)),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                control += 1;
                if control > max_control {
                    return Err(End::Close(CloseCode::TooMany));
                }
            }
            Some(Ok(Message::Close(_))) | None => return Err(End::Gone),
            // Never yielded by a read: tungstenite assembles frames into messages.
            Some(Ok(Message::Frame(_))) => {}
            Some(Err(e)) => return Err(read_error(&e)),
        }
    }
}

/// Runs one upgraded connection to its end.
///
/// Memory per idle connection is dominated by this future, which lives in the
/// connection's task for its whole life. Only the session's state and the main loop
/// (`Session::serve`) are held inline; the one-off phases (hello, start, close) are
/// boxed, so their futures exist only while they run.
pub(super) async fn run(
    node: Arc<Node>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    admission: Result<Pending, CloseCode>,
    origin_ok: bool,
) {
    let Some(mut socket) = Box::pin(upgrade::connect(on_upgrade, &node.config)).await else {
        // The client left before the upgrade completed.
        return;
    };
    let end = match admission {
        Err(CloseCode::TooMany) => Box::pin(busy(&node, &mut socket)).await,
        Err(code) => End::Close(code),
        Ok(_) if !origin_ok => End::Close(CloseCode::Forbidden),
        Ok(_) if node.is_draining() => {
            let _ = Box::pin(timeout(CLOSE_TIMEOUT, send_reconnect(&mut socket))).await;
            End::Close(CloseCode::Draining)
        }
        Ok(pending) => serve_session(&node, &mut socket, pending).await,
    };
    Box::pin(finish(&node, &mut socket, end)).await;
    // After a read error the stream reads nothing more, so a client closed by the frame
    // meter (which errs once) is drained below it, or its flood would reset the close.
    Box::pin(socket.get_mut().linger(CLOSE_TIMEOUT)).await;
}

/// Hello, token, session: everything between the upgrade and the end. The connection
/// holds a pending slot until its token is verified, then an authenticated one
/// (`Pending::authenticate`: the node's and the user's connection limits).
pub(super) async fn serve_session(
    node: &Arc<Node>,
    socket: &mut dyn Socket,
    pending: Pending,
) -> End {
    let (token, resume) = match Box::pin(hello(node, socket, pending.evicted())).await {
        Ok(hello) => hello,
        Err(end) => return end,
    };
    let claims = match node.keys.verifier.verify(&token) {
        Ok(claims) => claims,
        Err(e) => {
            tracing::debug!(error = %e, "token refused");
            return End::Close(CloseCode::Unauthorized);
        }
    };
    if node
        .users
        .is_revoked(&claims.sub, claims.issued_at(), now_secs())
    {
        tracing::debug!(user = %claims.sub, "revoked token refused");
        return End::CloseWith(CloseCode::Unauthorized, CloseReason::TokenRevoked);
    }
    drop(token);
    let mut session = Session::new(Arc::clone(node), claims);
    // Before any backend work (the personal channel, presence): a token that reconnects
    // in a loop must not get a fresh allowance each time. Server-started reconnects are
    // covered by the burst (docs/operations.md, "Limits per user").
    if !node.take_user_budget(&session.user, UserLimit::Connect) {
        return End::CloseWith(CloseCode::TooMany, CloseReason::UserConnects);
    }
    let admission = match pending.authenticate() {
        Ok(admission) => admission,
        Err(CloseCode::TooMany) => return Box::pin(busy(node, socket)).await,
        Err(code) => return End::Close(code),
    };
    // Starting a session reads and subscribes in the backend; a burst of thousands at
    // once would queue there until its commands time out (4503 for everyone). So at
    // most `node::MAX_STARTING` start at once (their backend work, not the write of
    // `welcome`), and one that can't within `START_WAIT` is told to come back instead.
    let started = match timeout(START_WAIT, node.starting.acquire()).await {
        Ok(Ok(permit)) => Box::pin(session.start(socket, resume, permit)).await,
        _ => Err(Box::pin(busy(node, socket)).await),
    };
    let end = match started {
        Ok(()) => match session.serve(socket).await {
            Ok(()) => End::Gone,
            Err(end) => end,
        },
        Err(end) => end,
    };
    session.cleanup();
    drop(admission);
    end
}

/// Waits for `hello` within the hello timeout. A connection still silent when the node
/// drains is told to go elsewhere.
pub(super) async fn hello(
    node: &Node,
    socket: &mut dyn Socket,
    evicted: &tokio_util::sync::CancellationToken,
) -> Result<(String, BTreeMap<String, StreamPosition>), End> {
    let hello_timeout = Duration::from_millis(node.config.hello_timeout_ms);
    let max_control = node.config.max_messages_per_sec;
    tokio::select! {
        r = timeout(hello_timeout, read_hello(socket, max_control)) => match r {
            Ok(r) => r,
            Err(_) => Err(End::Close(CloseCode::Timeout)),
        },
        // A newcomer needed this connection's place in the full pending budget.
        _ = evicted.cancelled() => Err(Box::pin(busy(node, socket)).await),
        _ = node.drain.cancelled() => {
            let _ = timeout(CLOSE_TIMEOUT, send_reconnect(socket)).await;
            Err(End::Close(CloseCode::Draining))
        }
    }
}

/// Counts how the connection ended and sends the close frame, if any.
pub(super) async fn finish(node: &Node, socket: &mut dyn Socket, end: End) {
    let (code, reason) = match end {
        End::Close(code) => (code, CloseReason::Default),
        End::CloseWith(code, reason) => (code, reason),
        End::Gone => {
            node.metrics.disconnected(None);
            return;
        }
    };
    node.metrics.disconnected(Some(code.code()));
    if code == CloseCode::SlowConsumer {
        node.metrics.slow_consumer_disconnects.inc();
    }
    if reason == CloseReason::Unavailable {
        // Cut off from the broker (see `crate::cutoff`): go to a ready peer.
        let after_ms = rand::rng().random_range(0..node.config.cutoff_move_spread_ms.max(1));
        let _ = timeout(
            CLOSE_TIMEOUT,
            send_reconnect_frame(socket, "unavailable", after_ms),
        )
        .await;
    }
    close(socket, code, reason).await;
}

#[cfg(test)]
mod session_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn origins() {
        let mut h = HeaderMap::new();
        assert!(origin_allowed(None, &h));
        let list = vec!["https://app.example".to_string()];
        assert!(
            origin_allowed(Some(&list), &h),
            "no Origin header: not a browser"
        );
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://app.example"),
        );
        assert!(origin_allowed(Some(&list), &h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!origin_allowed(Some(&list), &h));
    }
}
