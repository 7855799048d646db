//! The HTTP API: the server API (publish, presence, history, nodes: bearer key), the
//! public endpoints (connect, health, readiness, metrics) and dev mode's token endpoint.
//!
//! Every error is a proper status with `{"error":{"code":…,"message":…}}`.

mod channels;
mod health;
mod publish;
mod users;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use herald_protocol::codes::ErrorCode;
use herald_protocol::frame::ErrorBody;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::backend::error::BackendError;
use crate::node::Node;

/// An HTTP error with its JSON body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    /// The backend failure behind a 5xx, for the log only (never in the body).
    cause: Option<BackendError>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody::new(code, message),
            cause: None,
        }
    }

    /// Logs the backend failure behind this error, if any: called where the error
    /// leaves the node (the response, or one result of a batch), never in a conversion.
    pub(super) fn log(&self) {
        if let Some(cause) = &self.cause {
            tracing::warn!(error = %cause, status = %self.status, "backend error answering an API request");
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }
}

impl From<BackendError> for ApiError {
    /// A fixed, generic message: the backend's own error text names addresses and
    /// internals no API caller should see. The detail goes along for the log.
    fn from(e: BackendError) -> Self {
        let mut error = match e {
            BackendError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "broker unavailable; try again",
            ),
            BackendError::Internal(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                "internal error",
            ),
        };
        error.cause = Some(e);
        error
    }
}

impl From<crate::publish::PublishError> for ApiError {
    fn from(e: crate::publish::PublishError) -> Self {
        match e {
            crate::publish::PublishError::Backend(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        (self.status, Json(json!({ "error": self.body }))).into_response()
    }
}

/// A path parameter whose rejection is an [`ApiError`] with the JSON body of every other
/// error: axum's own `Path` rejection answers `text/plain` (for example to a segment
/// that is not valid UTF-8 once percent-decoded).
pub struct PathParam<T>(pub T);

impl<T, S> FromRequestParts<S> for PathParam<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(PathParam(value)),
            Err(e) => Err(ApiError::bad_request(format!(
                "bad path: {}",
                e.body_text()
            ))),
        }
    }
}

/// Proof that the request carried the API key (`Authorization: Bearer <key>`).
pub struct ApiKeyAuth;

impl FromRequestParts<Arc<Node>> for ApiKeyAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, node: &Arc<Node>) -> Result<Self, ApiError> {
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !presented.is_empty() && node.keys.api_key.matches(presented) {
            Ok(ApiKeyAuth)
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "missing or wrong API key (Authorization: Bearer <HERALD_API_KEY>)",
            ))
        }
    }
}

/// The node's routes (without `/ws`, which `lib.rs` adds).
pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/publish", post(publish::publish))
        .route("/v1/publish/batch", post(publish::publish_batch))
        .route("/v1/users/{user}/presence", get(users::user_presence))
        .route("/v1/users/{user}/disconnect", post(users::user_disconnect))
        .route("/v1/users/{user}/subscribe", post(users::user_subscribe))
        .route(
            "/v1/users/{user}/unsubscribe",
            post(users::user_unsubscribe),
        )
        .route("/v1/users/{user}/revoke", post(users::user_revoke))
        .route("/v1/users/{user}/unread", get(users::user_unread))
        .route(
            "/v1/channels/{channel}/presence",
            get(channels::channel_presence),
        )
        .route("/v1/channels/{channel}/history", get(channels::history))
        .route("/v1/nodes", get(health::nodes))
        .route("/v1/connect", get(health::connect))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/dev/token", get(health::dev_token))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

/// The JSON 405 of every endpoint (the web assets' too).
pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::BadRequest,
        "method not allowed on this endpoint",
    )
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such endpoint",
    )
}

/// `data` may be `null`: present, unlike a missing field.
pub(super) fn some_raw<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// Reads a request body of at most `limit` bytes, within the header read timeout.
///
/// hyper's header timeout ends once the request head is in; without this one, a client
/// could send a body a byte a minute and hold its connection and task forever (a
/// slowloris on the body).
pub(super) async fn read_body(
    node: &Node,
    body: Body,
    limit: usize,
) -> Result<axum::body::Bytes, ApiError> {
    let deadline = node.config.header_read_timeout();
    match tokio::time::timeout(deadline, to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            format!("body larger than {limit} bytes"),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            ErrorCode::BadRequest,
            format!(
                "request body not received within {} ms",
                deadline.as_millis()
            ),
        )),
    }
}

pub(super) fn number_param(
    params: &HashMap<String, String>,
    name: &str,
) -> Result<Option<u64>, ApiError> {
    params
        .get(name)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("`{name}` must be a non-negative integer"))
            })
        })
        .transpose()
}

/// Stored data as raw JSON. It was validated when published; `null` if a broker ever
/// holds something else, rather than an invalid answer.
pub(super) fn raw_json(data: &str) -> Box<RawValue> {
    RawValue::from_string(data.to_owned())
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON"))
}

pub use health::dev_token_ttl;
pub use publish::MAX_BATCH_MESSAGES;
pub use users::UNREAD_DEFAULT_LIMIT;
