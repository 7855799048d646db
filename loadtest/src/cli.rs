//! The command line: one subcommand per scenario, sharing [`Common`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Load generator and benchmark harness for Herald.
///
/// Point it at running nodes (`--url`, `--api`, keys) or let it start its own Redis and
/// nodes (`--spawn-cluster N`). Progress bars draw on a terminal; a summary is printed at
/// the end and `--report FILE` writes it as JSON (see docs/benchmarks.md).
#[derive(Debug, Parser)]
#[command(name = "herald-loadtest", version)]
pub struct Cli {
    /// The scenario.
    #[command(subcommand)]
    pub command: Command,
}

/// The scenarios.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Open N idle authenticated connections at a set rate, hold them, and measure the
    /// connect rate and the nodes' memory per connection.
    Connections(ConnectionsArgs),
    /// U users connected across the nodes; publishers push to random users through random
    /// nodes; count deliveries, latency, loss, duplicates and reordering.
    Push(PushArgs),
    /// One channel with S subscribers over the nodes; time from publish to first and last
    /// delivery.
    Broadcast(BroadcastArgs),
    /// `push` while nodes are killed, drained and restarted; clients reconnect and resume.
    Chaos(ChaosArgs),
    /// Internal: one worker process of `connections` or `broadcast`.
    #[command(hide = true)]
    Worker(WorkerArgs),
}

/// Options shared by every scenario.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Source addresses to spread connections over (127.0.0.2, 127.0.0.3, …), bound
    /// before connecting. 0 = one per 1,000 connections (at most 250), none below
    /// that: each address has only ~28k ephemeral ports, and the kernel's search for a
    /// free one gets slower as they fill (it was 65% of the generator's CPU at 19k
    /// connections from one address).
    #[arg(long, default_value_t = 0)]
    pub sources: u32,
    /// First source address.
    #[arg(long, default_value = "127.0.0.2")]
    pub source_base: std::net::Ipv4Addr,
    /// Node (or balancer) WebSocket URLs, comma-separated; connection i uses URL i mod n.
    #[arg(long, value_delimiter = ',', env = "HERALD_LOADTEST_URL")]
    pub url: Vec<String>,
    /// Node HTTP base URLs, comma-separated (publishing, `/metrics`, finding node pids).
    /// Default: derived from `--url`.
    #[arg(long, value_delimiter = ',', env = "HERALD_LOADTEST_API")]
    pub api: Vec<String>,
    /// API key of the nodes.
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// HS256 secret of the nodes: tokens are signed locally with it.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Seconds to publish (push, chaos) or to hold the connections (connections).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Exit with status 3 when anything was lost, duplicated, reordered or resynced.
    #[arg(long)]
    pub check: bool,
    /// Process ids of the nodes, in `--api` order (default: found by listening port).
    #[arg(long, value_delimiter = ',')]
    pub node_pid: Vec<u32>,
    /// Start a redis-server and N herald nodes on free ports for this run (then
    /// `--url`, `--api` and the keys are not needed).
    #[arg(long, value_name = "N")]
    pub spawn_cluster: Option<usize>,
    /// The herald binary for `--spawn-cluster` (default: next to this binary, or PATH).
    #[arg(long, env = "HERALD_BIN")]
    pub herald_bin: Option<PathBuf>,
    /// The redis-server binary for `--spawn-cluster`.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: String,
    /// The Redis of `--spawn-cluster`: `single` (one redis-server) or `sentinel` (a
    /// primary, a replica and three sentinels; enables the `failover-redis` action) or
    /// `cluster` (a Redis Cluster of three masters; the report gives each master's CPU).
    #[arg(long, default_value = "single", value_parser = ["single", "sentinel", "cluster"])]
    pub redis: String,
    /// Redis servers (`host:port`, comma-separated) whose `INFO cpu` the `push`,
    /// `chaos` and `broadcast` reports read: every master of a Redis Cluster. Default
    /// with `--spawn-cluster`: the spawned Redis (both servers of a Sentinel topology).
    #[arg(long, value_delimiter = ',')]
    pub redis_info: Vec<String>,
    /// Drain window of spawned nodes (`HERALD_DRAIN_MS`), ms.
    #[arg(long, default_value_t = 2000)]
    pub node_drain_ms: u64,
    /// New connections per second while `push`, `chaos` and `broadcast` connect
    /// (0 = as fast as possible; `connections` uses `--rate`).
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
}

/// `connections`.
#[derive(Debug, Clone, Args)]
pub struct ConnectionsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub connections: u64,
    /// New connections per second (0 = as fast as possible).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Handshakes in flight at most (over all workers).
    #[arg(long, default_value_t = 512)]
    pub concurrency: u64,
    /// Worker processes (0 = as many as the descriptor limit needs).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
}

/// `push`.
#[derive(Debug, Clone, Args)]
pub struct PushArgs {
    #[command(flatten)]
    pub common: Common,
    /// Users, one connection each, spread over `--url`.
    #[arg(long, default_value_t = 1000)]
    pub users: u64,
    /// Publishes per second over all publishers (0 = as fast as possible).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Concurrent publishers (each keeps one request in flight).
    #[arg(long, default_value_t = 16)]
    pub publishers: usize,
    /// Messages per publish request: 1 uses `POST /v1/publish`; more use
    /// `POST /v1/publish/batch`, each message to its own random user.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Seconds to wait after publishing for the last deliveries before counting losses.
    #[arg(long, default_value_t = 15.0)]
    pub drain: f64,
    /// Clients acknowledge what they receive (`ack` of their personal channel),
    /// coalesced like the SDKs: at most one ack per connection every 100 ms, with the
    /// latest offset. Measures what delivery receipts cost (Redis CPU per message).
    #[arg(long)]
    pub ack: bool,
}

/// `chaos`.
#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    #[command(flatten)]
    pub push: PushArgs,
    /// A node action: `at=5s kill node=2`, `at=8s restart node=2`, `at=10s drain node=1`
    /// (nodes count from 1 in `--api` order; restart needs `--spawn-cluster`);
    /// `at=5s failover-redis` (`--redis sentinel`); or a network fault on a node's link
    /// to Redis (`--spawn-cluster`, `--redis single`; `for=` heals it, left out it lasts
    /// to the end): `at=5s partition node=2 for=6s` (nothing passes, nothing closes),
    /// `at=5s loss node=2 percent=5 for=10s` (that share of chunks arrives a
    /// retransmission time, 200 ms, late), `at=5s latency node=2 ms=100 jitter=20 for=10s`
    /// (each way). Repeatable.
    #[arg(long)]
    pub action: Vec<String>,
    /// A shell command at a time: `at=5s cmd=scripts/dev-cluster up`. Repeatable.
    #[arg(long)]
    pub exec: Vec<String>,
}

/// `broadcast`.
#[derive(Debug, Clone, Args)]
pub struct BroadcastArgs {
    #[command(flatten)]
    pub common: Common,
    /// Subscribers of the channel, spread over `--url`.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: u64,
    /// Messages to publish, one at a time (each is one round).
    #[arg(long, default_value_t = 10)]
    pub messages: u64,
    /// Pause between rounds, ms.
    #[arg(long, default_value_t = 200)]
    pub interval_ms: u64,
    /// Give up waiting for a round's last delivery after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    pub round_timeout: f64,
    /// Worker processes holding the subscribers (0 = as many as the descriptor limit
    /// needs; 1 = all in this process).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
}

/// The hidden worker subcommand.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// The scenario: `connections` or `broadcast`.
    #[arg(long)]
    pub kind: String,
    /// The slice of work, as JSON.
    #[arg(long)]
    pub spec: String,
}
