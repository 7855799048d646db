//! The memory backend's Routing.

use async_trait::async_trait;

use super::MemoryBackend;
use crate::backend::error::BackendError;
use crate::backend::routing::BackendEvent;
use crate::backend::routing::BackendEvents;
use crate::backend::routing::Ephemeral;
use crate::backend::routing::Routing;
use crate::backend::routing::SubscribeAck;
use std::sync::Arc;

#[async_trait]
impl Routing for MemoryBackend {
    fn events(&self) -> Option<BackendEvents> {
        self.events_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    async fn publish_ephemeral(
        &self,
        channel: &str,
        data: &str,
        from: Option<&str>,
    ) -> Result<(), BackendError> {
        // No stream is touched or created: into the event stream when this node is
        // subscribed. Best effort: a stream that is full (a hub far behind) drops it
        // rather than making the publisher wait.
        let subscribed = self
            .subscribed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(channel);
        if subscribed {
            let message = Ephemeral {
                data: data.into(),
                from: from.map(Arc::from),
            };
            let _ = self.events.try_send(BackendEvent::Ephemeral {
                channel: channel.into(),
                message,
            });
        }
        Ok(())
    }

    fn subscribe(&self, channel: &str) -> SubscribeAck {
        self.subscribed
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(channel.to_owned());
        Box::pin(async { Ok(()) })
    }

    fn unsubscribe(&self, channel: &str) {
        self.subscribed
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(channel);
    }
}
