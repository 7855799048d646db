//! `POST /v1/publish` and `POST /v1/publish/batch`: parse, check, call the publish
//! verb ([`crate::publish`]), answer.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::some_raw;
use super::{read_body, ApiError, ApiKeyAuth};
use crate::node::Node;
use crate::publish::{Message, Published};
use axum::http::StatusCode;
use herald_protocol::channel::user_channel;
use herald_protocol::channel::validate_channel;
use herald_protocol::channel::validate_user;
use herald_protocol::codes::ErrorCode;
use herald_protocol::depth::nests_deeper_than;
use herald_protocol::depth::MAX_DATA_DEPTH;
use serde_json::value::RawValue;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PublishBody {
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
pub(super) struct Target {
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

pub(super) async fn publish(
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
pub(super) const MIN_BATCH_BODY_BYTES: usize = 1 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchBody {
    messages: Vec<PublishBody>,
}

/// `POST /v1/publish/batch` (an addition to the contract): up to
/// [`MAX_BATCH_MESSAGES`] publishes in one request, each answered in the same order as
/// `/v1/publish` would answer it. An application that pushes to many users at once
/// saves one HTTP round trip per message, and the node hands the whole batch to the
/// publish verb at once ([`crate::publish::Publisher::publish_batch`]: with Redis, one
/// script call per cluster slot). Messages to the same channel are published in their batch
/// order; different channels are independent.
///
/// The answer is 200 with one result per message (an offset or an error), unless every
/// message failed: then it is the first error's status, so that a caller that only
/// looks at the status still sees an outage.
pub(super) async fn publish_batch(
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
    // One call of the publish verb for the whole batch, in batch order.
    let messages: Vec<Message<'_>> = targets.iter().map(|(_, t)| t.message()).collect();
    let answers = node.publisher.publish_batch(&messages).await;
    for ((i, t), answer) in targets.iter().zip(answers) {
        results[*i] = Some(
            answer
                .map(|p| answer_of(&t.channel, p))
                .map_err(ApiError::from),
        );
    }
    let results: Vec<Result<Value, ApiError>> = results
        .into_iter()
        .map(|r| r.expect("every message has a result"))
        .collect();
    if results.iter().all(Result::is_err) {
        let mut errors = results.into_iter().filter_map(Result::err);
        let first = errors.next().expect("a batch is not empty");
        // The first is logged as the response; the others here.
        errors.for_each(|e| e.log());
        return Err(first);
    }
    let results: Vec<Value> = results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|e| {
                e.log();
                json!({ "error": e.body })
            })
        })
        .collect();
    Ok(Json(json!({ "results": results })))
}

impl Target {
    /// The message the publish verb takes.
    fn message(&self) -> Message<'_> {
        Message {
            channel: &self.channel,
            data: self.data.get(),
            from: self.from.as_deref(),
            ephemeral: self.ephemeral,
        }
    }
}

/// Publishes one checked request, ordinary or ephemeral.
pub(super) async fn publish_target(node: &Node, t: &Target) -> Result<Value, ApiError> {
    let published = node.publisher.publish(t.message()).await?;
    Ok(answer_of(&t.channel, published))
}

/// The answer to one publish, as `/v1/publish` gives it: the position, or
/// `{"channel":…,"ephemeral":true}` for an ephemeral message (it has no offset).
pub(super) fn answer_of(channel: &str, published: Published) -> Value {
    match published {
        Published::Stored(position) => json!({
            "channel": channel,
            "offset": position.offset,
            "epoch": position.epoch,
        }),
        Published::Ephemeral => json!({ "channel": channel, "ephemeral": true }),
    }
}
