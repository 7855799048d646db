//! Exact delivery accounting by offset.
//!
//! A message counts as sent only when the publish API answered with its offset
//! ([`Accepted`]). Each connection keeps the set of offsets it received ([`Seen`]):
//! an offset seen twice is a duplicate, an offset below the highest one seen is
//! reordered. After the drain period, lost = accepted offsets a connection never saw.
//! Offsets are small dense integers (1, 2, 3 … per channel), so bitsets hold them.
//!
//! Offsets count per epoch: when a channel starts a new epoch (Redis lost its data, or
//! a Sentinel failover), offsets start again at 1. So accepted offsets are kept per
//! epoch ([`AcceptedByEpoch`]), and a connection that a `resync` (or `recovered:
//! false`) moved to a new epoch keeps what it saw of the old one apart. Accepted
//! messages of an epoch the connection was told to leave, and never got, are counted
//! as `resynced_away`: the client knows it must reload, so they are not silent losses.

use std::collections::BTreeMap;

use herald_protocol::same_stream;

/// A growable set of offsets.
#[derive(Debug, Default, Clone)]
pub struct BitSet {
    words: Vec<u64>,
}

impl BitSet {
    /// Adds `n`; returns false when it was already there.
    pub fn insert(&mut self, n: u64) -> bool {
        let (w, b) = ((n / 64) as usize, n % 64);
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let had = self.words[w] & (1 << b) != 0;
        self.words[w] |= 1 << b;
        !had
    }

    /// Whether `n` is in the set.
    pub fn contains(&self, n: u64) -> bool {
        let w = (n / 64) as usize;
        w < self.words.len() && self.words[w] & (1 << (n % 64)) != 0
    }

    /// The elements, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            (0..64u64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| i as u64 * 64 + b)
        })
    }

    /// How many elements of `self` are not in `other`.
    pub fn count_missing_from(&self, other: &BitSet) -> u64 {
        self.words
            .iter()
            .enumerate()
            .map(|(i, w)| (w & !other.words.get(i).copied().unwrap_or(0)).count_ones() as u64)
            .sum()
    }

    /// Number of elements.
    pub fn len(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }
}

/// The offsets the publish API accepted for one channel (in one epoch).
pub type Accepted = BitSet;

/// The offsets the publish API accepted for one channel, per epoch.
pub type AcceptedByEpoch = BTreeMap<String, Accepted>;

/// What one connection saw of one channel, across its reconnects.
#[derive(Debug, Default)]
pub struct Seen {
    /// Whether a `welcome` confirmed the channel yet (a channel never published to has
    /// the empty epoch, so the epoch cannot tell).
    pub welcomed: bool,
    /// The channel's epoch (empty until the first `welcome` or message).
    pub epoch: String,
    /// Highest offset seen: where a reconnect resumes.
    pub last: u64,
    /// Offsets received.
    pub offsets: BitSet,
    /// Offsets received again.
    pub duplicates: u64,
    /// Offsets received after a higher one.
    pub reordered: u64,
    /// `resync` frames: the server admitted a gap.
    pub resyncs: u64,
    /// Resumes answered `recovered: false` (history did not reach back).
    pub not_recovered: u64,
    /// Messages of another epoch than the one this connection started in.
    pub foreign_epoch: u64,
    /// Offsets received in epochs a `resync` / `recovered: false` moved it away from.
    pub past: Vec<(String, BitSet)>,
    /// The highest position in the current epoch a `resync` / `recovered: false` put
    /// the connection at: offsets up to it that it never got were announced.
    pub told_upto: u64,
}

impl Seen {
    /// Records a delivery; returns true when it is a new offset (not a duplicate).
    pub fn deliver(&mut self, offset: u64, epoch: &str) -> bool {
        // Offset 0 (nothing seen yet) continues with any epoch: the first message of a
        // channel subscribed before its first publish names the epoch.
        if !same_stream(self.last, &self.epoch, epoch) {
            self.foreign_epoch += 1;
            return false;
        }
        if self.epoch != epoch {
            self.epoch = epoch.to_owned();
        }
        if !self.offsets.insert(offset) {
            self.duplicates += 1;
            return false;
        }
        if offset < self.last {
            self.reordered += 1;
        }
        self.last = self.last.max(offset);
        true
    }

    /// Records the position of a `welcome` subscription.
    pub fn welcome(&mut self, offset: u64, epoch: &str, recovered: bool) {
        if !self.welcomed {
            self.welcomed = true;
            self.epoch = epoch.to_owned();
            self.last = offset;
        } else if !recovered {
            self.not_recovered += 1;
            if self.epoch != epoch {
                self.leave_epoch(epoch);
                self.last = offset;
            } else {
                self.last = self.last.max(offset);
            }
            self.told_upto = self.told_upto.max(offset);
        }
    }

    /// Records a `resync`: continue from the server's position.
    pub fn resync(&mut self, offset: u64, epoch: &str) {
        self.resyncs += 1;
        if self.epoch != epoch {
            self.leave_epoch(epoch);
        }
        self.last = offset;
        self.told_upto = self.told_upto.max(offset);
    }

    /// Keeps what was seen of the current epoch apart and starts `epoch`.
    fn leave_epoch(&mut self, epoch: &str) {
        let old = std::mem::replace(&mut self.epoch, epoch.to_owned());
        let offsets = std::mem::take(&mut self.offsets);
        self.past.push((old, offsets));
        self.told_upto = 0;
    }

    /// The offsets seen in `epoch`, and up to which offset the connection was told it
    /// would not get them (every offset of an epoch it was told to leave).
    fn seen_in(&self, epoch: &str) -> (Option<&BitSet>, u64) {
        if self.epoch == epoch {
            return (Some(&self.offsets), self.told_upto);
        }
        match self.past.iter().find(|(e, _)| e == epoch) {
            Some((_, offsets)) => (Some(offsets), u64::MAX),
            None => (None, 0),
        }
    }
}

/// Totals over every connection.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// Accepted offsets delivered (once) to the connections that should get them.
    pub delivered: u64,
    /// Accepted offsets some connection never got.
    pub lost: u64,
    /// Offsets delivered twice to one connection.
    pub duplicates: u64,
    /// Offsets delivered after a higher one.
    pub reordered: u64,
    /// `resync` frames.
    pub resyncs: u64,
    /// Resumes answered `recovered: false`.
    pub not_recovered: u64,
    /// Deliveries of offsets the API never confirmed (the publish answer was lost).
    pub unacknowledged: u64,
    /// Accepted messages of an epoch the connection was told to leave (`resync`,
    /// `recovered: false`) and never got: announced, not silent.
    pub resynced_away: u64,
}

impl Totals {
    /// Adds one connection's view of a channel whose accepted offsets are `accepted`.
    pub fn add(&mut self, seen: &Seen, accepted: &AcceptedByEpoch) {
        let empty = BitSet::default();
        for (epoch, accepted) in accepted {
            let (offsets, told_upto) = seen.seen_in(epoch);
            let offsets = offsets.unwrap_or(&empty);
            let missing = accepted.count_missing_from(offsets);
            let announced = accepted
                .iter()
                .take_while(|o| *o <= told_upto)
                .filter(|o| !offsets.contains(*o))
                .count() as u64;
            self.resynced_away += announced;
            self.lost += missing - announced;
            self.delivered += accepted.len() - missing;
        }
        for (epoch, offsets) in std::iter::once((&seen.epoch, &seen.offsets))
            .chain(seen.past.iter().map(|(e, o)| (e, o)))
        {
            let accepted = accepted.get(epoch).unwrap_or(&empty);
            self.unacknowledged += offsets.count_missing_from(accepted);
        }
        self.duplicates += seen.duplicates;
        self.reordered += seen.reordered;
        self.resyncs += seen.resyncs;
        self.not_recovered += seen.not_recovered;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_loss_duplicates_and_reordering() {
        let mut accepted = Accepted::default();
        for o in 1..=5 {
            accepted.insert(o);
        }
        let mut seen = Seen::default();
        seen.welcome(0, "e", false);
        assert!(seen.deliver(1, "e"));
        assert!(seen.deliver(3, "e"));
        assert!(!seen.deliver(3, "e"));
        assert!(seen.deliver(2, "e"));
        assert!(seen.deliver(6, "e"));
        let mut t = Totals::default();
        t.add(&seen, &AcceptedByEpoch::from([("e".to_owned(), accepted)]));
        assert_eq!(t.delivered, 3);
        assert_eq!(t.lost, 2);
        assert_eq!(t.duplicates, 1);
        assert_eq!(t.reordered, 1);
        assert_eq!(t.unacknowledged, 1);
    }

    #[test]
    fn a_new_epoch_after_a_resync_is_counted_apart() {
        let mut old = Accepted::default();
        let mut new = Accepted::default();
        for o in 1..=4 {
            old.insert(o);
        }
        for o in 1..=2 {
            new.insert(o);
        }
        let mut seen = Seen::default();
        seen.welcome(0, "a", false);
        assert!(seen.deliver(1, "a"));
        assert!(seen.deliver(2, "a"));
        // Offsets 3 and 4 of `a` were lost with the failover, and `b` 1 went by before
        // the resync; the server says so.
        seen.resync(1, "b");
        assert!(seen.deliver(2, "b"));
        let mut t = Totals::default();
        t.add(
            &seen,
            &AcceptedByEpoch::from([("a".to_owned(), old), ("b".to_owned(), new)]),
        );
        assert_eq!((t.delivered, t.lost, t.duplicates), (3, 0, 0));
        assert_eq!((t.resynced_away, t.resyncs, t.unacknowledged), (3, 1, 0));
    }

    #[test]
    fn a_channel_first_published_after_the_welcome_is_not_foreign() {
        let mut seen = Seen::default();
        seen.welcome(0, "", false);
        assert!(seen.welcomed);
        assert!(seen.deliver(1, "e1"));
        assert_eq!(seen.epoch, "e1");
        assert!(
            !seen.deliver(2, "e2"),
            "another epoch after offset 1 is foreign"
        );
        assert_eq!(seen.foreign_epoch, 1);
    }

    #[test]
    fn bitset_across_words() {
        let mut b = BitSet::default();
        assert!(b.insert(0));
        assert!(b.insert(200));
        assert!(!b.insert(200));
        assert!(b.contains(200) && !b.contains(199));
        assert_eq!(b.len(), 2);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 200]);
    }
}
