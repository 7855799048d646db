//! Seconds-long smoke runs of the real `herald-loadtest` binary against real nodes and a
//! real Redis: every scenario works end to end and its JSON report says nothing was
//! lost, duplicated or reordered. Numbers (rates, latencies) are never asserted here:
//! they belong to docs/benchmarks.md, measured on a quiet machine.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use herald_testkit::process::{herald_bin, NodeProcess};
use herald_testkit::redis::RedisServer;
use herald_testkit::{API_KEY, SECRET};
use serde_json::Value;

/// Redis and three nodes on it, started by the test.
struct Cluster {
    redis: RedisServer,
    nodes: Vec<NodeProcess>,
}

impl Cluster {
    async fn start() -> Cluster {
        let redis = RedisServer::start();
        let url = redis.url();
        let nodes: Vec<NodeProcess> = (1..=3)
            .map(|i| NodeProcess::start(&format!("node{i}"), &[("HERALD_REDIS_URL", &url)]))
            .collect();
        for node in &nodes {
            node.wait_ready(Duration::from_secs(30)).await;
        }
        Cluster { redis, nodes }
    }

    /// `--url`, `--api` and the keys for these nodes.
    fn args(&self) -> Vec<String> {
        let urls: Vec<String> = self.nodes.iter().map(|n| n.ws_url()).collect();
        let apis: Vec<String> = self.nodes.iter().map(|n| n.http()).collect();
        vec![
            "--url".into(),
            urls.join(","),
            "--api".into(),
            apis.join(","),
            "--api-key".into(),
            API_KEY.into(),
            "--jwt-secret".into(),
            SECRET.into(),
            "--redis-info".into(),
            format!("127.0.0.1:{}", self.redis.port()),
        ]
    }
}

/// HAProxy in TCP mode in front of the nodes (round robin, health checks on /readyz),
/// killed on drop.
struct Balancer {
    child: std::process::Child,
    port: u16,
    _dir: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Balancer {
    /// HAProxy in front of `cluster`. A port taken between `free_port()` and HAProxy's
    /// bind makes HAProxy exit: then try again with another port (5 times at most).
    fn start(cluster: &Cluster) -> Balancer {
        for _ in 0..5 {
            if let Some(balancer) = Self::try_start(cluster) {
                return balancer;
            }
        }
        panic!("haproxy exited 5 times (ports taken?)");
    }

    fn try_start(cluster: &Cluster) -> Option<Balancer> {
        let port = herald_testkit::process::free_port();
        let dir =
            std::env::temp_dir().join(format!("herald-loadtest-lb-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = format!(
            "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend herald\n  bind 127.0.0.1:{port}\n  default_backend nodes\n\
             backend nodes\n  balance roundrobin\n  option httpchk GET /readyz\n"
        );
        for (i, node) in cluster.nodes.iter().enumerate() {
            cfg += &format!("  server node{i} {} check inter 1s\n", node.addr);
        }
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let mut child = std::process::Command::new("haproxy")
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start haproxy");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(_)) = child.try_wait() {
                let _ = std::fs::remove_dir_all(&dir);
                return None;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "haproxy did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Balancer {
            child,
            port,
            _dir: tempdir::Dir(dir),
        })
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A report file of its own for each run (tests run in parallel).
fn report_path(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "herald-loadtest-{name}-{}-{n}.json",
        std::process::id()
    ))
}

/// Runs `herald-loadtest <scenario> <args> --report FILE` (within 120 s) and returns the
/// report. The exit status must be 0.
async fn loadtest(scenario: &str, args: &[String]) -> Value {
    let report = report_path(scenario);
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald-loadtest"))
        .arg(scenario)
        .args(args)
        .arg("--report")
        .arg(&report)
        .env_remove("HERALD_JWT_SECRET")
        .env_remove("HERALD_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start herald-loadtest");
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("herald-loadtest finished within 120 s")
        .expect("wait for herald-loadtest");
    assert!(
        out.status.success(),
        "herald-loadtest {scenario} failed: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&report).expect("report written");
    let _ = std::fs::remove_file(&report);
    serde_json::from_str(&text).expect("report is JSON")
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Every report has the documented fields, and nothing went wrong in delivery.
fn assert_exact(report: &Value) {
    for field in [
        "scenario",
        "connections",
        "sent",
        "delivered",
        "lost",
        "duplicates",
        "reordered",
        "throughput_per_s",
    ] {
        assert!(
            report.get(field).is_some(),
            "report lacks {field}: {report}"
        );
    }
    for p in ["p50", "p90", "p99", "p999", "max"] {
        assert!(
            report["latency_ms"].get(p).is_some(),
            "latency_ms lacks {p}"
        );
    }
    assert_eq!(report["lost"], 0, "lost messages: {report}");
    assert_eq!(report["duplicates"], 0, "duplicates: {report}");
    assert_eq!(report["reordered"], 0, "reordered: {report}");
    assert_eq!(report["resyncs"], 0, "resyncs: {report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn push_delivers_every_accepted_message_exactly_once() {
    let cluster = Cluster::start().await;
    let mut args = cluster.args();
    args.extend(strings(&[
        "--users",
        "150",
        "--rate",
        "300",
        "--duration",
        "3",
        "--check",
    ]));
    let report = loadtest("push", &args).await;
    assert_exact(&report);
    assert_eq!(report["scenario"], "push");
    assert_eq!(report["connections"], 150);
    let sent = report["sent"].as_u64().unwrap();
    assert!(sent > 0, "nothing was sent: {report}");
    // One connection per user: every accepted message is one delivery.
    assert_eq!(report["delivered"].as_u64().unwrap(), sent);
    assert!(report["latency_ms"]["count"].as_u64().unwrap() >= sent);
    assert_redis_cpu(&report);
}

#[tokio::test(flavor = "multi_thread")]
async fn batched_push_through_the_batch_api_loses_nothing() {
    let cluster = Cluster::start().await;
    let mut args = cluster.args();
    args.extend(strings(&[
        "--users",
        "1500",
        "--rate",
        "1000",
        "--batch",
        "20",
        "--publishers",
        "4",
        "--duration",
        "3",
        "--check",
    ]));
    let report = loadtest("push", &args).await;
    assert_exact(&report);
    assert_eq!(report["settings"]["batch"], 20);
    // 1500 connections from more than one source address (one per 1,000).
    assert_eq!(report["connections"], 1500);
    let sent = report["sent"].as_u64().unwrap();
    assert!(sent >= 1000, "too little was sent: {report}");
    assert_eq!(report["delivered"].as_u64().unwrap(), sent);
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_kill_restart_and_drain_lose_nothing() {
    // The load generator starts its own Redis and nodes, so it can kill, drain and
    // restart them by index.
    let bin = herald_bin().display().to_string();
    let args = strings(&[
        "--spawn-cluster",
        "3",
        "--herald-bin",
        &bin,
        "--redis-server",
        "/usr/bin/redis-server",
        "--node-drain-ms",
        "1000",
        "--users",
        "150",
        "--rate",
        "200",
        "--duration",
        "6",
        "--action",
        "at=1s kill node=2",
        "--action",
        "at=2.5s restart node=2",
        "--action",
        "at=3.5s drain node=1",
        "--check",
    ]);
    let report = loadtest("chaos", &args).await;
    assert_exact(&report);
    assert_eq!(report["scenario"], "chaos");
    assert!(report["sent"].as_u64().unwrap() > 0);
    assert_eq!(report["delivered"], report["sent"]);
    assert!(
        report["reconnects"].as_u64().unwrap() > 0,
        "the killed node's clients reconnected: {report}"
    );
    let actions = report["actions"].as_array().expect("actions logged");
    assert_eq!(actions.len(), 3);
    assert!(
        actions.iter().all(|a| a["ok"] == true),
        "every action ran: {actions:?}"
    );
}

/// The network actions on the nodes' links to Redis: a partition long enough that the
/// cut-off node moves its clients (`reconnect` with reason `unavailable`), latency with
/// jitter and loss on the others; nothing lost, duplicated or reordered.
#[tokio::test(flavor = "multi_thread")]
async fn chaos_partition_loss_and_latency_lose_nothing() {
    let bin = herald_bin().display().to_string();
    let args = strings(&[
        "--spawn-cluster",
        "3",
        "--herald-bin",
        &bin,
        "--redis-server",
        "/usr/bin/redis-server",
        "--users",
        "150",
        "--rate",
        "200",
        "--duration",
        "13",
        "--action",
        // Long enough that a node on a loaded machine (this binary's tests run side by
        // side) sees the cut (about 3 s) and moves its clients well before the heal. The
        // slow and lossy links come after it: a peer counts as ready only after 2 s of
        // steady readiness, and a loaded machine's peers on a lossy link may flap.
        "at=1s partition node=1 for=7s",
        "--action",
        "at=8s latency node=2 ms=50 jitter=20 for=4s",
        "--action",
        "at=8s loss node=3 percent=5 for=4s",
        "--check",
    ]);
    let report = loadtest("chaos", &args).await;
    assert_exact(&report);
    assert_eq!(report["delivered"], report["sent"]);
    assert!(
        report["reconnects"].as_u64().unwrap() > 0,
        "the cut-off node's clients moved: {report}"
    );
    let actions = report["actions"].as_array().expect("actions logged");
    assert_eq!(actions.len(), 3);
    assert!(
        actions.iter().all(|a| a["ok"] == true),
        "every action ran: {actions:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_kills_an_external_node_found_by_port() {
    // Nodes the load generator did not start: it finds the pid by listening port.
    let cluster = Cluster::start().await;
    let mut args = cluster.args();
    args.extend(strings(&[
        "--users",
        "90",
        "--rate",
        "150",
        "--duration",
        "3",
        "--action",
        "at=1s kill node=3",
        "--check",
    ]));
    let report = loadtest("chaos", &args).await;
    assert_exact(&report);
    assert!(report["reconnects"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["actions"][0]["ok"], true, "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_spread_over_sources_and_workers() {
    let cluster = Cluster::start().await;
    let mut args = cluster.args();
    args.extend(strings(&[
        "--connections",
        "200",
        "--sources",
        "2",
        "--workers",
        "2",
        "--rate",
        "400",
        "--duration",
        "1",
    ]));
    let report = loadtest("connections", &args).await;
    assert_eq!(report["scenario"], "connections");
    assert_eq!(report["connections"], 200, "{report}");
    assert_eq!(report["connect_failures"], 0);
    let connect = &report["connect"];
    assert_eq!(connect["workers"], 2);
    assert_eq!(connect["sources"].as_array().unwrap().len(), 2);
    assert_eq!(connect["open_at_end"], 200);
    let memory = report["node_memory"].as_array().expect("node memory rows");
    assert_eq!(memory.len(), 3);
    for row in memory {
        assert!(row["pid"].as_u64().unwrap() > 0, "pid found by port: {row}");
        assert!(row["rss_after_kib"].as_u64().unwrap() > 0);
    }
    let total: u64 = memory
        .iter()
        .map(|r| {
            r["connections_after"].as_u64().unwrap() - r["connections_before"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(total, 200, "the nodes counted every connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn broadcast_reaches_every_subscriber_across_worker_processes() {
    let cluster = Cluster::start().await;
    let mut args = cluster.args();
    args.extend(strings(&[
        "--subscribers",
        "120",
        "--messages",
        "3",
        "--interval-ms",
        "50",
        "--workers",
        "2",
        "--check",
    ]));
    let report = loadtest("broadcast", &args).await;
    assert_exact(&report);
    assert_eq!(report["sent"], 3);
    assert_eq!(report["delivered"], 360);
    let b = &report["broadcast"];
    assert_eq!(b["subscribers"], 120);
    assert_eq!(report["settings"]["workers"], 2);
    let rounds = b["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    for r in rounds {
        assert_eq!(r["delivered"], 120);
        assert!(r["first_ms"].as_f64().unwrap() <= r["last_ms"].as_f64().unwrap());
    }
    assert_redis_cpu(&report);
}

/// The report has Redis's own CPU figure (`INFO cpu` of `--redis-info`), per message
/// and per server.
fn assert_redis_cpu(report: &Value) {
    let cpu = report["redis_cpu_s"].as_f64();
    assert!(cpu.is_some_and(|c| c > 0.0), "redis_cpu_s: {report}");
    assert!(
        report["redis_cpu_us_per_message"].as_f64().is_some(),
        "{report}"
    );
    assert_eq!(
        report["redis_cpu_per_server"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn push_and_broadcast_through_haproxy() {
    let cluster = Cluster::start().await;
    let lb = Balancer::start(&cluster);
    let base = |extra: &[&str]| {
        let mut args = strings(&[
            "--url",
            &format!("ws://127.0.0.1:{}/ws", lb.port),
            "--api",
            &format!("http://127.0.0.1:{}", lb.port),
            "--api-key",
            API_KEY,
            "--jwt-secret",
            SECRET,
            "--check",
        ]);
        args.extend(strings(extra));
        args
    };
    let report = loadtest(
        "push",
        &base(&["--users", "60", "--rate", "150", "--duration", "2"]),
    )
    .await;
    assert_exact(&report);
    assert_eq!(report["connections"], 60);
    assert_eq!(report["delivered"], report["sent"]);
    let report = loadtest(
        "broadcast",
        &base(&["--subscribers", "60", "--messages", "2"]),
    )
    .await;
    assert_exact(&report);
    assert_eq!(report["delivered"], 120);
}
