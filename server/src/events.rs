//! The node's one ordered consumer of backend events.
//!
//! Publications, resubscribes, user commands and ephemeral messages arrive on one
//! stream in the order the backend saw them, and are handled here in that order: a
//! `Resubscribed` must stay ordered with the publications around it, so the continuity
//! checks it starts see every publication delivered before it. Nothing here waits:
//! deliveries are offered without waiting, and anything that needs the backend runs in
//! its own task.

use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::backend::routing::{BackendEvent, BackendEvents};
use crate::hub::Hub;
use crate::users::Users;

/// Backend events taken from the stream at once (one upgrade of the weak handles per
/// batch).
const EVENT_BATCH: usize = 256;

/// Consumes the backend's events in a task, in order, until the backend closes the
/// stream.
///
/// The task holds the hub and the users weakly: the hub owns the backend's routing
/// and the backend owns the stream's sender, so a strong reference here would keep all
/// of them alive forever. Dropping the node drops the backend, whose `Drop` stops its
/// tasks and closes the stream, which ends this task.
pub fn consume(hub: &Arc<Hub>, users: &Arc<Users>, mut events: BackendEvents) -> JoinHandle<()> {
    let hub = Arc::downgrade(hub);
    let users = Arc::downgrade(users);
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(EVENT_BATCH);
        while events.recv_many(&mut batch, EVENT_BATCH).await > 0 {
            let (Some(hub), Some(users)) = (hub.upgrade(), users.upgrade()) else {
                return;
            };
            for event in batch.drain(..) {
                on_event(&hub, &users, event);
            }
        }
    })
}

/// Handles one backend event.
fn on_event(hub: &Arc<Hub>, users: &Arc<Users>, event: BackendEvent) {
    match event {
        BackendEvent::Publication {
            channel,
            publication,
        } => hub.on_publication(&channel, publication),
        BackendEvent::Resubscribed => {
            hub.on_resubscribed();
            // A revocation sent while this node was cut off was missed: load them again.
            tokio::spawn(Arc::clone(users).load_revocations());
        }
        BackendEvent::UserCommand {
            user,
            command,
            reply,
        } => {
            users.apply(hub, &user, &command, reply);
        }
        BackendEvent::Ephemeral { channel, message } => hub.fan_out_ephemeral(&channel, message),
    }
}
