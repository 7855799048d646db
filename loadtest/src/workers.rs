//! Worker processes: when one process cannot hold enough sockets (the descriptor hard
//! limit is 20,000 here and cannot be raised), the binary re-executes itself with the
//! hidden `worker` subcommand and a slice of the work as JSON. A worker prints one JSON
//! line `{"progress": …}` every few milliseconds; when its stdin closes it prints
//! `{"done": …}` and exits. The parent merges the results.

use std::io::Write;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::task::JoinHandle;

/// A worker process seen from the parent.
pub struct Worker {
    child: tokio::process::Child,
    progress: Arc<Mutex<Option<Value>>>,
    done: Arc<Mutex<Option<Value>>>,
    reader: JoinHandle<()>,
}

#[derive(Deserialize)]
struct Line {
    progress: Option<Value>,
    done: Option<Value>,
}

impl Worker {
    /// Starts `herald-loadtest worker --kind KIND --spec JSON`.
    pub fn spawn(kind: &str, spec: &impl Serialize) -> anyhow::Result<Worker> {
        let exe = std::env::current_exe().context("own executable")?;
        let mut child = tokio::process::Command::new(exe)
            .args(["worker", "--kind", kind, "--spec"])
            .arg(serde_json::to_string(spec)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("start worker process")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let progress = Arc::new(Mutex::new(None));
        let done = Arc::new(Mutex::new(None));
        let (p, d) = (Arc::clone(&progress), Arc::clone(&done));
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Line>(&line) {
                    Ok(Line {
                        progress: Some(x), ..
                    }) => *p.lock().expect("progress") = Some(x),
                    Ok(Line { done: Some(r), .. }) => *d.lock().expect("done") = Some(r),
                    _ => {}
                }
            }
        });
        Ok(Worker {
            child,
            progress,
            done,
            reader,
        })
    }

    /// The latest progress line, if any arrived.
    pub fn progress<T: DeserializeOwned>(&self) -> Option<T> {
        let p = self.progress.lock().expect("progress").clone()?;
        serde_json::from_value(p).ok()
    }

    /// Closes the worker's stdin (it then reports and exits) and returns its result.
    pub async fn finish<T: DeserializeOwned>(mut self) -> anyhow::Result<T> {
        drop(self.child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await;
        let _ = (&mut self.reader).await;
        let done = self.done.lock().expect("done").take();
        let done = done.context("a worker ended without a result")?;
        Ok(serde_json::from_value(done)?)
    }
}

/// The worker side: prints `progress()` every `every` until stdin closes, then prints
/// the result of `finish` and returns.
pub async fn serve<P, R, F>(
    every: Duration,
    progress: impl Fn() -> P,
    finish: F,
) -> anyhow::Result<()>
where
    P: Serialize,
    R: Serialize,
    F: std::future::Future<Output = R>,
{
    let mut stdin_closed = tokio::spawn(async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = &mut stdin_closed => break,
            _ = tick.tick() => emit(&serde_json::json!({ "progress": progress() }))?,
        }
    }
    let result = finish.await;
    emit(&serde_json::json!({ "done": result }))
}

fn emit(v: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}")?;
    out.flush()?;
    Ok(())
}
