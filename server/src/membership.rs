//! The membership verbs: a session arriving at and leaving the node, and entering and
//! leaving a channel. Each is written once here, and every path of the session (its
//! own `subscribe`, a resume at hello, a server subscribe, an unsubscribe, the end of
//! the session) calls it, so the services that track membership cannot drift apart.
//!
//! Entering a channel, in order (and rolled back in reverse on failure):
//! 1. the hub adds the session and the node's backend subscription becomes live;
//! 2. the stream is read (position, or the missed messages for a resume): joined
//!    first, read second, so whatever is published in between arrives both ways and
//!    the offset check drops the second copy. A failed read undoes step 1;
//! 3. the hub learns the channel's position (its continuity starts there);
//! 4. presence, webhooks (`channel.occupied`) and the subscription gauge count it.
//!    None of these can fail, so nothing after step 2 needs undoing.
//!
//! Leaving undoes step 4, then step 1. Arrival registers the session with its user
//! (the per-user limit) before anything else; departure unregisters it last.

use std::sync::Arc;

use herald_protocol::frame::SubscribeResult;
use herald_protocol::StreamPosition;

use crate::backend::error::BackendError;
use crate::backend::streams::{Publication, Streams};
use crate::continuity;
use crate::hub::Hub;
use crate::limits::RecoveryBudget;
use crate::mailbox::{SessionHandle, SessionId};
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::users::Users;
use crate::webhook::Webhooks;

/// The membership verbs over the services that track membership.
pub struct Membership {
    hub: Arc<Hub>,
    users: Arc<Users>,
    presence: Arc<Presence>,
    webhooks: Option<Arc<Webhooks>>,
    streams: Arc<dyn Streams>,
    metrics: Arc<Metrics>,
    /// Most messages one recovery reads (the history size).
    history_limit: usize,
}

/// A session, as the membership verbs need to know it.
#[derive(Clone, Copy)]
pub struct Member<'a> {
    /// The node-local session id.
    pub id: SessionId,
    /// The session's user.
    pub user: &'a Arc<str>,
    /// The session's mailbox.
    pub handle: &'a SessionHandle,
}

impl Membership {
    /// The verbs over these services; `history_limit` bounds one recovery read.
    pub fn new(
        hub: Arc<Hub>,
        users: Arc<Users>,
        presence: Arc<Presence>,
        webhooks: Option<Arc<Webhooks>>,
        streams: Arc<dyn Streams>,
        metrics: Arc<Metrics>,
        history_limit: usize,
    ) -> Self {
        Self {
            hub,
            users,
            presence,
            webhooks,
            streams,
            metrics,
            history_limit: history_limit.max(1),
        }
    }

    /// A session arrives: registers it with its user, unless the user already has
    /// `limit` sessions on this node (0: no limit). Whether it was registered.
    pub fn arrive(&self, m: Member<'_>, limit: u32) -> bool {
        if !self
            .users
            .index()
            .register(m.user, m.id, m.handle.clone(), limit)
        {
            return false;
        }
        if let Some(w) = &self.webhooks {
            w.user_connected(m.user);
        }
        true
    }

    /// A session enters `channel` (permission and limits checked by the caller): see
    /// the module doc for the order. With `since`, the missed messages come back too
    /// when they fit in `budget`. The name comes back as the one shared copy that
    /// presence and webhooks hold too, for the session to keep.
    pub async fn enter(
        &self,
        m: Member<'_>,
        channel: &str,
        since: Option<StreamPosition>,
        budget: &mut RecoveryBudget,
    ) -> Result<(Arc<str>, SubscribeResult, Vec<Publication>), BackendError> {
        self.hub.join(channel, m.id, m.handle.clone()).await?;
        let (result, pubs) = match self.recover(channel, since, budget).await {
            Ok(r) => r,
            Err(e) => {
                self.hub.leave(channel, m.id);
                self.metrics.broker_errors.inc();
                return Err(e);
            }
        };
        let position = StreamPosition::new(result.offset, result.epoch.clone());
        self.hub.seed(channel, &position);
        let name: Arc<str> = channel.into();
        self.presence.join(&name, m.user);
        if let Some(w) = &self.webhooks {
            w.channel_joined(&name);
        }
        self.metrics.subscriptions.inc();
        Ok((name, result, pubs))
    }

    /// A session leaves `channel` (which it was in).
    pub fn leave(&self, m: Member<'_>, channel: &Arc<str>) {
        self.hub.leave(channel, m.id);
        self.presence.leave(channel, m.user);
        if let Some(w) = &self.webhooks {
            w.channel_left(channel);
        }
        self.metrics.subscriptions.dec();
    }

    /// A session departs: it leaves every channel in `channels`, then its user.
    pub fn depart(&self, m: Member<'_>, channels: impl IntoIterator<Item = Arc<str>>) {
        m.handle.end();
        let registered = self.users.index().unregister(m.user, m.id);
        if let (true, Some(w)) = (registered, &self.webhooks) {
            w.user_disconnected(m.user);
        }
        for name in channels {
            self.leave(m, &name);
        }
    }

    /// Reads where the channel stands and, with `since`, what the client missed, if it
    /// fits in `budget`: a channel is recovered completely or not at all.
    async fn recover(
        &self,
        channel: &str,
        since: Option<StreamPosition>,
        budget: &mut RecoveryBudget,
    ) -> Result<(SubscribeResult, Vec<Publication>), BackendError> {
        let Some(since) = since else {
            let p = self.streams.position(channel).await?;
            return Ok((
                SubscribeResult {
                    offset: p.offset,
                    epoch: p.epoch,
                    recovered: false,
                },
                Vec::new(),
            ));
        };
        let history = self
            .streams
            .history(channel, since.offset, self.history_limit)
            .await?;
        let mut recovered = false;
        let mut pubs = Vec::new();
        if let Some(missing) = continuity::recovery(&since, &history) {
            pubs = history.publications;
            pubs.truncate(missing);
            recovered = budget.take(&pubs);
            if !recovered {
                // Honest, never a silent gap: the client is told it was not
                // recovered and starts from the current position.
                self.metrics.recovery_over_budget.inc();
                pubs = Vec::new();
            }
        }
        Ok((
            SubscribeResult {
                offset: history.position.offset,
                epoch: history.position.epoch,
                recovered,
            },
            pubs,
        ))
    }
}
