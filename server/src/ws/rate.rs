//! The command rate limit of a session: a token bucket, and when refusals become a close.

use std::time::Duration;
use tokio::time::Instant;

/// Token bucket of commands; sending at twice the rate for a second closes with 4429.
pub(super) struct RateLimit {
    rate: f64,
    tokens: f64,
    refilled: Instant,
    refused_in_window: u32,
    window_start: Instant,
}

pub(super) enum Rate {
    Allow,
    Refuse,
    Close,
}

impl RateLimit {
    pub(super) fn new(per_sec: u32) -> Self {
        let now = Instant::now();
        Self {
            rate: per_sec.max(1) as f64,
            tokens: per_sec.max(1) as f64,
            refilled: now,
            refused_in_window: 0,
            window_start: now,
        }
    }

    /// Takes a token if one is there, without counting a refusal (resume entries).
    pub(super) fn try_take(&mut self) -> bool {
        self.refill(Instant::now());
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        false
    }

    pub(super) fn refill(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.refilled = now;
    }

    pub(super) fn check(&mut self) -> Rate {
        let now = Instant::now();
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Rate::Allow;
        }
        if now.duration_since(self.window_start) > Duration::from_secs(1) {
            self.window_start = now;
            self.refused_in_window = 0;
        }
        self.refused_in_window += 1;
        if self.refused_in_window as f64 > self.rate {
            Rate::Close
        } else {
            Rate::Refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    pub(super) async fn rate_limit_refuses_then_closes() {
        let mut r = RateLimit::new(5);
        let mut outcomes = (0, 0, 0);
        for _ in 0..20 {
            match r.check() {
                Rate::Allow => outcomes.0 += 1,
                Rate::Refuse => outcomes.1 += 1,
                Rate::Close => {
                    outcomes.2 += 1;
                    break;
                }
            }
        }
        assert_eq!(outcomes.0, 5);
        assert_eq!(outcomes.1, 5);
        assert_eq!(outcomes.2, 1);
    }

    #[tokio::test]
    pub(super) async fn resume_entries_take_tokens_without_counting_refusals() {
        let mut r = RateLimit::new(3);
        assert!(r.try_take() && r.try_take() && r.try_take());
        for _ in 0..10 {
            assert!(!r.try_take(), "the bucket is empty");
        }
        // Refused resume entries do not push the connection towards a 4429.
        assert!(matches!(r.check(), Rate::Refuse));
    }
}
