//! What the server API accepted, and the exact count of what clients lost or got twice.
//!
//! A push counts as sent only when `POST /v1/publish` answered 200 with its offset. A
//! push whose answer never came (the node died mid-request) is "unconfirmed": it may or
//! may not exist, so a client receiving it is neither a loss nor a duplicate.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use crate::follower::{Follower, Record};

/// Offsets the API accepted, per channel.
#[derive(Default)]
pub struct Ledger {
    accepted: Mutex<BTreeMap<String, BTreeSet<u64>>>,
    unconfirmed: Mutex<u64>,
}

impl Ledger {
    /// Publishes `body` through `http` with `api_key`; records the offset when accepted.
    /// Returns whether it was accepted.
    pub async fn publish(
        &self,
        client: &reqwest::Client,
        http: &str,
        api_key: &str,
        body: &Value,
    ) -> bool {
        let answer = client
            .post(format!("{http}/v1/publish"))
            .bearer_auth(api_key)
            .json(body)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        let accepted = match answer {
            Ok(r) if r.status() == 200 => r.json::<Value>().await.ok(),
            Ok(r) if r.status().is_client_error() => {
                panic!("publish {body} refused: {}", r.status())
            }
            _ => None,
        };
        match accepted {
            Some(v) => {
                let channel = v["channel"].as_str().expect("channel").to_owned();
                let offset = v["offset"].as_u64().expect("offset");
                self.accepted
                    .lock()
                    .unwrap()
                    .entry(channel)
                    .or_default()
                    .insert(offset);
                true
            }
            None => {
                *self.unconfirmed.lock().unwrap() += 1;
                false
            }
        }
    }

    /// The highest accepted offset of a channel (0: none).
    pub fn last(&self, channel: &str) -> u64 {
        self.accepted
            .lock()
            .unwrap()
            .get(channel)
            .and_then(|s| s.last().copied())
            .unwrap_or(0)
    }

    /// Accepted pushes, all channels.
    pub fn total(&self) -> usize {
        self.accepted
            .lock()
            .unwrap()
            .values()
            .map(BTreeSet::len)
            .sum()
    }

    /// Publishes without an answer.
    pub fn unconfirmed(&self) -> u64 {
        *self.unconfirmed.lock().unwrap()
    }

    /// Whether `record` has reached the last accepted offset of each of `channels`.
    pub fn caught_up(&self, record: &Record, channels: &[String]) -> bool {
        channels.iter().all(|c| record.offset(c) >= self.last(c))
    }

    /// Waits until every follower (follower i on `channels(i)`) has the last accepted
    /// offset of its channels, all within `wait`.
    pub async fn wait_caught_up(
        &self,
        followers: &[Follower],
        channels: impl Fn(usize) -> Vec<String>,
        wait: Duration,
    ) {
        let deadline = tokio::time::Instant::now() + wait;
        for (i, f) in followers.iter().enumerate() {
            let want = channels(i);
            while !self.caught_up(&f.snapshot(), &want) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "follower {i} did not catch up: {:?}",
                    f.snapshot()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Counts, over every follower (record i of one on `channels(i)`) and each of its
    /// channels, the accepted messages it never got (lost) and the deliveries of an
    /// offset it already had (duplicates). Followers joined every channel before the
    /// first push, so each must get every accepted offset.
    pub fn tally(&self, records: &[Record], channels: impl Fn(usize) -> Vec<String>) -> Tally {
        let accepted = self.accepted.lock().unwrap();
        let empty = BTreeSet::new();
        let mut t = Tally::default();
        for (i, record) in records.iter().enumerate() {
            for channel in channels(i) {
                let want = accepted.get(&channel).unwrap_or(&empty);
                let seen = record.channels.get(&channel).cloned().unwrap_or_default();
                let received = seen.offsets();
                let got: BTreeSet<u64> = received.iter().copied().collect();
                t.expected += want.len() as u64;
                t.delivered += received.len() as u64;
                t.lost += want.difference(&got).count() as u64;
                t.duplicates += (received.len() - got.len()) as u64;
                t.violations += seen.violations.len() as u64;
                for (last, got) in &seen.violations {
                    *t.gaps
                        .entry(format!("{channel} {last}->{got}"))
                        .or_default() += 1;
                }
                t.discontinuities += u64::from(seen.discontinuities);
            }
        }
        t
    }
}

/// The result of [`Ledger::tally`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Out-of-order deliveries by "channel last->got", with how many followers saw each.
    pub gaps: BTreeMap<String, u64>,
    /// Accepted messages × their subscribers.
    pub expected: u64,
    /// Messages delivered to the followers.
    pub delivered: u64,
    /// Accepted messages a follower never got.
    pub lost: u64,
    /// Deliveries of an offset the follower already had.
    pub duplicates: u64,
    /// Out-of-order deliveries.
    pub violations: u64,
    /// `recovered: false` resumes and `resync` frames.
    pub discontinuities: u64,
}

impl Tally {
    /// Every accepted message reached every follower once, in order, and none was told
    /// to resync.
    #[track_caller]
    pub fn assert_exact(&self) {
        assert_eq!(
            (
                self.lost,
                self.duplicates,
                self.violations,
                self.discontinuities
            ),
            (0, 0, 0, 0),
            "{self:?}"
        );
    }
}
