//! Counts panics raised outside the test code (in the server or its dependencies), so a
//! test can assert that bad input made nothing panic.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

/// Installs the counting panic hook (once per test binary).
pub fn watch_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.location().is_some_and(|l| !l.file().contains("tests")) {
                SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// Fails when anything outside the tests panicked.
pub fn assert_no_server_panic() {
    assert_eq!(
        SERVER_PANICS.load(Ordering::SeqCst),
        0,
        "the server panicked (see the test output)"
    );
}
