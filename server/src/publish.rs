//! The publish verb: the one owner of "publish a message", which the HTTP API and the
//! socket both call.
//!
//! Order of one publish: a personal channel is first scheduled for the unacked check
//! (receipts; before the publish, so a crash in between leaves only a harmless entry),
//! then the backend stores and routes it, then it is counted. A message whose channel
//! could not be scheduled is not published. Every failure is counted once, here, in
//! `herald_broker_errors_total`; the caller maps it to its answer and logs it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use herald_protocol::channel::personal_channel_owner;
use herald_protocol::StreamPosition;

use crate::backend::error::BackendError;
use crate::backend::routing::Routing;
use crate::backend::streams::{BatchMessage, Streams};
use crate::metrics::Metrics;
use crate::receipts::Receipts;

/// Why a publish failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The backend failed (see [`BackendError`] for unavailable versus internal).
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// One message to publish: ordinary (numbered, stored) or ephemeral (routed only).
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// The channel (checked by the caller).
    pub channel: &'a str,
    /// The data, JSON text (checked by the caller).
    pub data: &'a str,
    /// The publisher (a valid user id, checked by the caller; a socket's own user).
    pub from: Option<&'a str>,
    /// Routed to the nodes subscribed now, never stored or numbered.
    pub ephemeral: bool,
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// Stored at this position of the channel.
    Stored(StreamPosition),
    /// Routed as an ephemeral message (no position).
    Ephemeral,
}

/// The publish verb over the capabilities it uses.
pub struct Publisher {
    streams: Arc<dyn Streams>,
    routing: Arc<dyn Routing>,
    receipts: Arc<Receipts>,
    metrics: Arc<Metrics>,
}

impl Publisher {
    /// A publisher storing through `streams`, routing ephemeral messages through
    /// `routing`, scheduling personal channels with `receipts`.
    pub fn new(
        streams: Arc<dyn Streams>,
        routing: Arc<dyn Routing>,
        receipts: Arc<Receipts>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            streams,
            routing,
            receipts,
            metrics,
        }
    }

    /// Publishes one message.
    pub async fn publish(&self, m: Message<'_>) -> Result<Published, PublishError> {
        if m.ephemeral {
            return self.ephemeral(m).await;
        }
        self.receipts
            .before_publish(m.channel)
            .await
            .inspect_err(|_| {
                self.metrics.broker_errors.inc();
            })?;
        let answer = self.streams.publish(m.channel, m.data, m.from).await;
        self.stored(m.data, answer)
    }

    /// Publishes several messages and answers each in the order given. Messages to one
    /// channel keep their order; the ordinary ones go to the backend as one batch (one
    /// script call per Redis slot), each personal channel scheduled once first.
    pub async fn publish_batch(
        &self,
        messages: &[Message<'_>],
    ) -> Vec<Result<Published, PublishError>> {
        let mut results: Vec<Option<Result<Published, PublishError>>> =
            messages.iter().map(|_| None).collect();
        // Ephemeral messages go out on their own (no offset, nothing to order).
        let (ephemeral, ordinary): (Vec<_>, Vec<_>) =
            messages.iter().enumerate().partition(|(_, m)| m.ephemeral);
        let sent = ephemeral
            .iter()
            .map(|(i, m)| async move { (*i, self.ephemeral(**m).await) });
        for (i, result) in futures_util::future::join_all(sent).await {
            results[i] = Some(result);
        }
        let personal: BTreeSet<&str> = ordinary
            .iter()
            .map(|(_, m)| m.channel)
            .filter(|c| personal_channel_owner(c).is_some())
            .collect();
        let scheduled = futures_util::future::join_all(
            personal
                .into_iter()
                .map(|c| async move { (c, self.receipts.before_publish(c).await) }),
        )
        .await;
        let refused: HashMap<&str, BackendError> = scheduled
            .into_iter()
            .filter_map(|(c, r)| r.err().map(|e| (c, e)))
            .collect();
        let (refused_messages, ordinary): (Vec<_>, Vec<_>) = ordinary
            .into_iter()
            .partition(|(_, m)| refused.contains_key(m.channel));
        for (i, m) in refused_messages {
            self.metrics.broker_errors.inc();
            results[i] = Some(Err(refused[m.channel].clone().into()));
        }
        let batch: Vec<BatchMessage<'_>> = ordinary
            .iter()
            .map(|(_, m)| BatchMessage {
                channel: m.channel,
                data: m.data,
                from: m.from,
            })
            .collect();
        let answers = self.streams.publish_batch(&batch).await;
        for ((i, m), answer) in ordinary.iter().zip(answers) {
            results[*i] = Some(self.stored(m.data, answer));
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(BackendError::Internal("no publish answer".into()).into()))
            })
            .collect()
    }

    async fn ephemeral(&self, m: Message<'_>) -> Result<Published, PublishError> {
        self.routing
            .publish_ephemeral(m.channel, m.data, m.from)
            .await
            .inspect_err(|_| {
                self.metrics.broker_errors.inc();
            })?;
        self.metrics.ephemeral_published.inc();
        Ok(Published::Ephemeral)
    }

    /// Counts a stored message, or its failure.
    fn stored(
        &self,
        data: &str,
        answer: Result<StreamPosition, BackendError>,
    ) -> Result<Published, PublishError> {
        let position = answer.inspect_err(|_| {
            self.metrics.broker_errors.inc();
        })?;
        self.metrics.messages_published.inc();
        self.metrics.message_bytes.observe(data.len() as f64);
        Ok(Published::Stored(position))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::backend::settings::BackendSettings;
    use crate::config::Config;

    fn publisher() -> Publisher {
        let b = Arc::new(MemoryBackend::new(BackendSettings::from_config(
            &Config::default(),
        )));
        let metrics = Arc::new(Metrics::new());
        let receipts = Arc::new(Receipts::new(b.clone(), Arc::clone(&metrics), 0, 10));
        // The stream is taken so that publishes do not wait for a consumer.
        let mut events = crate::backend::routing::Routing::events(&*b).expect("events");
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        Publisher::new(b.clone(), b, receipts, metrics)
    }

    fn msg<'a>(channel: &'a str, data: &'a str, ephemeral: bool) -> Message<'a> {
        Message {
            channel,
            data,
            from: None,
            ephemeral,
        }
    }

    #[tokio::test]
    async fn a_batch_answers_in_order_and_keeps_each_channel_in_order() {
        let p = publisher();
        let answers = p
            .publish_batch(&[
                msg("a", "1", false),
                msg("b", "1", false),
                msg("a", "2", true),
                msg("a", "3", false),
            ])
            .await;
        let offsets: Vec<Option<u64>> = answers
            .into_iter()
            .map(|r| match r.expect("published") {
                Published::Stored(p) => Some(p.offset),
                Published::Ephemeral => None,
            })
            .collect();
        assert_eq!(offsets, vec![Some(1), Some(1), None, Some(2)]);
        assert_eq!(p.metrics.messages_published.get(), 3);
        assert_eq!(p.metrics.ephemeral_published.get(), 1);
    }

    #[tokio::test]
    async fn single_and_batch_number_the_same_stream() {
        let p = publisher();
        let first = p.publish(msg("c", "1", false)).await.expect("published");
        assert!(matches!(first, Published::Stored(ref s) if s.offset == 1));
        let more = p.publish_batch(&[msg("c", "2", false)]).await;
        assert!(matches!(more[0], Ok(Published::Stored(ref s)) if s.offset == 2));
    }
}
