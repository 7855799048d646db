//! The backend's control over users on this node: which local sessions belong to which
//! user, and which tokens are revoked.
//!
//! The server API (`POST /v1/users/{user}/disconnect|subscribe|unsubscribe|revoke`)
//! sends a [`UserCommand`] through the broker to every node; each node's hub looks the
//! user up in its [`UserIndex`] and applies the command to those sessions. Revocations
//! are also kept here ([`Revocations`]), so that every hello and every `refresh` is
//! checked against them without a broker round trip.
//!
//! Race between a revocation and a hello on another node: the hub records the
//! revocation *before* it scans the user's sessions, and a new session registers in
//! the index *before* it checks the revocations. Both steps take the same locks, so
//! either the scan sees the new session or the session sees the revocation.
//!
//! [`UserCommand`]: crate::broker::UserCommand

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::broker::Revocation;
use crate::hub::{SessionHandle, SessionId};

const SHARDS: usize = 16;

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

    /// Local sessions of `user`.
    pub fn count(&self, user: &str) -> usize {
        self.shard(user).get(user).map_or(0, Vec::len)
    }
}

/// Whether a token of a user, issued at `iat`, is refused by a revocation of that user
/// (`before`, `until`) at time `now` (all unix seconds). A revocation refuses tokens
/// issued strictly before `before`, and ends at `until`, when every such token has
/// expired anyway.
pub fn is_revoked(before: u64, until: u64, iat: u64, now: u64) -> bool {
    now < until && iat < before
}

/// The revocations in force on this node: user → (before, until).
#[derive(Default)]
pub struct Revocations {
    map: Mutex<HashMap<String, (u64, u64)>>,
}

impl Revocations {
    fn map(&self) -> MutexGuard<'_, HashMap<String, (u64, u64)>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a revocation; a later `before` for the same user wins, and so does the
    /// later end. Expired entries are dropped on the way, which bounds the map by the
    /// revocations of the last token lifetime.
    pub fn insert(&self, user: &str, before: u64, until: u64, now: u64) {
        let mut map = self.map();
        map.retain(|_, (_, u)| *u > now);
        if until <= now {
            return; // over already
        }
        let entry = map.entry(user.to_owned()).or_insert((before, until));
        entry.0 = entry.0.max(before);
        entry.1 = entry.1.max(until);
    }

    /// Replaces every revocation with the broker's list (after a reconnect, when a
    /// command may have been missed). Entries recorded meanwhile are merged, not lost.
    pub fn load(&self, list: Vec<Revocation>, now: u64) {
        for r in list {
            self.insert(&r.user, r.before, r.until, now);
        }
    }

    /// Every revocation still in force at `now`.
    pub fn list(&self, now: u64) -> Vec<Revocation> {
        self.map()
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(user, (before, until))| Revocation {
                user: user.clone(),
                before: *before,
                until: *until,
            })
            .collect()
    }

    /// Whether a token of `user` issued at `iat` is refused now.
    pub fn is_revoked(&self, user: &str, iat: u64, now: u64) -> bool {
        self.map()
            .get(user)
            .is_some_and(|(before, until)| is_revoked(*before, *until, iat, now))
    }

    /// Revocations held.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::SessionControl;

    #[test]
    fn revocation_rule() {
        // Issued before: refused while the revocation lasts.
        assert!(is_revoked(100, 200, 99, 150));
        // Issued at or after `before`: fine.
        assert!(!is_revoked(100, 200, 100, 150));
        assert!(!is_revoked(100, 200, 101, 150));
        // Over: every token it refused has expired by then.
        assert!(!is_revoked(100, 200, 99, 200));
    }

    #[test]
    fn revocations_merge_and_expire() {
        let r = Revocations::default();
        r.insert("alice", 100, 200, 50);
        assert!(r.is_revoked("alice", 99, 60));
        assert!(!r.is_revoked("bob", 0, 60));
        // A later revocation moves `before` forward; an earlier one does not move it back.
        r.insert("alice", 150, 250, 60);
        r.insert("alice", 120, 210, 60);
        assert!(r.is_revoked("alice", 149, 60));
        assert!(r.is_revoked("alice", 149, 240));
        // Expired entries are dropped when another is recorded.
        r.insert("bob", 10, 20, 300);
        assert_eq!(r.len(), 0, "both expired at 300");
        r.load(
            vec![Revocation {
                user: "carol".into(),
                before: 5,
                until: 500,
            }],
            300,
        );
        assert!(r.is_revoked("carol", 4, 301));
    }

    #[test]
    fn index_counts_and_forgets() {
        let idx = UserIndex::default();
        let alice: Arc<str> = "alice".into();
        let h = || Arc::new(SessionControl::new(4));
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
