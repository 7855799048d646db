//! Real `redis-server` processes for tests: one Redis, or a local 3-master Redis
//! Cluster, on free loopback ports, each in its own temporary directory, killed on drop.
//!
//! Every wait here has a timeout and panics with a clear message when it runs out.
//! The helpers block briefly (process start, a `redis-cli` call); use a multi-thread
//! tokio runtime in tests that call them while a broker is running.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const REDIS_SERVER: &str = "/usr/bin/redis-server";
const REDIS_CLI: &str = "/usr/bin/redis-cli";
/// How long a server may take to answer PING after start.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cluster may take to reach `cluster_state:ok`.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of a [`RedisServer`].
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Append-only file on (`appendfsync always`), so that a restart after a kill keeps
    /// the data. Off by default: a restart then comes back empty.
    pub aof: bool,
    /// Run as a cluster node (`cluster-enabled yes`).
    pub cluster: bool,
    /// Listen on this port instead of a free one (no retry if it is taken).
    pub port: Option<u16>,
    /// Extra `--name value` arguments.
    pub extra: Vec<(String, String)>,
    /// Run in this network namespace (see [`crate::netns`]), listening on every
    /// address there; [`RedisServer::cli`] then runs there too.
    pub netns: Option<String>,
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "herald-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// One `redis-server` process.
pub struct RedisServer {
    port: u16,
    /// Cluster bus port (cluster nodes only).
    bus_port: u16,
    options: RedisOptions,
    dir: TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a Redis without persistence.
    pub fn start() -> Self {
        Self::start_with(RedisOptions::default())
    }

    /// Starts a Redis with `options`, on a free port (retrying if the port was taken).
    pub fn start_with(options: RedisOptions) -> Self {
        let mut server = Self {
            port: 0,
            bus_port: 0,
            options,
            dir: TempDir::new("redis"),
            child: None,
        };
        let mut last_error = String::new();
        for _ in 0..5 {
            server.port = server.options.port.unwrap_or_else(free_port);
            server.bus_port = if server.options.cluster {
                free_port()
            } else {
                0
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--port".into(),
            self.port.to_string(),
            "--bind".into(),
            if self.options.netns.is_some() {
                "0.0.0.0".into()
            } else {
                "127.0.0.1".into()
            },
            "--dir".into(),
            self.dir.0.display().to_string(),
            "--save".into(),
            "".into(),
            "--protected-mode".into(),
            "no".into(),
            "--daemonize".into(),
            "no".into(),
            "--logfile".into(),
            "redis.log".into(),
        ];
        if self.options.aof {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        } else {
            args.extend(["--appendonly", "no"].map(String::from));
        }
        if self.options.cluster {
            args.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-port",
                ]
                .map(String::from),
            );
            args.push(self.bus_port.to_string());
        }
        for (name, value) in &self.options.extra {
            args.push(format!("--{name}"));
            args.push(value.clone());
        }
        args
    }

    /// Starts the process and waits until it answers PING.
    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = match &self.options.netns {
            Some(ns) => {
                let mut c = Command::new(crate::netns::ip_bin());
                c.args(["netns", "exec", ns, REDIS_SERVER]);
                c
            }
            None => Command::new(REDIS_SERVER),
        };
        let mut child = cmd
            .args(self.args())
            .current_dir(&self.dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {REDIS_SERVER}: {e}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "redis-server on port {} exited with {status}: {}",
                    self.port,
                    self.log_tail()
                ));
            }
            // Make sure it is our process answering, not another test's server that
            // took the port first (ours then exits).
            let answers = match &self.options.netns {
                Some(_) => self.cli(&["ping"]) == "PONG",
                None => ping(self.port),
            };
            if answers
                && self
                    .cli(&["info", "server"])
                    .contains(&format!("process_id:{}", child.id()))
            {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "redis-server on port {} did not answer PING",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.0.join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// The port Redis listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Whether the process is running (it may be paused).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the process with SIGKILL and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A stopped process still dies on SIGKILL.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again on the same port and directory (same data with AOF).
    /// Kills it first if it is still running.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // The port can stay busy for a moment after the kill.
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("restart redis-server: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Freezes the process (SIGSTOP): its sockets stay open but nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Resumes a paused process (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server is not running");
        let status = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Runs `redis-cli` against this server and returns its output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        cli_in(self.options.netns.as_deref(), self.port, args)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `redis-cli -p <port> args…` with a timeout and returns stdout, trimmed.
pub fn cli(port: u16, args: &[&str]) -> String {
    cli_in(None, port, args)
}

/// [`cli`] run in network namespace `netns` (the caller's own with `None`).
pub fn cli_in(netns: Option<&str>, port: u16, args: &[&str]) -> String {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new(crate::netns::ip_bin());
            c.args(["netns", "exec", ns, REDIS_CLI]);
            c
        }
        None => Command::new(REDIS_CLI),
    };
    let mut child = cmd
        .arg("-h")
        .arg("127.0.0.1")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn redis-cli");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("redis-cli {args:?} timed out");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("redis-cli: {e}"),
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    out.trim().to_owned()
}

/// Whether a Redis answers PING on `port` within a short time (RESP over a raw socket,
/// no client process needed).
pub fn ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(n) => buf[..n].starts_with(b"+PONG"),
        Err(_) => false,
    }
}

/// A local Redis Cluster: 3 masters, no replicas.
pub struct RedisCluster {
    /// The masters.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts 3 cluster-enabled servers, creates the cluster and waits until every
    /// node reports `cluster_state:ok`.
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(RedisOptions {
                    cluster: true,
                    ..RedisOptions::default()
                })
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let mut args: Vec<&str> = vec!["--cluster", "create"];
        args.extend(addresses.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = cli(nodes[0].port(), &args);
        assert!(
            out.contains("[OK] All 16384 slots covered"),
            "redis-cli --cluster create failed:\n{out}"
        );
        let cluster = Self { nodes };
        cluster.wait_ok();
        cluster
    }

    /// Waits until every node reports `cluster_state:ok`.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let ok = self
                .nodes
                .iter()
                .all(|n| n.cli(&["cluster", "info"]).contains("cluster_state:ok"));
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster did not reach cluster_state:ok"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `redis-cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis-cluster://{}", hosts.join(","))
    }

    /// Runs `redis-cli -c` (following redirections) against the first node.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut all = vec!["-c"];
        all.extend_from_slice(args);
        cli(self.nodes[0].port(), &all)
    }

    /// Runs `args` on every master (for FLUSHALL and the like).
    pub fn cli_all(&self, args: &[&str]) -> Vec<String> {
        self.nodes.iter().map(|n| n.cli(args)).collect()
    }
}
