//! One session of the connection task: the welcome, the main loop and the frames the
//! server sends (messages, replies, `expiring`, refresh).

use super::*;

impl Driver {
    /// Serves one session until it ends.
    pub(super) async fn serve(&mut self, ws: Ws, welcome: Welcome, url: &str) -> End {
        let mut session = Session {
            ws,
            pending: HashMap::new(),
            retry: Vec::new(),
            retry_at: None,
            reconnect_after: None,
            refresh: Refresh::default(),
            fetch: None,
        };
        let end = match self.start_session(&mut session, welcome, url).await {
            Ok(heartbeat) => self.session_loop(&mut session, heartbeat).await,
            Err(end) => end,
        };
        self.session_ended(session.pending);
        end
    }

    /// Reports the session, applies `welcome`, sends what waited for a session.
    pub(super) async fn start_session(
        &mut self,
        session: &mut Session,
        welcome: Welcome,
        url: &str,
    ) -> Result<Duration, End> {
        let heartbeat = Duration::from_millis(welcome.heartbeat_ms);
        let node_changed = self
            .last_node
            .as_deref()
            .is_some_and(|last| last != welcome.node);
        self.last_node = Some(welcome.node.clone());
        tracing::info!(url, node = %welcome.node, session = %welcome.session, "connected");
        self.state.send_replace(State::Connected {
            node: welcome.node.clone(),
        });
        self.emit(Event::Connected(Connected {
            url: url.to_owned(),
            node: welcome.node.clone(),
            session: welcome.session.clone(),
            user: welcome.user.clone(),
            heartbeat,
            node_changed,
        }))
        .await;
        self.tracker.set_personal(&user_channel(&welcome.user));
        for (channel, result) in &welcome.subscriptions {
            if self.tracker.contains(channel) {
                self.subscribed(channel, result).await;
            } else {
                // Left while the hello was on its way.
                self.send(session, Pending::Ignore, |id| ClientCommand::Unsubscribe {
                    id,
                    channel: channel.clone(),
                })
                .await?;
            }
        }
        // Channels added while the hello was on its way.
        let missing: Vec<String> = self
            .tracker
            .channels()
            .filter(|c| !welcome.subscriptions.contains_key(*c) && !welcome.errors.contains_key(*c))
            .cloned()
            .collect();
        for (channel, error) in welcome.errors {
            self.refused(session, &channel, error).await;
        }
        for channel in missing {
            self.send_subscribe(session, channel).await?;
        }
        while let Some(queued) = self.queued.pop_front() {
            match queued {
                Queued::Publish(channel, data, reply) if !reply.is_closed() => {
                    let command = |id| ClientCommand::Publish {
                        id,
                        channel,
                        data,
                        ephemeral: false,
                    };
                    self.send(session, Pending::Publish(reply), command).await?;
                }
                Queued::Presence(channel, reply) if !reply.is_closed() => {
                    let pending = Pending::Presence(channel.clone(), reply);
                    let command = |id| ClientCommand::Presence { id, channel };
                    self.send(session, pending, command).await?;
                }
                Queued::Ack(offset, reply) if !reply.is_closed() => {
                    self.send_ack(session, offset, reply).await?;
                }
                _ => {} // the caller gave up (timeout)
            }
        }
        Ok(heartbeat)
    }

    /// Reads frames and commands until the session ends.
    pub(super) async fn session_loop(&mut self, session: &mut Session, heartbeat: Duration) -> End {
        // Any frame proves the connection alive; none for twice the heartbeat means it
        // is dead even if TCP has not noticed (a hung node, a dropped route).
        let silence = if heartbeat.is_zero() {
            MAX_SILENCE
        } else {
            heartbeat.saturating_mul(2).min(MAX_SILENCE)
        };
        let watchdog = tokio::time::sleep(silence);
        tokio::pin!(watchdog);
        loop {
            let retry_at = session.retry_at;
            let refresh_at = session.refresh.wake_at();
            let ack_at = self.ack_at;
            // Commands first: they are few, and a busy socket must not starve them.
            let step = tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    None => Err(End::Stop(StopReason::ClientClosed)),
                    Some(Command::Close { done }) => {
                        self.closers.push(done);
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            session.ws.close(None),
                        )
                        .await;
                        Err(End::Stop(StopReason::ClientClosed))
                    }
                    Some(command) => self.command_online(session, command).await,
                },
                // Frames before the watchdog: a frame that is ready proves life.
                frame = session.ws.next() => {
                    watchdog.as_mut().reset(Instant::now() + silence);
                    match frame {
                        Some(Ok(WsMessage::Text(text))) => self.on_text(session, &text).await,
                        Some(Ok(WsMessage::Close(frame))) => {
                            Err(closed(frame, session.reconnect_after))
                        }
                        Some(Ok(_)) => Ok(()),
                        Some(Err(e)) => Err(End::Lost(e.to_string())),
                        None => Err(End::Lost("connection closed".into())),
                    }
                }
                () = &mut watchdog => {
                    tracing::warn!(?silence, "no frame from the server: connection dead");
                    Err(End::HeartbeatTimeout)
                }
                () = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)),
                    if retry_at.is_some() => self.retry_subscribes(session).await,
                token = async { session.fetch.as_mut().expect("guarded").await },
                    if session.fetch.is_some() => {
                    session.fetch = None;
                    self.send_refresh(session, token).await
                }
                () = tokio::time::sleep_until(refresh_at.unwrap_or_else(Instant::now)),
                    if refresh_at.is_some() => {
                    self.refresh_due(session);
                    Ok(())
                }
                () = tokio::time::sleep_until(ack_at.unwrap_or_else(Instant::now)),
                    if ack_at.is_some() => self.send_auto_ack(session).await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    pub(super) async fn retry_subscribes(&mut self, session: &mut Session) -> Result<(), End> {
        session.retry_at = None;
        for channel in std::mem::take(&mut session.retry) {
            if self.tracker.contains(&channel) {
                self.send_subscribe(session, channel).await?;
            }
        }
        Ok(())
    }

    pub(super) async fn on_text(&mut self, session: &mut Session, text: &str) -> Result<(), End> {
        let frame = match ServerFrame::parse(text) {
            Ok(frame) => frame,
            Err(e) => {
                // Newer servers may add frame types: skip what this client does not know.
                tracing::debug!(error = %e, "unknown server frame skipped");
                self.malformed_reply(session, text, &e).await;
                return Ok(());
            }
        };
        match frame {
            ServerFrame::Message(m) => match self.tracker.message(&m.channel, m.offset, &m.epoch) {
                Verdict::Drop => {
                    tracing::trace!(channel = %m.channel, offset = m.offset, "dropped");
                }
                verdict => {
                    if let Verdict::DeliverAfterGap(resync) = verdict {
                        tracing::warn!(?resync, "gap in a channel's offsets");
                        self.emit(Event::Resync(resync)).await;
                    }
                    let personal = self.config.auto_ack && self.tracker.is_personal(&m.channel);
                    let position = personal.then(|| StreamPosition::new(m.offset, &m.epoch));
                    let message = Message {
                        channel: m.channel,
                        offset: m.offset,
                        epoch: m.epoch,
                        from: m.from,
                        data: m.data,
                    };
                    self.emit(Event::Message(message)).await;
                    if let Some(position) = position {
                        // Handed to the application: ack it, coalesced.
                        self.auto_ack = Some(position);
                        self.ack_at
                            .get_or_insert_with(|| Instant::now() + ACK_DELAY);
                    }
                }
            },
            // Apart from the tracker: no offset to order, deduplicate or resume by.
            // Only for channels still followed (one may arrive just after a local
            // unsubscribe).
            ServerFrame::Ephemeral(e) if self.tracker.contains(&e.channel) => {
                let message = EphemeralMessage {
                    channel: e.channel,
                    from: e.from,
                    data: e.data,
                };
                self.emit(Event::Ephemeral(message)).await;
            }
            ServerFrame::Ephemeral(e) => {
                tracing::trace!(channel = %e.channel, "ephemeral message of a channel not followed");
            }
            ServerFrame::Reply(reply) => self.on_reply(session, reply).await,
            ServerFrame::Ping => session.send(&ClientCommand::Pong).await?,
            ServerFrame::Reconnect(r) => {
                tracing::info!(reason = %r.reason, after_ms = r.after_ms, "server asks to reconnect");
                session.reconnect_after = Some(Duration::from_millis(r.after_ms));
            }
            ServerFrame::Resync(r) => {
                if let Some(resync) = self.tracker.resync(&r) {
                    self.emit(Event::Resync(resync)).await;
                }
            }
            ServerFrame::Welcome(_) => tracing::debug!("second welcome ignored"),
            ServerFrame::Expiring(e) => self.expiring(session, e.in_ms),
            ServerFrame::Subscribed(s) => {
                // A name the server would refuse in the next `hello` (4400 there) is
                // never followed.
                if check_channel(&s.channel).is_err() {
                    tracing::debug!(channel = %s.channel, "subscribed frame with a bad channel name skipped");
                    return Ok(());
                }
                tracing::info!(channel = %s.channel, offset = s.offset, "subscribed by the server");
                let subscription = self
                    .tracker
                    .subscribed_by_server(&s.channel, s.offset, &s.epoch);
                self.emit(Event::Subscribed(subscription)).await;
            }
            ServerFrame::Unsubscribed(u) => {
                if !self.tracker.remove(&u.channel) {
                    tracing::debug!(channel = %u.channel, "unsubscribed from a channel not followed");
                    return Ok(());
                }
                tracing::info!(channel = %u.channel, reason = %u.reason, "unsubscribed by the server");
                // A `subscribe` of the application still waiting for this channel
                // will not be confirmed any more.
                for waiter in self.subscribers.remove(&u.channel).unwrap_or_default() {
                    let _ = waiter.send(Err(Error::Cancelled(u.channel.clone())));
                }
                self.emit(Event::Unsubscribed {
                    channel: u.channel,
                    reason: u.reason,
                })
                .await;
            }
        }
        Ok(())
    }

    /// A frame that did not parse may still be the reply to a command in flight (an
    /// error code this client does not know, a result of another shape): settle that
    /// command now rather than let it wait for its timeout.
    pub(super) async fn malformed_reply(
        &mut self,
        session: &mut Session,
        text: &str,
        e: &serde_json::Error,
    ) {
        #[derive(Deserialize)]
        struct Loose {
            #[serde(rename = "type")]
            kind: serde_json::Value,
            #[serde(default)]
            id: serde_json::Value,
        }
        let Ok(loose) = serde_json::from_str::<Loose>(text) else {
            return;
        };
        let Some(id) = loose.id.as_u64().filter(|_| loose.kind == "reply") else {
            return;
        };
        let Some(pending) = session.pending.remove(&id) else {
            return;
        };
        tracing::warn!(id, error = %e, "malformed reply");
        let error = Error::Protocol(format!("malformed reply: {e}"));
        match pending {
            Pending::Subscribe(channel) => self.answer_subscribers(&channel, Err(error)),
            Pending::Unsubscribe(reply) => drop(reply.send(Err(error))),
            Pending::Publish(reply) => drop(reply.send(Err(error))),
            Pending::PublishEphemeral(reply) => drop(reply.send(Err(error))),
            Pending::Presence(_, reply) => drop(reply.send(Err(error))),
            Pending::Ack(_, reply) => drop(reply.send(Err(error))),
            Pending::Refresh(_) => self.refresh_failed(session, "malformed reply"),
            Pending::Ignore => {}
        }
    }

    /// `expiring`: start a refresh through the token callback (a fixed token cannot be
    /// refreshed: the session ends with 4401 at the token's `exp`).
    pub(super) fn expiring(&mut self, session: &mut Session, in_ms: u64) {
        match self.config.token {
            TokenSource::Static(_) => {
                tracing::info!(in_ms, "token expiring; a fixed token cannot be refreshed");
            }
            TokenSource::Provider(_) => {
                tracing::debug!(in_ms, "token expiring; refreshing");
                session.refresh.expiring(Instant::now(), in_ms);
            }
        }
    }

    /// The refresh timer fired: ask the callback, or give up on a reply that never came.
    pub(super) fn refresh_due(&mut self, session: &mut Session) {
        match session.refresh.stage() {
            Stage::Wait(_) => {
                let TokenSource::Provider(provider) = &self.config.token else {
                    session.refresh.give_up();
                    return;
                };
                let timeout = self.config.connect_timeout;
                let token = provider();
                session.fetch = Some(Box::pin(async move {
                    match tokio::time::timeout(timeout, token).await {
                        Err(_) => Err(format!("no token within {timeout:?}")),
                        Ok(Err(e)) => Err(e.to_string()),
                        Ok(Ok(token)) => Ok(token),
                    }
                }));
                session.refresh.fetching();
            }
            Stage::Sent { id, .. } => {
                session.pending.remove(&id);
                self.refresh_failed(session, "no reply in time");
            }
            Stage::Fetching | Stage::Idle => {}
        }
    }

    /// The callback answered: send `refresh` with the new token.
    pub(super) async fn send_refresh(
        &mut self,
        session: &mut Session,
        token: Result<String, String>,
    ) -> Result<(), End> {
        let token = match token {
            Ok(token) if token.is_empty() => {
                self.refresh_failed(session, "the token callback returned an empty token");
                return Ok(());
            }
            // The callback may cache tokens; the one about to expire is no refresh.
            Ok(token) if self.token.as_deref() == Some(token.as_str()) => {
                self.refresh_failed(session, "the token callback returned the expiring token");
                return Ok(());
            }
            Ok(token) => token,
            Err(e) => {
                self.refresh_failed(session, &format!("token callback failed: {e}"));
                return Ok(());
            }
        };
        let id = self.next_id;
        session
            .refresh
            .sent(id, Instant::now(), self.config.request_timeout);
        let pending = Pending::Refresh(token.clone());
        self.send(session, pending, |id| ClientCommand::Refresh { id, token })
            .await
    }

    pub(super) fn refresh_failed(&mut self, session: &mut Session, why: &str) {
        match session.refresh.failed(Instant::now()) {
            Some(next) => {
                let retry_in = next.saturating_duration_since(Instant::now());
                tracing::warn!(why, ?retry_in, "token refresh failed; retrying");
            }
            None => tracing::warn!(
                why,
                "token refresh failed; the session ends when the token expires (4401) and the client reconnects with a new token"
            ),
        }
    }

    pub(super) async fn on_reply(&mut self, session: &mut Session, reply: ReplyFrame) {
        let Some(pending) = reply.id.and_then(|id| session.pending.remove(&id)) else {
            tracing::debug!(id = ?reply.id, "reply to no pending command");
            return;
        };
        let outcome = match (reply.result, reply.error) {
            (_, Some(error)) => Err(error),
            (Some(result), None) => Ok(result),
            (None, None) => Ok(serde_json::Value::Null),
        };
        match pending {
            Pending::Subscribe(channel) => match outcome {
                Err(error) => self.refused(session, &channel, error).await,
                Ok(result) => match parse::<SubscribeResult>(result) {
                    Ok(result) => self.subscribed(&channel, &result).await,
                    Err(e) => self.answer_subscribers(&channel, Err(e)),
                },
            },
            Pending::Unsubscribe(reply) | Pending::Ack(_, reply) => {
                let _ = reply.send(outcome.map(drop).map_err(Error::Server));
            }
            Pending::Publish(reply) => {
                let _ = reply.send(outcome.map_err(Error::Server).and_then(parse));
            }
            Pending::PublishEphemeral(reply) => {
                let _ = reply.send(outcome.map(drop).map_err(Error::Server));
            }
            Pending::Presence(_, reply) => {
                #[derive(Deserialize)]
                struct Users {
                    users: BTreeMap<String, u64>,
                }
                let users = outcome
                    .map_err(Error::Server)
                    .and_then(parse::<Users>)
                    .map(|u| u.users);
                let _ = reply.send(users);
            }
            Pending::Refresh(token) => {
                if !reply.id.is_some_and(|id| session.refresh.is_pending(id)) {
                    return; // an older refresh, given up already
                }
                match outcome {
                    Ok(_) => {
                        tracing::info!("token refreshed");
                        session.refresh.succeeded();
                        // The next `hello` uses it too.
                        self.token = Some(token);
                    }
                    // A token of another user: asking again gives the same answer.
                    // At `exp` the session ends (4401) and the reconnect path asks the
                    // callback for whatever token it has then.
                    Err(error) if error.code == ErrorCode::Forbidden => {
                        tracing::warn!(error = %error.message, "token refresh refused (another user's token); not retrying");
                        session.refresh.give_up();
                    }
                    Err(error) => {
                        let why = format!("{}: {}", error.code.as_str(), error.message);
                        self.refresh_failed(session, &why);
                    }
                }
            }
            Pending::Ignore => {}
        }
    }

    /// A channel confirmed (reply or `welcome`): record, answer, report.
    pub(super) async fn subscribed(&mut self, channel: &str, result: &SubscribeResult) {
        let Some((subscription, resync)) = self.tracker.subscribed(channel, result) else {
            return; // left meanwhile
        };
        self.answer_subscribers(channel, Ok(subscription.clone()));
        self.emit(Event::Subscribed(subscription)).await;
        if let Some(resync) = resync {
            self.emit(Event::Resync(resync)).await;
        }
    }

    /// A channel refused by the server: for a passing reason, try again soon on this
    /// session (callers keep waiting); otherwise forget it, answer, report.
    pub(super) async fn refused(&mut self, session: &mut Session, channel: &str, error: ErrorBody) {
        let passing = matches!(
            error.code,
            ErrorCode::Unavailable | ErrorCode::RateLimited | ErrorCode::Internal
        );
        if passing && self.tracker.contains(channel) {
            tracing::warn!(channel, code = error.code.as_str(), error = %error.message, "subscribe failed; retrying");
            session.retry.push(channel.to_owned());
            session
                .retry_at
                .get_or_insert_with(|| Instant::now() + RETRY_MIN + jitter(RETRY_MIN * 2));
            return;
        }
        if !self.tracker.is_personal(channel) && self.tracker.remove(channel) {
            self.answer_subscribers(channel, Err(Error::Server(error.clone())));
            self.emit(Event::SubscribeFailed {
                channel: channel.to_owned(),
                error,
            })
            .await;
        }
    }
}
