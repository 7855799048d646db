//! The WebSocket handshake of `GET /ws`, done here rather than by axum's
//! `WebSocketUpgrade`, for one reason: the upgraded socket must be wrapped in the
//! frame meter ([`Guarded`]) before tungstenite reads from it, and axum's extractor
//! builds its WebSocket over the bare socket. The checks are RFC 6455's (and axum's):
//! `GET`, `Connection: upgrade`, `Upgrade: websocket`, `Sec-WebSocket-Version: 13` and a
//! `Sec-WebSocket-Key`. A request that fails them gets a 400 (426 for a wrong version,
//! with the version the node speaks) with the JSON error body of the HTTP API.

use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use herald_protocol::codes::ErrorCode;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};

use crate::api::ApiError;
use crate::config::Config;

use super::frames::Guarded;

/// The upgraded connection a session runs on.
pub(crate) type Upgraded = WebSocketStream<Guarded<TokioIo<hyper::upgrade::Upgraded>>>;

/// What a valid upgrade request yields: the response to send and the socket to come.
pub(crate) struct Accepted {
    pub response: Response,
    pub on_upgrade: OnUpgrade,
}

/// Why an upgrade request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// Not a `GET`.
    #[error("a WebSocket upgrade is a GET")]
    NotGet,
    /// No `Connection: upgrade`.
    #[error("expected Connection: upgrade")]
    Connection,
    /// No `Upgrade: websocket`.
    #[error("expected Upgrade: websocket")]
    Upgrade,
    /// A version other than 13: 426, with the version the node speaks.
    #[error("expected Sec-WebSocket-Version: 13")]
    Version,
    /// No `Sec-WebSocket-Key`.
    #[error("expected a Sec-WebSocket-Key")]
    Key,
    /// hyper can't hand over this connection.
    #[error("this connection can't be upgraded")]
    NotUpgradable,
}

impl IntoResponse for HandshakeError {
    fn into_response(self) -> Response {
        let status = match self {
            HandshakeError::Version => StatusCode::UPGRADE_REQUIRED,
            _ => StatusCode::BAD_REQUEST,
        };
        let mut response =
            ApiError::new(status, ErrorCode::BadRequest, self.to_string()).into_response();
        if self == HandshakeError::Version {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

/// Checks an upgrade request; `on_upgrade` is hyper's handle to its connection.
pub(crate) fn accept(
    method: &Method,
    headers: &HeaderMap,
    on_upgrade: Option<OnUpgrade>,
) -> Result<Accepted, HandshakeError> {
    if method != Method::GET {
        return Err(HandshakeError::NotGet);
    }
    if !header_has_token(headers, header::CONNECTION, "upgrade") {
        return Err(HandshakeError::Connection);
    }
    if !header_is(headers, header::UPGRADE, "websocket") {
        return Err(HandshakeError::Upgrade);
    }
    if !header_is(headers, header::SEC_WEBSOCKET_VERSION, "13") {
        return Err(HandshakeError::Version);
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or(HandshakeError::Key)?;
    let on_upgrade = on_upgrade.ok_or(HandshakeError::NotUpgradable)?;
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, HeaderValue::from_static("upgrade"))
        .header(header::UPGRADE, HeaderValue::from_static("websocket"))
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(axum::body::Body::empty())
        .expect("a valid response");
    Ok(Accepted {
        response,
        on_upgrade,
    })
}

/// The WebSocket over the upgraded connection, or `None` if the upgrade failed (the
/// client left before it completed).
pub(crate) async fn connect(on_upgrade: OnUpgrade, config: &Config) -> Option<Upgraded> {
    let upgraded = on_upgrade.await.ok()?;
    let frames = config
        .max_frames_per_sec
        .max(config.max_messages_per_sec.saturating_mul(2));
    let io = Guarded::new(TokioIo::new(upgraded), frames);
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(config.ws_read_buffer)
        .write_buffer_size(config.ws_write_buffer)
        .max_message_size(Some(config.max_frame_bytes))
        .max_frame_size(Some(config.max_frame_bytes));
    Some(WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config)).await)
}

/// Whether `name`'s value is `value`, ignoring case.
fn header_is(headers: &HeaderMap, name: header::HeaderName, value: &str) -> bool {
    headers
        .get(name)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

/// Whether `name`'s comma-separated value has the token `token`, ignoring case.
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        h
    }

    #[test]
    fn the_handshake_checks_are_rfc_6455s() {
        let h = upgrade_headers();
        // Without hyper's handle (no connection), a valid request is still refused,
        // after every header check passed.
        let refused = |m: &Method, h: &HeaderMap| accept(m, h, None).err().expect("refused");
        assert_eq!(refused(&Method::GET, &h), HandshakeError::NotUpgradable);
        assert_eq!(refused(&Method::POST, &h), HandshakeError::NotGet);
        let mut v = h.clone();
        v.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        assert_eq!(refused(&Method::GET, &v), HandshakeError::Version);
        let r = HandshakeError::Version.into_response();
        assert_eq!(r.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(r.headers()[header::SEC_WEBSOCKET_VERSION], "13");
        assert_eq!(
            HandshakeError::Key.into_response().status(),
            StatusCode::BAD_REQUEST
        );
        for (name, error) in [
            (header::CONNECTION, HandshakeError::Connection),
            (header::UPGRADE, HandshakeError::Upgrade),
            (header::SEC_WEBSOCKET_KEY, HandshakeError::Key),
        ] {
            let mut m = h.clone();
            m.remove(&name);
            assert_eq!(refused(&Method::GET, &m), error, "without {name}");
        }
        assert!(header_has_token(&h, header::CONNECTION, "upgrade"));
        let mut no = HeaderMap::new();
        no.insert(header::CONNECTION, HeaderValue::from_static("upgraded"));
        assert!(!header_has_token(&no, header::CONNECTION, "upgrade"));
    }
}
