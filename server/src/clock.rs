//! The one wall clock of the node. Tokens, revocations, webhook events, receipts and
//! registry samples all read Unix time; reading it in one place keeps them agreeing on
//! what "before the clock was set" means (0, never a panic).

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in whole seconds; 0 when the system clock is before 1970.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Unix time in milliseconds; 0 when the system clock is before 1970.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_milliseconds_agree() {
        let s = now_secs();
        let ms = now_ms();
        assert!(ms / 1000 >= s && ms / 1000 <= s + 1);
    }
}
