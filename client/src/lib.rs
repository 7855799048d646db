//! Herald's Rust SDK: a WebSocket client that reconnects on its own, resumes every
//! channel from the last message it delivered, and never hands the application a
//! duplicate or an out-of-order message.
//!
//! ```no_run
//! use herald_client::{Client, Event};
//!
//! # async fn demo(token: String) -> Result<(), herald_client::Error> {
//! let (client, mut events) = Client::builder()
//!     .discover("http://127.0.0.1:8080") // ask /v1/connect for a node…
//!     .url("ws://127.0.0.1:8080/ws") //     …or connect here directly
//!     .token(token)
//!     .start()?;
//! client.subscribe("room:42").await?;
//! client.publish("room:42", &serde_json::json!({"text": "hi"})).await?;
//! while let Some(event) = events.recv().await {
//!     match event {
//!         Event::Message(m) => println!("{} #{}: {}", m.channel, m.offset, m.data),
//!         Event::Resync(r) => println!("reload {} from the backend", r.channel),
//!         Event::Stopped(reason) => println!("stopped: {reason:?}"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # What the client does
//!
//! - **Finding a node.** [`Endpoint`]s are tried in the order given: a WebSocket URL is
//!   used as is, an HTTP base URL is asked for `GET /v1/connect` (the least-loaded node)
//!   and the client connects there directly. After a disconnect it moves on to the next
//!   endpoint and avoids the node it just lost while another one is available.
//! - **Reconnecting.** Exponential backoff with full jitter (250 ms doubling up to 30 s by
//!   default). Close codes are honoured: 4503 (draining) reconnects at once after the
//!   server's jitter; 4401 asks the token callback for a new token; 4400, 4403 and 1009
//!   stop the client ([`Event::Stopped`]), and so does 4410 (kicked:
//!   [`StopReason::Kicked`]); 4408, 4429, 4509 back off and resume.
//! - **Token refresh.** When the server says `expiring`, a client with a token callback
//!   gets a fresh token and sends `refresh` in the open session, retrying shortly until
//!   the token's expiry; messages keep flowing meanwhile.
//! - **Server-side channels.** Channels the server adds (`subscribed`) are followed
//!   like the client's own ([`Subscription::by_server`]); removed ones (`unsubscribed`)
//!   are forgotten ([`Event::Unsubscribed`]).
//! - **Resuming.** The client remembers every followed channel, the personal
//!   `user:<sub>` channel included, with the position of the last message it delivered,
//!   and sends them as `resume` in each `hello`. Messages at or below that position in
//!   the same epoch are dropped, so each message reaches the application once, in order.
//!   When history no longer reaches back (`recovered: false`) or the server sends
//!   `resync`, the application gets an [`Event::Resync`] and should reload that
//!   channel's state.
//! - **Heartbeat watchdog.** The client answers `ping` with `pong`. If nothing arrives
//!   from the server for twice the `heartbeat_ms` of `welcome`, the connection is
//!   considered dead and replaced, even when TCP has not noticed.
//! - **Commands while disconnected.** `subscribe` / `unsubscribe` update the followed
//!   channels immediately and take effect at the next `hello`; `publish` / `presence`
//!   wait for the next session, within the request timeout (see [`Client`]).
//!
//! One task per client owns the socket; [`Client`] handles talk to it over channels.
//!
//! # TLS
//!
//! With the cargo feature `tls` (on by default) the client speaks `wss://` and
//! `https://` (for `/v1/connect`) through rustls, trusting the Mozilla roots bundled by
//! `webpki-roots` plus any root certificates added with
//! [`ClientBuilder::tls_root_certificates_pem`] (a private CA; turn the built-in roots
//! off with [`ClientBuilder::tls_built_in_roots`]). Certificates are always verified;
//! there is no option to skip that. A certificate the client does not trust ends the
//! attempt with [`DisconnectReason::Tls`], and the client retries with backoff, over TLS
//! only. An `https://` discovery endpoint must answer `wss://` URLs, and redirects never
//! lead from `https` to `http`: nothing falls back to plaintext.
//!
//! ```no_run
//! # fn demo(token: String, my_ca_pem: &[u8]) -> Result<(), herald_client::Error> {
//! # #[cfg(feature = "tls")] {
//! let (client, events) = herald_client::Client::builder()
//!     .discover("https://push.example.com") // /v1/connect over HTTPS, then wss://
//!     .url("wss://push.example.com/ws")
//!     .tls_root_certificates_pem(my_ca_pem) // only for a private CA
//!     .token(token)
//!     .start()?;
//! # }
//! # Ok(()) }
//! ```
//!
//! Built with `default-features = false`, the SDK has no TLS stack and
//! [`ClientBuilder::start`] refuses `wss://` and `https://` endpoints with
//! [`Error::Config`].
//!
//! # Modules
//! - [`config`]: [`ClientBuilder`], [`Endpoint`], tokens, timeouts;
//! - `connection`: the task that owns the socket and the reconnect policy;
//! - `endpoints`: choosing the next node (rotation, `/v1/connect`);
//! - `backoff`: exponential backoff with full jitter;
//! - `tls` (feature `tls`): the rustls configuration and telling TLS failures apart;
//! - `refresh`: when to ask for a fresh token after `expiring`, and when to give up;
//! - `tracker`: followed channels, positions, the duplicate filter;
//! - [`event`] and [`error`]: what the application receives.

pub mod config;
pub mod error;
pub mod event;

mod backoff;
mod client;
mod connection;
mod endpoints;
mod refresh;
#[cfg(feature = "tls")]
mod tls;
mod tracker;

pub use client::{Client, Events};
pub use config::{BoxError, ClientBuilder, TokenFuture};
pub use connection::ACK_DELAY;
pub use endpoints::Endpoint;
pub use error::Error;
pub use event::{
    Connected, DisconnectReason, Disconnected, EphemeralMessage, Event, Message, Resync,
    ResyncCause, State, StopReason, Subscription,
};
pub use herald_protocol::codes::{CloseCode, ErrorCode};
pub use herald_protocol::frame::ErrorBody;
pub use herald_protocol::StreamPosition;
