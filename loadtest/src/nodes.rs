//! Watching the nodes under test from outside: their process ids (given, or found by
//! listening port in `/proc`), resident memory (`VmRSS`) and connection gauge
//! (`herald_connections` from `/metrics`). Memory comes from `/proc` for a node on this
//! machine, and otherwise from the node's `process_resident_memory_bytes` gauge, so
//! memory per connection is measurable for remote nodes too.

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One node as the load generator sees it.
#[derive(Debug, Clone)]
pub struct Node {
    /// HTTP base URL.
    pub api: String,
    /// Its process id, when known.
    pub pid: Option<u32>,
}

/// Memory of one node before and after the connections were opened.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeMemory {
    /// HTTP base URL of the node.
    pub node: String,
    /// Process id (0 when unknown).
    pub pid: u32,
    /// Resident memory before, KiB.
    pub rss_before_kib: u64,
    /// Resident memory after, KiB.
    pub rss_after_kib: u64,
    /// `herald_connections` before.
    pub connections_before: u64,
    /// `herald_connections` after.
    pub connections_after: u64,
    /// (rss after − before) / (connections after − before), bytes.
    pub bytes_per_connection: f64,
}

impl NodeMemory {
    /// Fills in [`Self::bytes_per_connection`].
    pub fn finish(mut self) -> Self {
        let conns = self
            .connections_after
            .saturating_sub(self.connections_before);
        let bytes = self.rss_after_kib.saturating_sub(self.rss_before_kib) * 1024;
        self.bytes_per_connection = if conns > 0 {
            (bytes as f64 / conns as f64).round()
        } else {
            0.0
        };
        self
    }
}

/// The nodes behind `apis`: pids from `given` (same order) or found by port.
pub fn discover(apis: &[String], given: &[u32]) -> Vec<Node> {
    apis.iter()
        .enumerate()
        .map(|(i, api)| Node {
            api: api.clone(),
            pid: given
                .get(i)
                .copied()
                .or_else(|| port_of(api).and_then(pid_listening_on)),
        })
        .collect()
}

/// The port of `http://host:port`.
pub fn port_of(url: &str) -> Option<u16> {
    let rest = url.split("://").nth(1)?;
    let authority = rest.split('/').next()?;
    authority.rsplit(':').next()?.parse().ok()
}

/// The process listening on TCP `port` (IPv4 or IPv6), by inode in `/proc/net/tcp*`
/// and `/proc/*/fd`.
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT, st 0A is LISTEN, inode is field 9.
            if f.len() > 9 && f[3] == "0A" {
                let local_port = f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok());
                if local_port == Some(port) {
                    inodes.insert(format!("socket:[{}]", f[9]));
                }
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for proc in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                if inodes.contains(link.to_string_lossy().as_ref()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// `VmRSS` of `pid`, KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time (user + system) of `pid` so far, seconds. `/proc/<pid>/stat` counts in
/// USER_HZ, which is 100 on Linux whatever the kernel's tick rate.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields count from after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// CPU seconds of all `pids` together; `None` when one of them is gone.
pub fn total_cpu_seconds(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

/// `herald_connections` and `process_resident_memory_bytes` (in KiB) from the node's
/// `/metrics`.
pub async fn scrape(client: &reqwest::Client, api: &str) -> (Option<u64>, Option<u64>) {
    let url = format!("{}/metrics", api.trim_end_matches('/'));
    let text = async {
        client
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .text()
            .await
    };
    let Ok(text) = text.await else {
        return (None, None);
    };
    let value = |name: &str| {
        text.lines()
            .find(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' '))
            })?
            .split_whitespace()
            .nth(1)?
            .parse::<f64>()
            .ok()
    };
    (
        value("herald_connections").map(|v| v as u64),
        value("process_resident_memory_bytes").map(|v| v as u64 / 1024),
    )
}

/// A snapshot of every node: (rss KiB, connections).
pub async fn snapshot(client: &reqwest::Client, nodes: &[Node]) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(nodes.len());
    for node in nodes {
        let (conns, scraped_rss) = scrape(client, &node.api).await;
        let rss = node.pid.and_then(rss_kib).or(scraped_rss).unwrap_or(0);
        out.push((rss, conns.unwrap_or(0)));
    }
    out
}

/// Memory rows from two snapshots.
pub fn memory(nodes: &[Node], before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<NodeMemory> {
    nodes
        .iter()
        .zip(before.iter().zip(after))
        .map(|(n, (b, a))| {
            NodeMemory {
                node: n.api.clone(),
                pid: n.pid.unwrap_or(0),
                rss_before_kib: b.0,
                rss_after_kib: a.0,
                connections_before: b.1,
                connections_after: a.1,
                bytes_per_connection: 0.0,
            }
            .finish()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_own_listener_and_memory() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(pid_listening_on(port), Some(std::process::id()));
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        assert!(cpu_seconds(std::process::id()).is_some());
        assert_eq!(port_of("http://127.0.0.1:8081"), Some(8081));
    }
}
