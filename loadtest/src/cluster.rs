//! `--spawn-cluster N`: the load generator starts its own `redis-server` and N `herald`
//! nodes on free loopback ports, so that `chaos` can kill, drain and restart nodes by
//! index. Everything it started is killed when the run ends (on drop).
//!
//! With `--redis sentinel` the Redis is a Sentinel topology instead (herald_testkit's
//! [`RedisSentinel`]: a primary, a replica, three sentinels) and the nodes use a
//! `redis-sentinel://` URL, so that `failover-redis` can kill the primary. With
//! `--redis cluster` it is a Redis Cluster of three masters (herald_testkit's
//! [`RedisCluster`]), and the report's Redis CPU is read from every master.
//!
//! When `chaos` has network actions (`partition`, `loss`, `latency`), each node reaches
//! the (single) Redis through its own `herald_testkit::proxy::FaultProxy`, where those
//! actions act: a partition black-holes the link (no FIN, no reset), latency delays it
//! with jitter, loss holds random chunks back for a retransmission time.
//!
//! Nodes inherit this process's environment, so any `HERALD_*` tuning set in the shell
//! applies to them; the listen address, Redis URL, keys and node id are set here.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use herald_testkit::proxy::FaultProxy;
use herald_testkit::redis::RedisCluster;
use herald_testkit::sentinel::RedisSentinel;

/// A node process started by the load generator.
struct SpawnedNode {
    port: u16,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

/// Redis + N herald nodes, owned by this process.
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    redis: Option<Child>,
    /// `host:port` of the Redis server(s): where the report reads `INFO cpu`.
    redis_addrs: Vec<String>,
    /// The Sentinel topology, with `--redis sentinel` (instead of `redis`).
    sentinel: Option<RedisSentinel>,
    /// The Redis Cluster, with `--redis cluster` (instead of `redis`): held so its
    /// servers live as long as the run (they are killed when it is dropped).
    _redis_cluster: Option<RedisCluster>,
    nodes: Vec<SpawnedNode>,
    /// With `fault_links`: node i reaches Redis through `links[i]`, where the network
    /// actions (`partition`, `loss`, `latency`) act.
    links: Vec<FaultProxy>,
}

/// How to start the cluster.
pub struct ClusterOptions<'a> {
    /// Number of nodes.
    pub nodes: usize,
    /// The `herald` binary.
    pub herald_bin: &'a Path,
    /// The `redis-server` binary.
    pub redis_server: &'a str,
    /// HS256 secret the nodes verify tokens with.
    pub jwt_secret: &'a str,
    /// API key of the nodes.
    pub api_key: &'a str,
    /// The nodes' drain window (`HERALD_DRAIN_MS`).
    pub drain_ms: u64,
    /// Start a Sentinel topology instead of one redis-server.
    pub sentinel: bool,
    /// Start a Redis Cluster of three masters instead of one redis-server.
    pub redis_cluster: bool,
    /// Put a fault proxy between each node and the (single) Redis, for the network
    /// actions. Off otherwise: the proxy costs a hop.
    pub fault_links: bool,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn redis_ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 16];
    s.write_all(b"PING\r\n").is_ok()
        && s.read(&mut buf)
            .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}

impl Cluster {
    /// Starts Redis and the nodes and waits until every node is ready.
    pub async fn start(o: ClusterOptions<'_>) -> anyhow::Result<Cluster> {
        let dir = std::env::temp_dir().join(format!("herald-loadtest-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut redis_cluster = None;
        let (redis, sentinel, redis_url) = if o.redis_cluster {
            let started = tokio::task::spawn_blocking(RedisCluster::start)
                .await
                .map_err(|e| anyhow!("could not start the Redis Cluster: {e}"))?;
            let url = started.url();
            redis_cluster = Some(started);
            (None, None, url)
        } else if o.sentinel {
            // The testkit helper blocks (process starts, redis-cli) and panics on
            // failure: off the runtime, with the panic turned into an error.
            let topology = tokio::task::spawn_blocking(RedisSentinel::start)
                .await
                .map_err(|e| anyhow!("could not start the Sentinel topology: {e}"))?;
            let url = topology.url();
            (None, Some(topology), url)
        } else {
            let (redis, port) = start_redis(o.redis_server, &dir).await?;
            (Some(redis), None, format!("redis://127.0.0.1:{port}"))
        };
        // Both servers of a Sentinel topology: the replica's CPU is part of the cost.
        // Every master of a Redis Cluster: the cost is their sum, and the spread shows
        // how the load is shared.
        let redis_addrs = match (&sentinel, &redis_url) {
            _ if redis_cluster.is_some() => redis_cluster
                .iter()
                .flat_map(|c| c.nodes.iter())
                .map(|s| format!("127.0.0.1:{}", s.port()))
                .collect(),
            (Some(t), _) => t
                .servers
                .iter()
                .map(|s| format!("127.0.0.1:{}", s.port()))
                .collect(),
            (None, url) => vec![url.trim_start_matches("redis://").to_owned()],
        };
        if o.fault_links && (sentinel.is_some() || redis_cluster.is_some()) {
            bail!("the network actions (partition, loss, latency) need --redis single");
        }
        let mut links = Vec::new();
        if o.fault_links {
            let upstream: SocketAddr = redis_url.trim_start_matches("redis://").parse()?;
            for _ in 0..o.nodes {
                links.push(FaultProxy::start(upstream).await);
            }
        }
        let mut cluster = Cluster {
            dir,
            bin: o.herald_bin.to_owned(),
            redis,
            redis_addrs,
            sentinel,
            _redis_cluster: redis_cluster,
            nodes: Vec::new(),
            links,
        };
        for i in 0..o.nodes {
            let port = free_port()?;
            let redis_url = match cluster.links.get(i) {
                Some(link) => format!("redis://{}", link.addr()),
                None => redis_url.clone(),
            };
            let env = vec![
                ("HERALD_LISTEN".into(), format!("127.0.0.1:{port}")),
                ("HERALD_NODE_ID".into(), format!("node{}", i + 1)),
                (
                    "HERALD_PUBLIC_URL".into(),
                    format!("ws://127.0.0.1:{port}/ws"),
                ),
                ("HERALD_REDIS_URL".into(), redis_url.clone()),
                ("HERALD_JWT_SECRET".into(), o.jwt_secret.into()),
                ("HERALD_API_KEY".into(), o.api_key.into()),
                ("HERALD_DRAIN_MS".into(), o.drain_ms.to_string()),
                ("HERALD_DEV".into(), "0".into()),
                (
                    "RUST_LOG".into(),
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                ),
            ];
            cluster.nodes.push(SpawnedNode {
                port,
                env,
                child: None,
            });
            cluster.spawn(i)?;
        }
        for i in 0..o.nodes {
            cluster.wait_ready(i).await?;
        }
        Ok(cluster)
    }

    /// Whether the Redis is a Sentinel topology (`failover-redis` works).
    pub fn has_sentinel(&self) -> bool {
        self.sentinel.is_some()
    }

    /// Kills the Redis primary (SIGKILL), waits until the sentinels promoted the
    /// replica, and starts the killed server again (empty; the sentinels make it the
    /// new replica). Returns what happened, with the time to promotion.
    pub fn failover_redis(&mut self) -> anyhow::Result<String> {
        let topology = self
            .sentinel
            .as_mut()
            .ok_or_else(|| anyhow!("failover-redis needs --redis sentinel"))?;
        let started = Instant::now();
        // The testkit helpers panic when a wait runs out: turned into an error here.
        let (old, promoted, took) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let old = topology.kill_primary();
            let promoted = topology.wait_promoted(old, Duration::from_secs(30));
            let took = started.elapsed();
            topology.servers[old].restart();
            (old, promoted, took)
        }))
        .map_err(|_| anyhow!("the Redis failover did not complete within 30 s"))?;
        let _ = old;
        Ok(format!(
            "primary killed, replica on port {} promoted after {} ms; the old primary \
             restarted as a replica",
            topology.servers[promoted].port(),
            took.as_millis()
        ))
    }

    /// The fault proxy between node `i` and Redis.
    fn link(&self, i: usize) -> anyhow::Result<&FaultProxy> {
        self.links.get(i).ok_or_else(|| {
            anyhow!(
                "network actions need --spawn-cluster with --redis single (node {})",
                i + 1
            )
        })
    }

    /// Whether the nodes reach Redis through fault proxies (network actions work).
    pub fn has_links(&self) -> bool {
        !self.links.is_empty()
    }

    /// Partitions node `i` from Redis: nothing passes either way and nothing is closed
    /// (no FIN, no reset), until [`Cluster::heal`].
    pub fn partition(&self, i: usize) -> anyhow::Result<()> {
        self.link(i)?.black_hole();
        Ok(())
    }

    /// Ends every fault on node `i`'s link to Redis: partition, loss and latency.
    pub fn heal(&self, i: usize) -> anyhow::Result<()> {
        let link = self.link(i)?;
        link.restore();
        link.set_loss(0);
        link.set_latency(Duration::ZERO, Duration::ZERO);
        Ok(())
    }

    /// Loss on node `i`'s link to Redis, as TCP lives it (`FaultProxy::set_loss`).
    pub fn loss(&self, i: usize, percent: u32) -> anyhow::Result<()> {
        self.link(i)?.set_loss(percent);
        Ok(())
    }

    /// Latency with jitter on node `i`'s link to Redis, each way.
    pub fn latency(&self, i: usize, base: Duration, jitter: Duration) -> anyhow::Result<()> {
        self.link(i)?.set_latency(base, jitter);
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node{}.log", i + 1)))?;
        let node = &mut self.nodes[i];
        let child = Command::new(&self.bin)
            .envs(node.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.bin.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// `host:port` of the Redis server(s) (both of a Sentinel topology).
    pub fn redis_addrs(&self) -> Vec<String> {
        self.redis_addrs.clone()
    }

    /// WebSocket URLs of the nodes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("ws://127.0.0.1:{}/ws", n.port))
            .collect()
    }

    /// HTTP base URLs of the nodes.
    pub fn apis(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("http://127.0.0.1:{}", n.port))
            .collect()
    }

    /// Process ids of the nodes (0 for a node that is down).
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .map(|n| n.child.as_ref().map(Child::id).unwrap_or(0))
            .collect()
    }

    /// Waits (up to 30 s) until node `i` answers `/readyz` with 200.
    pub async fn wait_ready(&self, i: usize) -> anyhow::Result<()> {
        wait_ready(&self.apis()[i]).await
    }

    /// SIGKILL node `i`: it dies without notice.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let node = self.node(i)?;
        match node.child.take() {
            Some(mut child) => {
                child.kill()?;
                child.wait()?;
                Ok(())
            }
            None => bail!("node {} is not running", i + 1),
        }
    }

    /// SIGTERM node `i`: it drains (clients get `reconnect`, then 4503) and exits.
    pub fn drain(&mut self, i: usize) -> anyhow::Result<()> {
        let node = self.node(i)?;
        match &node.child {
            Some(child) => signal(child.id(), "TERM"),
            None => bail!("node {} is not running", i + 1),
        }
    }

    /// Starts node `i` again on its port (killing it first if it still runs; a draining
    /// node gets up to 20 s to finish). Call [`Self::wait_ready`] after.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let node = self.node(i)?;
        if let Some(mut child) = node.child.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait()?.is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            child.wait()?;
        }
        self.spawn(i)
    }

    fn node(&mut self, i: usize) -> anyhow::Result<&mut SpawnedNode> {
        let n = self.nodes.len();
        self.nodes
            .get_mut(i)
            .with_context(|| format!("no node {} (the cluster has {n})", i + 1))
    }
}

/// Starts one redis-server without persistence in `dir`; returns it and its port.
async fn start_redis(bin: &str, dir: &Path) -> anyhow::Result<(Child, u16)> {
    let redis_port = free_port()?;
    let redis = Command::new(bin)
        .args([
            "--port",
            &redis_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args([
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--logfile",
            "redis.log",
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {bin}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis_ping(redis_port) {
        if Instant::now() > deadline {
            bail!("redis-server did not answer PING on port {redis_port}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((redis, redis_port))
}

/// Waits (up to 30 s) until `api` answers `/readyz` with 200.
pub async fn wait_ready(api: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let url = format!("{}/readyz", api.trim_end_matches('/'));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client
            .get(&url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
        {
            if r.status() == 200 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{url} not ready within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a signal with `kill(1)` (this crate forbids `unsafe`, so no libc call).
pub fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .context("run kill")?;
    if !status.success() {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(mut redis) = self.redis.take() {
            let _ = redis.kill();
            let _ = redis.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
