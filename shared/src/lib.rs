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
}
