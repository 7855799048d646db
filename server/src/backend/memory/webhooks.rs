//! The memory backend's webhook state: the model of `backend/webhooks.rs` in one
//! process, for a single node. Not durable: a restart forgets the log and the cursors.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;

use crate::backend::error::BackendError;
use crate::backend::streams::new_epoch;
use crate::backend::webhooks::{
    event_json, subject_field, transition_kinds, Batch, Holding, NewEvent, StoredEvent,
    WebhookStore, WebhookStoreSettings,
};
use crate::clock::now_ms;

/// The memory broker's webhook state: the same model in one process, for a single
/// node. Not durable: a restart forgets the log and the cursors.
pub struct MemoryWebhookStore {
    settings: WebhookStoreSettings,
    epoch: String,
    state: Mutex<MemState>,
}

#[derive(Default)]
struct MemState {
    n: u64,
    log: VecDeque<StoredEvent>,
    /// subject → nodes holding it.
    holders: HashMap<String, HashSet<String>>,
    on: HashSet<String>,
    /// subject → offline deadline (unix ms).
    due: BTreeMap<String, u64>,
    nodes: HashMap<String, u64>,
    cursors: HashMap<String, u64>,
    leases: HashMap<String, (String, u64)>,
}

impl MemState {
    fn emit(&mut self, epoch: &str, retention: usize, subject: &str, up: bool, now: u64) {
        let Some((on, off, field, name)) = transition_kinds(subject) else {
            return;
        };
        self.push(
            epoch,
            retention,
            if up { on } else { off },
            field,
            name,
            "",
            None,
            now,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        epoch: &str,
        retention: usize,
        kind: &str,
        field: &str,
        name: &str,
        extra: &str,
        id: Option<&str>,
        now: u64,
    ) {
        self.n += 1;
        let id = id.map_or_else(|| format!("{epoch}-{}", self.n), str::to_owned);
        let json = event_json(&id, kind, field, name, self.n, now, extra);
        self.log.push_back(StoredEvent { n: self.n, json });
        while self.log.len() > retention.max(1) {
            self.log.pop_front();
        }
    }

    fn let_go(&mut self, node: &str, subject: &str, grace: u64, now: u64) -> bool {
        let empty = match self.holders.get_mut(subject) {
            Some(set) => {
                set.remove(node);
                set.is_empty()
            }
            None => true,
        };
        if empty {
            self.holders.remove(subject);
            if self.on.contains(subject) {
                self.due.entry(subject.to_owned()).or_insert(now + grace);
                return true;
            }
        }
        false
    }

    fn drop_node(&mut self, node: &str, grace: u64, now: u64) {
        self.nodes.remove(node);
        let held: Vec<String> = self
            .holders
            .iter()
            .filter(|(_, nodes)| nodes.contains(node))
            .map(|(s, _)| s.clone())
            .collect();
        for s in held {
            self.let_go(node, &s, grace, now);
        }
    }
}

impl MemoryWebhookStore {
    /// An empty store.
    pub fn new(settings: WebhookStoreSettings) -> Self {
        // Numbered from the clock like the Redis log: see `webhook.lua`.
        let state = MemState {
            n: now_ms() * 1000,
            ..MemState::default()
        };
        Self {
            settings,
            epoch: new_epoch(),
            state: Mutex::new(state),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn grace_ms(&self) -> u64 {
        self.settings.grace.as_millis() as u64
    }

    fn lease_ok(state: &mut MemState, target: &str, holder: &str, lease_ms: u64, now: u64) -> bool {
        match state.leases.get(target) {
            Some((h, until)) if h != holder && *until > now => false,
            _ => {
                state
                    .leases
                    .insert(target.to_owned(), (holder.to_owned(), now + lease_ms));
                true
            }
        }
    }
}

#[async_trait]
impl WebhookStore for MemoryWebhookStore {
    async fn report(&self, node: &str, holdings: &[Holding]) -> Result<bool, BackendError> {
        let now = now_ms();
        let (grace, retention) = (self.grace_ms(), self.settings.retention);
        let mut st = self.state();
        let fresh = st.nodes.insert(node.to_owned(), now).is_none();
        for h in holdings {
            if h.held {
                st.holders
                    .entry(h.subject.clone())
                    .or_default()
                    .insert(node.to_owned());
                if st.on.contains(&h.subject) {
                    st.due.remove(&h.subject);
                } else {
                    st.on.insert(h.subject.clone());
                    st.emit(&self.epoch, retention, &h.subject, true, now);
                }
            } else if st.let_go(node, &h.subject, grace, now) && grace == 0 {
                st.due.remove(&h.subject);
                st.on.remove(&h.subject);
                st.emit(&self.epoch, retention, &h.subject, false, now);
            }
        }
        Ok(fresh)
    }

    async fn leave(&self, node: &str) -> Result<(), BackendError> {
        let now = now_ms();
        let grace = self.grace_ms();
        self.state().drop_node(node, grace, now);
        Ok(())
    }

    async fn sweep(&self) -> Result<u64, BackendError> {
        let now = now_ms();
        let ttl = self.settings.node_ttl.as_millis() as u64;
        let (grace, retention) = (self.grace_ms(), self.settings.retention);
        let mut st = self.state();
        let dead: Vec<String> = st
            .nodes
            .iter()
            .filter(|(_, at)| now.saturating_sub(**at) > ttl)
            .map(|(n, _)| n.clone())
            .collect();
        for node in dead {
            st.drop_node(&node, grace, now);
        }
        let due: Vec<String> = st
            .due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(s, _)| s.clone())
            .collect();
        let mut emitted = 0;
        for s in due {
            st.due.remove(&s);
            if !st.holders.contains_key(&s) && st.on.remove(&s) {
                st.emit(&self.epoch, retention, &s, false, now);
                emitted += 1;
            }
        }
        Ok(emitted)
    }

    async fn append(&self, event: &NewEvent) -> Result<(), BackendError> {
        let (field, name) = subject_field(&event.subject)?;
        let now = now_ms();
        let retention = self.settings.retention;
        self.state().push(
            &self.epoch,
            retention,
            &event.kind,
            field,
            name,
            &event.extra,
            event.id.as_deref(),
            now,
        );
        Ok(())
    }

    async fn claim(&self, target: &str, holder: &str) -> Result<bool, BackendError> {
        let lease = self.settings.lease.as_millis() as u64;
        Ok(Self::lease_ok(
            &mut self.state(),
            target,
            holder,
            lease,
            now_ms(),
        ))
    }

    async fn read(
        &self,
        target: &str,
        holder: &str,
        max: usize,
    ) -> Result<Option<Batch>, BackendError> {
        let lease = self.settings.lease.as_millis() as u64;
        let mut st = self.state();
        if !Self::lease_ok(&mut st, target, holder, lease, now_ms()) {
            return Ok(None);
        }
        let cursor = st.cursors.get(target).copied();
        let after = cursor.unwrap_or(0);
        let events: Vec<StoredEvent> = st
            .log
            .iter()
            .filter(|e| e.n > after)
            .take(max.max(1))
            .cloned()
            .collect();
        let trimmed = match (cursor, events.first()) {
            (Some(c), Some(first)) => first.n.saturating_sub(c + 1),
            _ => 0,
        };
        Ok(Some(Batch { events, trimmed }))
    }

    async fn ack(&self, target: &str, holder: &str, upto: u64) -> Result<bool, BackendError> {
        let mut st = self.state();
        let now = now_ms();
        if !matches!(st.leases.get(target), Some((h, until)) if h == holder && *until > now) {
            return Ok(false);
        }
        let c = st.cursors.entry(target.to_owned()).or_insert(0);
        *c = (*c).max(upto);
        Ok(true)
    }

    async fn release(&self, target: &str, holder: &str) -> Result<(), BackendError> {
        let mut st = self.state();
        if matches!(st.leases.get(target), Some((h, _)) if h == holder) {
            st.leases.remove(target);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn store(grace_ms: u64) -> MemoryWebhookStore {
        MemoryWebhookStore::new(WebhookStoreSettings {
            grace: Duration::from_millis(grace_ms),
            node_ttl: Duration::from_secs(10),
            lease: Duration::from_secs(10),
            retention: 5,
        })
    }

    fn hold(s: &str, held: bool) -> Holding {
        Holding {
            subject: s.into(),
            held,
        }
    }

    /// Type and seq (relative to the log's first number) of each event.
    fn kinds(st: &MemoryWebhookStore) -> Vec<String> {
        let state = st.state();
        let base = state.log.front().map_or(0, |e| e.n - 1);
        state
            .log
            .iter()
            .map(|e| {
                let v: serde_json::Value = serde_json::from_str(&e.json).unwrap();
                let seq = v["seq"].as_u64().unwrap();
                assert_eq!(seq, e.n);
                format!("{} {}", v["type"].as_str().unwrap(), seq - base)
            })
            .collect()
    }

    #[test]
    fn event_json_is_json_with_the_contract_fields() {
        let j = event_json(
            "e-7",
            "user.online",
            "user",
            "al\"ice",
            7,
            1_700_000_000_123,
            "",
        );
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["id"], "e-7");
        assert_eq!(v["type"], "user.online");
        assert_eq!(v["user"], "al\"ice");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["at"], 1_700_000_000_123u64);
        let j = event_json(
            "e-8",
            "message.unacked",
            "user",
            "bob",
            8,
            1,
            r#""offset":3,"data":{"a":1}"#,
        );
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["data"]["a"], 1);
    }

    #[tokio::test]
    async fn hops_do_not_flap_and_the_last_leave_emits_once() {
        let st = store(0);
        assert!(st.report("a", &[hold("u:alice", true)]).await.unwrap());
        st.report("b", &[hold("u:alice", true)]).await.unwrap();
        st.report("a", &[hold("u:alice", false)]).await.unwrap();
        st.report("b", &[hold("u:alice", false)]).await.unwrap();
        st.report("b", &[hold("u:alice", false)]).await.unwrap(); // repeated: idempotent
        assert_eq!(kinds(&st), ["user.online 1", "user.offline 2"]);
    }

    #[tokio::test]
    async fn a_reconnect_within_the_grace_emits_nothing() {
        let st = store(60_000);
        st.report("a", &[hold("c:room", true)]).await.unwrap();
        st.report("a", &[hold("c:room", false)]).await.unwrap();
        st.report("a", &[hold("c:room", true)]).await.unwrap();
        st.sweep().await.unwrap();
        assert_eq!(kinds(&st), ["channel.occupied 1"]);
        st.report("a", &[hold("c:room", false)]).await.unwrap();
        st.state().due.values_mut().for_each(|d| *d = 0); // the grace is over
        assert_eq!(st.sweep().await.unwrap(), 1);
        assert_eq!(st.sweep().await.unwrap(), 0);
        assert_eq!(kinds(&st), ["channel.occupied 1", "channel.vacated 2"]);
    }

    #[tokio::test]
    async fn a_leaving_node_lets_go_of_everything() {
        let st = store(0);
        st.report("a", &[hold("u:x", true), hold("u:y", true)])
            .await
            .unwrap();
        st.report("b", &[hold("u:y", true)]).await.unwrap();
        st.leave("a").await.unwrap();
        st.sweep().await.unwrap();
        assert_eq!(
            kinds(&st),
            ["user.online 1", "user.online 2", "user.offline 3"]
        );
    }

    #[tokio::test]
    async fn cursor_lease_and_retention() {
        let st = store(0);
        let base = st.state().n; // event k (from 1) has number base + k
        for i in 0..8 {
            st.append(&NewEvent {
                kind: "test".into(),
                subject: format!("u:u{i}"),
                extra: String::new(),
                id: None,
            })
            .await
            .unwrap();
        }
        // Retention 5: events 4..=8 are kept; a new target starts at the oldest.
        let b = st.read("t", "n1", 2).await.unwrap().unwrap();
        assert_eq!((b.events[0].n - base, b.events.len(), b.trimmed), (4, 2, 0));
        assert!(
            st.read("t", "n2", 2).await.unwrap().is_none(),
            "n1 holds the lease"
        );
        assert!(!st.ack("t", "n2", base + 5).await.unwrap());
        assert!(st.ack("t", "n1", base + 5).await.unwrap());
        let b = st.read("t", "n1", 10).await.unwrap().unwrap();
        assert_eq!(
            b.events.iter().map(|e| e.n - base).collect::<Vec<_>>(),
            [6, 7, 8]
        );
        st.ack("t", "n1", base + 8).await.unwrap();
        for _ in 0..7 {
            st.append(&NewEvent {
                kind: "test".into(),
                subject: "c:room".into(),
                extra: String::new(),
                id: None,
            })
            .await
            .unwrap();
        }
        let b = st.read("t", "n1", 10).await.unwrap().unwrap();
        assert_eq!(
            (b.events[0].n - base, b.trimmed),
            (11, 2),
            "9 and 10 were trimmed"
        );
        st.release("t", "n1").await.unwrap();
        assert!(st.claim("t", "n2").await.unwrap());
        assert!(st
            .append(&NewEvent {
                kind: "x".into(),
                subject: "bad".into(),
                extra: String::new(),
                id: None,
            })
            .await
            .is_err());
    }
}
