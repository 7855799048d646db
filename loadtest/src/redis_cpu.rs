//! Redis CPU over a run, from the Redis servers' own `INFO cpu`
//! (`used_cpu_sys + used_cpu_user`), read before and after the measured window. With
//! Redis Cluster, give every master (`--redis-info`): the report has each one's share,
//! so it shows whether the load spreads over the shards.
//!
//! The same `INFO` also gives `commandstats`: each server's calls and CPU µs per
//! command over the window (commands run inside scripts included), which shows what
//! one message costs in Redis commands, not only in seconds.
//!
//! `INFO` goes over a plain TCP connection in RESP, with short timeouts: the generator
//! has no Redis client, and one command at each end of a run needs none.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long one `INFO` may take.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The CPU seconds (system + user) a Redis server reports in its `INFO cpu` text.
pub fn parse_used_cpu(info: &str) -> Option<f64> {
    let field = |name: &str| -> Option<f64> {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(field("used_cpu_sys")? + field("used_cpu_user")?)
}

/// One command's line of `INFO commandstats`: `cmdstat_<name>:calls=N,usec=M,…`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommandStat {
    /// The command, lower case (`evalsha`, `xadd`, …).
    pub command: String,
    /// Calls (in the window, once subtracted).
    pub calls: u64,
    /// CPU µs Redis spent in it.
    pub usec: u64,
}

/// The commands of an `INFO commandstats` text.
pub fn parse_commandstats(info: &str) -> Vec<CommandStat> {
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |f: &str| -> Option<u64> {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('='))?
                    .parse()
                    .ok()
            };
            Some(CommandStat {
                command: name.to_owned(),
                calls: field("calls")?,
                usec: field("usec")?,
            })
        })
        .collect()
}

/// `after - before` per command, without commands that were not called.
pub fn command_delta(before: &[CommandStat], after: &[CommandStat]) -> Vec<CommandStat> {
    let mut out: Vec<CommandStat> = after
        .iter()
        .filter_map(|a| {
            let b = before.iter().find(|b| b.command == a.command);
            let calls = a.calls.saturating_sub(b.map_or(0, |b| b.calls));
            let usec = a.usec.saturating_sub(b.map_or(0, |b| b.usec));
            (calls > 0).then(|| CommandStat {
                command: a.command.clone(),
                calls,
                usec,
            })
        })
        .collect();
    out.sort_by(|a, b| b.calls.cmp(&a.calls).then(a.command.cmp(&b.command)));
    out
}

/// Asks the Redis at `addr` for its CPU seconds and command statistics so far.
fn reading(addr: &str) -> Option<Reading> {
    let text = info(addr)?;
    Some((parse_used_cpu(&text)?, parse_commandstats(&text)))
}

/// `INFO cpu commandstats` of the Redis at `addr`.
fn info(addr: &str) -> Option<String> {
    let sock = addr.to_socket_addrs().ok()?.next()?;
    let mut stream = TcpStream::connect_timeout(&sock, TIMEOUT).ok()?;
    stream.set_read_timeout(Some(TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(TIMEOUT)).ok()?;
    stream
        .write_all(b"*3\r\n$4\r\nINFO\r\n$3\r\ncpu\r\n$12\r\ncommandstats\r\n")
        .ok()?;
    // A bulk string: `$<len>\r\n<text>\r\n`. Read until the whole text is in.
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n")?;
        let len: usize = head.strip_prefix('$')?.parse().ok()?;
        if body.len() >= len {
            return Some(body[..len].to_owned());
        }
        if buf.len() > 256 * 1024 {
            return None;
        }
    }
}

/// One Redis server's CPU over the run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServerCpu {
    /// `host:port`.
    pub addr: String,
    /// CPU seconds it used in the window.
    pub cpu_s: f64,
    /// Calls and CPU µs per command in the window, most called first.
    #[serde(default)]
    pub commands: Vec<CommandStat>,
}

/// The reading at the start of a run.
pub struct RedisCpu {
    before: Vec<(String, Option<Reading>)>,
}

/// CPU seconds and command statistics of one server at one moment.
type Reading = (f64, Vec<CommandStat>);

impl RedisCpu {
    /// Reads every server's CPU now, off the async runtime's threads.
    pub async fn start_async(addrs: &[String]) -> RedisCpu {
        let addrs = addrs.to_vec();
        tokio::task::spawn_blocking(move || RedisCpu::start(&addrs))
            .await
            .unwrap_or(RedisCpu { before: Vec::new() })
    }

    /// [`RedisCpu::finish`], off the async runtime's threads.
    pub async fn finish_async(self) -> Option<Vec<ServerCpu>> {
        tokio::task::spawn_blocking(move || self.finish())
            .await
            .ok()
            .flatten()
    }

    /// Reads every server's CPU now (blocking, at most a couple of seconds each).
    pub fn start(addrs: &[String]) -> RedisCpu {
        RedisCpu {
            before: addrs.iter().map(|a| (a.clone(), reading(a))).collect(),
        }
    }

    /// Each server's CPU since [`RedisCpu::start`]; `None` when there is no server to
    /// read or one did not answer at either end (restarted, failed over), since a
    /// partial sum would understate the cost.
    pub fn finish(self) -> Option<Vec<ServerCpu>> {
        if self.before.is_empty() {
            return None;
        }
        self.before
            .into_iter()
            .map(|(addr, before)| {
                let (after, after_stats) = reading(&addr)?;
                let (before, before_stats) = before?;
                let cpu_s = after - before;
                let commands = command_delta(&before_stats, &after_stats);
                (cpu_s >= 0.0).then_some(ServerCpu {
                    addr,
                    cpu_s,
                    commands,
                })
            })
            .collect()
    }
}

/// Total CPU seconds and µs per message, for a report.
pub fn totals(servers: &[ServerCpu], messages: u64) -> (f64, Option<f64>) {
    let total: f64 = servers.iter().map(|s| s.cpu_s).sum();
    let per = (messages > 0).then(|| total * 1e6 / messages as f64);
    (total, per)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_info_cpu() {
        let info = "# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\n\
                    used_cpu_sys_children:0.000000\r\nused_cpu_user_children:0.000000\r\n";
        assert_eq!(parse_used_cpu(info), Some(3.75));
        assert_eq!(parse_used_cpu("# CPU\r\nused_cpu_sys:1\r\n"), None);
    }

    #[test]
    fn parses_commandstats_and_subtracts() {
        let before = parse_commandstats(
            "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=500,usec_per_call=50.00,\
             rejected_calls=0,failed_calls=0\r\ncmdstat_xadd:calls=80,usec=160,usec_per_call=2.00\r\n",
        );
        assert_eq!(before.len(), 2);
        assert_eq!((before[0].calls, before[0].usec), (10, 500));
        let after = parse_commandstats(
            "cmdstat_evalsha:calls=12,usec=600\r\ncmdstat_xadd:calls=80,usec=160\r\n\
             cmdstat_publish:calls=5,usec=20\r\n",
        );
        let d = command_delta(&before, &after);
        assert_eq!(
            d,
            vec![
                CommandStat {
                    command: "publish".into(),
                    calls: 5,
                    usec: 20
                },
                CommandStat {
                    command: "evalsha".into(),
                    calls: 2,
                    usec: 100
                },
            ]
        );
    }

    #[test]
    fn totals_per_message() {
        let s = vec![
            ServerCpu {
                addr: "a".into(),
                cpu_s: 0.5,
                commands: Vec::new(),
            },
            ServerCpu {
                addr: "b".into(),
                cpu_s: 0.5,
                commands: Vec::new(),
            },
        ];
        assert_eq!(totals(&s, 100_000), (1.0, Some(10.0)));
        assert_eq!(totals(&s, 0).1, None);
    }

    #[test]
    fn a_server_that_does_not_answer_gives_no_figure() {
        // A port nothing listens on: the reading is missing at both ends.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cpu = RedisCpu::start(&[format!("127.0.0.1:{port}")]);
        assert!(cpu.finish().is_none());
        assert!(RedisCpu::start(&[]).finish().is_none());
    }
}
