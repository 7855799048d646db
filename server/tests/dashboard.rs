//! The cluster dashboard (`/admin`) and the API additions it reads: load figures in
//! `/v1/nodes` and per-node presence in `/v1/users/{user}/presence`.
//!
//! The browser test runs the page in headless Chromium (Debian's `chromium`, driven by
//! playwright-core from `web/tests/dashboard.mjs`) against three real nodes on a real
//! Redis, while this side holds two WebSockets of one user on two nodes and checks that
//! the page's kick closes both with 4410.

#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;
#[path = "support/panics.rs"]
mod panics;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use client::{Client, Closed};
use herald_testkit::process::NodeProcess;
use herald_testkit::redis::RedisServer;
use herald_testkit::API_KEY;
use node::TestNode;
use panics::{assert_no_server_panic, watch_panics};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::oneshot;

/// The whole browser run; it normally takes well under a minute.
const OVERALL: Duration = Duration::from_secs(120);
/// How long a node may take to become ready.
const READY: Duration = Duration::from_secs(30);
/// How long the kicked sockets may take to see their close.
const KICK: Duration = Duration::from_secs(15);

async fn get(n: &TestNode, path: &str) -> reqwest::Response {
    reqwest::get(format!("{}{path}", n.http())).await.unwrap()
}

#[tokio::test]
async fn the_admin_page_is_served_with_a_strict_policy() {
    watch_panics();
    let n = TestNode::start_default().await;
    let files = [
        (
            "/admin",
            "text/html; charset=utf-8",
            include_str!("../../web/admin.html"),
        ),
        (
            "/admin.js",
            "text/javascript; charset=utf-8",
            include_str!("../../web/admin.js"),
        ),
        (
            "/admin.css",
            "text/css; charset=utf-8",
            include_str!("../../web/admin.css"),
        ),
    ];
    for (path, content_type, body) in files {
        // No key needed: the page is inert without one.
        let r = get(&n, path).await;
        assert_eq!(r.status(), 200, "{path}");
        let headers = r.headers().clone();
        let header = |name: &str| {
            headers
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        assert_eq!(header("content-type"), content_type, "{path}");
        assert_eq!(header("cache-control"), "no-cache", "{path}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert!(header("etag").starts_with('"'), "{path}");
        assert_eq!(r.text().await.unwrap(), body, "{path}: the file from web/");
        if path != "/admin" {
            assert!(header("content-security-policy").is_empty(), "{path}");
            continue;
        }
        let csp = header("content-security-policy");
        let directives: Vec<&str> = csp.split(';').map(str::trim).collect();
        for want in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            // Only this node's API: no WebSockets, no other hosts.
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ] {
            assert!(directives.contains(&want), "{want} in {csp}");
        }
        assert!(!csp.contains("unsafe") && !csp.contains("ws:"), "{csp}");
        assert_eq!(header("x-frame-options"), "DENY");
        assert_eq!(header("referrer-policy"), "no-referrer");
        // Self-contained: no external resources, no inline script, style or handlers.
        assert!(!body.contains("http://") && !body.contains("https://"));
        assert_eq!(body.matches("<script").count(), 1);
        assert!(body.contains(r#"<script type="module" src="/admin.js"></script>"#));
        for handler in [" onclick=", " onsubmit=", " onload=", " onerror="] {
            assert!(!body.contains(handler), "no inline {handler}");
        }
        assert!(!body.contains("style="), "no inline style");
    }
    // The page's script writes API data as text, never as HTML.
    let script = include_str!("../../web/admin.js");
    assert!(!script.contains("innerHTML") && !script.contains("outerHTML"));
    assert!(
        !script.contains("localStorage"),
        "the key stays in sessionStorage"
    );
    n.shutdown().await;
    assert_no_server_panic();
}

#[tokio::test]
async fn nodes_carry_load_figures_and_user_presence_names_nodes() {
    watch_panics();
    let n = TestNode::start_default().await;
    // Ready does not wait for the first heartbeat.
    let deadline = Instant::now() + Duration::from_secs(10);
    let node_id = loop {
        let (status, body) = n.get("/v1/nodes").await;
        assert_eq!(status, 200, "{body}");
        if let Some(id) = body["nodes"][0]["id"].as_str() {
            break id.to_owned();
        }
        assert!(Instant::now() < deadline, "this node never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let token = node::token("ulla", &["room:*"], &["room:*"]);
    let (mut a, _) = Client::hello(&n.ws_url(), &token, json!({})).await;
    let (_b, _) = Client::hello(&n.ws_url(), &token, json!({})).await;
    let reply = a
        .request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;
    assert!(reply.get("result").is_some(), "{reply}");
    for i in 0..3 {
        let (status, _) = n.publish(json!({"user": "ulla", "data": {"i": i}})).await;
        assert_eq!(status, 200);
    }

    // The heartbeat carries the figures within a second or so.
    let deadline = Instant::now() + Duration::from_secs(10);
    let me = loop {
        let (_, body) = n.get("/v1/nodes").await;
        let me = body["nodes"][0].clone();
        if me["connections"] == 2
            && me["messages_delivered_total"].as_u64() >= Some(6)
            && me["subscriptions"] == 3
        {
            break me;
        }
        assert!(Instant::now() < deadline, "figures never arrived: {me}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The v1 fields stay; the additions are all there, with sensible values.
    for field in ["id", "url", "connections", "draining"] {
        assert!(me.get(field).is_some(), "{field} in {me}");
    }
    assert_eq!(me["messages_published_total"], 3, "{me}");
    assert_eq!(me["messages_delivered_total"], 6, "{me}");
    // ulla:2 personal channels + room:1 → two broker channels.
    assert_eq!(me["channels"], 2, "{me}");
    assert!(me["rss_bytes"].as_u64().unwrap() > 1 << 20, "{me}");
    assert!(me["open_fds"].as_u64().unwrap() >= 3, "{me}");
    assert!(me["cpu_seconds"].as_f64().unwrap() >= 0.0, "{me}");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let at = me["sampled_at_ms"].as_u64().unwrap();
    assert!(at <= now_ms && now_ms - at < 10_000, "{me}");

    // Presence of a user names the nodes (one node here) with their sessions.
    let (status, p) = n.get("/v1/users/ulla/presence").await;
    assert_eq!(status, 200);
    assert_eq!(
        p,
        json!({"user": "ulla", "online": true, "connections": 2, "nodes": {node_id: 2}})
    );
    let (_, p) = n.get("/v1/users/nobody/presence").await;
    assert_eq!(
        p,
        json!({"user": "nobody", "online": false, "connections": 0, "nodes": {}})
    );
    // Still behind the key.
    let r = get(&n, "/v1/nodes").await;
    assert_eq!(r.status(), 401);
    n.shutdown().await;
    assert_no_server_panic();
}

// ---- the page in Chromium ---------------------------------------------------------------

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
        "dashboard test: no Chromium at {} — run scripts/test (it installs Debian's \
         `chromium`), or `apt-get install -y chromium`, or set HERALD_CHROMIUM",
        chromium.display()
    );
    assert!(
        web_tests.join("node_modules/playwright-core").is_dir(),
        "dashboard test: {}/node_modules is missing — run scripts/test (it runs `npm ci` \
         there), or `npm ci` in web/tests",
        web_tests.display()
    );
    chromium
}

/// A socket of the user the page kicks, read until the server closes it; the close is
/// reported on the returned channel.
async fn held_socket(url: String, token: String) -> oneshot::Receiver<Closed> {
    let (mut c, welcome) = Client::hello(&url, &token, json!({})).await;
    assert_eq!(welcome["user"], "kim");
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let _ = tx.send(c.expect_close(OVERALL).await);
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_chromium() {
    let web_tests = workspace().join("web/tests");
    let chromium = prerequisites(&web_tests);

    let redis = RedisServer::start();
    let redis_url = redis.url();
    let env = [
        ("HERALD_REDIS_URL", redis_url.as_str()),
        ("RUST_LOG", "error"),
    ];
    let mut nodes: Vec<NodeProcess> = ["dash-0", "dash-1", "dash-2"]
        .iter()
        .map(|id| NodeProcess::start(id, &env))
        .collect();
    for n in &nodes {
        n.wait_ready(READY).await;
    }
    // kim is online on two nodes.
    let token = herald_testkit::token("kim", &[], &[]);
    let mut kicked = vec![
        held_socket(nodes[0].ws_url(), token.clone()).await,
        held_socket(nodes[1].ws_url(), token).await,
    ];

    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let config = json!({
        "apiKey": API_KEY,
        "nodes": nodes.iter().map(|n| json!({"id": n.id, "http": n.http()})).collect::<Vec<_>>(),
        "user": "kim",
        "userNodes": [nodes[0].id, nodes[1].id],
        "artifacts": artifacts,
    });
    let mut child = Command::new("node")
        .arg(web_tests.join("dashboard.mjs"))
        .arg(config.to_string())
        .current_dir(&web_tests)
        .env("HERALD_CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start node web/tests/dashboard.mjs");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();

    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + OVERALL;
    let mut passed = false;
    let mut checked_kick = false;
    loop {
        let line = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Err(_) => panic!("dashboard test: no result within {OVERALL:?}"),
            Ok(Err(e)) => panic!("dashboard test: reading the script's output: {e}"),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(line))) => line,
        };
        let Some(command) = line.strip_prefix("@@") else {
            eprintln!("{line}");
            continue;
        };
        let mut words = command.split_whitespace();
        let (verb, arg) = (words.next().unwrap_or(""), words.next());
        match verb {
            "pass" => {
                passed = true;
                continue;
            }
            "kicked" => {
                // Both of kim's sockets, on two nodes, closed with 4410.
                for (i, rx) in kicked.drain(..).enumerate() {
                    let closed = tokio::time::timeout(KICK, rx)
                        .await
                        .unwrap_or_else(|_| panic!("kim's socket {i} not closed within {KICK:?}"))
                        .expect("the reader reports");
                    assert_eq!(closed, Closed::Code(4410), "kim's socket {i}");
                }
                eprintln!("[rust] both of kim's sockets closed with 4410");
                checked_kick = true;
            }
            "kill" => {
                let i: usize = arg.and_then(|a| a.parse().ok()).expect("node index");
                tokio::task::block_in_place(|| nodes[i].kill());
            }
            other => panic!("dashboard test: unknown request `{other}`"),
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
        "dashboard test failed ({status}); its output is above"
    );
    assert!(checked_kick, "the script never asked to check the kick");
    eprintln!(
        "measured: dashboard test took {:?} (screenshot in {})",
        started.elapsed(),
        artifacts.display()
    );
}
