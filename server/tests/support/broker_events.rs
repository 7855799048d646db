//! A broker's event stream as the broker tests see it: every event forwarded as a plain
//! value (every user command answered with one session), plus the registry and
//! presence values they build.

#![allow(dead_code)]

use super::backend::TestBackend;
use herald_server::backend::nodes::NodeInfo;
use herald_server::backend::presence::PresenceChange;
use herald_server::backend::routing::BackendEvent;
use herald_server::backend::streams::Publication;
use herald_server::backend::users::UserCommand;
use tokio::sync::mpsc;

/// One broker event, as the tests compare it.
#[derive(Debug)]
pub enum Event {
    Publication(String, Publication),
    Resubscribed,
    UserCommand(String, UserCommand),
    /// Channel, data, `from`.
    Ephemeral(String, String, Option<String>),
}

/// Takes the broker's event stream (once: a second take answers `None`) and forwards
/// everything to the test.
pub fn record(broker: &dyn TestBackend) -> mpsc::UnboundedReceiver<Event> {
    let mut events = broker.events().expect("the event stream, once");
    assert!(broker.events().is_none(), "taken once");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let event = match event {
                BackendEvent::Publication {
                    channel,
                    publication,
                } => Event::Publication(channel.to_string(), publication),
                BackendEvent::Resubscribed => Event::Resubscribed,
                BackendEvent::UserCommand {
                    user,
                    command,
                    reply,
                } => {
                    let _ = reply.send(1);
                    Event::UserCommand(user, command)
                }
                BackendEvent::Ephemeral { channel, message } => Event::Ephemeral(
                    channel.to_string(),
                    message.data.to_string(),
                    message.from.map(|f| f.to_string()),
                ),
            };
            let _ = tx.send(event);
        }
    });
    rx
}

/// A registry entry for node `id`.
pub fn info(id: &str) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        url: format!("ws://{id}/ws"),
        connections: 0,
        draining: false,
        stats: Default::default(),
    }
}

/// A presence change of `user` in `channel`.
pub fn change(channel: &str, user: &str, connections: u32) -> PresenceChange {
    PresenceChange {
        channel: channel.into(),
        user: user.into(),
        connections,
    }
}
