//! The application's commands while a session is up, and what becomes of pending ones
//! when it ends.

use super::*;

impl Driver {
    /// Starts following `channel` and queues `reply` for the answer; a channel already
    /// followed is answered at once with `AlreadySubscribed`. True when newly followed.
    pub(super) fn follow(
        &mut self,
        channel: String,
        since: Option<StreamPosition>,
        reply: Reply<Subscription>,
    ) -> bool {
        if !self.tracker.add(&channel, since) {
            let _ = reply.send(Err(Error::AlreadySubscribed(channel)));
            return false;
        }
        self.subscribers.entry(channel).or_default().push(reply);
        true
    }

    pub(super) fn answer_subscribers(
        &mut self,
        channel: &str,
        answer: Result<Subscription, Error>,
    ) {
        for waiter in self.subscribers.remove(channel).unwrap_or_default() {
            let _ = waiter.send(answer.clone());
        }
    }

    pub(super) async fn command_online(
        &mut self,
        session: &mut Session,
        command: Command,
    ) -> Result<(), End> {
        match command {
            Command::Subscribe {
                channel,
                since,
                reply,
            } => {
                if !self.follow(channel.clone(), since, reply) {
                    return Ok(());
                }
                self.send_subscribe(session, channel).await
            }
            Command::Unsubscribe { channel, reply } => {
                let followed = self.tracker.contains(&channel);
                if let Err(e) = self.leave(&channel) {
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                if !followed {
                    let _ = reply.send(Ok(()));
                    return Ok(());
                }
                let command = |id| ClientCommand::Unsubscribe { id, channel };
                self.send(session, Pending::Unsubscribe(reply), command)
                    .await
            }
            Command::Publish {
                channel,
                data,
                reply,
            } => {
                let command = |id| ClientCommand::Publish {
                    id,
                    channel,
                    data,
                    ephemeral: false,
                };
                self.send(session, Pending::Publish(reply), command).await
            }
            Command::PublishEphemeral {
                channel,
                data,
                reply,
            } => {
                let command = |id| ClientCommand::Publish {
                    id,
                    channel,
                    data,
                    ephemeral: true,
                };
                self.send(session, Pending::PublishEphemeral(reply), command)
                    .await
            }
            Command::Presence { channel, reply } => {
                let pending = Pending::Presence(channel.clone(), reply);
                let command = |id| ClientCommand::Presence { id, channel };
                self.send(session, pending, command).await
            }
            Command::Ack { offset, reply } => self.send_ack(session, offset, reply).await,
            other => {
                self.command_offline(other);
                Ok(())
            }
        }
    }

    pub(super) async fn send_subscribe(
        &mut self,
        session: &mut Session,
        channel: String,
    ) -> Result<(), End> {
        let since = self.tracker.position(&channel);
        let pending = Pending::Subscribe(channel.clone());
        let command = |id| ClientCommand::Subscribe { id, channel, since };
        self.send(session, pending, command).await
    }

    /// A manual `ack` (with an id: the caller waits for the answer), in the epoch the
    /// client is in on its personal channel.
    pub(super) async fn send_ack(
        &mut self,
        session: &mut Session,
        offset: u64,
        reply: Reply<()>,
    ) -> Result<(), End> {
        let Some(channel) = self.tracker.personal().map(str::to_owned) else {
            let _ = reply.send(Err(Error::Protocol("no personal channel yet".into())));
            return Ok(());
        };
        let epoch = self.tracker.position(&channel).map(|p| p.epoch);
        let command = |id| ClientCommand::Ack {
            id: Some(id),
            channel,
            offset,
            epoch,
        };
        self.send(session, Pending::Ack(offset, reply), command)
            .await
    }

    /// Sends the coalesced auto-ack, without an id (only a refusal is answered, and
    /// nobody waits for it). Skipped when the personal channel moved to another epoch
    /// meanwhile: its messages were not the ones delivered.
    pub(super) async fn send_auto_ack(&mut self, session: &mut Session) -> Result<(), End> {
        self.ack_at = None;
        let Some(position) = self.auto_ack.take() else {
            return Ok(());
        };
        let Some(channel) = self.tracker.personal().map(str::to_owned) else {
            return Ok(());
        };
        if self
            .tracker
            .position(&channel)
            .is_some_and(|p| p.epoch != position.epoch)
        {
            return Ok(());
        }
        session
            .send(&ClientCommand::Ack {
                id: None,
                channel,
                offset: position.offset,
                epoch: Some(position.epoch),
            })
            .await
    }

    /// Sends a command with a fresh id and records what waits for its reply.
    pub(super) async fn send(
        &mut self,
        session: &mut Session,
        pending: Pending,
        command: impl FnOnce(u64) -> ClientCommand,
    ) -> Result<(), End> {
        let id = self.next_id;
        self.next_id += 1;
        session.pending.insert(id, pending);
        session.send(&command(id)).await
    }

    /// The session is gone: settle what was in flight on it.
    pub(super) fn session_ended(&mut self, pending: HashMap<u64, Pending>) {
        let mut pending: Vec<(u64, Pending)> = pending.into_iter().collect();
        pending.sort_by_key(|(id, _)| *id);
        for (_, p) in pending {
            match p {
                // The channel is still followed: the next hello resumes it and answers.
                // A refresh ends with its session (the next hello has a token anyway).
                Pending::Subscribe(_) | Pending::Ignore | Pending::Refresh(_) => {}
                // The next hello will not include it: done.
                Pending::Unsubscribe(reply) => {
                    let _ = reply.send(Ok(()));
                }
                // Maybe published, maybe not: never resend on the caller's behalf.
                Pending::Publish(reply) => {
                    let _ = reply.send(Err(Error::ConnectionLost));
                }
                Pending::PublishEphemeral(reply) => {
                    let _ = reply.send(Err(Error::ConnectionLost));
                }
                // Harmless to ask again.
                Pending::Presence(channel, reply) => {
                    self.queued.push_back(Queued::Presence(channel, reply));
                }
                // Cumulative and idempotent: sent again on the next session.
                Pending::Ack(offset, reply) => {
                    self.queued.push_back(Queued::Ack(offset, reply));
                }
            }
        }
    }
}
