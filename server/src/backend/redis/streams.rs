//! The Redis backend's Streams.

use async_trait::async_trait;

use super::broker_error;
use super::coalesce;
use super::millis;
use super::parse_position;
use super::scripts;
use super::RedisBackend;
use crate::backend::error::BackendError;
use crate::backend::streams::BatchMessage;
use crate::backend::streams::History;
use crate::backend::streams::Publication;
use crate::backend::streams::Streams;
use fred::types::Value;
use herald_protocol::StreamPosition;
use std::sync::Arc;
use tokio::sync::oneshot;

#[async_trait]
impl Streams for RedisBackend {
    async fn publish(
        &self,
        channel: &str,
        data: &str,
        from: Option<&str>,
    ) -> Result<StreamPosition, BackendError> {
        let message = BatchMessage {
            channel,
            data,
            from,
        };
        self.publish_batch(&[message])
            .await
            .pop()
            .unwrap_or_else(|| Err(BackendError::Internal("no publish answer".into())))
    }

    async fn publish_batch(
        &self,
        messages: &[BatchMessage<'_>],
    ) -> Vec<Result<StreamPosition, BackendError>> {
        let inner = &self.inner;
        // Fail fast while disconnected, as every command does (nothing is queued).
        if let Err(e) = inner.publisher() {
            return messages.iter().map(|_| Err(e.clone())).collect();
        }
        // Queued in order under one lock: a channel's messages keep their order, and
        // those of one slot go out in as few calls as the call bounds allow.
        let mut answers = Vec::with_capacity(messages.len());
        let queued: Vec<(u16, coalesce::Outgoing)> = messages
            .iter()
            .map(|m| {
                let (done, answer) = oneshot::channel();
                answers.push(answer);
                let message = coalesce::Outgoing {
                    channel: m.channel.to_owned(),
                    data: Value::from(m.data),
                    from: Value::from(m.from.unwrap_or_default()),
                    done,
                };
                (self.lane(m.channel), message)
            })
            .collect();
        for lane in inner.lanes.enqueue(queued) {
            tokio::spawn(coalesce::flush(self.inner.clone(), lane));
        }
        let mut out = Vec::with_capacity(answers.len());
        for answer in answers {
            out.push(
                answer.await.unwrap_or_else(|_| {
                    Err(BackendError::Unavailable("redis broker stopped".into()))
                }),
            );
        }
        out
    }

    async fn history(
        &self,
        channel: &str,
        since: u64,
        limit: usize,
    ) -> Result<History, BackendError> {
        let inner = &self.inner;
        let client = inner.ready()?;
        let args = vec![
            millis(inner.settings.meta_ttl),
            format!("{}-0", since.saturating_add(1)),
            limit.min(inner.settings.history_size).to_string(),
            millis(inner.settings.history_ttl),
            inner.topology.replid_flag().to_owned(),
            inner.settings.history_size.to_string(),
        ];
        let answer: Vec<Value> = scripts::run(
            client,
            &inner.scripts.history,
            self.channel_keys(channel),
            args,
        )
        .await
        .map_err(broker_error)?;
        let position = parse_position(&answer)?;
        let epoch: Arc<str> = position.epoch.as_str().into();
        // (id, data, from) triples; from is '' when the message has no publisher.
        let mut publications = Vec::with_capacity(answer.len().saturating_sub(2) / 3);
        for entry in answer.get(2..).unwrap_or_default().chunks_exact(3) {
            let offset = entry[0]
                .as_str()
                .and_then(|id| id.split('-').next()?.parse::<u64>().ok())
                .ok_or_else(|| BackendError::Internal("bad history entry id".into()))?;
            let data = entry[1]
                .as_str()
                .ok_or_else(|| BackendError::Internal("bad history entry".into()))?;
            let from = match &entry[2] {
                Value::String(s) if !s.is_empty() => Some(Arc::from(&**s)),
                _ => None,
            };
            publications.push(Publication {
                offset,
                epoch: epoch.clone(),
                data: data.as_ref().into(),
                from,
            });
        }
        Ok(History {
            position,
            publications,
        })
    }

    async fn position(&self, channel: &str) -> Result<StreamPosition, BackendError> {
        // history.lua with a limit of 0 is exactly "read the position" (creating
        // nothing): one script keeps the epoch logic in one place.
        Ok(self.history(channel, 0, 0).await?.position)
    }
}
