//! A Herald node as a separate process (the real `herald` binary), so tests can kill it
//! with SIGKILL or stop it with SIGTERM like an orchestrator would.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A node process.
pub struct NodeProcess {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its node id.
    pub id: String,
    child: Option<Child>,
    env: Vec<(String, String)>,
    /// The network namespace it runs in (`ip netns exec`), if not the caller's.
    netns: Option<String>,
}

/// A free loopback port (bound then released; the node binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl NodeProcess {
    /// Starts `herald` with the given extra environment on a free port and waits until
    /// it accepts connections (not `/readyz`: a node may legitimately start unready).
    /// A `HERALD_LISTEN` in `env` replaces the free port (give it a real port, not 0;
    /// `0.0.0.0` is reached on 127.0.0.1).
    pub fn start(id: &str, env: &[(&str, &str)]) -> NodeProcess {
        Self::start_with(id, true, env)
    }

    /// [`Self::start`] without the test keys: with no key in `env` the node starts in
    /// dev mode on its loopback address, as `herald` does with nothing configured.
    pub fn start_without_keys(id: &str, env: &[(&str, &str)]) -> NodeProcess {
        Self::start_with(id, false, env)
    }

    /// [`Self::start`] inside network namespace `ns` (see [`crate::netns`]),
    /// listening on `ip` and a free port: `HERALD_LISTEN` and so the node's public URL
    /// are that address, which its peers and the test reach through the lab's router.
    pub fn start_in_netns(
        ns: &str,
        ip: std::net::Ipv4Addr,
        id: &str,
        env: &[(&str, &str)],
    ) -> NodeProcess {
        let listen = format!("{ip}:{}", free_port());
        let mut all: Vec<(&str, &str)> = env.to_vec();
        all.push(("HERALD_LISTEN", &listen));
        let mut node = Self::prepare(id, true, &all);
        node.netns = Some(ns.to_owned());
        node.spawn();
        node
    }

    fn start_with(id: &str, keys: bool, env: &[(&str, &str)]) -> NodeProcess {
        let mut node = Self::prepare(id, keys, env);
        node.spawn();
        node
    }

    fn prepare(id: &str, keys: bool, env: &[(&str, &str)]) -> NodeProcess {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut all: Vec<(String, String)> = vec![
            ("HERALD_LISTEN".into(), addr.to_string()),
            ("HERALD_NODE_ID".into(), id.into()),
            ("HERALD_DRAIN_MS".into(), "1000".into()),
            ("HERALD_NODE_TTL_SECS".into(), "3".into()),
            ("RUST_LOG".into(), "warn".into()),
        ];
        if keys {
            all.push(("HERALD_JWT_SECRET".into(), crate::SECRET.into()));
            all.push(("HERALD_API_KEY".into(), crate::API_KEY.into()));
        }
        let mut addr = addr;
        for (k, v) in env {
            all.retain(|(key, _)| key != k);
            all.push((k.to_string(), v.to_string()));
            if *k == "HERALD_LISTEN" {
                // A listen address of the caller's (a fixed port): reach it on loopback
                // when it is every interface.
                let listen: SocketAddr = v.parse().expect("HERALD_LISTEN is host:port");
                addr = match listen.ip() {
                    ip if ip.is_unspecified() && ip.is_ipv4() => {
                        SocketAddr::from(([127, 0, 0, 1], listen.port()))
                    }
                    ip if ip.is_unspecified() => {
                        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, listen.port()))
                    }
                    _ => listen,
                };
            }
        }
        NodeProcess {
            addr,
            id: id.into(),
            child: None,
            env: all,
            netns: None,
        }
    }

    fn spawn(&mut self) {
        let mut cmd = match &self.netns {
            // `ip netns exec` execs the program itself: the child is the node.
            Some(ns) => {
                let mut c = Command::new(crate::netns::ip_bin());
                c.args(["netns", "exec", ns]).arg(herald_bin());
                c
            }
            None => Command::new(herald_bin()),
        };
        // HERALD_TEST_NODE_LOG=<RUST_LOG filter> shows every test node's log.
        let log = std::env::var("HERALD_TEST_NODE_LOG").ok();
        cmd.env_clear()
            .envs(self.env.iter().cloned())
            .envs(log.iter().map(|l| ("RUST_LOG", l.as_str())))
            .stdin(Stdio::null())
            .stdout(if log.is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn herald");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(self.addr).is_err() {
            // A node that refused to start (its error is on stderr above) fails at once,
            // not after the deadline.
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "herald {} exited at start ({status}); see its stderr",
                    self.id
                );
            }
            assert!(Instant::now() < deadline, "herald did not listen in time");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// The process id while the node runs (to read `/proc/<pid>/status` and the like).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Resident memory of the node (`VmRSS` of `/proc/<pid>/status`), in KiB; `None`
    /// when the node is not running or the platform has no `/proc`.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Open file descriptors of the node (entries of `/proc/<pid>/fd`): sockets
    /// included, so a leak of connections shows here.
    pub fn open_fds(&self) -> Option<usize> {
        let dir = std::fs::read_dir(format!("/proc/{}/fd", self.pid()?)).ok()?;
        Some(dir.count())
    }

    /// `ws://…/ws`
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// `http://…`
    pub fn http(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until `/readyz` answers 200, within `wait`.
    pub async fn wait_ready(&self, wait: Duration) {
        let url = format!("{}/readyz", self.http());
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(r) = reqwest::get(&url).await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {} not ready in time",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: the node dies without notice.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit (within `wait`); returns how long it took.
    pub fn terminate(&mut self, wait: Duration) -> Duration {
        let started = Instant::now();
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if started.elapsed() > wait {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("node {} did not exit within {wait:?} of SIGTERM", self.id);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        started.elapsed()
    }

    /// Freezes the node (SIGSTOP): its sockets stay open, but it answers nothing, sends
    /// no heartbeat and stops refreshing its registry entry, like a hung machine. Dropping
    /// or killing a paused node still works (SIGKILL ends a stopped process).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused node run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("node is not running");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Starts the node again on the same address with the same environment.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a `herald` process that was expected to refuse to start ended.
#[derive(Debug)]
pub struct Refusal {
    /// Its exit status.
    pub status: std::process::ExitStatus,
    /// What it printed on stderr.
    pub stderr: String,
}

/// Runs `herald` with exactly `env` (nothing of the test's environment) and expects it to
/// refuse to start: it must exit within 10 s. A node that is still running then is killed
/// and the test fails. Give it an address that can't collide (port 0) in `env`.
pub fn start_refused(env: &[(&str, &str)]) -> Refusal {
    let mut child = Command::new(herald_bin())
        .env_clear()
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herald");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if child.try_wait().expect("wait for herald").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("herald started with {env:?}; it should have refused");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("herald's output");
    Refusal {
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The `herald` binary of this workspace, built once per test process.
///
/// `HERALD_BIN` overrides it. Otherwise it is `target/<profile>/herald`, next to the test
/// binary's `deps/` folder, and `cargo build -p herald-server --bin herald` runs once first
/// so that `cargo test -p <another crate>` never runs a stale node. Cargo holds no lock
/// while tests run, so the nested build does not wait on the outer `cargo test`.
pub fn herald_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("HERALD_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("current test executable");
        let mut dir = exe
            .parent()
            .expect("test binary has a folder")
            .to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let release = dir.ends_with("release");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("testkit sits in the workspace");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.current_dir(workspace).args([
            "build",
            "--quiet",
            "-p",
            "herald-server",
            "--bin",
            "herald",
        ]);
        if release {
            build.arg("--release");
        }
        let status = build
            .status()
            .expect("run cargo build for the herald binary");
        assert!(status.success(), "cargo build of the herald binary failed");
        let bin = dir.join("herald");
        assert!(bin.exists(), "no herald binary at {}", bin.display());
        bin
    })
}
