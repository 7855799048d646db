//! The registry, health, metrics and dev-token endpoints.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::Json;
use serde_json::{json, Value};

use super::{ApiError, ApiKeyAuth};
use crate::node::Node;
use crate::registry::least_loaded;
use axum::http::header;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use herald_protocol::channel::validate_user;
use herald_protocol::codes::ErrorCode;
use std::collections::HashMap;

pub(super) async fn nodes(
    _: ApiKeyAuth,
    State(node): State<Arc<Node>>,
) -> Result<Json<Value>, ApiError> {
    let nodes = node.nodes().await?;
    Ok(Json(json!({ "nodes": nodes })))
}

pub(super) async fn connect(State(node): State<Arc<Node>>) -> Result<Json<Value>, ApiError> {
    let nodes = node.nodes().await?;
    match least_loaded(&nodes) {
        Some(n) => Ok(Json(json!({ "node": n.id, "url": n.url }))),
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "no live node accepts clients",
        )),
    }
}

pub(super) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

pub(super) async fn readyz(State(node): State<Arc<Node>>) -> (StatusCode, Json<Value>) {
    let broker = node.backend_healthy();
    let draining = node.is_draining();
    let status = if broker && !draining {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body =
        json!({ "ready": status == StatusCode::OK, "broker": broker, "draining": draining });
    // How long the broker has been healthy: a peer cut off from Redis moves its clients
    // here only if this node kept working meanwhile (`crate::cutoff`).
    // Healthy a moment ago but not yet seen so by the watcher (it looks every 100 ms):
    // 0, never "unknown", which a peer would take for an older node that counts.
    if status == StatusCode::OK && node.config.redis_url.is_some() {
        let ready_for = node.readiness.healthy_for().unwrap_or_default();
        body["ready_for_ms"] = json!(ready_for.as_millis() as u64);
    }
    (status, Json(body))
}

pub(super) async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        node.metrics.render(),
    )
}

/// Dev tokens live for a day, or the longest lifetime the node accepts if shorter.
pub(super) const DEV_TOKEN_TTL_SECS: u64 = 86_400;

/// The lifetime of a dev token on this node.
pub fn dev_token_ttl(node: &Node) -> u64 {
    DEV_TOKEN_TTL_SECS.min(node.keys.verifier.max_lifetime_secs())
}

pub(super) async fn dev_token(
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
