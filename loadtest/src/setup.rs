//! What every scenario needs before it starts: the cluster (given or spawned), resolved
//! targets, keys, the nodes' pids, and a run id that keeps this run's users and channels
//! apart from earlier runs (fresh channels start at offset 0).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail};
use rand::Rng;

use crate::cli::Common;
use crate::client::Target;
use crate::cluster::{Cluster, ClusterOptions};
use crate::nodes::{self, Node};

/// A ready-to-run environment.
pub struct Setup {
    /// Where clients connect.
    pub targets: Vec<Target>,
    /// Node HTTP base URLs.
    pub apis: Vec<String>,
    /// API key.
    pub api_key: String,
    /// Token secret.
    pub jwt_secret: String,
    /// The nodes (with pids when found).
    pub nodes: Vec<Node>,
    /// Redis servers whose `INFO cpu` the reports read.
    pub redis_info: Vec<String>,
    /// The cluster this process started, if any.
    pub cluster: Option<Arc<Mutex<Cluster>>>,
    /// Unique per run: prefix of user and channel names.
    pub run: String,
    /// `--sources` (0 = automatic, see `scenario::source_addresses`).
    pub sources: u32,
    /// `--source-base`.
    pub source_base: std::net::Ipv4Addr,
}

/// The shortest secret and API key a node takes outside dev mode (the spawned nodes run
/// with `HERALD_DEV=0`): `herald_server::auth::MIN_KEY_BYTES`.
const MIN_KEY_BYTES: usize = 32;

/// A random key for spawned nodes, longer than [`MIN_KEY_BYTES`].
fn random_key() -> String {
    let mut rng = rand::rng();
    (0..40)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
        .collect()
}

fn default_herald_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("herald")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("herald"))
}

/// The HTTP base URL of a WebSocket URL (`ws://h:p/ws` → `http://h:p`).
pub fn api_of(url: &str) -> String {
    let rest = url.strip_prefix("ws://").unwrap_or(url);
    format!("http://{}", rest.split('/').next().unwrap_or(rest))
}

impl Setup {
    /// Prepares the run described by `c`.
    pub async fn new(c: &Common) -> anyhow::Result<Setup> {
        Self::with_links(c, false).await
    }

    /// [`Setup::new`]; with `fault_links`, a spawned cluster's nodes reach Redis through
    /// fault proxies (for the network actions of `chaos`).
    pub async fn with_links(c: &Common, fault_links: bool) -> anyhow::Result<Setup> {
        let mut c = c.clone();
        let mut cluster = None;
        if let Some(n) = c.spawn_cluster {
            if n == 0 {
                bail!("--spawn-cluster needs at least 1 node");
            }
            let secret = c.jwt_secret.clone().unwrap_or_else(random_key);
            let key = c.api_key.clone().unwrap_or_else(random_key);
            // Said here, not as a node that never gets ready: the nodes refuse short keys.
            for (flag, value) in [("--jwt-secret", &secret), ("--api-key", &key)] {
                if value.len() < MIN_KEY_BYTES {
                    bail!(
                        "{flag} is {} bytes; the spawned nodes need at least {MIN_KEY_BYTES} \
                         (or leave it out: a random one is made)",
                        value.len()
                    );
                }
            }
            let bin = c.herald_bin.clone().unwrap_or_else(default_herald_bin);
            let started = Cluster::start(ClusterOptions {
                nodes: n,
                herald_bin: &bin,
                redis_server: &c.redis_server,
                jwt_secret: &secret,
                api_key: &key,
                drain_ms: c.node_drain_ms,
                sentinel: c.redis == "sentinel",
                redis_cluster: c.redis == "cluster",
                fault_links,
            })
            .await?;
            if c.url.is_empty() {
                c.url = started.urls();
            }
            c.api = started.apis();
            c.node_pid = started.pids();
            if c.redis_info.is_empty() {
                c.redis_info = started.redis_addrs();
            }
            c.jwt_secret = Some(secret);
            c.api_key = Some(key);
            crate::progress::println(&format!(
                "spawned redis + {n} nodes: {}",
                started.apis().join(" ")
            ));
            cluster = Some(Arc::new(Mutex::new(started)));
        }
        if c.url.is_empty() {
            bail!("give --url (node WebSocket URLs) or --spawn-cluster N");
        }
        let apis = if c.api.is_empty() {
            c.url.iter().map(|u| api_of(u)).collect()
        } else {
            c.api.clone()
        };
        let mut targets = Vec::new();
        for url in &c.url {
            targets.push(Target::resolve(url).await?);
        }
        let jwt_secret = c
            .jwt_secret
            .clone()
            .ok_or_else(|| anyhow!("give --jwt-secret (or HERALD_JWT_SECRET)"))?;
        let api_key = c.api_key.clone().unwrap_or_default();
        let nodes = nodes::discover(&apis, &c.node_pid);
        let run = format!("lt{:x}", crate::client::now_us() % 0xff_ffff_ffff);
        Ok(Setup {
            targets,
            apis,
            api_key,
            jwt_secret,
            nodes,
            redis_info: c.redis_info.clone(),
            cluster,
            run,
            sources: c.sources,
            source_base: c.source_base,
        })
    }
}
