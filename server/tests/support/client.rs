//! A real WebSocket client (tokio-tungstenite) that speaks Herald's protocol in JSON.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as TCloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Default wait for one frame.
pub const WAIT: Duration = Duration::from_secs(5);

/// What the client saw when the server closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// A close frame with this code.
    Code(u16),
    /// The connection ended without a close frame.
    NoFrame,
}

/// A test client.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames read while waiting for something else (messages while awaiting a reply).
    pending: VecDeque<Value>,
    next_id: u64,
}

impl Client {
    /// Connects (no hello yet).
    pub async fn connect(url: &str) -> Client {
        Self::connect_with(url, &[]).await
    }

    /// Connects with extra request headers, e.g. `Origin`.
    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Client {
        let mut req = url.into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("connect in time")
            .expect("connect");
        Client {
            ws,
            pending: VecDeque::new(),
            next_id: 1,
        }
    }

    /// Connects and says hello; returns the client and the welcome frame.
    pub async fn hello(url: &str, token: &str, resume: Value) -> (Client, Value) {
        let mut c = Self::connect(url).await;
        c.send(json!({"type": "hello", "token": token, "resume": resume}))
            .await;
        let welcome = c.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (c, welcome)
    }

    /// Sends a JSON frame.
    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    /// Sends a raw text frame.
    pub async fn send_text(&mut self, s: &str) {
        self.ws
            .send(Message::Text(s.to_owned().into()))
            .await
            .unwrap();
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, b: Vec<u8>) {
        self.ws.send(Message::Binary(b.into())).await.unwrap();
    }

    /// Sends a raw text frame, ignoring send errors (the server may have closed).
    pub async fn try_send_text(&mut self, s: &str) -> bool {
        self.ws
            .send(Message::Text(s.to_owned().into()))
            .await
            .is_ok()
    }

    /// The next JSON frame (pending ones first), within [`WAIT`]. Panics on close.
    pub async fn recv(&mut self) -> Value {
        if let Some(v) = self.pending.pop_front() {
            return v;
        }
        self.recv_wire(WAIT).await.expect("a frame, not a close")
    }

    /// The next frame from the socket; `Err` when the server closed.
    pub async fn recv_wire(&mut self, wait: Duration) -> Result<Value, Closed> {
        loop {
            let msg = tokio::time::timeout(wait, self.ws.next())
                .await
                .expect("a frame in time");
            match msg {
                Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(Some(f)))) => return Err(Closed::Code(u16::from(f.code))),
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => {
                    return Err(Closed::NoFrame)
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Whether nothing arrives within `wait`.
    pub async fn silent_for(&mut self, wait: Duration) -> bool {
        if !self.pending.is_empty() {
            return false;
        }
        match tokio::time::timeout(wait, self.ws.next()).await {
            Err(_) => true,
            Ok(Some(Ok(Message::Text(t)))) => {
                self.pending.push_back(serde_json::from_str(&t).unwrap());
                false
            }
            Ok(_) => false,
        }
    }

    /// Reads until the server closes; returns the close code seen. Frames before the
    /// close are kept for [`Client::recv`] (within `wait` overall).
    pub async fn expect_close(&mut self, wait: Duration) -> Closed {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_wire(left).await {
                Ok(v) => self.pending.push_back(v),
                Err(c) => return c,
            }
        }
    }

    /// Sends a command with a fresh id and returns its reply; frames that arrive before
    /// the reply are kept for [`Client::recv`].
    pub async fn request(&mut self, mut cmd: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = json!(id);
        self.send(cmd).await;
        loop {
            let v = self.recv_wire(WAIT).await.expect("a reply, not a close");
            if v["type"] == "reply" && v["id"] == json!(id) {
                return v;
            }
            self.pending.push_back(v);
        }
    }

    /// The next `message` frame (skipping pings).
    pub async fn next_message(&mut self) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] != "ping" {
                return v;
            }
        }
    }

    /// Closes politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }

    /// Sends a close frame with a code (as a browser tab would on unload).
    pub async fn close_with(mut self, code: u16) {
        let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: TCloseCode::from(code),
            reason: "".into(),
        };
        let _ = self.ws.close(Some(frame)).await;
    }
}
