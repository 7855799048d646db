//! Progress bars (indicatif) on stderr. They draw only when stderr is a terminal, so
//! worker processes, CI logs and `--report` runs stay clean.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

fn multi() -> &'static MultiProgress {
    static MULTI: OnceLock<MultiProgress> = OnceLock::new();
    MULTI.get_or_init(|| {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr_with_hz(4)
        } else {
            ProgressDrawTarget::hidden()
        };
        MultiProgress::with_draw_target(target)
    })
}

/// A bar counting to `len`.
pub fn bar(prefix: &str, len: u64) -> ProgressBar {
    let bar = multi().add(ProgressBar::new(len));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {per_sec} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_owned());
    bar
}

/// A bar that fills over `duration`, with a free-text message (rates, counters).
pub fn timer(prefix: &str, duration: Duration) -> ProgressBar {
    let bar = multi().add(ProgressBar::new(duration.as_millis().max(1) as u64));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {elapsed} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_owned());
    bar
}

/// Prints a line above the bars (or plainly when they are hidden).
pub fn println(line: &str) {
    if multi().is_hidden() {
        eprintln!("{line}");
    } else {
        let _ = multi().println(line);
    }
}
