//! Prometheus metrics of one node.
//!
//! Each node owns its own registry (the `prometheus-client` crate) rather than a
//! process-global recorder, so that several nodes in one process (the tests do this)
//! keep separate numbers. Counters get the `_total` suffix from the encoder.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label of disconnects: the close code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The close code, or `client` when the client closed or vanished.
    pub code: String,
}

/// Label of commands: the command type.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabel {
    /// The command.
    pub command: &'static str,
}

/// Label of the per-user budgets: which one refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UserLimitLabel {
    /// `connect` or `subscribe`.
    pub limit: &'static str,
}

/// Label of webhook requests: how they ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `ok` (2xx) or `failed` (another status, a timeout, a connection error).
    pub outcome: &'static str,
}

/// Webhook delivery metrics (`herald_webhook_*`).
#[derive(Default)]
pub struct WebhookMetrics {
    /// Events delivered (a 2xx answered their request) by this node.
    pub delivered: Counter,
    /// Events of requests that failed and are retried (counted per attempt).
    pub retried: Counter,
    /// Requests, by outcome.
    pub requests: Family<OutcomeLabel, Counter>,
    /// Events trimmed from the log before this node could deliver them: lost.
    pub trimmed: Counter,
}

impl WebhookMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "herald_webhook_events_delivered",
            "Webhook events delivered (2xx)",
            self.delivered.clone(),
        );
        registry.register(
            "herald_webhook_events_retried",
            "Webhook events in failed requests, retried (per attempt)",
            self.retried.clone(),
        );
        registry.register(
            "herald_webhook_requests",
            "Webhook requests by outcome",
            self.requests.clone(),
        );
        registry.register(
            "herald_webhook_events_trimmed",
            "Webhook events trimmed from the log before delivery (lost)",
            self.trimmed.clone(),
        );
    }
}

/// The node's metrics. Cheap to clone handles live inside; share it behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    /// Open client connections.
    pub connections: Gauge,
    /// Connections accepted since start.
    pub connections_accepted: Counter,
    /// TCP connections refused at accept: `HERALD_MAX_HTTP_CONNECTIONS` were in their
    /// HTTP phase, all younger than a second. Each is answered busy, or dropped.
    pub http_connections_refused: Counter,
    /// Evicted connections closed unanswered: no busy answer was free.
    pub http_connections_dropped: Counter,
    /// Clients told to come back later: `reconnect` with reason `busy` and close 4429
    /// for a WebSocket, a 503 with `Retry-After` for other requests.
    pub busy_answers: Counter,
    /// Connections in their HTTP phase closed to make room for a newcomer (the oldest,
    /// silent ones first).
    pub http_connections_evicted: Counter,
    /// Open connections that have not finished `hello` (also in `connections`).
    pub pending_handshakes: Gauge,
    /// Pending connections closed 4429 to make room for a newcomer (the pending budget
    /// was full).
    pub pending_evicted: Counter,
    /// Channels a `hello` resume or a `subscribe` did not recover because the recovery
    /// byte budget (`HERALD_MAX_RECOVERY_BYTES`) was spent: `recovered: false`.
    pub recovery_over_budget: Counter,
    /// Connections closed, by close code.
    pub disconnects: Family<CodeLabel, Counter>,
    /// Channel subscriptions of local sessions.
    pub subscriptions: Gauge,
    /// Channels this node is subscribed to at the broker.
    pub broker_channels: Gauge,
    /// Messages this node published to the broker (API and clients).
    pub messages_published: Counter,
    /// Message frames written to client sockets.
    pub messages_delivered: Counter,
    /// Messages this node took from the broker.
    pub broker_messages_received: Counter,
    /// Sessions closed with 4509.
    pub slow_consumer_disconnects: Counter,
    /// Messages dropped because a session queue was full (the session is then closed).
    pub queue_drops: Counter,
    /// Ephemeral messages published through this node (not in `messages_published`).
    pub ephemeral_published: Counter,
    /// Ephemeral message frames written to client sockets.
    pub ephemeral_delivered: Counter,
    /// Ephemeral messages dropped at a full session queue (the session stays open).
    pub ephemeral_dropped: Counter,
    /// Size of published message data, in bytes.
    pub message_bytes: Histogram,
    /// Client commands, by type.
    pub commands: Family<CommandLabel, Counter>,
    /// Commands refused with `rate_limited`.
    pub rate_limited: Counter,
    /// Connects (4429) and channel entries (`rate_limited`) refused by a user's budget.
    pub user_limited: Family<UserLimitLabel, Counter>,
    /// Users whose per-user budgets the node tracks (spent, not yet refilled).
    pub tracked_users: Gauge,
    /// Gaps in a channel's stream repaired from history.
    pub gaps_repaired: Counter,
    /// Live publications not buffered during a gap repair because the repair buffers
    /// were full; each is read from history afterwards (or its sessions resync).
    pub repair_buffer_overflows: Counter,
    /// `resync` frames sent because a gap could not be repaired.
    pub resyncs: Counter,
    /// Broker operations that failed.
    pub broker_errors: Counter,
    /// Channels with stored state (offset, epoch, history) in the in-memory broker;
    /// refreshed by the node's housekeeping. Stays 0 with Redis.
    pub memory_streams: Gauge,
    /// Delivery receipts: `message.unacked` reports the sweeper handed on (and its
    /// consumer confirmed). See [`crate::receipts`].
    pub unacked_messages: Counter,
    /// Delivery receipts: acknowledged positions written to the broker (one per
    /// channel per flush, however many `ack` frames were coalesced into it).
    pub acks_flushed: Counter,
    /// Delivery receipts: `ack` frames accepted from clients.
    pub acks_received: Counter,
    /// Resident memory of the process, read from `/proc` at each scrape.
    resident_memory: Gauge,
    /// Open file descriptors of the process, counted at each scrape.
    open_fds: Gauge,
    /// Webhook deliveries.
    pub webhooks: WebhookMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            connections: Gauge::default(),
            connections_accepted: Counter::default(),
            http_connections_refused: Counter::default(),
            http_connections_dropped: Counter::default(),
            busy_answers: Counter::default(),
            http_connections_evicted: Counter::default(),
            pending_handshakes: Gauge::default(),
            pending_evicted: Counter::default(),
            recovery_over_budget: Counter::default(),
            disconnects: Family::default(),
            subscriptions: Gauge::default(),
            broker_channels: Gauge::default(),
            messages_published: Counter::default(),
            messages_delivered: Counter::default(),
            broker_messages_received: Counter::default(),
            slow_consumer_disconnects: Counter::default(),
            queue_drops: Counter::default(),
            ephemeral_published: Counter::default(),
            ephemeral_delivered: Counter::default(),
            ephemeral_dropped: Counter::default(),
            message_bytes: Histogram::new(exponential_buckets(64.0, 4.0, 8)),
            commands: Family::default(),
            rate_limited: Counter::default(),
            user_limited: Family::default(),
            tracked_users: Gauge::default(),
            gaps_repaired: Counter::default(),
            repair_buffer_overflows: Counter::default(),
            resyncs: Counter::default(),
            broker_errors: Counter::default(),
            memory_streams: Gauge::default(),
            unacked_messages: Counter::default(),
            acks_flushed: Counter::default(),
            acks_received: Counter::default(),
            resident_memory: Gauge::default(),
            open_fds: Gauge::default(),
            webhooks: WebhookMetrics::default(),
            registry: Registry::default(),
        };
        registry.register(
            "herald_connections",
            "Open client connections",
            m.connections.clone(),
        );
        registry.register(
            "herald_connections_accepted",
            "Client connections accepted",
            m.connections_accepted.clone(),
        );
        registry.register(
            "herald_http_connections_refused",
            "TCP connections refused at accept because HERALD_MAX_HTTP_CONNECTIONS were in their HTTP phase (answered busy, or dropped)",
            m.http_connections_refused.clone(),
        );
        registry.register(
            "herald_http_connections_dropped",
            "Evicted HTTP-phase connections closed unanswered because no busy answer was free",
            m.http_connections_dropped.clone(),
        );
        registry.register(
            "herald_busy_answers",
            "Clients told to come back later (reconnect busy and close 4429, or a 503 with Retry-After)",
            m.busy_answers.clone(),
        );
        registry.register(
            "herald_http_connections_evicted",
            "Connections in their HTTP phase closed to make room for a newcomer",
            m.http_connections_evicted.clone(),
        );
        registry.register(
            "herald_pending_handshakes",
            "Open connections that have not finished hello",
            m.pending_handshakes.clone(),
        );
        registry.register(
            "herald_pending_evicted",
            "Pending connections closed to make room in a full pending budget",
            m.pending_evicted.clone(),
        );
        registry.register(
            "herald_recovery_over_budget",
            "Channels not recovered because the recovery byte budget was spent",
            m.recovery_over_budget.clone(),
        );
        registry.register(
            "herald_disconnects",
            "Connections closed, by close code",
            m.disconnects.clone(),
        );
        registry.register(
            "herald_subscriptions",
            "Channel subscriptions of local sessions",
            m.subscriptions.clone(),
        );
        registry.register(
            "herald_broker_channels",
            "Channels subscribed at the broker",
            m.broker_channels.clone(),
        );
        registry.register(
            "herald_messages_published",
            "Messages published through this node",
            m.messages_published.clone(),
        );
        registry.register(
            "herald_messages_delivered",
            "Message frames written to clients",
            m.messages_delivered.clone(),
        );
        registry.register(
            "herald_broker_messages_received",
            "Messages this node took from the broker",
            m.broker_messages_received.clone(),
        );
        registry.register(
            "herald_slow_consumer_disconnects",
            "Sessions closed with 4509 (slow consumer)",
            m.slow_consumer_disconnects.clone(),
        );
        registry.register(
            "herald_queue_drops",
            "Messages dropped at a full session queue",
            m.queue_drops.clone(),
        );
        registry.register(
            "herald_ephemeral_published",
            "Ephemeral messages published through this node",
            m.ephemeral_published.clone(),
        );
        registry.register(
            "herald_ephemeral_delivered",
            "Ephemeral message frames written to clients",
            m.ephemeral_delivered.clone(),
        );
        registry.register(
            "herald_ephemeral_dropped",
            "Ephemeral messages dropped at a full session queue",
            m.ephemeral_dropped.clone(),
        );
        registry.register(
            "herald_message_bytes",
            "Size of published data in bytes",
            m.message_bytes.clone(),
        );
        registry.register(
            "herald_commands",
            "Client commands by type",
            m.commands.clone(),
        );
        registry.register(
            "herald_rate_limited",
            "Commands refused with rate_limited",
            m.rate_limited.clone(),
        );
        registry.register(
            "herald_user_limited",
            "Connects and channel entries refused by a user's budget on this node",
            m.user_limited.clone(),
        );
        registry.register(
            "herald_tracked_users",
            "Users whose per-user budgets this node tracks",
            m.tracked_users.clone(),
        );
        registry.register(
            "herald_gaps_repaired",
            "Stream gaps repaired from history",
            m.gaps_repaired.clone(),
        );
        registry.register(
            "herald_repair_buffer_overflows",
            "Publications not buffered during a gap repair (buffers full); read from history after it",
            m.repair_buffer_overflows.clone(),
        );
        registry.register("herald_resyncs", "resync frames sent", m.resyncs.clone());
        registry.register(
            "herald_broker_errors",
            "Failed broker operations",
            m.broker_errors.clone(),
        );
        registry.register(
            "herald_memory_streams",
            "Channels with stored state in the in-memory broker",
            m.memory_streams.clone(),
        );
        registry.register(
            "herald_unacked_messages",
            "Messages to personal channels reported as not acknowledged in time",
            m.unacked_messages.clone(),
        );
        registry.register(
            "herald_acks_flushed",
            "Acknowledged positions written to the broker (coalesced acks)",
            m.acks_flushed.clone(),
        );
        registry.register(
            "herald_acks_received",
            "ack frames accepted from clients",
            m.acks_received.clone(),
        );
        // The standard names of Prometheus' process collector, so that dashboards (and
        // herald-loadtest, for nodes on other machines) find them.
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            m.resident_memory.clone(),
        );
        registry.register(
            "process_open_fds",
            "Number of open file descriptors",
            m.open_fds.clone(),
        );
        m.webhooks.register(&mut registry);
        Self { registry, ..m }
    }

    /// Counts a disconnect with its close code (`None`: the client went away).
    pub fn disconnected(&self, code: Option<u16>) {
        let code = code.map_or_else(|| "client".to_owned(), |c| c.to_string());
        self.disconnects.get_or_create(&CodeLabel { code }).inc();
    }

    /// The metrics in Prometheus (OpenMetrics) text format.
    pub fn render(&self) -> String {
        if let Some(bytes) = resident_memory_bytes() {
            self.resident_memory.set(bytes);
        }
        if let Some(fds) = open_fds() {
            self.open_fds.set(fds as i64);
        }
        let mut out = String::with_capacity(4096);
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// `VmRSS` of this process (Linux); `None` elsewhere.
pub(crate) fn resident_memory_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Open file descriptors of this process (entries of `/proc/self/fd`); `None` without
/// `/proc`.
pub(crate) fn open_fds() -> Option<u64> {
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|fds| fds.count() as u64)
}

/// CPU time this process used, user plus system, in seconds (Linux); `None` elsewhere.
pub(crate) fn cpu_seconds() -> Option<f64> {
    cpu_seconds_of_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// Clock ticks per second of `/proc/<pid>/stat` times. This is the kernel's `USER_HZ`,
/// which is 100 on every Linux architecture Herald runs on (what `sysconf(_SC_CLK_TCK)`
/// answers), so no libc call is needed to learn it.
const USER_HZ: f64 = 100.0;

/// `utime + stime` of a `/proc/<pid>/stat` line, in seconds.
///
/// The second field is the command name in parentheses and may itself contain spaces
/// and parentheses, so the fields are counted from the last `)`: after it come state
/// (field 3) … utime (14) and stime (15).
fn cpu_seconds_of_stat(stat: &str) -> Option<f64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_from_proc_stat() {
        // A command name with a space and a parenthesis, as a process may choose.
        let stat = "4242 (her ald) x) S 1 4242 4242 0 -1 4194560 1302 0 0 0 \
                    250 75 0 0 20 0 6 0 123456 1234567 890 18446744073709551615";
        assert_eq!(cpu_seconds_of_stat(stat), Some(3.25));
        assert_eq!(cpu_seconds_of_stat("4242 (herald) S 1"), None);
        assert_eq!(cpu_seconds_of_stat("garbage"), None);
    }

    #[test]
    fn this_process_has_figures() {
        // Linux is where Herald runs and is tested.
        assert!(resident_memory_bytes().is_some_and(|b| b > 0));
        assert!(open_fds().is_some_and(|n| n > 0));
        assert!(cpu_seconds().is_some_and(|s| s >= 0.0));
    }
}
