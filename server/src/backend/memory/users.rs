//! The memory backend's UserControl.

use async_trait::async_trait;

use super::MemoryBackend;
use crate::backend::error::BackendError;
use crate::backend::routing::BackendEvent;
use crate::backend::users::Revocation;
use crate::backend::users::UserCommand;
use crate::backend::users::UserControl;

#[async_trait]
impl UserControl for MemoryBackend {
    async fn user_command(&self, user: &str, command: &UserCommand) -> Result<u64, BackendError> {
        if let UserCommand::Revoke { before, until } = command {
            // The stored list: the same merge rules as every node's own copy.
            self.revocations
                .insert(user, *before, *until, crate::clock::now_secs());
        }
        // One node: the command reaches this node's hub directly. No hub listening (it
        // is gone, or never took the stream): nobody was affected.
        let (reply, count) = tokio::sync::oneshot::channel();
        let event = BackendEvent::UserCommand {
            user: user.to_owned(),
            command: command.clone(),
            reply,
        };
        if self.events.send(event).await.is_err() {
            return Ok(0);
        }
        Ok(count.await.unwrap_or(0))
    }

    async fn revocations(&self) -> Result<Vec<Revocation>, BackendError> {
        Ok(self.revocations.list(crate::clock::now_secs()))
    }
}
