//! Streams and history: each channel's numbered messages (offsets without gaps, an
//! epoch that changes when history is lost) and the short history a client resumes
//! from. Only a publish stores anything about a channel's stream; reading a channel
//! that has no stored state answers `(0, EMPTY_EPOCH)` and stores nothing, so that
//! subscribing to ever new names cannot grow the backend (see
//! [`herald_protocol::same_stream`] for why offset 0 needs no epoch).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use herald_protocol::StreamPosition;

use super::error::BackendError;

/// One published message as the broker numbered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// Offset in the channel, from 1, without gaps within an epoch.
    pub offset: u64,
    /// The channel's epoch when it was published.
    pub epoch: Arc<str>,
    /// The published value as JSON text (validated on the way in, never re-encoded).
    pub data: Arc<str>,
    /// Who published it: the publisher's user id for a socket publish (set by the
    /// server), what the backend gave for an API publish, `None` when nobody said.
    /// Stored with the message, so recovered messages carry it too.
    pub from: Option<Arc<str>>,
}

/// A slice of a channel's history and where the channel stands now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// The channel's latest offset and epoch.
    pub position: StreamPosition,
    /// Retained publications after the requested offset, in offset order.
    pub publications: Vec<Publication>,
}

/// One message of [`Self::publish_batch`]: what [`Self::publish`] takes.
#[derive(Debug, Clone, Copy)]
pub struct BatchMessage<'a> {
    /// The channel.
    pub channel: &'a str,
    /// The data (JSON text).
    pub data: &'a str,
    /// The publisher (a valid user id, checked by the caller).
    pub from: Option<&'a str>,
}

/// A random epoch: 8 alphanumeric characters.
pub fn new_epoch() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 8)
}

/// Numbering, storing and reading the messages of channels.
#[async_trait]
pub trait Streams: Send + Sync + 'static {
    /// Publishes `data` (JSON text) to `channel` as one atomic step: the next offset,
    /// appended to history, routed to subscribed nodes. Returns the message's position.
    /// `from` (a valid user id, checked by the caller) is stored with the message.
    ///
    /// A publish is the only call that creates a channel's state: the first one (or the
    /// first after the state expired or was lost) starts a fresh random epoch.
    async fn publish(
        &self,
        channel: &str,
        data: &str,
        from: Option<&str>,
    ) -> Result<StreamPosition, BackendError>;

    /// Publishes several messages, each as [`Self::publish`] would, and answers each
    /// in the order given. Messages to one channel get their offsets in the order
    /// given; different channels are independent, and one may fail while another
    /// succeeds.
    ///
    /// The default publishes each channel's messages one after the other and the
    /// channels concurrently. The Redis broker sends one script call per cluster slot.
    async fn publish_batch(
        &self,
        messages: &[BatchMessage<'_>],
    ) -> Vec<Result<StreamPosition, BackendError>> {
        let mut by_channel: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, m) in messages.iter().enumerate() {
            by_channel.entry(m.channel).or_default().push(i);
        }
        let lanes = by_channel.into_values().map(|indexes| async move {
            let mut out = Vec::with_capacity(indexes.len());
            for i in indexes {
                let m = &messages[i];
                out.push((i, self.publish(m.channel, m.data, m.from).await));
            }
            out
        });
        let mut results: Vec<Option<Result<StreamPosition, BackendError>>> =
            messages.iter().map(|_| None).collect();
        for (i, result) in futures_util::future::join_all(lanes)
            .await
            .into_iter()
            .flatten()
        {
            results[i] = Some(result);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(BackendError::Internal("no publish answer".into()))))
            .collect()
    }

    /// Retained publications with offset greater than `since`, at most `limit`, oldest
    /// first, and the channel's current position. A channel without stored state reads
    /// as `(0, EMPTY_EPOCH)` with nothing retained, and the read stores nothing: a
    /// client subscribing to endless new names must not grow the broker.
    async fn history(
        &self,
        channel: &str,
        since: u64,
        limit: usize,
    ) -> Result<History, BackendError>;

    /// The channel's current position; `(0, EMPTY_EPOCH)` for a channel without stored
    /// state, which this read does not create (see [`Self::history`]).
    async fn position(&self, channel: &str) -> Result<StreamPosition, BackendError>;
}
