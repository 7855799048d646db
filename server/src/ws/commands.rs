//! The client's commands after `welcome`, and the server API's commands for a session's user.

use std::sync::Arc;

use herald_protocol::codes::{CloseCode, ErrorCode};
use herald_protocol::frame::{
    ClientCommand, ErrorBody, ParseError, Reply, ServerFrame, Subscribed, Unsubscribed,
};
use serde_json::json;

use crate::backend::users::UserCommand;
use crate::clock::now_secs;
use crate::limits::RecoveryBudget;
use crate::mailbox::Control;
use crate::publish::{Message, Published};

use super::error::CommandError;
use super::rate::Rate;
use super::session::{token_timers, Session};
use super::socket::Socket;
use super::End;

impl Session {
    /// Handles one text frame after `welcome`.
    pub(super) async fn command(&mut self, socket: &mut dyn Socket, text: &str) -> Result<(), End> {
        let parsed = ClientCommand::parse(text);
        let (id, kind) = match &parsed {
            Err(ParseError::NotACommand(_)) | Ok(ClientCommand::Hello { .. }) => {
                return Err(End::Close(CloseCode::BadRequest))
            }
            Ok(ClientCommand::Pong) => (None, "pong"),
            Err(ParseError::BadArgument { id, .. }) => (*id, "invalid"),
            Ok(ClientCommand::Subscribe { id, .. }) => (Some(*id), "subscribe"),
            Ok(ClientCommand::Unsubscribe { id, .. }) => (Some(*id), "unsubscribe"),
            Ok(ClientCommand::Publish { id, .. }) => (Some(*id), "publish"),
            Ok(ClientCommand::Presence { id, .. }) => (Some(*id), "presence"),
            Ok(ClientCommand::Refresh { id, .. }) => (Some(*id), "refresh"),
            Ok(ClientCommand::Ack { id, .. }) => (*id, "ack"),
        };
        self.node
            .metrics
            .commands
            .get_or_create(&crate::metrics::CommandLabel { command: kind })
            .inc();
        // Every frame counts against the rate, malformed ones and pongs included.
        match self.rate.check() {
            Rate::Allow => {}
            // A pong expects no reply, so a refused one is only counted.
            Rate::Refuse if matches!(parsed, Ok(ClientCommand::Pong)) => {
                self.node.metrics.rate_limited.inc();
                return Ok(());
            }
            Rate::Refuse => {
                self.node.metrics.rate_limited.inc();
                let err = CommandError::new(
                    ErrorCode::RateLimited,
                    "too many commands; slow down".into(),
                );
                return self.reply(socket, id, Err(err)).await;
            }
            Rate::Close => return Err(End::Close(CloseCode::TooMany)),
        }
        let command = match parsed {
            Ok(c) => c,
            Err(ParseError::BadArgument { message, .. }) => {
                let err = CommandError::new(ErrorCode::BadRequest, message);
                return self.reply(socket, id, Err(err)).await;
            }
            Err(ParseError::NotACommand(_)) => return Err(End::Close(CloseCode::BadRequest)),
        };
        if let ClientCommand::Ack {
            channel,
            offset,
            epoch,
            ..
        } = &command
        {
            // Answered only with an `id` (auto-acks of the SDKs send none), errors always.
            return match self.ack(channel, *offset, epoch.as_deref()) {
                Ok(_) if id.is_none() => Ok(()),
                result => self.reply(socket, id, result).await,
            };
        }
        let id = id.unwrap_or_default();
        match command {
            ClientCommand::Subscribe { channel, since, .. } => {
                match self.subscribe(&channel, since).await {
                    Ok((result, pubs)) => {
                        let value = serde_json::to_value(&result).expect("serializable");
                        self.reply(socket, Some(id), Ok(value)).await?;
                        let name = self.channel_name(&channel);
                        self.send_publications(socket, &name, &pubs).await?;
                        self.flush(socket).await
                    }
                    Err(e) => self.reply(socket, Some(id), Err(e)).await,
                }
            }
            ClientCommand::Unsubscribe { channel, .. } => {
                let result = self.unsubscribe(&channel).map(|()| json!({}));
                self.reply(socket, Some(id), result).await
            }
            ClientCommand::Publish {
                channel,
                data,
                ephemeral: true,
                ..
            } => {
                let result = self.publish_ephemeral(&channel, data.get()).await;
                self.reply(socket, Some(id), result).await
            }
            ClientCommand::Publish { channel, data, .. } => {
                let result = self.publish(&channel, data.get()).await;
                self.reply(socket, Some(id), result).await
            }
            ClientCommand::Presence { channel, .. } => {
                let result = self.presence(&channel).await;
                self.reply(socket, Some(id), result).await
            }
            ClientCommand::Refresh { token, .. } => self.refresh(socket, id, &token).await,
            ClientCommand::Pong | ClientCommand::Hello { .. } | ClientCommand::Ack { .. } => Ok(()),
        }
    }

    /// Counts a frame that gets no answer (a WebSocket ping or pong) against the rate.
    pub(super) fn count_silent_frame(&mut self) -> Result<(), End> {
        match self.rate.check() {
            Rate::Allow => Ok(()),
            Rate::Refuse => {
                self.node.metrics.rate_limited.inc();
                Ok(())
            }
            Rate::Close => Err(End::Close(CloseCode::TooMany)),
        }
    }

    pub(super) fn unsubscribe(&mut self, channel: &str) -> Result<(), CommandError> {
        if *channel == *self.personal {
            return Err(CommandError::new(
                ErrorCode::Forbidden,
                "the personal channel cannot be left".into(),
            ));
        }
        self.leave(channel);
        Ok(())
    }

    /// `refresh`: swaps the session's token for a fresh one of the same user. A token
    /// that does not verify leaves the old one in place (the session still ends at the
    /// old `exp`). The new token's patterns apply at once: channels they no longer
    /// allow are left, each with an `unsubscribed` frame; server-granted ones stay.
    pub(super) async fn refresh(
        &mut self,
        socket: &mut dyn Socket,
        id: u64,
        token: &str,
    ) -> Result<(), End> {
        let claims = match self.node.keys.verifier.verify(token) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "refresh token refused");
                let err =
                    CommandError::new(ErrorCode::Unauthorized, "invalid or expired token".into());
                return self.reply(socket, Some(id), Err(err)).await;
            }
        };
        if claims.sub != self.claims.sub {
            let err =
                CommandError::new(ErrorCode::Forbidden, "the token is for another user".into());
            return self.reply(socket, Some(id), Err(err)).await;
        }
        if self
            .node
            .users
            .is_revoked(&claims.sub, claims.issued_at(), now_secs())
        {
            let err = CommandError::new(ErrorCode::Unauthorized, "token revoked".into());
            return self.reply(socket, Some(id), Err(err)).await;
        }
        let lost: Vec<Arc<str>> = self
            .channels
            .iter()
            .filter(|(name, state)| {
                !state.granted && ***name != *self.personal && !claims.may_subscribe(name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        (self.expires_at, self.notice_at) =
            token_timers(claims.exp, self.node.config.token_expiry_notice_ms);
        self.handle.set_token_iat(claims.issued_at());
        self.claims = claims;
        for channel in &lost {
            self.leave(channel);
        }
        let reply = ServerFrame::Reply(Reply {
            id: Some(id),
            result: Some(json!({})),
            error: None,
        });
        self.send(socket, reply.to_json()).await?;
        for channel in lost {
            let frame = ServerFrame::Unsubscribed(Unsubscribed {
                channel: channel.to_string(),
                reason: "permissions".into(),
            });
            self.send(socket, frame.to_json()).await?;
        }
        self.flush(socket).await
    }

    /// A server API command for this session's user: join or leave a channel, and tell
    /// the client with `subscribed` / `unsubscribed`; the session counts itself in
    /// `item` when the command changed it. (Closes do not come this way: the hub asks
    /// for them directly.)
    pub(super) async fn control(
        &mut self,
        socket: &mut dyn Socket,
        item: &Control,
    ) -> Result<(), End> {
        match &item.command {
            UserCommand::Subscribe { channel } => {
                if let Some(state) = self.channels.get_mut(channel.as_str()) {
                    // In it by its own subscribe: the backend now holds the membership
                    // too, so a refresh that drops the pattern keeps the channel. Not a
                    // change, so not counted.
                    state.granted = true;
                    return Ok(());
                }
                // No `since`: nothing is recovered, the budget is a formality. Not
                // drawn from the user's subscribe budget: the backend asked for it.
                let mut budget = RecoveryBudget::new(self.node.config.max_recovery_bytes);
                match self.join(channel, None, true, &mut budget).await {
                    Ok((result, _)) => {
                        item.changed();
                        let frame = ServerFrame::Subscribed(Subscribed {
                            channel: channel.clone(),
                            offset: result.offset,
                            epoch: result.epoch,
                        });
                        self.send(socket, frame.to_json()).await?;
                        self.flush(socket).await
                    }
                    Err(e) => {
                        // At its subscription limit, or the broker is down: the session
                        // stays as it is and is not counted.
                        e.log("server subscribe not applied");
                        tracing::debug!(code = ?e.code, message = %e.message, channel, "server subscribe not applied");
                        Ok(())
                    }
                }
            }
            UserCommand::Unsubscribe { channel } => {
                if **channel == *self.personal || !self.leave(channel) {
                    return Ok(());
                }
                item.changed();
                let frame = ServerFrame::Unsubscribed(Unsubscribed {
                    channel: channel.clone(),
                    reason: "server".into(),
                });
                self.send(socket, frame.to_json()).await?;
                self.flush(socket).await
            }
            UserCommand::Disconnect { .. } | UserCommand::Revoke { .. } => Ok(()),
        }
    }

    /// Whether the token lets the session publish to `channel` (ordinary or ephemeral).
    fn may_publish(&self, channel: &str) -> Result<(), CommandError> {
        if self.claims.may_publish(channel) {
            return Ok(());
        }
        Err(CommandError::new(
            ErrorCode::Forbidden,
            format!("not allowed to publish to {channel}"),
        ))
    }

    pub(super) async fn publish(
        &self,
        channel: &str,
        data: &str,
    ) -> Result<serde_json::Value, CommandError> {
        self.may_publish(channel)?;
        // `from` is always the session's user: a client cannot choose it (any `from` in
        // its frame is not even parsed).
        let published = self
            .node
            .publisher
            .publish(Message {
                channel,
                data,
                from: Some(&self.user),
                ephemeral: false,
            })
            .await?;
        let Published::Stored(position) = published else {
            return Err(CommandError::new(
                ErrorCode::Internal,
                "internal error".into(),
            ));
        };
        Ok(json!({"offset": position.offset, "epoch": position.epoch}))
    }

    /// `publish` with `"ephemeral":true`: the same permission as an ordinary publish,
    /// then a bucket of its own (`max_ephemeral_per_sec`). The reply is
    /// `{"ephemeral":true}`: there is no offset to give.
    pub(super) async fn publish_ephemeral(
        &mut self,
        channel: &str,
        data: &str,
    ) -> Result<serde_json::Value, CommandError> {
        self.may_publish(channel)?;
        if !self.ephemeral_rate.try_take() {
            self.node.metrics.rate_limited.inc();
            return Err(CommandError::new(
                ErrorCode::RateLimited,
                format!(
                    "more than {} ephemeral messages per second; slow down",
                    self.node.config.max_ephemeral_per_sec
                ),
            ));
        }
        // `from` is the session's user, as for an ordinary publish.
        self.node
            .publisher
            .publish(Message {
                channel,
                data,
                from: Some(&self.user),
                ephemeral: true,
            })
            .await?;
        Ok(json!({ "ephemeral": true }))
    }

    /// `ack`: checked against what this connection saw of its personal channel
    /// ([`crate::receipts::check_ack`]), then queued on the node, which coalesces the
    /// acks of all its sessions and writes them within 50 ms: no broker call here.
    pub(super) fn ack(
        &self,
        channel: &str,
        offset: u64,
        epoch: Option<&str>,
    ) -> Result<serde_json::Value, CommandError> {
        let (current_epoch, delivered) = self
            .channels
            .get(&*self.personal)
            .map_or((None, 0), |s| (Some(s.epoch.clone()), s.last));
        let current = current_epoch.clone().unwrap_or_else(|| "".into());
        crate::receipts::check_ack(
            channel,
            offset,
            epoch,
            &self.personal,
            (&current, delivered),
        )
        .map_err(|e| CommandError::new(e.code(), e.to_string()))?;
        self.node.receipts.ack(&self.personal, &current, offset);
        Ok(json!({"offset": offset, "epoch": &*current}))
    }

    pub(super) async fn presence(&self, channel: &str) -> Result<serde_json::Value, CommandError> {
        // A member the backend put in the channel may see who else is in it, whatever
        // the token's patterns say.
        let granted = self.channels.get(channel).is_some_and(|s| s.granted);
        if !granted && !self.claims.may_subscribe(channel) {
            return Err(CommandError::new(
                ErrorCode::Forbidden,
                format!("not allowed to see presence of {channel}"),
            ));
        }
        let users = self.node.presence(channel).await?;
        Ok(json!({ "users": users }))
    }

    pub(super) async fn reply(
        &mut self,
        socket: &mut dyn Socket,
        id: Option<u64>,
        result: Result<serde_json::Value, CommandError>,
    ) -> Result<(), End> {
        let reply = match result {
            Ok(value) => Reply {
                id,
                result: Some(value),
                error: None,
            },
            Err(e) => {
                e.log("a client command failed");
                Reply {
                    id,
                    result: None,
                    error: Some(ErrorBody::new(e.code, e.message)),
                }
            }
        };
        self.send(socket, ServerFrame::Reply(reply).to_json())
            .await?;
        self.flush(socket).await
    }
}
