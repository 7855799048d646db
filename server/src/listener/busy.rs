//! The answer of a node that has no room for a connection: "come back in `after_ms`".
//!
//! When the HTTP phase is full of connections younger than a second, a newcomer used
//! to be closed unread, which a client sees as a reset (or an upgrade never answered):
//! it can't tell a full node from a dead one, and a browser can't read the status of a
//! failed upgrade anyway. So the newcomer's request head is read here (bounded like any
//! head, within [`BUSY_HEAD_TIMEOUT`]) and answered without hyper or the router:
//! - a WebSocket upgrade gets its 101, the frame `{"type":"reconnect","reason":"busy",
//!   "after_ms":N}` and close 4429, so every client, a browser included, learns when
//!   to come back;
//! - any other request gets a 503 with `Retry-After` and the JSON error body.
//!
//! `after_ms` comes from [`Busy`]: a burst is spread at the rate the node admits.
//! These answers take a few microseconds each, but each holds a descriptor while it
//! runs, so at most [`MAX_BUSY_ANSWERS`] run at once. Past that the accept loop waits
//! for one to finish: new connections wait in the kernel's accept queue meanwhile
//! (and past its backlog, clients retry their SYN), which is slower but never a reset.

use std::sync::Arc;
use std::time::Duration;

use herald_protocol::codes::{CloseCode, ErrorCode};
use herald_protocol::frame::{ErrorBody, Reconnect, ServerFrame};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::CloseFrame;

use super::head::{self, Head};
use crate::limits::Busy;

/// Busy answers at once.
pub const MAX_BUSY_ANSWERS: usize = 1_024;

/// How long a refused client has to send its request head.
pub const BUSY_HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an evicted connection waits for a busy answer to be free.
pub const EVICTED_WAIT: Duration = Duration::from_secs(1);

/// How long the answer may take to send, and the client to read it and close.
const BUSY_LINGER: Duration = Duration::from_secs(1);

/// The busy answers in flight, at most [`MAX_BUSY_ANSWERS`].
#[derive(Debug)]
pub struct BusyAnswers {
    slots: Arc<Semaphore>,
}

impl Default for BusyAnswers {
    fn default() -> Self {
        Self {
            slots: Arc::new(Semaphore::new(MAX_BUSY_ANSWERS)),
        }
    }
}

/// What a request head asks for, as far as a busy answer cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Asked {
    /// A WebSocket upgrade, with its `Sec-WebSocket-Key`.
    Upgrade(String),
    /// Anything else (an API call, a page, an upgrade that isn't valid).
    Other,
}

/// Reads what a complete request head asks for.
pub fn asked(head: &[u8]) -> Asked {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
        return Asked::Other;
    }
    let value = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let upgrade = value("upgrade").is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    let connection = value("connection").is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    });
    match (
        request.method,
        upgrade && connection,
        value("sec-websocket-key"),
    ) {
        (Some("GET"), true, Some(key)) => Asked::Upgrade(key.trim().to_string()),
        _ => Asked::Other,
    }
}

/// The bytes of the busy answer to `asked`, telling the client to wait `after_ms`.
pub fn answer(asked: &Asked, after_ms: u64) -> Vec<u8> {
    match asked {
        Asked::Upgrade(key) => {
            let mut out = format!(
                "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
                 sec-websocket-accept: {}\r\n\r\n",
                tungstenite::handshake::derive_accept_key(key.as_bytes())
            )
            .into_bytes();
            let reconnect = ServerFrame::Reconnect(Reconnect {
                reason: "busy".into(),
                after_ms,
            })
            .to_json();
            let frames = [
                Frame::message(reconnect.into_bytes(), OpCode::Data(Data::Text), true),
                Frame::close(Some(CloseFrame {
                    code: CloseCode::TooMany.code().into(),
                    reason: "busy".into(),
                })),
            ];
            for frame in frames {
                frame.format(&mut out).expect("writing to a Vec");
            }
            out
        }
        Asked::Other => {
            let body = serde_json::json!({
                "error": ErrorBody::new(
                    ErrorCode::Unavailable,
                    format!("the node is busy; retry in {after_ms} ms"),
                )
            })
            .to_string();
            format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                 retry-after: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                after_ms.div_ceil(1_000),
                body.len()
            )
            .into_bytes()
        }
    }
}

/// What a busy answer needs besides the connection.
#[derive(Clone)]
pub struct Answerer {
    /// The answers in flight.
    pub answers: Arc<BusyAnswers>,
    /// Where `after_ms` comes from.
    pub busy: Arc<Busy>,
    /// Counts the answers sent.
    pub answered: Counter,
    /// The request head limit.
    pub max_head: usize,
}

impl Answerer {
    /// A place for one more answer, waiting for one if all are taken. The accept loop
    /// waits here rather than drop the newcomer: while it waits, new connections queue
    /// in the kernel (and, past its backlog, clients retry their SYN), which is
    /// slower, never a reset.
    pub async fn slot(&self) -> OwnedSemaphorePermit {
        Arc::clone(&self.answers.slots)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Answers `stream` busy on a task of its own, in the place `slot`.
    pub fn spawn(&self, slot: OwnedSemaphorePermit, stream: TcpStream) {
        let this = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            this.answer(stream, Vec::new()).await;
        });
    }

    /// Answers `stream` busy here, `read` being what was read of its head so far, once
    /// a place is free, within [`EVICTED_WAIT`] (`false`: nothing sent). The wait is
    /// short: the connection already holds a descriptor and is no longer counted.
    pub async fn answer_here(&self, stream: TcpStream, read: Vec<u8>) -> bool {
        let Ok(_slot) = tokio::time::timeout(EVICTED_WAIT, self.slot()).await else {
            return false;
        };
        self.answer(stream, read).await;
        true
    }

    async fn answer(&self, mut stream: TcpStream, mut read: Vec<u8>) {
        let Ok(Head::Complete(head)) = tokio::time::timeout(
            BUSY_HEAD_TIMEOUT,
            head::read_into(&mut stream, &mut read, self.max_head),
        )
        .await
        else {
            return;
        };
        let bytes = answer(&asked(&head), self.busy.refuse());
        self.answered.inc();
        let _ = tokio::time::timeout(BUSY_LINGER, async {
            stream.write_all(&bytes).await?;
            stream.shutdown().await?;
            // Wait for the client's end: its close frame (sent once it has read ours) or
            // its FIN. Dropping the socket before that would reset it, and the reset
            // can destroy the answer before the client reads it; once the client
            // answered, it has read everything.
            let mut sink = [0u8; 1_024];
            let _ = stream.read(&mut sink).await?;
            Ok::<_, std::io::Error>(())
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\n\
        Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    #[test]
    fn an_upgrade_is_told_apart_from_other_requests() {
        assert_eq!(
            asked(UPGRADE),
            Asked::Upgrade("dGhlIHNhbXBsZSBub25jZQ==".into())
        );
        assert_eq!(
            asked(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
            Asked::Other
        );
        assert_eq!(asked(b"not http\r\n\r\n"), Asked::Other);
        let post = String::from_utf8_lossy(UPGRADE).replace("GET", "POST");
        assert_eq!(asked(post.as_bytes()), Asked::Other);
    }

    #[test]
    fn an_upgrade_gets_reconnect_busy_then_4429() {
        let bytes = answer(&asked(UPGRADE), 1_234);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.starts_with("HTTP/1.1 101 "), "{text}");
        // RFC 6455's own example key and accept value.
        assert!(text.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        let frames = &bytes[text.find("\r\n\r\n").unwrap() + 4..];
        // A text frame first (FIN, opcode 1)...
        assert_eq!(frames[0], 0x81);
        let json = r#"{"type":"reconnect","reason":"busy","after_ms":1234}"#;
        assert!(text.contains(json), "{text}");
        // The close frame: opcode 8, code 4429.
        let close_at = frames.windows(2).rposition(|w| w[0] == 0x88).unwrap();
        assert_eq!(&frames[close_at + 2..close_at + 4], &4429u16.to_be_bytes());
    }

    #[test]
    fn other_requests_get_a_json_503_with_retry_after() {
        let bytes = answer(&Asked::Other, 1_200);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
        assert!(text.contains("retry-after: 2\r\n"), "{text}");
        let body: serde_json::Value =
            serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "unavailable");
    }

    #[tokio::test]
    async fn at_most_so_many_answers_run_at_once() {
        let answerer = Answerer {
            answers: Arc::new(BusyAnswers::default()),
            busy: Arc::default(),
            answered: Counter::default(),
            max_head: 8_192,
        };
        let mut slots = Vec::new();
        for _ in 0..MAX_BUSY_ANSWERS {
            slots.push(answerer.slot().await);
        }
        let waiting = tokio::time::timeout(Duration::from_millis(50), answerer.slot()).await;
        assert!(waiting.is_err(), "all taken: the next one waits");
        slots.pop();
        let freed = tokio::time::timeout(Duration::from_millis(50), answerer.slot()).await;
        assert!(freed.is_ok(), "a place given back is taken at once");
    }
}
