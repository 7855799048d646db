//! Herald wire protocol v1, shared by the server, the client SDK and the load generator.
//!
//! This crate owns everything both ends of a socket must agree on and nothing else:
//! - [`channel`]: channel names, user ids, permission patterns;
//! - [`frame`]: the JSON frames (client commands, server frames) and their parsing;
//! - [`codes`]: WebSocket close codes and reply error codes;
//! - [`depth`]: how deeply JSON nests, and the limit on published `data`;
//! - [`StreamPosition`]: an `(offset, epoch)` position in a channel's stream.
//!
//! It depends on serde only, so any runtime can use it.

pub mod channel;
pub mod codes;
pub mod depth;
pub mod frame;

use serde::{Deserialize, Serialize};

/// A position in one channel's stream: the offset of the last message seen, in an epoch.
///
/// Offsets count 1, 2, 3 … per channel without gaps; `0` means "before the first
/// message". Offsets from another epoch mean nothing (the history was lost in between).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct StreamPosition {
    /// Offset of the last message at this position.
    pub offset: u64,
    /// The epoch the offset belongs to.
    pub epoch: String,
}

impl StreamPosition {
    /// A position from its parts.
    pub fn new(offset: u64, epoch: impl Into<String>) -> Self {
        Self {
            offset,
            epoch: epoch.into(),
        }
    }

    /// Whether a stream whose epoch is `epoch` continues from this position, that is,
    /// whether its offsets after this one are the messages not seen yet. See
    /// [`same_stream`], the one place where this rule lives.
    pub fn continues_with(&self, epoch: &str) -> bool {
        same_stream(self.offset, &self.epoch, epoch)
    }
}

/// The epoch of a channel that has no stored state: never published to, or its state
/// expired or was lost. Reading such a channel creates nothing and answers
/// `(0, EMPTY_EPOCH)`; only a publish gives a channel a (random, non-empty) epoch.
pub const EMPTY_EPOCH: &str = "";

/// Whether a position `(offset, epoch)` and a stream in epoch `other_epoch` are the
/// same stream, so that the stream's offsets after `offset` are exactly what the holder
/// of the position has not seen.
///
/// Offsets from another epoch mean nothing, except offset 0: it means "nothing seen
/// yet", which is true in every epoch. So a position at offset 0 continues with ANY
/// epoch: a client at `(0, "")` (subscribed to a channel never published to) that then
/// receives offset 1 of epoch `E` has missed nothing, and a `since` of `(0, anything)`
/// recovers from the start of the current history. Every comparison of epochs (server
/// sessions and hub, the Rust SDK, the load generator; herald.js mirrors it) goes
/// through this function.
pub fn same_stream(offset: u64, epoch: &str, other_epoch: &str) -> bool {
    offset == 0 || epoch == other_epoch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_zero_has_no_epoch() {
        assert!(same_stream(0, "", "e1"));
        assert!(same_stream(0, "e0", "e1"));
        assert!(same_stream(0, "e1", ""));
        assert!(same_stream(5, "e1", "e1"));
        assert!(same_stream(0, "", ""));
        // Beyond offset 0 the epoch must match: the history was lost in between.
        assert!(!same_stream(17, "e1", "e2"));
        assert!(!same_stream(17, "e1", EMPTY_EPOCH));
        assert!(!same_stream(1, "", "e1"));
        assert!(StreamPosition::new(0, EMPTY_EPOCH).continues_with("abc"));
        assert!(!StreamPosition::new(3, "x").continues_with("y"));
    }

    #[test]
    fn the_empty_position_round_trips() {
        let p = StreamPosition::new(0, EMPTY_EPOCH);
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(text, r#"{"offset":0,"epoch":""}"#);
        assert_eq!(serde_json::from_str::<StreamPosition>(&text).unwrap(), p);
        assert_eq!(StreamPosition::default(), p);
    }
}
