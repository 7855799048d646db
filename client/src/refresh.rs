//! Token refresh within a session (protocol v1.1): when the server says `expiring`, the
//! client asks its token callback for a fresh token and sends `refresh`, retrying with a
//! short backoff until the old token's deadline. A pure state machine over [`Instant`]s,
//! so the timing rules are unit-tested without a server; the connection task runs the
//! callback and the socket.
//!
//! Why give up at the deadline: after it the server closes the session with 4401
//! "token expired", and the reconnect path (which asks the callback again) takes over.

use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::jitter;

/// The first retry delay after a failed refresh; doubles per failure.
const RETRY_INITIAL: Duration = Duration::from_millis(250);
/// The largest retry delay.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// `expiring.in_ms` is capped to this (a day): a bogus huge value must not overflow an
/// `Instant`.
const MAX_IN: Duration = Duration::from_secs(86_400);

/// Where a refresh stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Ask the token callback at this time.
    Wait(Instant),
    /// The token callback is running.
    Fetching,
    /// `refresh` was sent with this id; without a reply by `until` it counts as failed.
    Sent {
        /// The command's id.
        id: u64,
        /// When to stop waiting for the reply.
        until: Instant,
    },
    /// Nothing to do: refreshed, or given up until the next `expiring`.
    Idle,
}

/// The refresh of the current session's token.
#[derive(Debug)]
pub(crate) struct Refresh {
    stage: Stage,
    /// The old token's expiry, as announced by `expiring`.
    deadline: Instant,
    failures: u32,
}

impl Default for Refresh {
    fn default() -> Self {
        Self {
            stage: Stage::Idle,
            deadline: Instant::now(),
            failures: 0,
        }
    }
}

impl Refresh {
    /// The current stage.
    pub(crate) fn stage(&self) -> Stage {
        self.stage
    }

    /// `expiring` arrived: the token expires `in_ms` after `now`. Starts a refresh at
    /// once, unless one is already running (then only the deadline moves).
    pub(crate) fn expiring(&mut self, now: Instant, in_ms: u64) {
        self.deadline = now + Duration::from_millis(in_ms).min(MAX_IN);
        if matches!(self.stage, Stage::Idle | Stage::Wait(_)) {
            self.failures = 0;
            self.stage = Stage::Wait(now);
        }
    }

    /// When the connection task must act next (ask the callback, or give up waiting
    /// for a reply); `None` while the callback runs or when idle.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        match self.stage {
            Stage::Wait(at) => Some(at),
            Stage::Sent { until, .. } => Some(until),
            Stage::Fetching | Stage::Idle => None,
        }
    }

    /// The callback was started.
    pub(crate) fn fetching(&mut self) {
        self.stage = Stage::Fetching;
    }

    /// `refresh` was sent with `id`; its reply is awaited until `now + timeout`.
    pub(crate) fn sent(&mut self, id: u64, now: Instant, timeout: Duration) {
        self.stage = Stage::Sent {
            id,
            until: now + timeout,
        };
    }

    /// Whether `id` is the id of the refresh in flight.
    pub(crate) fn is_pending(&self, id: u64) -> bool {
        matches!(self.stage, Stage::Sent { id: sent, .. } if sent == id)
    }

    /// The server took the new token.
    pub(crate) fn succeeded(&mut self) {
        self.stage = Stage::Idle;
        self.failures = 0;
    }

    /// The attempt failed (callback error, error reply, no reply in time): try again
    /// after a backoff, or give up when that would be past the deadline. Returns the
    /// time of the next try, `None` when given up.
    pub(crate) fn failed(&mut self, now: Instant) -> Option<Instant> {
        let ceiling = RETRY_INITIAL
            .saturating_mul(1u32 << self.failures.min(10))
            .min(RETRY_MAX);
        self.failures = self.failures.saturating_add(1);
        // Half fixed, half jitter: never an immediate retry loop, and clients whose
        // tokens expire together spread out.
        let next = now + ceiling / 2 + jitter(ceiling / 2);
        if next >= self.deadline {
            self.stage = Stage::Idle;
            None
        } else {
            self.stage = Stage::Wait(next);
            Some(next)
        }
    }

    /// Stop until the next `expiring` (a refusal that retrying cannot fix).
    pub(crate) fn give_up(&mut self) {
        self.stage = Stage::Idle;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiring_starts_at_once_and_a_success_ends_it() {
        let now = Instant::now();
        let mut r = Refresh::default();
        assert_eq!(r.wake_at(), None);
        r.expiring(now, 2_000);
        assert_eq!(r.wake_at(), Some(now));
        r.fetching();
        assert_eq!(r.wake_at(), None);
        r.sent(7, now, Duration::from_secs(10));
        assert!(r.is_pending(7) && !r.is_pending(8));
        assert_eq!(r.wake_at(), Some(now + Duration::from_secs(10)));
        r.succeeded();
        assert_eq!(r.stage(), Stage::Idle);
        assert!(!r.is_pending(7));
    }

    #[test]
    fn failures_back_off_and_stop_at_the_deadline() {
        let now = Instant::now();
        let mut r = Refresh::default();
        r.expiring(now, 3_000);
        let mut t = now;
        let mut tries = 0;
        while let Some(next) = r.failed(t) {
            assert!(next > t, "never an immediate retry");
            assert!(
                next < now + Duration::from_secs(3),
                "never past the deadline"
            );
            t = next;
            tries += 1;
            assert!(tries < 20);
        }
        assert!(tries >= 2, "a few tries before the deadline: {tries}");
        assert_eq!(r.stage(), Stage::Idle);
        assert_eq!(r.wake_at(), None);
    }

    #[test]
    fn delays_are_capped() {
        let now = Instant::now();
        let mut r = Refresh::default();
        r.expiring(now, 3_600_000);
        for _ in 0..50 {
            let next = r.failed(now).unwrap();
            assert!(next - now <= RETRY_MAX);
        }
    }

    #[test]
    fn a_second_expiring_during_a_refresh_only_moves_the_deadline() {
        let now = Instant::now();
        let mut r = Refresh::default();
        r.expiring(now, 1_000);
        r.fetching();
        r.expiring(now, 60_000);
        assert_eq!(r.stage(), Stage::Fetching);
        // The deadline moved: a failure now has room for a retry.
        assert!(r.failed(now).is_some());
    }

    #[test]
    fn huge_in_ms_does_not_overflow() {
        let now = Instant::now();
        let mut r = Refresh::default();
        r.expiring(now, u64::MAX);
        assert!(r.failed(now).is_some());
    }
}
