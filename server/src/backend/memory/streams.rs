//! The memory backend's Streams.

use async_trait::async_trait;

use super::MemoryBackend;
use crate::backend::error::BackendError;
use crate::backend::routing::BackendEvent;
use crate::backend::streams::History;
use crate::backend::streams::Publication;
use crate::backend::streams::Streams;
use herald_protocol::StreamPosition;
use herald_protocol::EMPTY_EPOCH;
use std::sync::Arc;

#[async_trait]
impl Streams for MemoryBackend {
    async fn publish(
        &self,
        channel: &str,
        data: &str,
        from: Option<&str>,
    ) -> Result<StreamPosition, BackendError> {
        // Room in the event stream first (a hub that falls behind makes publishers
        // wait), then the event is sent inside the stream's lock, so publications of a
        // channel reach the hub in offset order. Whether the channel is subscribed is
        // read under that lock too: a subscribe that returned before this publish
        // numbered its message must get it.
        let permit = self.events.reserve().await.ok();
        Ok(self.with_stream(channel, |stream, now| {
            stream.offset += 1;
            let publication = Publication {
                offset: stream.offset,
                epoch: stream.epoch.clone(),
                data: data.into(),
                from: from.map(Arc::from),
            };
            stream.history.push_back((now, publication.clone()));
            stream.trim(&self.settings, now);
            let subscribed = self
                .subscribed
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(channel);
            if let (true, Some(permit)) = (subscribed, permit) {
                permit.send(BackendEvent::Publication {
                    channel: channel.into(),
                    publication,
                });
            }
            stream.position()
        }))
    }

    async fn history(
        &self,
        channel: &str,
        since: u64,
        limit: usize,
    ) -> Result<History, BackendError> {
        let history = self.read_stream(channel, |stream, now| {
            stream.trim(&self.settings, now);
            let publications = stream
                .history
                .iter()
                .map(|(_, p)| p)
                .filter(|p| p.offset > since)
                .take(limit)
                .cloned()
                .collect();
            History {
                position: stream.position(),
                publications,
            }
        });
        Ok(history.unwrap_or_else(|| History {
            position: StreamPosition::new(0, EMPTY_EPOCH),
            publications: Vec::new(),
        }))
    }

    async fn position(&self, channel: &str) -> Result<StreamPosition, BackendError> {
        Ok(self
            .read_stream(channel, |stream, _| stream.position())
            .unwrap_or_else(|| StreamPosition::new(0, EMPTY_EPOCH)))
    }
}
