//! The HTTP API: the server API (publish, presence, history, nodes: bearer key), the
//! public endpoints (connect, health, readiness, metrics) and dev mode's token endpoint.
//!
//! Every error is a proper status with `{"error":{"code":…,"message":…}}`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use herald_protocol::channel::{
    personal_channel_owner, user_channel, validate_channel, validate_user,
};
use herald_protocol::codes::ErrorCode;
use herald_protocol::depth::{nests_deeper_than, MAX_DATA_DEPTH};
use herald_protocol::frame::ErrorBody;
use herald_protocol::StreamPosition;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::broker::{BatchMessage, BrokerError, Publication, UserCommand};
use crate::node::Node;
use crate::registry::least_loaded;

/// An HTTP error with its JSON body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody::new(code, message),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }
}

impl From<BrokerError> for ApiError {
    /// A fixed, generic message: the broker's own error text names addresses and
    /// internals no API caller should see. The log keeps the detail.
    fn from(e: BrokerError) -> Self {
        tracing::warn!(error = %e, "broker error answering an API request");
        match e {
            BrokerError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "broker unavailable; try again",
            ),
            BrokerError::Internal(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                "internal error",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.body }))).into_response()
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
        .route("/v1/publish", post(publish))
        .route("/v1/publish/batch", post(publish_batch))
        .route("/v1/users/{user}/presence", get(user_presence))
        .route("/v1/users/{user}/disconnect", post(user_disconnect))
        .route("/v1/users/{user}/subscribe", post(user_subscribe))
        .route("/v1/users/{user}/unsubscribe", post(user_unsubscribe))
        .route("/v1/users/{user}/revoke", post(user_revoke))
        .route("/v1/users/{user}/unread", get(user_unread))
        .route("/v1/channels/{channel}/presence", get(channel_presence))
        .route("/v1/channels/{channel}/history", get(history))
        .route("/v1/nodes", get(nodes))
        .route("/v1/connect", get(connect))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/dev/token", get(dev_token))
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
fn some_raw<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default, deserialize_with = "some_raw")]
    data: Option<Box<RawValue>>,
    /// The publisher to show receivers (v1.1): a user id, or absent.
    #[serde(default)]
    from: Option<String>,
    /// An ephemeral message (v1.1): no offset, not stored, only to current subscribers.
    #[serde(default)]
    ephemeral: bool,
}

/// What one publish request asks for, checked.
struct Target {
    channel: String,
    data: Box<RawValue>,
    from: Option<String>,
    ephemeral: bool,
}

impl PublishBody {
    /// The channel to publish to, the data and the publisher, all checked.
    fn target(self) -> Result<Target, ApiError> {
        let channel = match (self.channel, self.user) {
            (Some(channel), None) => {
                validate_channel(&channel)
                    .map_err(|e| ApiError::bad_request(format!("channel name {e}")))?;
                channel
            }
            (None, Some(user)) => {
                validate_user(&user).map_err(|e| ApiError::bad_request(format!("user id {e}")))?;
                user_channel(&user)
            }
            _ => {
                return Err(ApiError::bad_request(
                    "give exactly one of `channel` and `user`",
                ))
            }
        };
        let data = self
            .data
            .ok_or_else(|| ApiError::bad_request("`data` is missing"))?;
        if nests_deeper_than(data.get(), MAX_DATA_DEPTH) {
            return Err(ApiError::bad_request(format!(
                "`data` nests deeper than {MAX_DATA_DEPTH} levels"
            )));
        }
        // Checked like a user id: receivers may take it for one, and the Redis payload
        // relies on it having no `:`.
        if let Some(from) = &self.from {
            validate_user(from)
                .map_err(|e| ApiError::bad_request(format!("`from` must be a user id; it {e}")))?;
        }
        Ok(Target {
            channel,
            data,
            from: self.from,
            ephemeral: self.ephemeral,
        })
    }
}

async fn publish(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let limit = node.config.max_publish_bytes;
    let bytes = read_body(&node, body, limit).await?;
    let body: PublishBody = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
    let target = body.target()?;
    publish_target(&node, &target).await.map(Json)
}

/// Most messages in one batch.
pub const MAX_BATCH_MESSAGES: usize = 1000;
/// Least body size a batch may have, whatever `max_publish_bytes` is.
const MIN_BATCH_BODY_BYTES: usize = 1 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    messages: Vec<PublishBody>,
}

/// `POST /v1/publish/batch` (an addition to the contract): up to
/// [`MAX_BATCH_MESSAGES`] publishes in one request, each answered in the same order as
/// `/v1/publish` would answer it. An application that pushes to many users at once
/// saves one HTTP round trip per message, and the node hands the whole batch to the
/// broker at once ([`crate::broker::Broker::publish_batch`]: with Redis, one script
/// call per cluster slot). Messages to the same channel are published in their batch
/// order; different channels are independent.
///
/// The answer is 200 with one result per message (an offset or an error), unless every
/// message failed: then it is the first error's status, so that a caller that only
/// looks at the status still sees an outage.
async fn publish_batch(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let limit = node.config.max_publish_bytes.max(MIN_BATCH_BODY_BYTES);
    let bytes = read_body(&node, body, limit).await?;
    let batch: BatchBody = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
    let count = batch.messages.len();
    if count == 0 || count > MAX_BATCH_MESSAGES {
        return Err(ApiError::bad_request(format!(
            "a batch holds 1 to {MAX_BATCH_MESSAGES} messages, not {count}"
        )));
    }
    let limit = node.config.max_publish_bytes;
    let mut results: Vec<Option<Result<Value, ApiError>>> = (0..count).map(|_| None).collect();
    let mut targets = Vec::with_capacity(count);
    for (i, message) in batch.messages.into_iter().enumerate() {
        match message.target() {
            Ok(target) if target.data.get().len() > limit => {
                results[i] = Some(Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::TooLarge,
                    format!("data larger than {limit} bytes"),
                )));
            }
            Ok(target) => targets.push((i, target)),
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    // Ephemeral messages go out on their own (no offset, nothing to order).
    let (ephemeral, ordinary): (Vec<_>, Vec<_>) =
        targets.into_iter().partition(|(_, t)| t.ephemeral);
    let node_ref = &node;
    let sent = ephemeral.iter().map(|(i, t)| async move {
        (
            *i,
            publish_ephemeral(node_ref, &t.channel, &t.data, t.from.as_deref()).await,
        )
    });
    for (i, result) in futures_util::future::join_all(sent).await {
        results[i] = Some(result);
    }
    // Personal channels are scheduled for the unacked check first (receipts), each
    // once; a message whose channel could not be scheduled is not published.
    let personal: std::collections::BTreeSet<String> = ordinary
        .iter()
        .filter(|(_, t)| personal_channel_owner(&t.channel).is_some())
        .map(|(_, t)| t.channel.clone())
        .collect();
    let scheduled = futures_util::future::join_all(personal.into_iter().map(|c| async move {
        let result = node_ref.receipts.before_publish(&c).await;
        (c, result)
    }))
    .await;
    let refused: std::collections::HashMap<String, BrokerError> = scheduled
        .into_iter()
        .filter_map(|(c, r)| r.err().map(|e| (c, e)))
        .collect();
    let (refused_targets, targets): (Vec<_>, Vec<_>) = ordinary
        .into_iter()
        .partition(|(_, t)| refused.contains_key(t.channel.as_str()));
    for (i, t) in refused_targets {
        node.metrics.broker_errors.inc();
        results[i] = Some(Err(refused[t.channel.as_str()].clone().into()));
    }
    // One broker call for the whole batch, in batch order: the broker keeps each
    // channel's order and sends what shares a Redis slot as one script call.
    let messages: Vec<BatchMessage<'_>> = targets
        .iter()
        .map(|(_, t)| BatchMessage {
            channel: &t.channel,
            data: t.data.get(),
            from: t.from.as_deref(),
        })
        .collect();
    let answers = node.broker.publish_batch(&messages).await;
    for ((i, t), answer) in targets.iter().zip(answers) {
        results[*i] = Some(published(&node, &t.channel, &t.data, answer));
    }
    let results: Vec<Result<Value, ApiError>> = results
        .into_iter()
        .map(|r| r.expect("every message has a result"))
        .collect();
    if results.iter().all(Result::is_err) {
        let first = results.into_iter().next().expect("a batch is not empty");
        return Err(first.expect_err("every result is an error"));
    }
    let results: Vec<Value> = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| json!({ "error": e.body })))
        .collect();
    Ok(Json(json!({ "results": results })))
}

/// Reads a request body of at most `limit` bytes, within the header read timeout.
///
/// hyper's header timeout ends once the request head is in; without this one, a client
/// could send a body a byte a minute and hold its connection and task forever (a
/// slowloris on the body).
async fn read_body(node: &Node, body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
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

/// Publishes one checked request, ordinary or ephemeral.
async fn publish_target(node: &Node, t: &Target) -> Result<Value, ApiError> {
    if t.ephemeral {
        publish_ephemeral(node, &t.channel, &t.data, t.from.as_deref()).await
    } else {
        publish_one(node, &t.channel, &t.data, t.from.as_deref()).await
    }
}

/// Publishes an ephemeral message: `{"channel":…,"ephemeral":true}`, no offset (it has
/// none). Only the nodes with subscribers at that moment get it.
async fn publish_ephemeral(
    node: &Node,
    channel: &str,
    data: &RawValue,
    from: Option<&str>,
) -> Result<Value, ApiError> {
    node.broker
        .publish_ephemeral(channel, data.get(), from)
        .await
        .inspect_err(|_| {
            node.metrics.broker_errors.inc();
        })?;
    node.metrics.ephemeral_published.inc();
    Ok(json!({ "channel": channel, "ephemeral": true }))
}

/// Publishes one message and answers as `/v1/publish` does.
async fn publish_one(
    node: &Node,
    channel: &str,
    data: &RawValue,
    from: Option<&str>,
) -> Result<Value, ApiError> {
    // A personal channel is scheduled for the unacked check first (receipts).
    node.receipts
        .before_publish(channel)
        .await
        .inspect_err(|_| {
            node.metrics.broker_errors.inc();
        })?;
    let answer = node.broker.publish(channel, data.get(), from).await;
    published(node, channel, data, answer)
}

/// The answer to one publish, as `/v1/publish` gives it; counts it.
fn published(
    node: &Node,
    channel: &str,
    data: &RawValue,
    answer: Result<StreamPosition, BrokerError>,
) -> Result<Value, ApiError> {
    let position = answer.inspect_err(|_| {
        node.metrics.broker_errors.inc();
    })?;
    node.metrics.messages_published.inc();
    node.metrics.message_bytes.observe(data.get().len() as f64);
    Ok(json!({
        "channel": channel,
        "offset": position.offset,
        "epoch": position.epoch,
    }))
}

async fn user_presence(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    Path(user): Path<String>,
) -> Result<Json<Value>, ApiError> {
    validate_user(&user).map_err(|e| ApiError::bad_request(format!("user id {e}")))?;
    // Per node (an addition for the dashboard): `connections` is their sum.
    let mut users = node.broker.presence_by_node(&user_channel(&user)).await?;
    let nodes = users.remove(&user).unwrap_or_default();
    let connections = nodes.values().fold(0u32, |sum, n| sum.saturating_add(*n));
    Ok(Json(json!({
        "user": user,
        "online": connections > 0,
        "connections": connections,
        "nodes": nodes,
    })))
}

/// Largest body of a user command (`disconnect`, `subscribe`, …): a few fields.
const USER_COMMAND_BODY_BYTES: usize = 4096;

/// Reads a user command's JSON body. An empty body is `{}`.
async fn command_body<T: serde::de::DeserializeOwned>(
    node: &Node,
    body: Body,
) -> Result<T, ApiError> {
    let bytes = read_body(node, body, USER_COMMAND_BODY_BYTES).await?;
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))
}

/// Sends a user command through the broker to every node and answers with the count.
async fn user_command(
    node: &Node,
    user: &str,
    command: UserCommand,
) -> Result<Json<Value>, ApiError> {
    validate_user(user).map_err(|e| ApiError::bad_request(format!("user id {e}")))?;
    let sessions = node
        .broker
        .user_command(user, &command)
        .await
        .inspect_err(|_| {
            node.metrics.broker_errors.inc();
        })?;
    tracing::info!(user, ?command, sessions, "user command");
    Ok(Json(json!({ "sessions": sessions })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    /// 4401 (get a new token and reconnect) when true, 4410 (kicked) when false.
    #[serde(default = "yes")]
    reconnect: bool,
}

fn yes() -> bool {
    true
}

/// `POST /v1/users/{user}/disconnect`: closes every session of the user, cluster-wide.
async fn user_disconnect(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    Path(user): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body: DisconnectBody = command_body(&node, body).await?;
    let command = UserCommand::Disconnect {
        reconnect: body.reconnect,
    };
    user_command(&node, &user, command).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelBody {
    channel: String,
}

/// The channel of a server subscribe or unsubscribe: a valid name, and not a personal
/// channel (nobody else may be in one, and its owner cannot leave it).
fn server_channel(body: ChannelBody) -> Result<String, ApiError> {
    validate_channel(&body.channel)
        .map_err(|e| ApiError::bad_request(format!("channel name {e}")))?;
    if herald_protocol::channel::personal_channel_owner(&body.channel).is_some() {
        return Err(ApiError::bad_request(
            "personal channels (user:…) cannot be joined or left",
        ));
    }
    Ok(body.channel)
}

/// A subscribe or unsubscribe: the body's channel, checked, in the command `make` builds.
async fn channel_command(
    node: &Node,
    user: &str,
    body: Body,
    make: fn(String) -> UserCommand,
) -> Result<Json<Value>, ApiError> {
    let channel = server_channel(command_body(node, body).await?)?;
    user_command(node, user, make(channel)).await
}

/// `POST /v1/users/{user}/subscribe`: the user's current sessions join a channel.
async fn user_subscribe(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    Path(user): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    channel_command(&node, &user, body, |channel| UserCommand::Subscribe {
        channel,
    })
    .await
}

/// `POST /v1/users/{user}/unsubscribe`: the user's current sessions leave a channel.
async fn user_unsubscribe(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    Path(user): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    channel_command(&node, &user, body, |channel| UserCommand::Unsubscribe {
        channel,
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    /// Unix seconds; tokens issued before are refused.
    before: u64,
}

/// `POST /v1/users/{user}/revoke`: tokens of the user issued before `before` are
/// refused from now on, on every node, and the sessions holding one are closed (4401).
///
/// The revocation lasts until `max(before, now)` plus the longest token lifetime the
/// node accepts: by then every token it refuses has expired. `before` may not lie
/// further ahead than that lifetime.
async fn user_revoke(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    Path(user): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body: RevokeBody = command_body(&node, body).await?;
    let now = crate::auth::now_secs();
    let lifetime = node.keys.verifier.max_lifetime_secs();
    if body.before == 0 || body.before > now.saturating_add(lifetime) {
        return Err(ApiError::bad_request(format!(
            "`before` must be unix seconds from 1 to now + {lifetime}"
        )));
    }
    let command = UserCommand::Revoke {
        before: body.before,
        until: body.before.max(now).saturating_add(lifetime),
    };
    user_command(&node, &user, command).await
}

async fn channel_presence(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    Path(channel): Path<String>,
) -> Result<Json<Value>, ApiError> {
    validate_channel(&channel).map_err(|e| ApiError::bad_request(format!("channel name {e}")))?;
    let users = node.broker.presence(&channel).await?;
    Ok(Json(json!({ "channel": channel, "users": users })))
}

fn number_param(params: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    params
        .get(name)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("`{name}` must be a non-negative integer"))
            })
        })
        .transpose()
}

async fn history(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    Path(channel): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<HistoryAnswer>, ApiError> {
    validate_channel(&channel).map_err(|e| ApiError::bad_request(format!("channel name {e}")))?;
    let since = number_param(&params, "since")?.unwrap_or(0);
    let max = node.config.history_size as u64;
    let limit = number_param(&params, "limit")?.unwrap_or(max).min(max) as usize;
    let h = node.broker.history(&channel, since, limit).await?;
    let messages = history_messages(&h.publications);
    // Serialized straight from the struct: `json!` would go through `Value` again.
    Ok(Json(HistoryAnswer {
        channel,
        epoch: h.position.epoch,
        offset: h.position.offset,
        messages,
    }))
}

/// Stored messages as the API answers them. `data` goes out exactly as it was
/// published, like on the WebSocket: parsing it into a `Value` would turn big integers
/// into floats, numbers out of f64's range and values nested deeper than serde_json's
/// recursion limit into errors.
fn history_messages(publications: &[Publication]) -> Vec<HistoryMessage> {
    publications
        .iter()
        .map(|p| HistoryMessage {
            offset: p.offset,
            from: p.from.as_deref().map(str::to_owned),
            data: raw_json(&p.data),
        })
        .collect()
}

/// Messages `GET /v1/users/{user}/unread` returns without a `limit`.
pub const UNREAD_DEFAULT_LIMIT: u64 = 100;

/// `GET /v1/users/{user}/unread?limit=M` (v1.1): the user's acknowledged position on
/// the personal channel, its latest offset and epoch, and the unacknowledged messages
/// still in history, oldest first: at most `limit` (default [`UNREAD_DEFAULT_LIMIT`],
/// at most the history size).
async fn user_unread(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    Path(user): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    validate_user(&user).map_err(|e| ApiError::bad_request(format!("user id {e}")))?;
    let max = node.config.history_size as u64;
    let limit = number_param(&params, "limit")?
        .unwrap_or(UNREAD_DEFAULT_LIMIT)
        .min(max) as usize;
    let channel = user_channel(&user);
    let ack = node.broker.acked(&channel).await?;
    let mut h = node.broker.history(&channel, ack.acked, limit).await?;
    let mut acked = ack.acked;
    if h.position.epoch != ack.epoch {
        // A new epoch started between the two reads: nothing of it is acked.
        acked = 0;
        h = node.broker.history(&channel, 0, limit).await?;
    }
    let messages = history_messages(&h.publications);
    Ok(Json(json!({
        "user": user,
        "acked": acked,
        "offset": h.position.offset,
        "epoch": h.position.epoch,
        "messages": messages,
    })))
}

/// The answer of `GET /v1/channels/{channel}/history`.
#[derive(serde::Serialize)]
struct HistoryAnswer {
    channel: String,
    epoch: String,
    offset: u64,
    messages: Vec<HistoryMessage>,
}

/// One message of a history answer, its data as raw JSON.
#[derive(serde::Serialize)]
struct HistoryMessage {
    offset: u64,
    /// The publisher, when known (as in the `message` frame).
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    data: Box<RawValue>,
}

/// Stored data as raw JSON. It was validated when published; `null` if a broker ever
/// holds something else, rather than an invalid answer.
fn raw_json(data: &str) -> Box<RawValue> {
    RawValue::from_string(data.to_owned())
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON"))
}

async fn nodes(_: ApiKeyAuth, State(node): State<Arc<Node>>) -> Result<Json<Value>, ApiError> {
    let nodes = node.broker.nodes().await?;
    Ok(Json(json!({ "nodes": nodes })))
}

async fn connect(State(node): State<Arc<Node>>) -> Result<Json<Value>, ApiError> {
    let nodes = node.broker.nodes().await?;
    match least_loaded(&nodes) {
        Some(n) => Ok(Json(json!({ "node": n.id, "url": n.url }))),
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "no live node accepts clients",
        )),
    }
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(node): State<Arc<Node>>) -> (StatusCode, Json<Value>) {
    let broker = node.broker.is_healthy();
    let draining = node.is_draining();
    let status = if broker && !draining {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "ready": status == StatusCode::OK, "broker": broker, "draining": draining })),
    )
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        node.metrics.render(),
    )
}

/// Dev tokens live for a day, or the longest lifetime the node accepts if shorter.
const DEV_TOKEN_TTL_SECS: u64 = 86_400;

/// The lifetime of a dev token on this node.
pub(crate) fn dev_token_ttl(node: &Node) -> u64 {
    DEV_TOKEN_TTL_SECS.min(node.keys.verifier.max_lifetime_secs())
}

async fn dev_token(
    State(node): State<Arc<Node>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let Some(signer) = node.keys.dev_signer.as_ref() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "dev tokens exist only in dev mode with an HS256 secret",
        ));
    };
    let user = params
        .get("user")
        .ok_or_else(|| ApiError::bad_request("`user` is missing"))?;
    validate_user(user).map_err(|e| ApiError::bad_request(format!("user id {e}")))?;
    Ok(Json(
        json!({ "token": signer.dev_token(user, dev_token_ttl(&node)) }),
    ))
}
