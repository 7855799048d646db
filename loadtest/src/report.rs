//! The result of a run: the JSON written by `--report FILE` and the human summary.
//! Every field is documented in docs/benchmarks.md.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::actions::ActionLog;
use crate::latency::Percentiles;
use crate::nodes::NodeMemory;

/// One run's numbers. The first block is common to every scenario.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// `connections`, `push`, `broadcast` or `chaos`.
    pub scenario: String,
    /// Connections that got a `welcome`.
    pub connections: u64,
    /// Messages the publish API accepted (answered 200 with an offset).
    pub sent: u64,
    /// Accepted messages delivered, counted once per receiving connection.
    pub delivered: u64,
    /// Accepted messages a connection that should have them never got (after the drain).
    pub lost: u64,
    /// Offsets delivered twice to one connection.
    pub duplicates: u64,
    /// Offsets delivered after a higher one on the same connection.
    pub reordered: u64,
    /// `delivered` per second over the measured window (connects per second for
    /// `connections`).
    pub throughput_per_s: f64,
    /// End-to-end latency, publish call to delivery (`connections`: the handshake).
    pub latency_ms: Percentiles,
    /// Length of the measured window, seconds.
    pub duration_s: f64,
    /// `resync` frames received: the server admitted a gap it could not repair.
    pub resyncs: u64,
    /// Resumes answered `recovered: false`.
    pub not_recovered: u64,
    /// Accepted messages a connection never got because a `resync` / `recovered:
    /// false` moved it to a new epoch (a Redis failover or data loss): announced to the
    /// client, so not counted as lost (`push`, `chaos`).
    #[serde(default)]
    pub resynced_away: u64,
    /// Deliveries of offsets whose publish call did not return an answer (not counted
    /// as sent; they are not duplicates either).
    pub unacknowledged: u64,
    /// Publish calls that failed (not 200, refused, timed out).
    pub publish_errors: u64,
    /// First connects that failed after retries.
    pub connect_failures: u64,
    /// Disconnects seen by clients.
    pub disconnects: u64,
    /// Successful reconnects.
    pub reconnects: u64,
    /// CPU seconds the nodes used while publishing and draining (`push`, `chaos`;
    /// local nodes with known pids only; a node restarted meanwhile is not counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_cpu_s: Option<f64>,
    /// `delivered` / `node_cpu_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliveries_per_node_cpu_s: Option<f64>,
    /// Redis CPU seconds in the same window, from the servers' own `INFO cpu`
    /// (`--redis-info`; every master of a Redis Cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_cpu_s: Option<f64>,
    /// `redis_cpu_s` in µs per accepted publish (`sent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_cpu_us_per_message: Option<f64>,
    /// Each Redis server's share of `redis_cpu_s`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redis_cpu_per_server: Vec<crate::redis_cpu::ServerCpu>,
    /// CPU seconds this load generator process used in the same window (`push`,
    /// `chaos`): when it nears the nodes' figure, the generator may be the bottleneck.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator_cpu_s: Option<f64>,
    /// `connections` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<ConnectStats>,
    /// Node memory before/after (`connections`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_memory: Vec<NodeMemory>,
    /// Reconnect timing (`push`, `chaos`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect: Option<ReconnectStats>,
    /// `broadcast` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broadcast: Option<BroadcastStats>,
    /// `chaos` actions and what happened.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<ActionLog>,
    /// First-connect errors by message (a sample).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, u64>,
    /// Settings of the run (users, rate, nodes …).
    #[serde(default)]
    pub settings: BTreeMap<String, serde_json::Value>,
}

/// Numbers of the `connections` scenario.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectStats {
    /// Connections asked for.
    pub requested: u64,
    /// Welcomes per second from the first connect to the last welcome.
    pub connect_rate_per_s: f64,
    /// Seconds from the first connect to the last welcome.
    pub ramp_s: f64,
    /// Connections that closed while held.
    pub dropped_while_held: u64,
    /// Connections still open at the end of the hold.
    pub open_at_end: u64,
    /// `busy` answers the clients waited out before they got in.
    #[serde(default)]
    pub busy_answers: u64,
    /// Connect attempts that failed otherwise: resets, refused or unanswered upgrades,
    /// closes before `welcome` (retried, or counted in `connect_failures`).
    #[serde(default)]
    pub connect_errors: u64,
    /// Source addresses used (empty: the kernel chose).
    pub sources: Vec<String>,
    /// Processes that held the connections.
    pub workers: usize,
}

/// Reconnect timing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReconnectStats {
    /// Time from a disconnect to the next `welcome`, ms.
    pub time_ms: Percentiles,
    /// Most reconnects within one second.
    pub peak_per_s: u64,
}

/// Numbers of the `broadcast` scenario.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BroadcastStats {
    /// Subscribers of the channel.
    pub subscribers: u64,
    /// One row per published message.
    pub rounds: Vec<Round>,
    /// Median over rounds of publish → first delivery, ms.
    pub first_ms_p50: f64,
    /// Median over rounds of publish → last delivery, ms.
    pub last_ms_p50: f64,
    /// Worst round's publish → last delivery, ms.
    pub last_ms_max: f64,
}

/// One broadcast message.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Round {
    /// Publish → first delivery, ms.
    pub first_ms: f64,
    /// Publish → last delivery, ms.
    pub last_ms: f64,
    /// Subscribers that got it.
    pub delivered: u64,
}

impl Report {
    /// Writes the report as pretty JSON.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)? + "\n")?;
        Ok(())
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let l = &self.latency_ms;
        s += &format!("== herald-loadtest {} ==\n", self.scenario);
        s += &format!(
            "connections {}   failed {}   disconnects {}   reconnects {}\n",
            self.connections, self.connect_failures, self.disconnects, self.reconnects
        );
        if self.scenario != "connections" {
            s += &format!(
                "sent {}   delivered {}   lost {}   duplicates {}   reordered {}   resyncs {}   not recovered {}\n",
                self.sent, self.delivered, self.lost, self.duplicates, self.reordered, self.resyncs, self.not_recovered
            );
            s += &format!(
                "publish errors {}   unacknowledged deliveries {}   resynced away {}\n",
                self.publish_errors, self.unacknowledged, self.resynced_away
            );
        }
        let what = if self.scenario == "connections" {
            "handshake"
        } else {
            "latency"
        };
        s += &format!(
            "{what} ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  (n={})\n",
            l.p50, l.p90, l.p99, l.p999, l.max, l.count
        );
        s += &format!(
            "throughput {:.0}/s over {:.1} s\n",
            self.throughput_per_s, self.duration_s
        );
        if let (Some(cpu), Some(per)) = (self.node_cpu_s, self.deliveries_per_node_cpu_s) {
            s += &format!("node CPU {cpu:.2} s: {per:.0} deliveries per node CPU-second\n");
        }
        if let (Some(cpu), Some(per)) = (self.redis_cpu_s, self.redis_cpu_us_per_message) {
            let servers: Vec<String> = self
                .redis_cpu_per_server
                .iter()
                .map(|s| format!("{} {:.2} s", s.addr, s.cpu_s))
                .collect();
            s += &format!(
                "redis CPU {cpu:.2} s: {per:.1} µs per message ({})\n",
                servers.join(", ")
            );
            // Calls per accepted message, by command, over every server.
            let mut by_command: std::collections::BTreeMap<&str, (u64, u64)> =
                std::collections::BTreeMap::new();
            for server in &self.redis_cpu_per_server {
                for c in &server.commands {
                    let e = by_command.entry(c.command.as_str()).or_default();
                    e.0 += c.calls;
                    e.1 += c.usec;
                }
            }
            if self.sent > 0 && !by_command.is_empty() {
                let mut rows: Vec<(&str, (u64, u64))> = by_command.into_iter().collect();
                rows.sort_by_key(|row| std::cmp::Reverse(row.1 .0));
                let per = |n: u64| n as f64 / self.sent as f64;
                let list: Vec<String> = rows
                    .iter()
                    .map(|(name, (calls, usec))| {
                        format!("{name} {:.2} ({:.1} µs)", per(*calls), per(*usec))
                    })
                    .collect();
                s += &format!("redis calls per message: {}\n", list.join(", "));
            }
        }
        if let Some(g) = self.generator_cpu_s {
            s += &format!("load generator CPU {g:.2} s\n");
        }
        if let Some(c) = &self.connect {
            s += &format!(
                "connect rate {:.0}/s (ramp {:.1} s), {} workers, sources {}, dropped while held {}, open at end {}\n",
                c.connect_rate_per_s, c.ramp_s, c.workers, source_range(&c.sources), c.dropped_while_held, c.open_at_end
            );
            s += &format!(
                "busy answers waited out {}, connect errors (resets, unanswered upgrades) {}\n",
                c.busy_answers, c.connect_errors
            );
        }
        for m in &self.node_memory {
            s += &format!(
                "node {} pid {}: rss {} → {} KiB, connections {} → {}: {:.0} bytes/connection\n",
                m.node,
                m.pid,
                m.rss_before_kib,
                m.rss_after_kib,
                m.connections_before,
                m.connections_after,
                m.bytes_per_connection
            );
        }
        if let Some(r) = &self.reconnect {
            s += &format!(
                "reconnect ms: p50 {:.1}  p99 {:.1}  max {:.1}   peak {}/s\n",
                r.time_ms.p50, r.time_ms.p99, r.time_ms.max, r.peak_per_s
            );
        }
        if let Some(b) = &self.broadcast {
            s += &format!(
                "broadcast to {}: first delivery p50 {:.1} ms, last delivery p50 {:.1} ms, worst last {:.1} ms over {} messages\n",
                b.subscribers, b.first_ms_p50, b.last_ms_p50, b.last_ms_max, b.rounds.len()
            );
        }
        for a in &self.actions {
            s += &format!(
                "action at {:.2}s {}: {} {}\n",
                a.at_s,
                a.action,
                if a.ok { "ok" } else { "FAILED" },
                a.detail
            );
        }
        for (e, n) in &self.errors {
            s += &format!("error ×{n}: {e}\n");
        }
        s
    }
}

/// The source addresses for a summary line: all of a few, or the first, the last and
/// how many (the JSON report lists them all).
fn source_range(sources: &[String]) -> String {
    match sources {
        [] => "none (the OS picks)".into(),
        [first, .., last] if sources.len() > 3 => {
            format!("{first} … {last} ({})", sources.len())
        }
        all => all.join(", "),
    }
}
