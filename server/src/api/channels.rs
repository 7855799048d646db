//! The channel API: presence and history.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::Json;
use serde_json::{json, Value};

use super::number_param;
use super::raw_json;
use super::{ApiError, ApiKeyAuth, PathParam};
use crate::backend::streams::Publication;
use crate::node::Node;
use herald_protocol::channel::validate_channel;
use serde_json::value::RawValue;
use std::collections::HashMap;

pub(super) async fn channel_presence(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    PathParam(channel): PathParam<String>,
) -> Result<Json<Value>, ApiError> {
    validate_channel(&channel).map_err(|e| ApiError::bad_request(format!("channel name {e}")))?;
    let users = node.presence(&channel).await?;
    Ok(Json(json!({ "channel": channel, "users": users })))
}

pub(super) async fn history(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    PathParam(channel): PathParam<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<HistoryAnswer>, ApiError> {
    validate_channel(&channel).map_err(|e| ApiError::bad_request(format!("channel name {e}")))?;
    let since = number_param(&params, "since")?.unwrap_or(0);
    let max = node.config.history_size as u64;
    let limit = number_param(&params, "limit")?.unwrap_or(max).min(max) as usize;
    let h = node.history(&channel, since, limit).await?;
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
pub(super) fn history_messages(publications: &[Publication]) -> Vec<HistoryMessage> {
    publications
        .iter()
        .map(|p| HistoryMessage {
            offset: p.offset,
            from: p.from.as_deref().map(str::to_owned),
            data: raw_json(&p.data),
        })
        .collect()
}

/// The answer of `GET /v1/channels/{channel}/history`.
#[derive(serde::Serialize)]
pub(super) struct HistoryAnswer {
    channel: String,
    epoch: String,
    offset: u64,
    messages: Vec<HistoryMessage>,
}

/// One message of a history answer, its data as raw JSON.
#[derive(serde::Serialize)]
pub(super) struct HistoryMessage {
    offset: u64,
    /// The publisher, when known (as in the `message` frame).
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    data: Box<RawValue>,
}
