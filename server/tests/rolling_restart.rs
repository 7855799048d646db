//! The dev cluster under load, restarted node by node by the real scripts: a few
//! thousand clients connected through HAProxy receive pushes (personal and rooms) while
//! `scripts/rolling-restart` drains and restarts every node. Every client reconnects and
//! resumes; nothing is lost or delivered twice; the reconnect rate is reported.
//!
//! The cluster is the one `scripts/dev-cluster up` starts (on free ports, in a temporary
//! state folder, with this workspace's herald binary), so this also tests that script.

#[path = "support/follower.rs"]
mod follower;
#[path = "support/haproxy.rs"]
mod haproxy;
#[path = "support/ledger.rs"]
mod ledger;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use follower::{Follower, Options};
use herald_testkit::process::{free_port, herald_bin};
use herald_testkit::{token, API_KEY, SECRET};
use ledger::Ledger;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Clients connected through the balancer during the restart.
const CLIENTS: usize = 3000;
/// Rooms; client i is in room i % ROOMS.
const ROOMS: usize = 3;
/// The nodes' drain window: short, to keep the test short, but long enough for the
/// node to spread its `reconnect` frames.
const DRAIN_MS: &str = "4000";

/// How to run the dev-cluster scripts against one state folder, with one environment.
#[derive(Clone)]
struct Scripts {
    env: Vec<(String, String)>,
    dir: PathBuf,
}

impl Scripts {
    /// Runs `scripts/<name> args…` with this environment (and no other HERALD_ variable
    /// of the test's own environment).
    fn run(&self, name: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(haproxy::workspace().join("scripts").join(name));
        cmd.args(args);
        for (key, _) in std::env::vars() {
            if key.starts_with("HERALD_") || key == "RUST_LOG" {
                cmd.env_remove(key);
            }
        }
        cmd.envs(self.env.iter().cloned())
            .output()
            .unwrap_or_else(|e| panic!("run scripts/{name}: {e}"))
    }

    /// The nodes' "drain window over; closing the rest" lines: sessions a node had to
    /// close without their spread `reconnect`, because the machine was too slow.
    fn drain_overruns(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for name in ["node1", "node2", "node3"] {
            let text =
                std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
            lines.extend(
                text.lines()
                    .filter(|l| l.contains("drain window over"))
                    .map(|l| format!("{name}: {}", l.rsplit("  ").next().unwrap_or(l))),
            );
        }
        lines
    }

    /// The tail of every log of the cluster, for failure messages.
    fn logs(&self) -> String {
        let mut all = String::new();
        for name in ["redis", "node1", "node2", "node3", "haproxy"] {
            let text =
                std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            all.push_str(&format!("--- {name}.log\n"));
            for line in tail.into_iter().rev() {
                all.push_str(line);
                all.push('\n');
            }
        }
        all
    }
}

/// A dev cluster started by `scripts/dev-cluster up`, stopped by `down` on drop.
struct DevCluster {
    scripts: Scripts,
    lb: SocketAddr,
    up_output: String,
}

impl DevCluster {
    /// Free ports, a temporary state folder, this workspace's herald binary, the test
    /// keys (the environment wins over deploy/cluster.env) and a short drain window.
    /// A port taken between `free_port()` and its bind fails `up`: then the cluster is
    /// taken down and started again on other ports (3 times at most).
    fn up(lb_kind: &str) -> DevCluster {
        let mut failures = Vec::new();
        loop {
            match Self::try_up(lb_kind) {
                Ok(cluster) => return cluster,
                Err(e) if failures.len() < 2 => failures.push(e),
                Err(e) => panic!("{}\n{e}", failures.join("\n")),
            }
        }
    }

    fn try_up(lb_kind: &str) -> Result<DevCluster, String> {
        let dir = std::env::temp_dir().join(format!("herald-dev-cluster-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let lb_port = free_port();
        let mut env: Vec<(String, String)> = vec![
            ("HERALD_CLUSTER_DIR".into(), dir.display().to_string()),
            ("HERALD_BIN".into(), herald_bin().display().to_string()),
            ("HERALD_LB".into(), lb_kind.into()),
            ("HERALD_LB_PORT".into(), lb_port.to_string()),
            ("HERALD_LB_STATS_PORT".into(), free_port().to_string()),
            ("HERALD_REDIS_PORT".into(), free_port().to_string()),
            ("HERALD_JWT_SECRET".into(), SECRET.into()),
            ("HERALD_API_KEY".into(), API_KEY.into()),
            ("HERALD_DRAIN_MS".into(), DRAIN_MS.into()),
            ("RUST_LOG".into(), "warn".into()),
        ];
        for i in 1..=3 {
            env.push((format!("HERALD_NODE{i}_PORT"), free_port().to_string()));
        }
        let scripts = Scripts { env, dir };
        let out = scripts.run("dev-cluster", &["up"]);
        let cluster = DevCluster {
            up_output: String::from_utf8_lossy(&out.stdout).into_owned(),
            scripts,
            lb: format!("127.0.0.1:{lb_port}").parse().unwrap(),
        };
        if !out.status.success() {
            return Err(format!(
                "scripts/dev-cluster up failed:\n{}\n{}\n{}",
                cluster.up_output,
                String::from_utf8_lossy(&out.stderr),
                cluster.scripts.logs()
            ));
        }
        Ok(cluster)
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        let _ = self.scripts.run("dev-cluster", &["down"]);
        let _ = std::fs::remove_dir_all(&self.scripts.dir);
    }
}

fn user(i: usize) -> String {
    format!("u{i}")
}

fn room(i: usize) -> String {
    format!("room:r{}", i % ROOMS)
}

fn channels(i: usize) -> Vec<String> {
    vec![format!("user:{}", user(i)), room(i)]
}

/// Pushes until `stop`: personal pushes round-robin over the users from `workers`
/// tasks, and one push to each room every 500 ms, all through the balancer.
fn start_pushing(
    ledger: &Arc<Ledger>,
    http: String,
    workers: usize,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (ledger, http, stop) = (Arc::clone(ledger), http.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut i = w;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !stop.is_cancelled() {
                tick.tick().await;
                let body = json!({"user": user(i % CLIENTS), "data": {"n": i}});
                ledger.publish(&client, &http, API_KEY, &body).await;
                i += workers;
            }
        }));
    }
    let (ledger, stop) = (Arc::clone(ledger), stop.clone());
    tasks.push(tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        while !stop.is_cancelled() {
            tick.tick().await;
            for r in 0..ROOMS {
                let body = json!({"channel": format!("room:r{r}"), "data": {}});
                ledger.publish(&client, &http, API_KEY, &body).await;
            }
        }
    }));
    tasks
}

fn raise_fd_limit() {
    let (soft, hard) = rlimit::Resource::NOFILE.get().expect("read RLIMIT_NOFILE");
    if soft < hard {
        rlimit::Resource::NOFILE
            .set(hard, hard)
            .expect("raise RLIMIT_NOFILE");
    }
    let need = CLIENTS as u64 + 500;
    assert!(
        hard >= need,
        "this test needs {need} file descriptors; the hard limit is {hard}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_through_haproxy_loses_nothing() {
    raise_fd_limit();
    let cluster = tokio::task::spawn_blocking(|| DevCluster::up("l7"))
        .await
        .unwrap();
    for wanted in ["API key:", "/dev/token?user=", "demo page:"] {
        assert!(
            cluster.up_output.contains(wanted),
            "dev-cluster up does not print {wanted:?}:\n{}",
            cluster.up_output
        );
    }

    // Connect in waves, as users arrive, not all in one millisecond.
    let started = Instant::now();
    let mut followers: Vec<Follower> = Vec::with_capacity(CLIENTS);
    for wave in (0..CLIENTS).collect::<Vec<_>>().chunks(250) {
        for &i in wave {
            followers.push(Follower::start(Options {
                targets: vec![cluster.lb],
                token: token(&user(i), &["room:*"], &[]),
                extra: vec![room(i)],
                jitter: true,
                ..Options::default()
            }));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for &i in wave {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                followers[i].wait_for(&room(i), 0, left).await,
                "client {i} did not connect through the balancer\n{}",
                cluster.scripts.logs()
            );
        }
    }
    let connect_time = started.elapsed();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for f in &followers {
        *per_node
            .entry(f.snapshot().node().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        per_node.len(),
        3,
        "leastconn did not use every node: {per_node:?}"
    );

    let ledger = Arc::new(Ledger::default());
    let stop = CancellationToken::new();
    let pushers = start_pushing(&ledger, format!("http://{}", cluster.lb), 4, &stop);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let restart_started = Instant::now();
    let pushed_before = ledger.total();
    let restart = {
        let scripts = cluster.scripts.clone();
        tokio::task::spawn_blocking(move || scripts.run("rolling-restart", &[]))
            .await
            .unwrap()
    };
    let restart_time = restart_started.elapsed();
    let pushed_during = ledger.total() - pushed_before;
    let late = cluster.scripts.drain_overruns();
    assert!(
        restart.status.success(),
        "scripts/rolling-restart failed:\n{}\n{}\n{}",
        String::from_utf8_lossy(&restart.stdout),
        String::from_utf8_lossy(&restart.stderr),
        cluster.scripts.logs()
    );

    // Pushes go on a moment after the last node is back, then stop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    for p in pushers {
        p.await.unwrap();
    }
    ledger
        .wait_caught_up(&followers, channels, Duration::from_secs(60))
        .await;

    let records = follower::stop_all(followers).await;
    let tally = ledger.tally(&records, channels);
    let errors: Vec<&String> = records.iter().flat_map(|r| r.errors.iter()).collect();

    // Reconnects, per second since the restart began: the attempts after a client's
    // first (what the balancer sees: the storm, if any), and the welcomes after its
    // first (resumed sessions).
    let mut attempts_per_second: BTreeMap<u64, u64> = BTreeMap::new();
    let mut welcomes_per_second: BTreeMap<u64, u64> = BTreeMap::new();
    for r in &records {
        for at in r.attempts.iter().skip(1) {
            let second = at.saturating_duration_since(restart_started).as_secs();
            *attempts_per_second.entry(second).or_default() += 1;
        }
        for (at, _) in r.welcomes.iter().skip(1) {
            let second = at.saturating_duration_since(restart_started).as_secs();
            *welcomes_per_second.entry(second).or_default() += 1;
        }
    }
    let reconnects: u64 = welcomes_per_second.values().sum();
    let attempts: u64 = attempts_per_second.values().sum();
    let peak = |m: &BTreeMap<u64, u64>| m.values().copied().max().unwrap_or(0);
    let timeline = |m: &BTreeMap<u64, u64>| {
        m.iter()
            .map(|(s, n)| format!("{s}s:{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "measured: rolling restart of 3 nodes (drain {DRAIN_MS} ms) under {CLIENTS} clients \
         through haproxy l7: connect {:.1} s, restart {:.1} s, {} pushes accepted \
         ({pushed_during} during the restart, {} unconfirmed), {} deliveries, lost {}, \
         duplicates {}; {reconnects} resumed sessions from {attempts} reconnect attempts; \
         peak {} reconnect attempts/s, {} resumes/s; attempts per second since the restart \
         began [{}], resumes [{}]; drain overruns {late:?}; {} errors answered {:?}",
        connect_time.as_secs_f64(),
        restart_time.as_secs_f64(),
        ledger.total(),
        ledger.unconfirmed(),
        tally.delivered,
        tally.lost,
        tally.duplicates,
        peak(&attempts_per_second),
        peak(&welcomes_per_second),
        timeline(&attempts_per_second),
        timeline(&welcomes_per_second),
        errors.len(),
        errors.iter().take(5).collect::<Vec<_>>(),
    );
    tally.assert_exact();
    for (i, r) in records.iter().enumerate() {
        assert!(
            r.connects() >= 2,
            "client {i} was never moved, yet every node restarted"
        );
    }
}
