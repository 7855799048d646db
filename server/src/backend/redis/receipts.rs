//! Delivery receipts in Redis (see [`crate::receipts`] for what they are).
//!
//! Per personal channel `C`, the hash `P{C}:r` (`e` epoch, `a` acked offset, `p`
//! reported up to) lives in the channel's slot, so one script compares it with the
//! channel's meta hash and history atomically. The due and claimed sets live in their
//! own slot `{#receipts}`: a publish schedules the channel there with one call before
//! the publish script runs, since a script may only touch one slot.
//!
//! The scripts are kept apart from the broker's core scripts (`scripts.rs`): they are
//! hashed once, on first use.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use fred::types::scripts::Script;
use fred::types::Value;
use futures_util::future::try_join_all;

use super::{broker_error, millis, scripts, RedisBackend};
use crate::backend::error::BackendError;
use crate::backend::receipts::{Ack, AckPosition, ReceiptStore, Scan, Unacked};

struct ReceiptScripts {
    ack: Script,
    acked: Script,
    schedule: Script,
    claim: Script,
    scan: Script,
    reported: Script,
    release: Script,
}

static SCRIPTS: LazyLock<ReceiptScripts> = LazyLock::new(|| ReceiptScripts {
    ack: Script::from_lua(include_str!("receipts/ack.lua")),
    acked: Script::from_lua(include_str!("receipts/acked.lua")),
    schedule: Script::from_lua(include_str!("receipts/schedule.lua")),
    claim: Script::from_lua(include_str!("receipts/claim.lua")),
    scan: Script::from_lua(include_str!("receipts/scan.lua")),
    reported: Script::from_lua(include_str!("receipts/reported.lua")),
    release: Script::from_lua(include_str!("receipts/release.lua")),
});

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => u64::try_from(*i).ok(),
        Value::String(s) => s.parse().ok(),
        Value::Bytes(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Integer(i) => Some(*i),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn bad(what: &str) -> BackendError {
    BackendError::Internal(format!("bad receipts answer: {what}"))
}

#[async_trait]
impl ReceiptStore for RedisBackend {
    async fn store_acks(&self, acks: &[Ack]) -> Result<(), BackendError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        // One script per channel (each may live on another shard), sent concurrently:
        // fred pipelines them on the connection.
        let ttl = millis(inner.settings.meta_ttl);
        let calls = acks.iter().map(|ack| {
            let keys = vec![
                inner.keys.receipts(&ack.channel),
                inner.keys.meta(&ack.channel),
            ];
            let args = vec![ack.epoch.clone(), ack.offset.to_string(), ttl.clone()];
            scripts::run::<Value>(client, &SCRIPTS.ack, keys, args)
        });
        try_join_all(calls).await.map_err(broker_error)?;
        Ok(())
    }

    async fn acked(&self, channel: &str) -> Result<AckPosition, BackendError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        let keys = vec![inner.keys.receipts(channel), inner.keys.meta(channel)];
        let answer: Vec<Value> = scripts::run(client, &SCRIPTS.acked, keys, vec![])
            .await
            .map_err(broker_error)?;
        let epoch = answer
            .first()
            .and_then(Value::as_str)
            .ok_or_else(|| bad("epoch"))?
            .to_string();
        let acked = answer.get(1).and_then(as_u64).ok_or_else(|| bad("acked"))?;
        Ok(AckPosition { epoch, acked })
    }

    async fn schedule(&self, channel: &str, delay: Duration) -> Result<Duration, BackendError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        let keys = vec![inner.keys.receipts_due()];
        let args = vec![channel.to_owned(), millis(delay)];
        let remaining: i64 = scripts::run(client, &SCRIPTS.schedule, keys, args)
            .await
            .map_err(broker_error)?;
        Ok(Duration::from_millis(remaining.max(0) as u64))
    }

    async fn claim_due(
        &self,
        limit: usize,
        visibility: Duration,
    ) -> Result<Vec<String>, BackendError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        let keys = vec![inner.keys.receipts_due(), inner.keys.receipts_claimed()];
        let args = vec![limit.max(1).to_string(), millis(visibility)];
        let answer: Vec<String> = scripts::run(client, &SCRIPTS.claim, keys, args)
            .await
            .map_err(broker_error)?;
        Ok(answer)
    }

    async fn scan(
        &self,
        channel: &str,
        timeout: Duration,
        limit: usize,
    ) -> Result<Scan, BackendError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        let keys = vec![
            inner.keys.meta(channel),
            inner.keys.history(channel),
            inner.keys.receipts(channel),
        ];
        let args = vec![
            millis(timeout),
            limit.max(1).to_string(),
            millis(inner.settings.history_ttl),
        ];
        let answer: Vec<Value> = scripts::run(client, &SCRIPTS.scan, keys, args)
            .await
            .map_err(broker_error)?;
        let epoch = answer
            .first()
            .and_then(Value::as_str)
            .ok_or_else(|| bad("epoch"))?
            .to_string();
        let next = answer.get(1).and_then(as_i64).ok_or_else(|| bad("next"))?;
        let mut overdue = Vec::new();
        for entry in answer.get(2..).unwrap_or_default().chunks_exact(4) {
            let offset = entry[0]
                .as_str()
                .and_then(|id| id.split('-').next()?.parse::<u64>().ok())
                .ok_or_else(|| bad("entry id"))?;
            let data = entry[1].as_str().ok_or_else(|| bad("entry data"))?;
            let from = match entry[2].as_str() {
                Some(s) if !s.is_empty() => Some(Arc::from(&*s)),
                _ => None,
            };
            overdue.push(Unacked {
                channel: channel.to_owned(),
                offset,
                epoch: epoch.clone(),
                data: Arc::from(&*data),
                from,
                published_at_ms: as_u64(&entry[3]).unwrap_or(0),
            });
        }
        Ok(Scan {
            epoch,
            overdue,
            next_due_in: u64::try_from(next).ok().map(Duration::from_millis),
        })
    }

    async fn finish(
        &self,
        channel: &str,
        epoch: &str,
        reported: u64,
        next_due_in: Option<Duration>,
    ) -> Result<(), BackendError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        // Reported first, claim released second: a crash between the two only makes
        // another sweeper look at the channel again and find nothing new.
        if reported > 0 && !epoch.is_empty() {
            let keys = vec![inner.keys.receipts(channel), inner.keys.meta(channel)];
            let args = vec![
                epoch.to_owned(),
                reported.to_string(),
                millis(inner.settings.meta_ttl),
            ];
            scripts::run::<Value>(client, &SCRIPTS.reported, keys, args)
                .await
                .map_err(broker_error)?;
        }
        let keys = vec![inner.keys.receipts_due(), inner.keys.receipts_claimed()];
        let next = next_due_in.map_or_else(|| "-1".to_owned(), |d| d.as_millis().to_string());
        let args = vec![channel.to_owned(), next];
        scripts::run::<Value>(client, &SCRIPTS.release, keys, args)
            .await
            .map_err(broker_error)?;
        Ok(())
    }
}
