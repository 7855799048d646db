//! A Redis Sentinel topology for tests: one primary, one replica and three sentinels
//! on free loopback ports, with quick failover settings (a primary is down after
//! 1 s without answers, quorum 2). Everything is killed on drop.
//!
//! The servers never change their places in [`RedisSentinel::servers`]; which one is
//! the primary is asked from the sentinels.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::net::Ipv4Addr;

use crate::redis::{cli_in, free_port, ping, RedisOptions, RedisServer};

const REDIS_SENTINEL: &str = "/usr/bin/redis-sentinel";
/// The service name the sentinels monitor.
pub const SERVICE: &str = "herald";
/// How long the topology may take to form (replica in sync, sentinels know each other).
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
/// Milliseconds without answers after which a sentinel deems the primary down.
pub const DOWN_AFTER_MS: u64 = 1_000;

/// One `redis-sentinel` process.
pub struct Sentinel {
    port: u16,
    /// Where it runs: its network namespace and the address it is reached at there
    /// (see [`crate::netns`]); `None`: on loopback, here.
    place: Option<(String, Ipv4Addr)>,
    dir: PathBuf,
    child: Option<Child>,
}

impl Sentinel {
    fn start(primary: (Ipv4Addr, u16), place: Option<(String, Ipv4Addr)>) -> Self {
        let (primary_ip, primary_port) = primary;
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "herald-sentinel-{}-{port}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        std::fs::create_dir_all(&dir).expect("create sentinel dir");
        // Sentinel rewrites its config file, so it must be its own, writable file.
        let conf = format!(
            "port {port}\nbind {bind}\nprotected-mode no\ndaemonize no\n\
             dir {dir}\nlogfile sentinel.log\n\
             sentinel monitor {SERVICE} {primary_ip} {primary_port} 2\n\
             sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n\
             sentinel failover-timeout {SERVICE} 3000\n\
             sentinel parallel-syncs {SERVICE} 1\n",
            dir = dir.display(),
            bind = if place.is_some() {
                "0.0.0.0"
            } else {
                "127.0.0.1"
            },
        );
        let path = dir.join("sentinel.conf");
        std::fs::write(&path, conf).expect("write sentinel.conf");
        let mut cmd = match &place {
            Some((ns, _)) => {
                let mut c = Command::new(crate::netns::ip_bin());
                c.args(["netns", "exec", ns, REDIS_SENTINEL]);
                c
            }
            None => Command::new(REDIS_SENTINEL),
        };
        let child = cmd
            .arg(&path)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {REDIS_SENTINEL}: {e}"));
        let sentinel = Self {
            port,
            place,
            dir,
            child: Some(child),
        };
        let deadline = Instant::now() + FORM_TIMEOUT;
        while !match &sentinel.place {
            Some(_) => sentinel.cli(&["ping"]) == "PONG",
            None => ping(port),
        } {
            assert!(
                Instant::now() < deadline,
                "redis-sentinel on port {port} did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        sentinel
    }

    /// The port the sentinel listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs `redis-cli` against this sentinel.
    pub fn cli(&self, args: &[&str]) -> String {
        cli_in(
            self.place.as_ref().map(|(ns, _)| ns.as_str()),
            self.port,
            args,
        )
    }

    /// `host:port` where nodes reach it.
    pub fn addr(&self) -> String {
        match &self.place {
            Some((_, ip)) => format!("{ip}:{}", self.port),
            None => format!("127.0.0.1:{}", self.port),
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One primary, one replica, three sentinels.
pub struct RedisSentinel {
    /// The two Redis servers; `servers[0]` starts as the primary.
    pub servers: Vec<RedisServer>,
    /// The three sentinels.
    pub sentinels: Vec<Sentinel>,
}

impl RedisSentinel {
    /// Starts the servers, makes the second a replica of the first, waits until it is
    /// in sync, starts the sentinels and waits until each knows the replica and the
    /// two other sentinels.
    pub fn start() -> Self {
        Self::start_at(None)
    }

    /// [`Self::start`] in network namespaces (see [`crate::netns`]): the primary in
    /// `servers[0]` (namespace, address), the replica in `servers[1]`, the three
    /// sentinels in `sentinels`. The sentinels name the servers by those addresses, so
    /// nodes in other namespaces reach what they announce.
    pub fn start_in_netns(servers: [(String, Ipv4Addr); 2], sentinels: (String, Ipv4Addr)) -> Self {
        Self::start_at(Some((servers, sentinels)))
    }

    #[allow(clippy::type_complexity)]
    fn start_at(places: Option<([(String, Ipv4Addr); 2], (String, Ipv4Addr))>) -> Self {
        let server = |i: usize| match &places {
            Some((servers, _)) => RedisServer::start_with(RedisOptions {
                netns: Some(servers[i].0.clone()),
                ..RedisOptions::default()
            }),
            None => RedisServer::start(),
        };
        let servers = vec![server(0), server(1)];
        let primary_ip = places
            .as_ref()
            .map_or(Ipv4Addr::LOCALHOST, |(servers, _)| servers[0].1);
        let primary = servers[0].port().to_string();
        let answer = servers[1].cli(&["replicaof", &primary_ip.to_string(), &primary]);
        assert_eq!(answer, "OK", "REPLICAOF failed");
        wait_until("the replica to sync", || {
            servers[1]
                .cli(&["info", "replication"])
                .contains("master_link_status:up")
        });
        let place = places.map(|(_, sentinels)| sentinels);
        let sentinels: Vec<Sentinel> = (0..3)
            .map(|_| Sentinel::start((primary_ip, servers[0].port()), place.clone()))
            .collect();
        let topology = Self { servers, sentinels };
        topology.wait_formed();
        topology
    }

    /// Waits until every sentinel knows a replica and the two other sentinels (what a
    /// failover needs).
    pub fn wait_formed(&self) {
        wait_until("the sentinels to know each other and the replica", || {
            self.sentinels.iter().all(|s| {
                let master = s.cli(&["sentinel", "master", SERVICE]);
                field(&master, "num-other-sentinels") == Some("2")
                    && field(&master, "num-slaves").is_some_and(|n| n != "0")
            })
        });
    }

    /// `redis-sentinel://127.0.0.1:s1,127.0.0.1:s2,127.0.0.1:s3/herald`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.sentinels.iter().map(Sentinel::addr).collect();
        format!("redis-sentinel://{}/{SERVICE}", hosts.join(","))
    }

    /// The primary's port as the first sentinel that answers reports it.
    pub fn primary_port(&self) -> u16 {
        for s in &self.sentinels {
            let out = s.cli(&["sentinel", "get-master-addr-by-name", SERVICE]);
            if let Some(port) = out.lines().nth(1).and_then(|p| p.trim().parse().ok()) {
                return port;
            }
        }
        panic!("no sentinel reports the primary");
    }

    /// The index in [`Self::servers`] of the current primary.
    pub fn primary(&self) -> usize {
        let port = self.primary_port();
        self.servers
            .iter()
            .position(|s| s.port() == port)
            .expect("the primary is one of ours")
    }

    /// Kills the current primary with SIGKILL; returns its index.
    pub fn kill_primary(&mut self) -> usize {
        let i = self.primary();
        self.servers[i].kill();
        i
    }

    /// Waits until server `i` is a replica with its link to the primary up.
    pub fn wait_replica(&self, i: usize, wait: Duration) {
        let deadline = Instant::now() + wait;
        while !self.servers[i]
            .cli(&["info", "replication"])
            .contains("master_link_status:up")
        {
            assert!(
                Instant::now() < deadline,
                "server {i} did not become a replica within {wait:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asks the sentinels for a failover (`SENTINEL FAILOVER`): the primary is demoted
    /// without losing what the replica already has.
    pub fn failover(&self) {
        let out = self.sentinels[0].cli(&["sentinel", "failover", SERVICE]);
        assert_eq!(out, "OK", "SENTINEL FAILOVER failed");
    }

    /// Waits until the sentinels report a primary other than server `old` and it
    /// answers as a primary; returns its index.
    pub fn wait_promoted(&self, old: usize, wait: Duration) -> usize {
        let deadline = Instant::now() + wait;
        loop {
            let port = self.primary_port();
            if let Some(i) = self.servers.iter().position(|s| s.port() == port) {
                if i != old && self.servers[i].cli(&["role"]).starts_with("master") {
                    return i;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no replica was promoted within {wait:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The value of `name` in a `redis-cli` flat field/value answer (one item a line).
fn field<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let mut lines = answer.lines();
    while let Some(line) = lines.next() {
        if line.trim() == name {
            return lines.next().map(str::trim);
        }
    }
    None
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + FORM_TIMEOUT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
