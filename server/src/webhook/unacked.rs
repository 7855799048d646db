//! The node's consumer of unacked reports: the sweeper of [`crate::receipts`] hands
//! over batches, and each message becomes a `message.unacked` event in the webhook log.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::backend::receipts::Unacked;
use crate::receipts::UnackedBatch;

/// The node's consumer of unacked reports: each message becomes a `message.unacked`
/// event in the webhook log, then the batch is confirmed, so the sweeper marks the
/// messages reported only once their events are stored (at least once: a node that
/// dies in between leaves the claim to run out, and another node appends the same
/// events again, with the same ids). A batch whose append fails is not confirmed: the
/// claim runs out and the channel is swept again. Without `HERALD_WEBHOOK_URL` the
/// reports are only logged and counted.
pub async fn forward_unacked(
    mut reports: mpsc::Receiver<UnackedBatch>,
    webhooks: Option<Arc<super::Webhooks>>,
) {
    'batches: while let Some(batch) = reports.recv().await {
        for m in &batch.messages {
            let Some(w) = &webhooks else {
                tracing::info!(
                    id = %m.event_id(),
                    channel = %m.channel,
                    offset = m.offset,
                    epoch = %m.epoch,
                    published_at_ms = m.published_at_ms,
                    "message.unacked (no webhook configured)"
                );
                continue;
            };
            let Some(user) = m.user() else { continue };
            let event = super::NewEvent {
                id: Some(m.event_id()),
                ..super::NewEvent::for_user("message.unacked", user, unacked_fields(m))
            };
            if let Err(e) = w.append(&event).await {
                tracing::warn!(error = %e, channel = %m.channel, "message.unacked: could not append; the sweep repeats it");
                continue 'batches;
            }
        }
        batch.confirm();
    }
}

/// The members of a `message.unacked` event besides `id`, `type`, `user`, `seq` and
/// `at`: `channel`, `offset`, `epoch`, `data` (as published), `from` when known and
/// `published_at_ms` (Unix ms).
pub fn unacked_fields(m: &Unacked) -> String {
    let mut s = format!(
        r#""channel":{},"offset":{},"epoch":{},"data":{}"#,
        serde_json::Value::from(m.channel.as_str()),
        m.offset,
        serde_json::Value::from(m.epoch.as_str()),
        m.data,
    );
    if let Some(from) = &m.from {
        s.push_str(&format!(r#","from":{}"#, serde_json::Value::from(&**from)));
    }
    s.push_str(&format!(r#","published_at_ms":{}"#, m.published_at_ms));
    s
}
