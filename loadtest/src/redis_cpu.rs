//! Redis CPU over a run, from the Redis servers' own `INFO cpu`
//! (`used_cpu_sys + used_cpu_user`), read before and after the measured window. With
//! Redis Cluster, give every master (`--redis-info`): the report has each one's share,
//! so it shows whether the load spreads over the shards.
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

/// Asks the Redis at `addr` (`host:port`) for its CPU seconds so far.
pub fn used_cpu(addr: &str) -> Option<f64> {
    let sock = addr.to_socket_addrs().ok()?.next()?;
    let mut stream = TcpStream::connect_timeout(&sock, TIMEOUT).ok()?;
    stream.set_read_timeout(Some(TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(TIMEOUT)).ok()?;
    stream
        .write_all(b"*2\r\n$4\r\nINFO\r\n$3\r\ncpu\r\n")
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
            return parse_used_cpu(&body[..len]);
        }
        if buf.len() > 64 * 1024 {
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
}

/// The reading at the start of a run.
pub struct RedisCpu {
    before: Vec<(String, Option<f64>)>,
}

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
            before: addrs.iter().map(|a| (a.clone(), used_cpu(a))).collect(),
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
                let after = used_cpu(&addr)?;
                let cpu_s = after - before?;
                (cpu_s >= 0.0).then_some(ServerCpu { addr, cpu_s })
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
    fn totals_per_message() {
        let s = vec![
            ServerCpu {
                addr: "a".into(),
                cpu_s: 0.5,
            },
            ServerCpu {
                addr: "b".into(),
                cpu_s: 0.5,
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
