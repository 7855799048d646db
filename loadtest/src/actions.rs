//! Timed actions of `chaos`: `--action "at=5s kill node=2"` (kill, drain, restart a node),
//! `--action "at=5s failover-redis"` (kill the Redis primary of `--redis sentinel`),
//! `--action "at=5s partition node=2 for=6s"` (and `loss`, `latency`: network faults on
//! a node's link to Redis, with `--spawn-cluster`; see `cluster`)
//! and `--exec "at=5s cmd=…"` (any shell command, for clusters run by something else:
//! `scripts/dev-cluster`, systemd, an orchestrator).
//!
//! `kill` and `drain` work on any local node: the pid comes from `--spawn-cluster`,
//! `--node-pid` or the node's listening port. `restart` needs `--spawn-cluster`, since
//! only then does the load generator know how to start a node; otherwise use `--exec`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};

use crate::cluster::{self, Cluster};
use crate::nodes::Node;

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// SIGKILL node i (0-based).
    Kill(usize),
    /// SIGTERM node i: drain and exit.
    Drain(usize),
    /// Start node i again and wait until it is ready.
    Restart(usize),
    /// Run a shell command.
    Exec(String),
    /// SIGKILL the Redis primary of a spawned Sentinel topology; the sentinels promote
    /// the replica.
    FailoverRedis,
    /// A network fault on node i's link to Redis, healed after `lasting` (or never).
    Net {
        /// The node.
        node: usize,
        /// The fault.
        fault: NetFault,
        /// How long it lasts; `None`: to the end of the run.
        lasting: Option<Duration>,
    },
}

/// A network fault between a node and Redis.
#[derive(Debug, Clone, PartialEq)]
pub enum NetFault {
    /// Nothing passes, nothing is closed.
    Partition,
    /// This percentage of chunks arrives a retransmission time late.
    Loss(u32),
    /// Each way: a base delay and a random jitter on top.
    Latency(Duration, Duration),
}

/// A step at a time since the start of publishing.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// When.
    pub at: Duration,
    /// What.
    pub step: Step,
    /// The text it was parsed from.
    pub text: String,
}

/// What happened to one action, for the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActionLog {
    /// The action as given.
    pub action: String,
    /// Seconds since the start of publishing when it ran.
    pub at_s: f64,
    /// How long it took, ms (a restart includes waiting for `/readyz`).
    pub took_ms: f64,
    /// Whether it succeeded.
    pub ok: bool,
    /// Error or command output.
    pub detail: String,
}

/// Parses `5s`, `500ms`, `1.5` (seconds).
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    if !v.is_finite() || v < 0.0 {
        bail!("bad duration {s:?}");
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// Parses `at=5s kill|drain|restart node=2` (nodes count from 1), `at=5s
/// failover-redis`, or a network fault on a node's link to Redis: `at=5s partition
/// node=2 for=6s`, `at=5s loss node=2 percent=5 for=10s`, `at=5s latency node=2
/// ms=100 jitter=20ms for=10s` (`for` left out: to the end of the run).
pub fn parse_action(text: &str) -> anyhow::Result<Action> {
    let mut at = None;
    let mut verb = None;
    let mut node = None;
    let mut lasting = None;
    let mut percent = None;
    let mut delay = None;
    let mut jitter = Duration::ZERO;
    for word in text.split_whitespace() {
        match word.split_once('=') {
            Some(("at", v)) => at = Some(parse_duration(v)?),
            Some(("for", v)) => lasting = Some(parse_duration(v)?),
            Some(("percent", v)) => {
                let p: u32 = v.parse().with_context(|| format!("bad percent {v:?}"))?;
                if p > 100 {
                    bail!("percent={p}: at most 100");
                }
                percent = Some(p)
            }
            // `ms=100` is milliseconds; a unit may be given (`ms=0.1s`).
            Some(("ms", v)) => {
                delay = Some(match v.parse::<u64>() {
                    Ok(ms) => Duration::from_millis(ms),
                    Err(_) => parse_duration(v)?,
                })
            }
            Some(("jitter", v)) => {
                jitter = match v.parse::<u64>() {
                    Ok(ms) => Duration::from_millis(ms),
                    Err(_) => parse_duration(v)?,
                }
            }
            Some(("node", v)) => {
                let n: usize = v.parse().with_context(|| format!("bad node {v:?}"))?;
                if n == 0 {
                    bail!("nodes count from 1");
                }
                node = Some(n - 1)
            }
            Some((k, _)) => bail!("unknown key {k:?} in action {text:?}"),
            None => verb = Some(word),
        }
    }
    let at = at.ok_or_else(|| anyhow!("action {text:?} needs at=TIME"))?;
    if verb == Some("failover-redis") {
        if node.is_some() {
            bail!("action {text:?}: failover-redis takes no node=");
        }
        return Ok(Action {
            at,
            step: Step::FailoverRedis,
            text: text.to_owned(),
        });
    }
    let node = node.ok_or_else(|| anyhow!("action {text:?} needs node=N"))?;
    let net = |fault| Step::Net {
        node,
        fault,
        lasting,
    };
    let step = match verb {
        Some("kill") => Step::Kill(node),
        Some("drain") => Step::Drain(node),
        Some("restart") => Step::Restart(node),
        Some("partition") => net(NetFault::Partition),
        Some("loss") => {
            net(NetFault::Loss(percent.ok_or_else(|| {
                anyhow!("action {text:?} needs percent=P")
            })?))
        }
        Some("latency") => net(NetFault::Latency(
            delay.ok_or_else(|| anyhow!("action {text:?} needs ms=MILLISECONDS"))?,
            jitter,
        )),
        other => bail!(
            "action {text:?}: unknown verb {other:?} (kill, drain, restart, failover-redis, \
             partition, loss, latency)"
        ),
    };
    if lasting.is_some() && !matches!(step, Step::Net { .. }) {
        bail!("action {text:?}: for= is for partition, loss and latency");
    }
    Ok(Action {
        at,
        step,
        text: text.to_owned(),
    })
}

/// Parses `at=5s cmd=<shell command, the rest of the text>`.
pub fn parse_exec(text: &str) -> anyhow::Result<Action> {
    let rest = text.trim_start();
    let (at, rest) = rest
        .strip_prefix("at=")
        .and_then(|r| r.split_once(char::is_whitespace))
        .ok_or_else(|| anyhow!("exec {text:?} must start with at=TIME"))?;
    let cmd = rest
        .trim_start()
        .strip_prefix("cmd=")
        .ok_or_else(|| anyhow!("exec {text:?} needs cmd=COMMAND after at=TIME"))?;
    Ok(Action {
        at: parse_duration(at)?,
        step: Step::Exec(cmd.to_owned()),
        text: text.to_owned(),
    })
}

/// Where actions act.
pub struct Target {
    /// The cluster this process started, if any.
    pub cluster: Option<Arc<Mutex<Cluster>>>,
    /// The nodes under test (pids for external clusters).
    pub nodes: Vec<Node>,
}

impl Target {
    /// Checks that every action can run here.
    pub fn check(&self, actions: &[Action]) -> anyhow::Result<()> {
        for a in actions {
            let node = match a.step {
                Step::Kill(i) | Step::Drain(i) | Step::Restart(i) => i,
                Step::Net { node, .. } => {
                    let links = self
                        .cluster
                        .as_ref()
                        .is_some_and(|c| c.lock().is_ok_and(|c| c.has_links()));
                    if !links {
                        bail!(
                            "{:?}: network actions need --spawn-cluster (with --redis single)",
                            a.text
                        );
                    }
                    node
                }
                Step::Exec(_) => continue,
                Step::FailoverRedis => {
                    let sentinel = self
                        .cluster
                        .as_ref()
                        .is_some_and(|c| c.lock().is_ok_and(|c| c.has_sentinel()));
                    if !sentinel {
                        bail!(
                            "{:?}: failover-redis needs --spawn-cluster with --redis sentinel",
                            a.text
                        );
                    }
                    continue;
                }
            };
            if node >= self.nodes.len() {
                bail!("{:?}: there are only {} nodes", a.text, self.nodes.len());
            }
            if self.cluster.is_none() {
                if matches!(a.step, Step::Restart(_)) {
                    bail!(
                        "{:?}: restart needs --spawn-cluster (use --exec for other clusters)",
                        a.text
                    );
                }
                if self.nodes[node].pid.is_none() {
                    bail!(
                        "{:?}: no pid known for {} (give --node-pid)",
                        a.text,
                        self.nodes[node].api
                    );
                }
            }
        }
        Ok(())
    }

    async fn run(&self, step: &Step) -> anyhow::Result<String> {
        match (step, &self.cluster) {
            (
                Step::Net {
                    node,
                    fault,
                    lasting,
                },
                Some(cluster),
            ) => {
                {
                    let c = cluster.lock().expect("cluster lock");
                    match fault {
                        NetFault::Partition => c.partition(*node)?,
                        NetFault::Loss(p) => c.loss(*node, *p)?,
                        NetFault::Latency(base, jitter) => c.latency(*node, *base, *jitter)?,
                    }
                }
                let Some(lasting) = lasting else {
                    return Ok("until the end of the run".into());
                };
                tokio::time::sleep(*lasting).await;
                cluster.lock().expect("cluster lock").heal(*node)?;
                Ok(format!("healed after {} ms", lasting.as_millis()))
            }
            (Step::Exec(cmd), _) => {
                let out = tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .await?;
                let text = String::from_utf8_lossy(&out.stderr).trim().to_owned()
                    + String::from_utf8_lossy(&out.stdout).trim();
                let tail: String = text
                    .lines()
                    .last()
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect();
                if !out.status.success() {
                    bail!("{}: {tail}", out.status);
                }
                Ok(tail)
            }
            (step, Some(cluster)) => {
                let shared = Arc::clone(cluster);
                let step2 = step.clone();
                // Restart may wait for a draining process: keep it off the runtime.
                let detail = tokio::task::spawn_blocking(move || {
                    let mut c = shared.lock().expect("cluster lock");
                    match step2 {
                        Step::Kill(i) => c.kill(i).map(|()| String::new()),
                        Step::Drain(i) => c.drain(i).map(|()| String::new()),
                        Step::Restart(i) => c.restart(i).map(|()| String::new()),
                        Step::FailoverRedis => c.failover_redis(),
                        Step::Exec(_) | Step::Net { .. } => Ok(String::new()),
                    }
                })
                .await??;
                if let Step::Restart(i) = step {
                    let api = cluster.lock().expect("cluster lock").apis()[*i].clone();
                    cluster::wait_ready(&api).await?;
                }
                Ok(detail)
            }
            (Step::Kill(i), None) => self.signal(*i, "KILL"),
            (Step::Drain(i), None) => self.signal(*i, "TERM"),
            (Step::Restart(_), None) => bail!("restart needs --spawn-cluster"),
            (Step::FailoverRedis, None) => bail!("failover-redis needs --spawn-cluster"),
            (Step::Net { .. }, None) => bail!("network actions need --spawn-cluster"),
        }
    }

    fn signal(&self, i: usize, name: &str) -> anyhow::Result<String> {
        let pid = self.nodes[i]
            .pid
            .ok_or_else(|| anyhow!("no pid for node {}", i + 1))?;
        cluster::signal(pid, name)?;
        Ok(format!("SIG{name} sent to pid {pid}"))
    }
}

/// Runs `actions` at their times after `start`, concurrently (a restart waiting for
/// readiness does not delay a later kill), and returns what happened.
pub async fn run_all(target: Arc<Target>, actions: Vec<Action>, start: Instant) -> Vec<ActionLog> {
    let tasks: Vec<_> = actions
        .into_iter()
        .map(|a| {
            let target = Arc::clone(&target);
            tokio::spawn(async move {
                tokio::time::sleep_until((start + a.at).into()).await;
                let began = Instant::now();
                let result = target.run(&a.step).await;
                let log = ActionLog {
                    action: a.text.clone(),
                    at_s: began.duration_since(start).as_secs_f64(),
                    took_ms: began.elapsed().as_secs_f64() * 1000.0,
                    ok: result.is_ok(),
                    detail: match result {
                        Ok(d) => d,
                        Err(e) => format!("{e:#}"),
                    },
                };
                crate::progress::println(&format!(
                    "[{:6.2}s] {} → {}{}",
                    log.at_s,
                    log.action,
                    if log.ok { "ok" } else { "FAILED" },
                    if log.detail.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", log.detail)
                    }
                ));
                log
            })
        })
        .collect();
    let mut logs = Vec::new();
    for t in tasks {
        if let Ok(log) = t.await {
            logs.push(log);
        }
    }
    logs.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    logs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_actions() {
        let a = parse_action("at=5s kill node=2").unwrap();
        assert_eq!(a.at, Duration::from_secs(5));
        assert_eq!(a.step, Step::Kill(1));
        assert_eq!(
            parse_action("restart node=1 at=500ms").unwrap().step,
            Step::Restart(0)
        );
        assert!(parse_action("at=5s explode node=1").is_err());
        assert!(parse_action("at=5s kill node=0").is_err());
        assert!(parse_action("kill node=1").is_err());
        assert_eq!(
            parse_action("at=2s failover-redis").unwrap().step,
            Step::FailoverRedis
        );
        assert!(parse_action("at=2s failover-redis node=1").is_err());
        assert_eq!(
            parse_action("at=5s partition node=2 for=6s").unwrap().step,
            Step::Net {
                node: 1,
                fault: NetFault::Partition,
                lasting: Some(Duration::from_secs(6))
            }
        );
        assert_eq!(
            parse_action("at=5s loss node=1 percent=5").unwrap().step,
            Step::Net {
                node: 0,
                fault: NetFault::Loss(5),
                lasting: None
            }
        );
        assert_eq!(
            parse_action("at=1s latency node=3 ms=100 jitter=20 for=2s")
                .unwrap()
                .step,
            Step::Net {
                node: 2,
                fault: NetFault::Latency(Duration::from_millis(100), Duration::from_millis(20)),
                lasting: Some(Duration::from_secs(2))
            }
        );
        assert!(parse_action("at=5s loss node=1").is_err(), "needs percent");
        assert!(parse_action("at=5s loss node=1 percent=101").is_err());
        assert!(parse_action("at=5s latency node=1").is_err(), "needs ms");
        assert!(parse_action("at=5s kill node=1 for=2s").is_err());
        let e = parse_exec("at=1.5s cmd=kill -9 $(cat /tmp/x.pid)").unwrap();
        assert_eq!(e.at, Duration::from_millis(1500));
        assert_eq!(e.step, Step::Exec("kill -9 $(cat /tmp/x.pid)".into()));
        assert!(parse_exec("cmd=true").is_err());
    }
}
