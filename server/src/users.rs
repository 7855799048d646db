//! Users on this node: which local sessions belong to which user, which tokens are
//! revoked, and the server API's commands applied to them.
//!
//! The server API (`POST /v1/users/{user}/disconnect|subscribe|unsubscribe|revoke`)
//! sends a [`UserCommand`] through the backend to every node ([`Users::command`]); each
//! node's event consumer hands it to [`Users::apply`], which looks the user up in the
//! [`UserIndex`] and applies the command to those sessions. Revocations are kept here
//! too, so that every hello and every `refresh` is checked against them without a
//! backend round trip ([`Users::is_revoked`]).
//!
//! Race between a revocation and a hello on another node: a revocation is recorded
//! *before* the user's sessions are scanned, and a new session registers in the index
//! *before* it checks the revocations. Both steps take the same locks, so either the
//! scan sees the new session or the session sees the revocation.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use herald_protocol::codes::CloseCode;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::backend::error::BackendError;
use crate::backend::users::{Revocations, UserCommand, UserControl};
use crate::hub::Hub;
use crate::mailbox::{CloseReason, Control, Outbound, SessionHandle, SessionId};

const SHARDS: usize = 16;

/// Longest wait of a node's answer to a server subscribe or unsubscribe for its sessions
/// to apply it (they do within milliseconds unless one is stuck writing to a slow
/// client); below the Redis backend's wait for every node's answer.
pub const APPLY_WAIT: Duration = Duration::from_secs(1);

/// One shard of the index: user → that user's local sessions.
type UserShard = HashMap<Arc<str>, Vec<(SessionId, SessionHandle)>>;

/// Local sessions by user. Sharded std mutexes: no `.await` happens while one is held.
pub struct UserIndex {
    shards: Box<[Mutex<UserShard>]>,
}

impl Default for UserIndex {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl UserIndex {
    fn shard(&self, user: &str) -> MutexGuard<'_, UserShard> {
        let mut h = DefaultHasher::new();
        user.hash(&mut h);
        self.shards[(h.finish() as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a session of `user`, unless the user already has `limit` sessions on this
    /// node (`HERALD_MAX_CONNECTIONS_PER_USER`; 0: no limit). Returns whether it was
    /// added. Check and insert happen under one lock, so concurrent hellos of one user
    /// cannot overshoot the limit.
    pub fn register(
        &self,
        user: &Arc<str>,
        id: SessionId,
        handle: SessionHandle,
        limit: u32,
    ) -> bool {
        let mut shard = self.shard(user);
        let sessions = shard.entry(Arc::clone(user)).or_default();
        if limit > 0 && sessions.len() >= limit as usize {
            if sessions.is_empty() {
                shard.remove(&**user);
            }
            return false;
        }
        sessions.push((id, handle));
        true
    }

    /// Removes a session of `user`; the user's entry goes with its last session.
    /// Returns whether the session was registered.
    pub fn unregister(&self, user: &str, id: SessionId) -> bool {
        let mut shard = self.shard(user);
        let Some(sessions) = shard.get_mut(user) else {
            return false;
        };
        let before = sessions.len();
        sessions.retain(|(s, _)| *s != id);
        let removed = sessions.len() < before;
        if sessions.is_empty() {
            shard.remove(user);
        }
        removed
    }

    /// Runs `f` on each local session of `user`, under the user's shard lock (so `f`
    /// must not block), and returns how many sessions `f` counted (returned `true` for).
    pub fn for_each(
        &self,
        user: &str,
        mut f: impl FnMut(SessionId, &SessionHandle) -> bool,
    ) -> u64 {
        let shard = self.shard(user);
        let Some(sessions) = shard.get(user) else {
            return 0;
        };
        sessions.iter().filter(|(id, h)| f(*id, h)).count() as u64
    }

    /// Runs `f` on every local session, one shard lock at a time (so `f` must not
    /// block); returns how many sessions `f` counted.
    pub fn for_all(&self, mut f: impl FnMut(SessionId, &SessionHandle) -> bool) -> u64 {
        let mut n = 0;
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (id, handle) in shard.values().flatten() {
                n += u64::from(f(*id, handle));
            }
        }
        n
    }

    /// Local sessions of `user`.
    pub fn count(&self, user: &str) -> usize {
        self.shard(user).get(user).map_or(0, Vec::len)
    }
}

/// The node's users: the local index, the revocations in force, and the backend's
/// user control that carries commands to every node.
pub struct Users {
    index: UserIndex,
    revocations: Revocations,
    store: Arc<dyn UserControl>,
}

impl Users {
    /// Users over the backend's user control.
    pub fn new(store: Arc<dyn UserControl>) -> Self {
        Self {
            index: UserIndex::default(),
            revocations: Revocations::default(),
            store,
        }
    }

    /// Local sessions by user.
    pub fn index(&self) -> &UserIndex {
        &self.index
    }

    /// Whether a token of `user` issued at `iat` is refused at `now` (unix seconds).
    pub fn is_revoked(&self, user: &str, iat: u64, now: u64) -> bool {
        self.revocations.is_revoked(user, iat, now)
    }

    /// Sends `command` to the sessions of `user` on every node (this one included,
    /// through the backend's event stream) and returns how many it affected.
    pub async fn command(&self, user: &str, command: &UserCommand) -> Result<u64, BackendError> {
        self.store.user_command(user, command).await
    }

    /// Applies a server API command to the local sessions of `user` and answers on
    /// `reply` with how many it changed. Closes are requested at once and count the
    /// sessions whose close this command requested (the first request wins, so two
    /// concurrent disconnects do not both count one session). Joins and leaves go
    /// through the sessions' queues, since only a session's own task changes its
    /// channels, and each session counts itself once it applied the command
    /// ([`Control`]); the answer waits for them, at most [`APPLY_WAIT`].
    pub fn apply(&self, hub: &Hub, user: &str, command: &UserCommand, reply: oneshot::Sender<u64>) {
        let closed = match command {
            UserCommand::Disconnect { reconnect } => {
                let (code, reason) = if *reconnect {
                    (CloseCode::Unauthorized, CloseReason::Disconnected)
                } else {
                    (CloseCode::Kicked, CloseReason::Default)
                };
                self.index
                    .for_each(user, |_, h| h.close_with(code.code(), reason))
            }
            UserCommand::Revoke { before, until } => {
                // Recorded before the scan: see the race note in the module doc.
                self.revocations
                    .insert(user, *before, *until, crate::clock::now_secs());
                self.index.for_each(user, |_, h| {
                    h.token_iat() < *before
                        && h.close_with(CloseCode::Unauthorized.code(), CloseReason::TokenRevoked)
                })
            }
            UserCommand::Subscribe { .. } | UserCommand::Unsubscribe { .. } => {
                let item = Arc::new(Control::new(command.clone(), reply));
                // Every session gets it, member or not: whether it changes one is known
                // only in its own task (a join of an earlier command may be queued).
                self.index.for_each(user, |_, h| {
                    hub.offer_or_close(h, Outbound::Control(Arc::clone(&item)));
                    false
                });
                // A session stuck in a write must not hold the answer up: after
                // APPLY_WAIT it goes out with the sessions counted so far.
                let pending = Arc::downgrade(&item);
                drop(item);
                if pending.strong_count() > 0 {
                    tokio::spawn(async move {
                        tokio::time::sleep(APPLY_WAIT).await;
                        if let Some(item) = pending.upgrade() {
                            item.answer_now();
                        }
                    });
                }
                return;
            }
        };
        let _ = reply.send(closed);
    }

    /// Loads the broker's revocations, retrying for a while when the broker does not
    /// answer (it may still be connecting). Run at start and after every resubscribe,
    /// which also covers a broker that was down for longer than the retries.
    ///
    /// A revocation this node missed (cut off from the broker when it was made) also
    /// closes the local sessions whose token it refuses, as the command would have:
    /// refusing only new hellos would leave those sessions open until their `exp`.
    pub async fn load_revocations(self: Arc<Self>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut delay = Duration::from_millis(100);
        loop {
            match self.store.revocations().await {
                Ok(list) => {
                    let now = crate::clock::now_secs();
                    // Recorded before the scan: see the race note in the module doc.
                    self.revocations.load(list.clone(), now);
                    for r in list.iter().filter(|r| r.until > now) {
                        let closed = self.index.for_each(&r.user, |_, h| {
                            let revoked = h.token_iat() < r.before;
                            if revoked {
                                h.close_with(
                                    CloseCode::Unauthorized.code(),
                                    CloseReason::TokenRevoked,
                                );
                            }
                            revoked
                        });
                        if closed > 0 {
                            tracing::info!(user = %r.user, sessions = closed, "missed revocation applied");
                        }
                    }
                    return;
                }
                Err(e) if Instant::now() + delay > deadline => {
                    tracing::warn!(error = %e, "could not load revocations; next try after a broker reconnect");
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not load revocations; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::Mailbox;

    #[test]
    fn index_counts_and_forgets() {
        let idx = UserIndex::default();
        let alice: Arc<str> = "alice".into();
        let h = || Arc::new(Mailbox::new(4));
        assert!(idx.register(&alice, 1, h(), 2));
        assert!(idx.register(&alice, 2, h(), 2));
        assert!(!idx.register(&alice, 3, h(), 2), "over the per-user limit");
        assert_eq!(idx.count("alice"), 2);
        assert_eq!(idx.for_each("alice", |id, _| id == 2), 1);
        idx.unregister("alice", 1);
        idx.unregister("alice", 2);
        assert_eq!(idx.count("alice"), 0);
        assert_eq!(idx.for_each("alice", |_, _| true), 0);
    }
}
