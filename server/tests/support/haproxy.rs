//! A real HAProxy in front of test nodes, running the configuration files we ship
//! (`deploy/haproxy-l4.cfg`, `deploy/haproxy-l7.cfg`) unchanged: only the environment
//! variables they expand differ (free loopback ports instead of 8080 and 8081–8083).

#![allow(dead_code)]

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The workspace root (where `deploy/` and `scripts/` live).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("server/ sits in the workspace")
        .to_path_buf()
}

/// The shipped configuration of a balancer kind: `l4` or `l7`.
pub fn config_path(kind: &str) -> PathBuf {
    workspace().join(format!("deploy/haproxy-{kind}.cfg"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// A running `haproxy -db` process, killed on drop.
pub struct Haproxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// The stats page (`/stats;csv`).
    pub stats: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl Haproxy {
    /// Starts HAProxy with `deploy/haproxy-<kind>.cfg` in front of `nodes` (the servers
    /// `node1`, `node2`, `node3`, in this order), on free loopback ports, and waits until
    /// it listens.
    pub fn start(kind: &str, nodes: [SocketAddr; 3]) -> Haproxy {
        static N: AtomicU64 = AtomicU64::new(0);
        let log = std::env::temp_dir().join(format!(
            "herald-haproxy-{}-{}.log",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut last = String::new();
        for _ in 0..5 {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let stats: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let mut cmd = Command::new("haproxy");
            cmd.arg("-f")
                .arg(config_path(kind))
                .arg("-db")
                .env("HERALD_LB_BIND", addr.to_string())
                .env("HERALD_LB_STATS_BIND", stats.to_string())
                .env_remove("HERALD_LB_RESOLVER")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log).expect("create the haproxy log"));
            for (i, node) in nodes.iter().enumerate() {
                cmd.env(format!("HERALD_NODE{}_ADDR", i + 1), node.to_string());
            }
            let mut child = cmd
                .spawn()
                .expect("spawn haproxy (apt-get install haproxy)");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if TcpStream::connect(addr).is_ok() && TcpStream::connect(stats).is_ok() {
                    return Haproxy {
                        addr,
                        stats,
                        child,
                        log,
                    };
                }
                if let Ok(Some(status)) = child.try_wait() {
                    // Most likely a port taken between free_port() and the bind: retry.
                    last = format!(
                        "haproxy exited ({status}): {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = "haproxy did not listen within 10 s".into();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("could not start haproxy: {last}");
    }

    /// `ws://…/ws` through the balancer.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// `http://…` of the balancer.
    pub fn http(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// HAProxy's view of a server of the `nodes` backend: `UP`, `DOWN`, `UP 1/2`, …
    pub async fn status(&self, server: &str) -> Option<String> {
        let csv = reqwest::Client::new()
            .get(format!("http://{}/stats;csv", self.stats))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        csv.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            (fields.len() > 17 && fields[0] == "nodes" && fields[1] == server)
                .then(|| fields[17].to_owned())
        })
    }

    /// Waits until HAProxy reports `server` as `want`, within `wait`.
    pub async fn wait_status(&self, server: &str, want: &str, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            let now = self.status(server).await;
            if now.as_deref() == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy: {server} is {now:?}, not {want}, after {wait:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}
