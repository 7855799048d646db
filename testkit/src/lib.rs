//! Real components for Herald's tests, shared by every crate of the workspace:
//!
//! - [`redis`]: `redis-server` processes and a local Redis Cluster on free ports;
//! - [`sentinel`]: a primary, a replica and three sentinels, for failover tests;
//! - [`process`]: the real `herald` binary as a child process (SIGKILL, SIGTERM, restart);
//! - [`proxy`]: a TCP fault proxy that cuts, black-holes, delays and restores connections;
//! - [`netns`]: hosts in network namespaces behind a router, with partitions and packet
//!   loss as firewall rules, for network-fault tests;
//! - [`layers`]: the import graph of a crate's modules and its cycles (see below);
//! - [`SECRET`], [`API_KEY`] and [`token`]: the keys every test node shares;
//! - [`metric`] and [`metric_value`]: one value from a node's `/metrics`.
//!
//! Nothing here is a mock: tests talk to the same programs that run in production.
//!
//! # Import cycles
//!
//! `tests/import_cycles.rs` runs [`layers`] on `server/src` and `client/src` and fails
//! on any import cycle: a set of module files that reach one another through `use`
//! declarations or paths in code (`crate::x::f()`, `super::y::Z`), so that none of them
//! can be read, tested or changed without the others. The modules must form layers:
//!
//! - a module may use its ancestors (a child that adds `impl Parent` blocks imports its
//!   parent) and anything below it, but no two modules may depend on each other, directly
//!   or through others;
//! - the crate root (`lib.rs`, `main.rs`) is the wiring on top and is not checked;
//! - `#[cfg(test)]` items (`mod tests { ... }`) are not counted: tests import freely.
//!
//! A failure lists each cycle's modules and every edge inside it with the file and line
//! of a reference that makes it (`crate::a -> crate::b (src/a.rs:12)`): removing enough
//! of those references breaks the cycle.

pub mod layers;
pub mod netns;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod sentinel;

use std::time::{SystemTime, UNIX_EPOCH};

/// The JWT secret of test nodes. At least 32 bytes: outside dev mode a node refuses a
/// shorter one (`herald_server::auth::MIN_KEY_BYTES`).
pub const SECRET: &str = "test-secret-0123456789-abcdefghijklmnop";
/// The API key of test nodes, at least 32 bytes like [`SECRET`].
pub const API_KEY: &str = "test-api-key-0123456789-abcdefghijklmnop";

// A shorter key would stop every test node at start, far from the cause.
const _: () = assert!(SECRET.len() >= 32 && API_KEY.len() >= 32);

/// A one-hour HS256 token for `user`, signed with [`SECRET`], with these subscribe and
/// publish patterns.
pub fn token(user: &str, channels: &[&str], publish: &[&str]) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        + 3600;
    let claims = serde_json::json!({
        "sub": user,
        "exp": exp,
        "channels": channels,
        "publish": publish,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign test token")
}

/// Sums the samples of metric `name` (over all its label sets) in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Reads metric `name` from the `/metrics` of the node at `http` (`http://host:port`).
pub async fn metric(http: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{http}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("read /metrics");
    metric_value(&text, name)
}
