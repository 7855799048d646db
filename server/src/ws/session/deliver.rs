//! Delivery: what the session's mailbox holds, written to the socket in batches, each
//! message checked against the session's own position (a gap is filled from history or
//! answered with `resync`).

use super::*;

impl Session {
    pub(in crate::ws) async fn send_publications(
        &mut self,
        socket: &mut dyn Socket,
        channel: &Arc<str>,
        pubs: &[Publication],
    ) -> Result<(), End> {
        for p in pubs {
            let frame = herald_protocol::frame::encode_message(
                channel,
                p.offset,
                &p.epoch,
                p.from.as_deref(),
                &p.data,
            );
            self.send(socket, frame).await?;
            self.node.metrics.messages_delivered.inc();
        }
        Ok(())
    }

    /// Writes what the mailbox holds, unless the token has expired. A write that stalls
    /// loses against a close request, its deadline (`send`) or the token's expiry (a
    /// client that stops reading must not keep an expired session, and the messages
    /// behind it, open).
    pub(in crate::ws) async fn deliver(
        &mut self,
        socket: &mut dyn Socket,
        batch: &mut VecDeque<Outbound>,
        control: &SessionHandle,
    ) -> Result<(), End> {
        // Nothing goes out after the token's `exp`, even when delivery wins the race
        // against the timer.
        let expires_at = self.expires_at;
        if Instant::now() >= expires_at {
            return Err(End::CloseWith(
                CloseCode::Unauthorized,
                CloseReason::TokenExpired,
            ));
        }
        tokio::select! {
            r = self.write_batch(socket, batch) => r,
            (code, reason) = control.closed() => Err(End::CloseWith(code_of(code), reason)),
            _ = tokio::time::sleep_until(expires_at) => {
                Err(End::CloseWith(CloseCode::Unauthorized, CloseReason::TokenExpired))
            }
        }
    }

    /// Writes what is queued (up to a batch, taken from the mailbox in one lock), then
    /// flushes once. `batch` is the session's buffer, empty between calls; it keeps
    /// what a failed write left, which no longer matters (the session ends).
    pub(in crate::ws) async fn write_batch(
        &mut self,
        socket: &mut dyn Socket,
        batch: &mut VecDeque<Outbound>,
    ) -> Result<(), End> {
        self.handle.take_batch(batch, BATCH);
        let mut delivered = 0;
        let result = async {
            while let Some(item) = batch.pop_front() {
                delivered += self.write_item(socket, item).await?;
            }
            self.flush(socket).await
        }
        .await;
        // Counted per batch: one update of the node-wide counter, not one per frame.
        self.node.metrics.messages_delivered.inc_by(delivered);
        if batch.capacity() > KEEP_SLOTS {
            batch.shrink_to(KEEP_SLOTS);
        }
        result
    }

    /// Writes one queued item; returns how many messages it delivered (0 or 1) for the
    /// batch's count. Recovered messages (gap fills) count themselves.
    pub(in crate::ws) async fn write_item(
        &mut self,
        socket: &mut dyn Socket,
        item: Outbound,
    ) -> Result<u64, End> {
        match item {
            Outbound::Message(d) => {
                let Some(state) = self.channels.get(&d.channel) else {
                    return Ok(0); // unsubscribed meanwhile
                };
                let last = state.last;
                // The rare paths are boxed to keep them out of the task's size.
                match continuity::session_arrival(last, &state.epoch, d.offset, &d.epoch) {
                    SessionArrival::Next => {}
                    SessionArrival::Duplicate => return Ok(0), // already delivered
                    SessionArrival::NewStream(position) => {
                        Box::pin(self.resync(socket, &d.channel, position)).await?;
                    }
                    SessionArrival::Gap => {
                        // d's epoch: from offset 0 the gap is in whatever epoch d is in.
                        Box::pin(self.fill_gap(socket, &d.channel, &d.epoch, last, d.offset))
                            .await?;
                    }
                }
                self.send(socket, d.frame.clone()).await?;
                if let Some(state) = self.channels.get_mut(&d.channel) {
                    state.epoch = d.epoch.clone();
                    state.last = d.offset;
                }
                Ok(1)
            }
            Outbound::Control(command) => {
                Box::pin(self.control(socket, &command)).await?;
                Ok(0)
            }
            Outbound::Ephemeral(e) => {
                // Only while still in the channel; the channel's position (`last`) is
                // not touched: the frame has none, and gap checks must not see it.
                if self.channels.contains_key(&e.channel) {
                    self.send(socket, e.frame.clone()).await?;
                    self.node.metrics.ephemeral_delivered.inc();
                }
                Ok(0)
            }
            Outbound::Resync(resync) => {
                let (channel, position) = *resync;
                let behind = self
                    .channels
                    .get(&channel)
                    .is_some_and(|s| continuity::resync_applies(s.last, &s.epoch, &position));
                if behind {
                    Box::pin(self.resync(socket, &channel, position)).await?;
                }
                Ok(0)
            }
        }
    }

    /// The session saw a gap the hub did not repair (rare): fill it from history, or
    /// tell the client to resync.
    pub(in crate::ws) async fn fill_gap(
        &mut self,
        socket: &mut dyn Socket,
        channel: &Arc<str>,
        epoch: &Arc<str>,
        last: u64,
        next: u64,
    ) -> Result<(), End> {
        let want = (next - last - 1) as usize;
        if let Ok(h) = self.node.history(channel, last, want).await {
            if continuity::fills_gap(last, epoch, want, &h.publications) {
                self.send_publications(socket, channel, &h.publications)
                    .await?;
                self.node.metrics.gaps_repaired.inc();
                return Ok(());
            }
        }
        self.resync(socket, channel, StreamPosition::new(next - 1, &**epoch))
            .await
    }

    pub(in crate::ws) async fn resync(
        &mut self,
        socket: &mut dyn Socket,
        channel: &Arc<str>,
        position: StreamPosition,
    ) -> Result<(), End> {
        if let Some(state) = self.channels.get_mut(channel) {
            state.epoch = position.epoch.as_str().into();
            state.last = position.offset;
        }
        self.node.metrics.resyncs.inc();
        let frame = ServerFrame::Resync(Resync {
            channel: channel.to_string(),
            offset: position.offset,
            epoch: position.epoch,
        });
        self.send(socket, frame.to_json()).await
    }
}
