//! The browser client (`/herald.js`) and the demo page (`/`) in a real browser: headless
//! Chromium (Debian's `chromium`) driven by playwright-core from `web/tests/browser.mjs`,
//! against a real cluster: Redis, three dev-mode nodes sharing their keys, and one node
//! without dev mode (for the demo's "paste a token" path).
//!
//! The script asks for failures by printing `@@kill i`, `@@terminate i`, `@@restart i` or
//! `@@redis-restart`; this test does it to the real processes and answers `ok` on the
//! script's stdin. `@@pass` means every browser-side check held (see browser.mjs for them:
//! pushes through a node kill and a drain without loss or duplicates, recovered:false,
//! resync after Redis lost its data, the demo across two nodes).
//!
//! Chromium and `web/tests/node_modules` are installed by `scripts/test`; when either is
//! missing this test fails and says so, rather than passing without a browser.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use herald_testkit::process::NodeProcess;
use herald_testkit::redis::RedisServer;
use herald_testkit::{token, API_KEY, SECRET};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

/// The whole browser run, normally well under a minute.
const OVERALL: Duration = Duration::from_secs(180);
/// How long a node may take to become ready again.
const READY: Duration = Duration::from_secs(30);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("server sits in the workspace")
        .to_path_buf()
}

/// Chromium, node and playwright-core, or a panic that says how to install them.
fn prerequisites(web_tests: &Path) -> PathBuf {
    let chromium = std::env::var_os("HERALD_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        chromium.exists(),
        "browser test: no Chromium at {} — run scripts/test (it installs Debian's `chromium` \
         with apt-get), or `apt-get install -y chromium`, or set HERALD_CHROMIUM",
        chromium.display()
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "browser test: Node.js (`node`) is not on PATH — install it (apt-get install -y nodejs npm)"
    );
    assert!(
        web_tests.join("node_modules/playwright-core").is_dir(),
        "browser test: {}/node_modules is missing — run scripts/test (it runs `npm ci` there), \
         or `npm ci` in web/tests",
        web_tests.display()
    );
    chromium
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_js_and_demo_page_in_chromium() {
    let web_tests = workspace().join("web/tests");
    let chromium = prerequisites(&web_tests);

    let mut redis = RedisServer::start();
    let redis_url = redis.url();
    // History long enough that a slow node restart on a busy machine loses nothing.
    let history = "300";
    let env = [
        ("HERALD_REDIS_URL", redis_url.as_str()),
        ("HERALD_DEV", "1"),
        ("HERALD_HISTORY_SIZE", history),
        ("RUST_LOG", "error"),
    ];
    let mut nodes: Vec<NodeProcess> = ["web-0", "web-1", "web-2"]
        .iter()
        .map(|id| NodeProcess::start(id, &env))
        .collect();
    // Not dev mode (keys set, HERALD_DEV unset) and alone: /dev/token answers 404. Its
    // short heartbeat shows that herald.js answers pings.
    let plain = NodeProcess::start(
        "web-plain",
        &[("RUST_LOG", "error"), ("HERALD_HEARTBEAT_MS", "500")],
    );
    for n in nodes.iter().chain([&plain]) {
        n.wait_ready(READY).await;
    }
    // Screenshots of the demo, for a human to look at; overwritten by the next run.
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let config = json!({
        "apiKey": API_KEY,
        // Scenario 6 signs short-lived tokens itself.
        "secret": SECRET,
        "historySize": history.parse::<u64>().unwrap(),
        "nodes": nodes.iter().map(|n| json!({"id": n.id, "http": n.http()})).collect::<Vec<_>>(),
        "plain": {
            "id": plain.id,
            "http": plain.http(),
            "token": token("frank", &["*"], &["*"]),
        },
        "artifacts": artifacts,
    });

    let mut child = Command::new("node")
        .arg(web_tests.join("browser.mjs"))
        .arg(config.to_string())
        .current_dir(&web_tests)
        .env("HERALD_CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start node web/tests/browser.mjs");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();

    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + OVERALL;
    let mut passed = false;
    loop {
        let line = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Err(_) => panic!("browser test: no result within {OVERALL:?}"),
            Ok(Err(e)) => panic!("browser test: reading the script's output: {e}"),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(line))) => line,
        };
        let Some(command) = line.strip_prefix("@@") else {
            eprintln!("{line}");
            continue;
        };
        let mut words = command.split_whitespace();
        let (verb, arg) = (words.next().unwrap_or(""), words.next());
        let index = || -> usize {
            let i: usize = arg.and_then(|a| a.parse().ok()).expect("node index");
            assert!(i < nodes.len(), "no node {i}");
            i
        };
        match verb {
            "pass" => {
                passed = true;
                continue;
            }
            "kill" => {
                let i = index();
                tokio::task::block_in_place(|| nodes[i].kill());
            }
            "terminate" => {
                let i = index();
                let took = tokio::task::block_in_place(|| nodes[i].terminate(READY));
                eprintln!("[rust] node {i} drained and exited in {took:?}");
            }
            "restart" => {
                let i = index();
                tokio::task::block_in_place(|| nodes[i].restart());
                nodes[i].wait_ready(READY).await;
            }
            "redis-restart" => {
                tokio::task::block_in_place(|| redis.restart());
                let t = Instant::now();
                for n in &nodes {
                    n.wait_ready(READY).await;
                }
                eprintln!(
                    "[rust] nodes ready {:?} after the Redis restart",
                    t.elapsed()
                );
            }
            other => panic!("browser test: unknown request `{other}`"),
        }
        stdin.write_all(b"ok\n").await.expect("answer the script");
        stdin.flush().await.expect("answer the script");
    }
    let status = tokio::time::timeout_at(deadline, child.wait())
        .await
        .expect("the script exits")
        .expect("wait for the script");
    assert!(
        status.success() && passed,
        "browser test failed ({status}); its output is above"
    );
    eprintln!(
        "measured: browser test took {:?} (screenshots in {})",
        started.elapsed(),
        artifacts.display()
    );
}
