//! The Redis broker's webhook state: the model of [`crate::backend::webhooks`] in Redis,
//! every key under `<prefix>{#webhook}:` (one cluster slot), every step one Lua call
//! (`webhook.lua` for presence and the log, `webhook_deliver.lua` for leases and
//! cursors).

use std::sync::Arc;

use async_trait::async_trait;
use fred::types::scripts::Script;
use fred::types::Value;

use super::{broker_error, millis, scripts, Inner};
use crate::backend::error::BackendError;
use crate::backend::webhooks::{
    subject_field, Batch, Holding, NewEvent, StoredEvent, WebhookStore, WebhookStoreSettings,
};

/// Offline events one sweep call emits at most: bounds the time the script blocks
/// Redis; the rest are emitted by the next sweep.
const SWEEP_LIMIT: usize = 1_000;

/// Holdings of dead or leaving nodes let go of per call (see `webhook.lua`), for the
/// same reason: a node with 20,000 users is dropped over 20 sweeps, not in one call.
pub const DROP_LIMIT: usize = 1_000;

/// Holdings per report call, for the same reason.
const REPORT_CHUNK: usize = 512;

/// See the module doc.
pub(crate) struct RedisWebhookStore {
    inner: Arc<Inner>,
    settings: WebhookStoreSettings,
    presence: Script,
    deliver: Script,
    /// `<prefix>{#webhook}:`
    base: String,
}

impl RedisWebhookStore {
    pub(crate) fn new(inner: Arc<Inner>, settings: WebhookStoreSettings) -> Self {
        let base = inner.keys.webhook();
        Self {
            inner,
            settings,
            presence: Script::from_lua(include_str!("webhook.lua")),
            deliver: Script::from_lua(include_str!("webhook_deliver.lua")),
            base,
        }
    }

    /// Runs `webhook.lua` with `op` and its own arguments.
    async fn presence<R: fred::types::FromValue>(
        &self,
        op: &str,
        more: Vec<String>,
    ) -> Result<R, BackendError> {
        let client = self.inner.ready()?;
        let b = &self.base;
        let keys = vec![format!("{b}meta"), format!("{b}log"), format!("{b}nodes")];
        let mut args = vec![
            op.to_owned(),
            b.clone(),
            super::keys::new_epoch(),
            self.settings.grace.as_millis().to_string(),
            self.settings.retention.max(1).to_string(),
        ];
        args.extend(more);
        scripts::run(client, &self.presence, keys, args)
            .await
            .map_err(broker_error)
    }

    /// Runs `webhook_deliver.lua` for `target`.
    async fn deliver(
        &self,
        op: &str,
        target: &str,
        holder: &str,
        more: Option<String>,
    ) -> Result<Value, BackendError> {
        let client = self.inner.ready()?;
        let b = &self.base;
        let keys = vec![
            format!("{b}lease:{target}"),
            format!("{b}cursor"),
            format!("{b}log"),
        ];
        let mut args = vec![
            op.to_owned(),
            target.to_owned(),
            holder.to_owned(),
            millis(self.settings.lease),
        ];
        args.extend(more);
        scripts::run(client, &self.deliver, keys, args)
            .await
            .map_err(broker_error)
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => u64::try_from(*i).ok(),
        other => other.as_str().and_then(|s| s.parse().ok()),
    }
}

#[async_trait]
impl WebhookStore for RedisWebhookStore {
    async fn report(&self, node: &str, holdings: &[Holding]) -> Result<bool, BackendError> {
        let mut fresh = false;
        // An empty report still runs once: it is the heartbeat.
        let chunks: Vec<&[Holding]> = if holdings.is_empty() {
            vec![&[]]
        } else {
            holdings.chunks(REPORT_CHUNK).collect()
        };
        for chunk in chunks {
            let mut args = Vec::with_capacity(1 + chunk.len() * 2);
            args.push(node.to_owned());
            for h in chunk {
                args.push(h.subject.clone());
                args.push(if h.held { "1" } else { "0" }.to_owned());
            }
            let answer: i64 = self.presence("report", args).await?;
            fresh |= answer == 1;
        }
        Ok(fresh)
    }

    async fn leave(&self, node: &str) -> Result<(), BackendError> {
        self.presence::<Value>("leave", vec![node.to_owned(), DROP_LIMIT.to_string()])
            .await?;
        Ok(())
    }

    async fn sweep(&self) -> Result<u64, BackendError> {
        let emitted: i64 = self
            .presence(
                "sweep",
                vec![
                    millis(self.settings.node_ttl),
                    SWEEP_LIMIT.to_string(),
                    DROP_LIMIT.to_string(),
                ],
            )
            .await?;
        Ok(emitted.max(0) as u64)
    }

    async fn append(&self, event: &NewEvent) -> Result<(), BackendError> {
        let (field, name) = subject_field(&event.subject)?;
        self.presence::<Value>(
            "append",
            vec![
                event.kind.clone(),
                field.to_owned(),
                name.to_owned(),
                event.extra.clone(),
                event.id.clone().unwrap_or_default(),
            ],
        )
        .await?;
        Ok(())
    }

    async fn claim(&self, target: &str, holder: &str) -> Result<bool, BackendError> {
        let v = self.deliver("claim", target, holder, None).await?;
        Ok(as_u64(&v) == Some(1))
    }

    async fn read(
        &self,
        target: &str,
        holder: &str,
        max: usize,
    ) -> Result<Option<Batch>, BackendError> {
        let v = self
            .deliver("read", target, holder, Some(max.max(1).to_string()))
            .await?;
        let items = match v {
            Value::Array(items) => items,
            Value::Null => Vec::new(),
            other => {
                return Err(BackendError::Internal(format!(
                    "webhook read answered {other:?}"
                )))
            }
        };
        let Some((first, rest)) = items.split_first() else {
            return Ok(None);
        };
        let bad = || BackendError::Internal("malformed webhook read answer".into());
        let trimmed = as_u64(first).ok_or_else(bad)?;
        let mut events = Vec::with_capacity(rest.len() / 2);
        for pair in rest.chunks(2) {
            let [n, json] = pair else { return Err(bad()) };
            events.push(StoredEvent {
                n: as_u64(n).ok_or_else(bad)?,
                json: json.as_str().ok_or_else(bad)?.into_owned(),
            });
        }
        Ok(Some(Batch { events, trimmed }))
    }

    async fn ack(&self, target: &str, holder: &str, upto: u64) -> Result<bool, BackendError> {
        let v = self
            .deliver("ack", target, holder, Some(upto.to_string()))
            .await?;
        Ok(as_u64(&v) == Some(1))
    }

    async fn release(&self, target: &str, holder: &str) -> Result<(), BackendError> {
        self.deliver("release", target, holder, None).await?;
        Ok(())
    }
}
