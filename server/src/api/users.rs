//! The user API: presence, disconnect, subscribe, unsubscribe, revoke and unread.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::channels::history_messages;
use super::number_param;
use super::read_body;
use super::{ApiError, ApiKeyAuth, PathParam};
use crate::backend::users::UserCommand;
use crate::node::Node;
use herald_protocol::channel::user_channel;
use herald_protocol::channel::validate_channel;
use herald_protocol::channel::validate_user;
use std::collections::HashMap;

pub(super) async fn user_presence(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    PathParam(user): PathParam<String>,
) -> Result<Json<Value>, ApiError> {
    validate_user(&user).map_err(|e| ApiError::bad_request(format!("user id {e}")))?;
    // Per node (an addition for the dashboard): `connections` is their sum.
    let mut users = node.presence_by_node(&user_channel(&user)).await?;
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
pub(super) const USER_COMMAND_BODY_BYTES: usize = 4096;

/// Reads a user command's JSON body. An empty body is `{}`.
pub(super) async fn command_body<T: serde::de::DeserializeOwned>(
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
pub(super) async fn user_command(
    node: &Node,
    user: &str,
    command: UserCommand,
) -> Result<Json<Value>, ApiError> {
    validate_user(user).map_err(|e| ApiError::bad_request(format!("user id {e}")))?;
    let sessions = node.users.command(user, &command).await.inspect_err(|_| {
        node.metrics.broker_errors.inc();
    })?;
    tracing::info!(user, ?command, sessions, "user command");
    Ok(Json(json!({ "sessions": sessions })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DisconnectBody {
    /// 4401 (get a new token and reconnect) when true, 4410 (kicked) when false.
    #[serde(default = "yes")]
    reconnect: bool,
}

pub(super) fn yes() -> bool {
    true
}

/// `POST /v1/users/{user}/disconnect`: closes every session of the user, cluster-wide.
pub(super) async fn user_disconnect(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    PathParam(user): PathParam<String>,
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
pub(super) struct ChannelBody {
    channel: String,
}

/// The channel of a server subscribe or unsubscribe: a valid name, and not a personal
/// channel (nobody else may be in one, and its owner cannot leave it).
pub(super) fn server_channel(body: ChannelBody) -> Result<String, ApiError> {
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
pub(super) async fn channel_command(
    node: &Node,
    user: &str,
    body: Body,
    make: fn(String) -> UserCommand,
) -> Result<Json<Value>, ApiError> {
    let channel = server_channel(command_body(node, body).await?)?;
    user_command(node, user, make(channel)).await
}

/// `POST /v1/users/{user}/subscribe`: the user's current sessions join a channel.
pub(super) async fn user_subscribe(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    PathParam(user): PathParam<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    channel_command(&node, &user, body, |channel| UserCommand::Subscribe {
        channel,
    })
    .await
}

/// `POST /v1/users/{user}/unsubscribe`: the user's current sessions leave a channel.
pub(super) async fn user_unsubscribe(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    PathParam(user): PathParam<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    channel_command(&node, &user, body, |channel| UserCommand::Unsubscribe {
        channel,
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RevokeBody {
    /// Unix seconds; tokens issued before are refused.
    before: u64,
}

/// `POST /v1/users/{user}/revoke`: tokens of the user issued before `before` are
/// refused from now on, on every node, and the sessions holding one are closed (4401).
///
/// The revocation lasts until `max(before, now)` plus the longest token lifetime the
/// node accepts: by then every token it refuses has expired. `before` may not lie
/// further ahead than that lifetime.
pub(super) async fn user_revoke(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    PathParam(user): PathParam<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body: RevokeBody = command_body(&node, body).await?;
    let now = crate::clock::now_secs();
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

/// Messages `GET /v1/users/{user}/unread` returns without a `limit`.
pub const UNREAD_DEFAULT_LIMIT: u64 = 100;

/// `GET /v1/users/{user}/unread?limit=M` (v1.1): the user's acknowledged position on
/// the personal channel, its latest offset and epoch, and the unacknowledged messages
/// still in history, oldest first: at most `limit` (default [`UNREAD_DEFAULT_LIMIT`],
/// at most the history size).
pub(super) async fn user_unread(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
    PathParam(user): PathParam<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    validate_user(&user).map_err(|e| ApiError::bad_request(format!("user id {e}")))?;
    let max = node.config.history_size as u64;
    let limit = number_param(&params, "limit")?
        .unwrap_or(UNREAD_DEFAULT_LIMIT)
        .min(max) as usize;
    let channel = user_channel(&user);
    let ack = node.receipts.acked(&channel).await?;
    let mut h = node.history(&channel, ack.acked, limit).await?;
    let mut acked = ack.acked;
    if h.position.epoch != ack.epoch {
        // A new epoch started between the two reads: nothing of it is acked.
        acked = 0;
        h = node.history(&channel, 0, limit).await?;
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
