//! The backend's tunables, derived from the node's configuration.

use std::time::Duration;

use crate::config::Config;

/// Tunables every broker needs; they come from the node's configuration.
#[derive(Debug, Clone)]
pub struct BackendSettings {
    /// Messages kept per channel.
    pub history_size: usize,
    /// How long a message stays in history.
    pub history_ttl: Duration,
    /// How long a channel's offset and epoch outlive its last publish. Longer than the
    /// history, so that an idle channel keeps its epoch and idle subscribers need no resync.
    pub meta_ttl: Duration,
    /// A node that has not refreshed its registry entry for this long is dead.
    pub node_ttl: Duration,
    /// Presence entries not refreshed for this long expire.
    pub presence_ttl: Duration,
    /// Publications the Redis subscriber connection may hold for the reader before it
    /// drops the oldest (a lag, repaired from history). Unused by the memory broker.
    pub subscriber_buffer: usize,
    /// Replicas that must acknowledge a publish (Redis `WAIT`) before it counts as done;
    /// 0: none. Unused by the memory broker.
    pub wait_replicas: u32,
    /// How long a publish waits for `wait_replicas`.
    pub wait_timeout: Duration,
    /// Longest pause between two reconnect attempts. Unused by the memory broker.
    pub reconnect_max: Duration,
    /// How long one connect attempt may take. Unused by the memory broker.
    pub connect_timeout: Duration,
}

impl BackendSettings {
    /// The backend tunables derived from `config`.
    pub fn from_config(config: &Config) -> Self {
        let node_ttl = Duration::from_secs(config.node_ttl_secs.max(1));
        Self {
            history_size: config.history_size.max(1),
            history_ttl: Duration::from_secs(config.history_ttl_secs.max(1)),
            meta_ttl: Duration::from_secs(
                config.history_meta_ttl_secs.max(config.history_ttl_secs),
            ),
            node_ttl,
            // Presence entries are filtered by the registry on every read, so a dead
            // node drops out within the node TTL whatever this is. The TTL only
            // collects the hashes of channels whose nodes all died; a long one keeps
            // refreshing cheap (one PEXPIRE per channel every TTL/3).
            presence_ttl: node_ttl.saturating_mul(crate::config::PRESENCE_TTL_FACTOR),
            subscriber_buffer: config.redis_subscriber_buffer.max(1),
            wait_replicas: config.redis_wait_replicas,
            wait_timeout: Duration::from_millis(
                config
                    .redis_wait_timeout_ms
                    .clamp(1, crate::config::MAX_WAIT_TIMEOUT_MS),
            ),
            reconnect_max: Duration::from_millis(config.redis_reconnect_max_ms.clamp(50, 60_000)),
            connect_timeout: Duration::from_millis(config.redis_connect_timeout_ms.max(50)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_wait_timeout_is_bounded_by_the_command_timeout() {
        let mut c = Config::default();
        assert_eq!(BackendSettings::from_config(&c).wait_replicas, 0);
        c.redis_wait_timeout_ms = 60_000;
        assert_eq!(
            BackendSettings::from_config(&c).wait_timeout,
            Duration::from_millis(crate::config::MAX_WAIT_TIMEOUT_MS)
        );
        c.redis_wait_timeout_ms = 0;
        assert_eq!(
            BackendSettings::from_config(&c).wait_timeout,
            Duration::from_millis(1)
        );
    }
}
