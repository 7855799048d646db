//! User control across the cluster: commands of the server API for every session of a
//! user on every node, and the revocations every node checks tokens against.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::error::BackendError;

/// A command of the server API for every session of one user, on every node
/// (`POST /v1/users/{user}/…`). It travels through the broker to each node's hub, which
/// applies it to the user's local sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum UserCommand {
    /// Close every session: with 4401 when `reconnect` (get a new token), else 4410.
    Disconnect {
        /// Whether the client may reconnect on its own.
        reconnect: bool,
    },
    /// Join the channel (server-granted: the token's patterns are not asked).
    Subscribe {
        /// The channel.
        channel: String,
    },
    /// Leave the channel.
    Unsubscribe {
        /// The channel.
        channel: String,
    },
    /// Tokens of the user issued before `before` (unix seconds) are refused from now on;
    /// sessions holding one are closed with 4401.
    Revoke {
        /// Unix seconds.
        before: u64,
        /// Unix seconds after which the revocation is forgotten: by then every token it
        /// refuses has expired (see `auth::TokenVerifier`'s lifetime bound).
        until: u64,
    },
}

/// A revocation as the broker stores it: tokens of `user` issued before `before` are
/// refused until `until` (both unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The user.
    pub user: String,
    /// Tokens issued before this are refused.
    pub before: u64,
    /// Kept until then.
    pub until: u64,
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

/// Sending user commands to every node, and the stored revocations (what centrifuge
/// calls a `Controller`).
#[async_trait]
pub trait UserControl: Send + Sync + 'static {
    /// Sends `command` to the sessions of `user` on every live node and returns how many
    /// sessions it affected in total. A [`UserCommand::Revoke`] is stored first, so that
    /// nodes refuse the revoked tokens at hello too. Nodes that do not answer within a
    /// short time are not counted.
    async fn user_command(&self, user: &str, command: &UserCommand) -> Result<u64, BackendError>;

    /// Every stored revocation that is still in force (a node loads them at start and
    /// after a broker reconnect, when it may have missed a command).
    async fn revocations(&self) -> Result<Vec<Revocation>, BackendError>;
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
