//! The Redis backend's UserControl.

use async_trait::async_trait;
use fred::interfaces::{HashesInterface, KeysInterface, PubsubInterface};

use super::broker_error;
use super::keys;
use super::keys::Topology;
use super::scripts;
use super::Inner;
use super::RedisBackend;
use super::CONTROL_REPLY_TIMEOUT;
use super::CONTROL_REPLY_TTL;
use crate::backend::error::BackendError;
use crate::backend::routing::BackendEvent;
use crate::backend::users::Revocation;
use crate::backend::users::UserCommand;
use crate::backend::users::UserControl;
use fred::types::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

#[async_trait]
impl UserControl for RedisBackend {
    async fn user_command(&self, user: &str, command: &UserCommand) -> Result<u64, BackendError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        if let UserCommand::Revoke { before, until } = command {
            let ttl_ms = until
                .saturating_sub(crate::clock::now_secs())
                .max(1)
                .saturating_mul(1000);
            let args = vec![
                user.to_owned(),
                before.to_string(),
                until.to_string(),
                ttl_ms.to_string(),
            ];
            scripts::run::<Value>(
                client,
                &inner.scripts.revoke,
                vec![inner.keys.revocations()],
                args,
            )
            .await
            .map_err(broker_error)?;
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let message = ControlMessage {
            id: id.clone(),
            user: user.to_owned(),
            command: command.clone(),
        };
        let payload = serde_json::to_string(&message)
            .map_err(|e| BackendError::Internal(format!("user command: {e}")))?;
        let channel = inner.keys.pubsub(keys::CONTROL);
        // The answer counts the subscriber connections that received it: one per node.
        let receivers: i64 = match inner.topology {
            Topology::Single | Topology::Sentinel => client.publish(channel, payload).await,
            Topology::Cluster => client.spublish(channel, payload).await,
        }
        .map_err(broker_error)?;
        let key = inner.keys.control_reply(&id);
        let deadline = tokio::time::Instant::now() + CONTROL_REPLY_TIMEOUT;
        let mut wait = Duration::from_millis(2);
        let answers: HashMap<String, String> = loop {
            let answers: HashMap<String, String> =
                client.hgetall(key.as_str()).await.map_err(broker_error)?;
            if answers.len() as i64 >= receivers || tokio::time::Instant::now() >= deadline {
                if (answers.len() as i64) < receivers {
                    tracing::warn!(
                        nodes = receivers,
                        answered = answers.len(),
                        "some nodes did not answer a user command in time; not counted"
                    );
                }
                break answers;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(50));
        };
        let _ = client.del::<Value, _>(key.as_str()).await;
        Ok(answers.values().filter_map(|v| v.parse::<u64>().ok()).sum())
    }

    async fn revocations(&self) -> Result<Vec<Revocation>, BackendError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        let key = inner.keys.revocations();
        let entries: HashMap<String, String> =
            client.hgetall(key.as_str()).await.map_err(broker_error)?;
        let now = crate::clock::now_secs();
        let mut list = Vec::new();
        let mut stale = Vec::new();
        for (user, value) in entries {
            let parsed = value
                .split_once('|')
                .and_then(|(b, u)| Some((b.parse::<u64>().ok()?, u.parse::<u64>().ok()?)));
            match parsed {
                Some((before, until)) if until > now => list.push(Revocation {
                    user,
                    before,
                    until,
                }),
                _ => stale.push(user),
            }
        }
        if !stale.is_empty() {
            // Over or unreadable: forgotten; the answer is right without the cleanup.
            let _ = client.hdel::<Value, _, _>(key.as_str(), stale).await;
        }
        Ok(list)
    }
}

/// A user command as it travels over the control channel.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct ControlMessage {
    /// Names the reply hash.
    id: String,
    user: String,
    command: UserCommand,
}

/// Hands a user command from the control channel to the hub, then answers with the
/// count of sessions it affected (in a task: the reader must not wait).
pub(super) async fn on_control(inner: &Arc<Inner>, text: &str) {
    let message: ControlMessage = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "malformed user command from redis");
            return;
        }
    };
    let (reply, count) = oneshot::channel();
    let event = BackendEvent::UserCommand {
        user: message.user,
        command: message.command,
        reply,
    };
    if inner.events.send(event).await.is_err() {
        return; // nobody listens: the node is stopping
    }
    let inner = Arc::clone(inner);
    let id = message.id;
    tokio::spawn(async move {
        let Ok(sessions) = count.await else { return };
        let Ok(client) = inner.ready() else { return };
        let key = inner.keys.control_reply(&id);
        let reply = async {
            client
                .hset::<Value, _, _>(key.as_str(), (inner.keys.node_id(), sessions.to_string()))
                .await?;
            client
                .pexpire::<Value, _>(key.as_str(), CONTROL_REPLY_TTL.as_millis() as i64, None)
                .await
        };
        if let Err(e) = reply.await {
            tracing::debug!(error = %e, "could not answer a user command");
        }
    });
}
