//! The Redis backend's Routing.

use async_trait::async_trait;
use fred::interfaces::{EventInterface, PubsubInterface};

use super::broker_error;
use super::keys;
use super::keys::Topology;
use super::probe;
use super::subscriptions::Request;
use super::users::on_control;
use super::Inner;
use super::RedisBackend;
use crate::backend::error::BackendError;
use crate::backend::routing::BackendEvent;
use crate::backend::routing::BackendEvents;
use crate::backend::routing::Ephemeral;
use crate::backend::routing::Routing;
use crate::backend::routing::SubscribeAck;
use crate::backend::streams::Publication;
use fred::types::Message;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::sync::oneshot;

#[async_trait]
impl Routing for RedisBackend {
    fn events(&self) -> Option<BackendEvents> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    async fn publish_ephemeral(
        &self,
        channel: &str,
        data: &str,
        from: Option<&str>,
    ) -> Result<(), BackendError> {
        // A bare (S)PUBLISH on the channel's pub/sub channel: no script, no key. Redis
        // hands it only to the nodes subscribed now. On the command connection, not the
        // publisher: there is nothing for replicas to acknowledge.
        let client = self.inner.ready()?;
        let name = self.inner.keys.pubsub(channel);
        let payload = keys::ephemeral_payload(from, data);
        let _receivers: i64 = match self.inner.topology {
            Topology::Cluster => client.spublish(name, payload).await,
            Topology::Single | Topology::Sentinel => client.publish(name, payload).await,
        }
        .map_err(broker_error)?;
        Ok(())
    }

    fn subscribe(&self, channel: &str) -> SubscribeAck {
        let (ack, done) = oneshot::channel();
        let sent = self.inner.requests.send(Request::Subscribe {
            channel: channel.to_owned(),
            ack,
        });
        Box::pin(async move {
            if sent.is_err() {
                return Err(BackendError::Unavailable("redis broker stopped".into()));
            }
            done.await
                .unwrap_or_else(|_| Err(BackendError::Unavailable("redis broker stopped".into())))
        })
    }

    fn unsubscribe(&self, channel: &str) {
        let _ = self.inner.requests.send(Request::Unsubscribe {
            channel: channel.to_owned(),
        });
    }
}

/// The reader: hands each publication to the hub's event stream, in the order Redis sent them.
pub(super) async fn read_publications(
    inner: Arc<Inner>,
    mut messages: broadcast::Receiver<Message>,
) {
    loop {
        let message = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            message = messages.recv() => message,
        };
        match message {
            Ok(message) => dispatch(&inner, &message).await,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // fred dropped messages we did not read in time: any channel may have
                // a gap now. The hub checks every channel against history.
                tracing::warn!(
                    missed,
                    "redis subscriber lagged; checking channel continuity"
                );
                inner.on_resubscribed().await;
            }
            Err(broadcast::error::RecvError::Closed) => {
                if inner.cancel.is_cancelled() {
                    return;
                }
                messages = inner.sub.message_rx();
                tokio::time::sleep(Duration::from_millis(100)).await;
                inner.on_resubscribed().await;
            }
        }
    }
}

/// Decodes one pub/sub message and sends it to the hub. Waits while the event stream is
/// full: the reader falls behind, fred's buffer overflows, and the lag is repaired.
pub(super) async fn dispatch(inner: &Arc<Inner>, message: &Message) {
    let name: &str = &message.channel;
    let Some(text) = message.value.as_str() else {
        tracing::warn!(channel = name, "redis message without text payload");
        return;
    };
    if inner.keys.is_probe(name) {
        if let Ok(seq) = text.parse::<u64>() {
            probe::arrived(inner, name, seq);
        }
        return;
    }
    let Some(channel) = inner.keys.channel_of(name) else {
        return;
    };
    if channel == keys::CONTROL {
        on_control(inner, &text).await;
        return;
    }
    if let Some((from, data)) = keys::parse_ephemeral(&text) {
        let message = Ephemeral {
            data: data.into(),
            from: from.map(Arc::from),
        };
        let _ = inner
            .events
            .send(BackendEvent::Ephemeral {
                channel: channel.into(),
                message,
            })
            .await;
        return;
    }
    let Some(payload) = keys::parse_payload(&text) else {
        tracing::warn!(channel, "malformed publication payload from redis");
        return;
    };
    let _ = inner
        .events
        .send(BackendEvent::Publication {
            channel: channel.into(),
            publication: Publication {
                offset: payload.offset,
                epoch: payload.epoch.into(),
                data: payload.data.into(),
                from: payload.from.map(Arc::from),
            },
        })
        .await;
}
