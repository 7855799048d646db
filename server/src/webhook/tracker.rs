//! This node's side of webhook presence: local sessions per subject (a user or a
//! channel), reported to the broker's store as "held" / "not held".
//!
//! Sessions only touch a std mutex here (never Redis): the first session of a subject
//! and the last one mark it dirty, and a background task reports dirty subjects every
//! [`FLUSH_EVERY`], so a burst of connects costs one script call, and a user who
//! closes and reopens a tab between two flushes costs nothing. A failed report leaves
//! its subjects dirty (reports are idempotent), and when the store says it did not
//! know this node (it lost its data, or declared the node dead during a long pause)
//! every held subject is reported again: nothing is lost while Redis is briefly down.
//! The same task sends the node's heartbeat (an empty report) and runs the sweep.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::Webhooks;
use crate::backend::webhooks::Holding;

/// How often dirty subjects are reported.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

#[derive(Default)]
struct State {
    counts: HashMap<String, u32>,
    dirty: HashSet<String>,
}

/// Local sessions per subject. See the module doc.
#[derive(Default)]
pub struct Tracker {
    state: Mutex<State>,
}

impl Tracker {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One more local session of `subject`.
    pub fn add(&self, subject: String) {
        let mut st = self.state();
        let n = st.counts.entry(subject.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            st.dirty.insert(subject);
        }
    }

    /// One local session of `subject` fewer.
    pub fn remove(&self, subject: String) {
        let mut st = self.state();
        if let Some(n) = st.counts.get_mut(&subject) {
            *n -= 1;
            if *n == 0 {
                st.counts.remove(&subject);
                st.dirty.insert(subject);
            }
        }
    }

    /// Local sessions of `subject`.
    pub fn count(&self, subject: &str) -> u32 {
        self.state().counts.get(subject).copied().unwrap_or(0)
    }

    /// The dirty subjects with their current state (or, with `all`, every held one
    /// too), cleared.
    fn take(&self, all: bool) -> Vec<Holding> {
        let mut st = self.state();
        let mut subjects: HashSet<String> = std::mem::take(&mut st.dirty);
        if all {
            subjects.extend(st.counts.keys().cloned());
        }
        subjects
            .into_iter()
            .map(|subject| Holding {
                held: st.counts.contains_key(&subject),
                subject,
            })
            .collect()
    }

    fn mark(&self, holdings: &[Holding]) {
        let mut st = self.state();
        st.dirty.extend(holdings.iter().map(|h| h.subject.clone()));
    }
}

/// Reports dirty subjects (all held ones with `all`); on failure they stay dirty.
/// Returns whether the store asked for everything again.
async fn report(webhooks: &Webhooks, all: bool) -> Result<bool, ()> {
    let holdings = webhooks.tracker.take(all);
    match webhooks.store.report(&webhooks.node_id, &holdings).await {
        Ok(fresh) => {
            if !holdings.is_empty() {
                webhooks.appended.notify_waiters();
            }
            Ok(fresh)
        }
        Err(e) => {
            tracing::debug!(error = %e, "webhooks: presence report failed; will retry");
            webhooks.tracker.mark(&holdings);
            Err(())
        }
    }
}

/// Reports what is dirty now (the drain's last word).
pub(super) async fn flush(webhooks: &Webhooks) {
    let _ = report(webhooks, false).await;
}

/// The heartbeat period: several per node TTL.
fn heartbeat_every(node_ttl: Duration) -> Duration {
    (node_ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(2))
}

/// The sweep period: often enough that offline events come soon after the grace.
fn sweep_every(grace: Duration) -> Duration {
    (grace / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// Reports, heartbeats and sweeps until `stop`.
pub(super) async fn run(webhooks: Arc<Webhooks>, stop: CancellationToken) {
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let heartbeat = heartbeat_every(webhooks.settings.node_ttl);
    let sweep = sweep_every(webhooks.settings.grace);
    let mut next_heartbeat = tokio::time::Instant::now();
    // Jittered, so the nodes of a cluster do not sweep in lockstep.
    let jitter = |d: Duration| d.mul_f64(rand::rng().random_range(0.75..1.25));
    let mut next_sweep = tokio::time::Instant::now() + jitter(sweep);
    let mut all = true; // the first report asserts everything
                        // A node restarted under the same HERALD_NODE_ID before the store noticed it was
                        // gone: what the store thinks it holds belongs to its previous life. Let go of it
                        // first (its users get the grace, like after a crash), then report afresh.
    let mut previous_life = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = flush.tick() => {}
        }
        if previous_life {
            match webhooks.store.leave(&webhooks.node_id).await {
                Ok(()) => previous_life = false,
                Err(e) => {
                    tracing::debug!(error = %e, "webhooks: could not reset this node's holds; will retry");
                    continue;
                }
            }
        }
        let now = tokio::time::Instant::now();
        let dirty = !webhooks.tracker.state().dirty.is_empty();
        if all || dirty || now >= next_heartbeat {
            match report(&webhooks, all).await {
                Ok(fresh) => {
                    next_heartbeat = now + heartbeat;
                    // Unknown to the store: whatever it knew of this node is gone, so
                    // the next report asserts everything (unless this one just did).
                    let was_all = all;
                    all = fresh && !was_all;
                }
                Err(()) => all = true,
            }
        }
        if now >= next_sweep {
            next_sweep = now + jitter(sweep);
            match webhooks.store.sweep().await {
                Ok(n) if n > 0 => webhooks.appended.notify_waiters(),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "webhooks: sweep failed; will retry"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_and_last_sessions_mark_dirty() {
        let t = Tracker::default();
        t.add("u:a".into());
        t.add("u:a".into());
        assert_eq!(
            t.take(false),
            [Holding {
                subject: "u:a".into(),
                held: true
            }]
        );
        t.remove("u:a".into());
        assert!(t.take(false).is_empty(), "one session left");
        t.remove("u:a".into());
        t.remove("u:a".into()); // more removes than adds: ignored
        assert_eq!(
            t.take(false),
            [Holding {
                subject: "u:a".into(),
                held: false
            }]
        );
        // Gone and back between two flushes: reported as held, once.
        t.add("c:r".into());
        t.take(false);
        t.remove("c:r".into());
        t.add("c:r".into());
        assert_eq!(
            t.take(false),
            [Holding {
                subject: "c:r".into(),
                held: true
            }]
        );
        assert_eq!(
            t.take(true),
            [Holding {
                subject: "c:r".into(),
                held: true
            }]
        );
        assert_eq!(t.count("c:r"), 1);
    }

    #[test]
    fn periods() {
        assert_eq!(
            heartbeat_every(Duration::from_secs(10)),
            Duration::from_secs(2)
        );
        assert_eq!(
            heartbeat_every(Duration::from_secs(1)),
            Duration::from_millis(250)
        );
        assert_eq!(sweep_every(Duration::from_secs(5)), Duration::from_secs(1));
        assert_eq!(sweep_every(Duration::ZERO), Duration::from_millis(100));
    }
}
