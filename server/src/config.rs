//! The node's configuration: every setting is an environment variable `HERALD_*` and a
//! `--flag` of the same name in kebab case, with the defaults of docs/protocol.md "Configuration".
//! Every limit lives here with its documented default (README, "Configuration").

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Presence TTL in node TTLs (10 s → 300 s).
pub const PRESENCE_TTL_FACTOR: u32 = 30;

/// The node's configuration.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "herald",
    version,
    about = "Herald: a horizontally scaled WebSocket push server"
)]
pub struct Config {
    /// Address and port to listen on. Without keys, only a loopback address runs (in
    /// dev mode); elsewhere a node without keys refuses to start.
    #[arg(long, env = "HERALD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Unset: single node with the in-memory broker. `redis://host:port[/db]`: one Redis.
    /// `redis-cluster://host:port[,host:port…]`: Redis Cluster with sharded pub/sub.
    /// `redis-sentinel://host:port[,host:port…]/service-name`: a primary with replicas
    /// behind Redis Sentinel (the hosts are the sentinels); the node follows a failover.
    #[arg(long, env = "HERALD_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Prefix of every Redis key and pub/sub channel (several clusters can share a Redis).
    #[arg(long, env = "HERALD_REDIS_PREFIX", default_value = "herald:")]
    pub redis_prefix: String,

    /// This node's id in the cluster (default: a random uuid).
    #[arg(long, env = "HERALD_NODE_ID")]
    pub node_id: Option<String>,

    /// WebSocket URL clients should use to reach this node directly (default `ws://<listen>/ws`).
    #[arg(long, env = "HERALD_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// HS256 secret for client tokens (at least 32 bytes outside dev mode).
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM public key (RS256 / ES256 / EdDSA) for client tokens.
    #[arg(long, env = "HERALD_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// Bearer key for the server API (at least 32 bytes outside dev mode).
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Comma list of allowed `Origin`s for `/ws`; unset = any.
    #[arg(long, env = "HERALD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,

    /// Dev mode even with keys configured and on any address (a dev cluster shares its
    /// keys). `1`, `true`, `yes` or `on` turn it on; `0`, `false`, `no`, `off` or empty
    /// leave it off (any case); any other value is a startup error.
    #[arg(long, env = "HERALD_DEV", value_parser = parse_switch)]
    pub dev: bool,

    /// Messages kept in each channel's history.
    #[arg(long, env = "HERALD_HISTORY_SIZE", default_value_t = 100)]
    pub history_size: usize,

    /// Seconds a message stays in history.
    #[arg(long, env = "HERALD_HISTORY_TTL_SECS", default_value_t = 300)]
    pub history_ttl_secs: u64,

    /// Seconds a channel's offset and epoch outlive its last publish.
    #[arg(long, env = "HERALD_HISTORY_META_TTL_SECS", default_value_t = 86_400)]
    pub history_meta_ttl_secs: u64,

    /// Milliseconds a new connection has to send `hello`.
    #[arg(long, env = "HERALD_HELLO_TIMEOUT_MS", default_value_t = 10_000)]
    pub hello_timeout_ms: u64,

    /// The server pings after this many milliseconds of silence; a client silent for
    /// twice this is closed with 4408.
    #[arg(long, env = "HERALD_HEARTBEAT_MS", default_value_t = 25_000)]
    pub heartbeat_ms: u64,

    /// Largest client frame in bytes (larger: close 1009).
    #[arg(long, env = "HERALD_MAX_FRAME_BYTES", default_value_t = 65_536)]
    pub max_frame_bytes: usize,

    /// Largest `POST /v1/publish` body in bytes (larger: 413).
    #[arg(long, env = "HERALD_MAX_PUBLISH_BYTES", default_value_t = 65_536)]
    pub max_publish_bytes: usize,

    /// Longest accepted token in bytes (longer: 4401).
    #[arg(long, env = "HERALD_MAX_TOKEN_BYTES", default_value_t = 8_192)]
    pub max_token_bytes: usize,

    /// Longest client token lifetime accepted, in seconds: `exp - iat` (or, without
    /// `iat`, `exp - now`) above it is refused. Revocations last this long.
    #[arg(long, env = "HERALD_MAX_TOKEN_LIFETIME_SECS", default_value_t = 86_400)]
    pub max_token_lifetime_secs: u64,

    /// How long before a token's `exp` the session is sent `expiring` (at most half of
    /// the token's remaining lifetime when it was accepted), in milliseconds.
    #[arg(long, env = "HERALD_TOKEN_EXPIRY_NOTICE_MS", default_value_t = 60_000)]
    pub token_expiry_notice_ms: u64,

    /// Channels one connection may be subscribed to, its personal channel included.
    #[arg(long, env = "HERALD_MAX_SUBSCRIPTIONS", default_value_t = 128)]
    pub max_subscriptions: usize,

    /// Commands one connection may send per second (a burst of as many is allowed).
    /// Over it: `rate_limited` replies; at twice the rate: close 4429.
    #[arg(long, env = "HERALD_MAX_MESSAGES_PER_SEC", default_value_t = 100)]
    pub max_messages_per_sec: u32,

    /// Ephemeral publishes (`"ephemeral":true`) one connection may send per second (a
    /// burst of as many is allowed), on top of the command rate, which they also count
    /// against. Over it: `rate_limited` replies (never a close by itself).
    #[arg(long, env = "HERALD_MAX_EPHEMERAL_PER_SEC", default_value_t = 10)]
    pub max_ephemeral_per_sec: u32,

    /// WebSocket frames one connection may send per second, of every kind (text,
    /// binary, continuation, ping, pong, close) and in every state, before `hello`
    /// included; the count is taken below the WebSocket library, so fragments of a
    /// message that never ends count too. Over it: close 4429. Never less than twice
    /// `HERALD_MAX_MESSAGES_PER_SEC` (a lower value is raised to that), so the command
    /// rate's own answers come first for a client that sends whole commands.
    #[arg(long, env = "HERALD_MAX_FRAMES_PER_SEC", default_value_t = 400,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_frames_per_sec: u32,

    /// Milliseconds a client has to send a complete HTTP request head (the WebSocket
    /// upgrade request included) and that an idle keep-alive connection stays open;
    /// then the connection is closed. Stops slowloris clients from holding sockets.
    #[arg(long, env = "HERALD_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,

    /// Bytes of an HTTP request's line and headers (the WebSocket upgrade included),
    /// from 8,192 to 1,048,576. Over it: 431 with the JSON error body, and the
    /// connection is closed. A request head is buffered whole before it is parsed, so
    /// this is also the most memory a connection that never finishes its head can hold
    /// (at most `HERALD_MAX_HTTP_CONNECTIONS` of them).
    #[arg(long, env = "HERALD_MAX_REQUEST_HEAD_BYTES", default_value_t = 32_768,
          value_parser = clap::value_parser!(u64).range(8_192..=1_048_576))]
    pub max_request_head_bytes: u64,

    /// TCP connections still in their HTTP phase: accepted and not yet upgraded to a
    /// WebSocket (a request head on its way, a keep-alive API connection between
    /// requests). Each holds a file descriptor, and a node has at most 20,000: without
    /// a count, sockets that never send a request could take every descriptor within
    /// `HERALD_HEADER_READ_TIMEOUT_MS`, and with them the node's own connections to
    /// Redis. When it is full, a newcomer closes the oldest connection at least 1 s
    /// old (one that never sent a request first); if all are younger, the newcomer is
    /// closed at once. Upgraded WebSockets leave this count (sessions have
    /// `HERALD_MAX_PENDING_HANDSHAKES` and `HERALD_MAX_CONNECTIONS`). At least 1.
    #[arg(
        long,
        env = "HERALD_MAX_HTTP_CONNECTIONS",
        default_value_t = 4_096,
        value_parser = parse_pending_budget
    )]
    pub max_http_connections: usize,

    /// Kernel send buffer of each client socket in bytes (SO_SNDBUF; Linux doubles it).
    /// Bounds what a client that stops reading can pin in kernel memory before its
    /// queue fills and it is closed with 4509. 0 keeps the OS default, which autotunes
    /// up to `net.ipv4.tcp_wmem`'s maximum (4 MiB) per socket.
    #[arg(long, env = "HERALD_TCP_SEND_BUFFER", default_value_t = 65_536)]
    pub tcp_send_buffer: usize,

    /// Connections this node accepts (more: close 4429).
    #[arg(long, env = "HERALD_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Connections from one IP address; 0 = no limit. Off by default because behind an
    /// L4 balancer every connection comes from the balancer's address.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,

    /// Connections that have not finished `hello` (the upgrade and the wait for the
    /// token). They have a budget of their own and never take the slots of
    /// `HERALD_MAX_CONNECTIONS`, which count authenticated sessions only. When it is
    /// full, the oldest pending connection that has waited 1 s or more is closed 4429 to
    /// make room; if none has, the newcomer is closed 4429 at once. An honest client
    /// finishes `hello` within a round trip, so 1,000 covers 10,000 connects per second
    /// at 100 ms each, while silent sockets cost at most ~1,000 × 10 KiB.
    ///
    /// At least 1: 0 would refuse every client (4429), unlike the `0 = no limit` of
    /// the per-IP and per-user limits, so it is a startup error rather than a trap.
    #[arg(
        long,
        env = "HERALD_MAX_PENDING_HANDSHAKES",
        default_value_t = 1_000,
        value_parser = parse_pending_budget
    )]
    pub max_pending_handshakes: usize,

    /// Connections of one user (token `sub`) on this node; 0 = no limit. Counted per
    /// node, not cluster-wide: a user's connections spread over N nodes may reach N
    /// times this. The connection over it is closed 4429 after `hello`.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS_PER_USER", default_value_t = 32)]
    pub max_connections_per_user: u32,

    /// New connections one user may open on this node per minute (each `hello` with a
    /// valid token counts, whoever asked for the reconnect); 0 = no limit. Over it:
    /// close 4429. Per node: a cluster of N nodes allows N times this.
    #[arg(long, env = "HERALD_MAX_USER_CONNECTS_PER_MIN", default_value_t = 60)]
    pub max_user_connects_per_min: u32,

    /// Connects one user may make at once on this node before the per-minute rate
    /// applies. Never below `HERALD_MAX_CONNECTIONS_PER_USER`, so that every connection
    /// of a user that the server moves here at once (a drain) fits.
    #[arg(long, env = "HERALD_MAX_USER_CONNECT_BURST", default_value_t = 64)]
    pub max_user_connect_burst: u32,

    /// Channels one user's connections together may enter per second on this node at
    /// their own request: every channel resumed in `hello` and every `subscribe` (each
    /// reads the channel from the backend); 0 = no limit. Over it: `rate_limited`.
    #[arg(
        long,
        env = "HERALD_MAX_USER_SUBSCRIBES_PER_SEC",
        default_value_t = 100
    )]
    pub max_user_subscribes_per_sec: u32,

    /// Channels one user may enter at once on this node before the per-second rate
    /// applies. Never below `HERALD_MAX_CONNECTIONS_PER_USER` times
    /// `HERALD_MAX_SUBSCRIPTIONS`, so that a drain moving all of a user's connections
    /// here can resume every channel.
    #[arg(long, env = "HERALD_MAX_USER_SUBSCRIBE_BURST", default_value_t = 4_096)]
    pub max_user_subscribe_burst: u32,

    /// Users whose per-user budgets this node tracks at once (about 100 bytes each).
    /// Only users who spent something not yet refilled are tracked; when the table is
    /// full, the entry nearest to full is dropped.
    #[arg(long, env = "HERALD_MAX_TRACKED_USERS", default_value_t = 100_000)]
    pub max_tracked_users: usize,

    /// Milliseconds one write to a client may take: each batch of live messages, each
    /// reply, `welcome` and each recovery (the messages after a `hello` resume or a
    /// `subscribe` with `since`) must be taken by the client within it, or the
    /// connection is closed with 4509 (slow consumer).
    #[arg(long, env = "HERALD_WRITE_TIMEOUT_MS", default_value_t = 10_000)]
    pub write_timeout_ms: u64,

    /// Bytes of message data one `hello` (all its resumed channels together) or one
    /// `subscribe` may recover. A channel that does not fit is not recovered at all
    /// (`recovered: false`, with the current position).
    #[arg(long, env = "HERALD_MAX_RECOVERY_BYTES", default_value_t = 1_048_576)]
    pub max_recovery_bytes: usize,

    /// Messages queued for one connection; a connection whose queue is full is a slow
    /// consumer and is closed with 4509.
    #[arg(long, env = "HERALD_SESSION_QUEUE", default_value_t = 1024)]
    pub session_queue: usize,

    /// Worker threads of the node's runtime; 0 = one per CPU core. Set it below the
    /// core count when several nodes (or a node and Redis) share a small machine: more
    /// runnable threads than cores cost context switches on every wakeup.
    #[arg(long, env = "HERALD_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// WebSocket read buffer per connection, in bytes. It is allocated up front and is
    /// also the most one read takes from the socket; a longer frame grows it to the
    /// frame's size. Clients send few, small frames (hello, subscribe), so 512 bytes
    /// fits nearly all of them and keeps an idle connection small (tungstenite's
    /// default is 128 KiB).
    #[arg(long, env = "HERALD_WS_READ_BUFFER", default_value_t = 512)]
    pub ws_read_buffer: usize,

    /// WebSocket write buffer per connection: frames are coalesced up to this size
    /// before a write; every batch ends with a flush.
    #[arg(long, env = "HERALD_WS_WRITE_BUFFER", default_value_t = 8192)]
    pub ws_write_buffer: usize,

    /// Milliseconds the node takes to drain its clients on SIGTERM; it exits within
    /// this plus 5 s.
    #[arg(long, env = "HERALD_DRAIN_MS", default_value_t = 10_000)]
    pub drain_ms: u64,

    /// Milliseconds a node keeps its broker subscription after the last local subscriber
    /// left, so that churn does not thrash the broker.
    #[arg(long, env = "HERALD_UNSUBSCRIBE_DELAY_MS", default_value_t = 5_000)]
    pub unsubscribe_delay_ms: u64,

    /// Publications the Redis subscriber connection buffers for the node's reader (fred's
    /// broadcast channel; fred's own default is 32). When the reader falls further behind,
    /// the oldest are dropped and the node repairs the gap from history, or sends `resync`.
    #[arg(long, env = "HERALD_REDIS_SUBSCRIBER_BUFFER", default_value_t = 16_384)]
    pub redis_subscriber_buffer: usize,

    /// A node cut off from Redis for this many milliseconds (after `/readyz` turned 503)
    /// moves its clients to a peer whose `/readyz` answers 200: `reconnect` with reason
    /// `unavailable`, then close 4503. 0: never move them.
    #[arg(long, env = "HERALD_CUTOFF_MOVE_AFTER_MS", default_value_t = 500)]
    pub cutoff_move_after_ms: u64,

    /// The `after_ms` of those `reconnect` frames is random below this, so the peers
    /// are not hit by every client at once.
    #[arg(long, env = "HERALD_CUTOFF_MOVE_SPREAD_MS", default_value_t = 750)]
    pub cutoff_move_spread_ms: u64,

    /// Longest pause between two attempts to reconnect to Redis (the backoff starts at
    /// 50 ms and doubles up to this).
    #[arg(long, env = "HERALD_REDIS_RECONNECT_MAX_MS", default_value_t = 200)]
    pub redis_reconnect_max_ms: u64,

    /// How long one attempt to connect to Redis (TCP and handshake) may take.
    #[arg(long, env = "HERALD_REDIS_CONNECT_TIMEOUT_MS", default_value_t = 400)]
    pub redis_connect_timeout_ms: u64,

    /// Replicas that must acknowledge a publish (Redis `WAIT`) before the API answers
    /// 200; 0: no wait. When fewer acknowledge within `HERALD_REDIS_WAIT_TIMEOUT_MS`,
    /// the publish answers 503 `unavailable` (the message may still have been delivered).
    #[arg(long, env = "HERALD_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,

    /// Milliseconds a publish waits for `HERALD_REDIS_WAIT_REPLICAS` replicas (at most
    /// 1500: Redis commands time out after 2 s).
    #[arg(long, env = "HERALD_REDIS_WAIT_TIMEOUT_MS", default_value_t = 500)]
    pub redis_wait_timeout_ms: u64,

    /// Milliseconds within which some device of a user must acknowledge (`ack`) a
    /// message of the user's personal channel; a message not acknowledged by then is
    /// reported once as `message.unacked` (for a mobile push). Only with
    /// `HERALD_WEBHOOK_URL`: the webhook is where reports go, so without one the
    /// detection is off whatever this says. 0 turns the detection off (no scheduling
    /// cost on publish); otherwise 100..=3600000. Keep it well
    /// below the history TTL: a message that left history before it is overdue cannot
    /// be reported.
    #[arg(long, env = "HERALD_ACK_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = parse_ack_timeout)]
    pub ack_timeout_ms: u64,

    /// Seconds after which a silent node is dropped from the registry and presence.
    #[arg(long, env = "HERALD_NODE_TTL_SECS", default_value_t = 10)]
    pub node_ttl_secs: u64,

    /// Webhook receivers: comma list of `http://` or `https://` URLs. Each gets every
    /// event (user.online/offline, channel.occupied/vacated, …) in signed batches, at
    /// least once. Unset: no webhooks.
    // Hidden in `--help`: a URL may carry credentials.
    #[arg(
        long,
        env = "HERALD_WEBHOOK_URL",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub webhook_url: Option<Vec<String>>,

    /// HMAC-SHA256 key of the `Herald-Signature` header; required with
    /// HERALD_WEBHOOK_URL (at least 32 bytes outside dev mode).
    #[arg(long, env = "HERALD_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// Milliseconds a user (or channel) stays online after its last connection (or
    /// subscriber) left; a reconnect within it sends no event.
    #[arg(long, env = "HERALD_OFFLINE_GRACE_MS", default_value_t = 5_000)]
    pub offline_grace_ms: u64,

    /// Most events in one webhook request (1–1000).
    #[arg(long, env = "HERALD_WEBHOOK_BATCH_SIZE", default_value_t = 100)]
    pub webhook_batch_size: usize,

    /// Events kept in the cluster's webhook log (about; at least 1000): a receiver down
    /// for longer than the log lasts loses the oldest (logged and counted).
    #[arg(long, env = "HERALD_WEBHOOK_RETENTION", default_value_t = 100_000)]
    pub webhook_retention: usize,

    /// Milliseconds a webhook request may take (connect to answer) before it counts as
    /// failed and is retried.
    #[arg(long, env = "HERALD_WEBHOOK_TIMEOUT_MS", default_value_t = 5_000)]
    pub webhook_timeout_ms: u64,

    /// Longest pause between two attempts of a failing webhook request, in ms (the
    /// pause doubles from 500 ms up to it, with jitter).
    #[arg(long, env = "HERALD_WEBHOOK_RETRY_MAX_MS", default_value_t = 60_000)]
    pub webhook_retry_max_ms: u64,

    /// Log format: `text` or `json`.
    #[arg(long, env = "HERALD_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// Parses an on/off setting strictly: `1 true yes on` / `0 false no off`, any case.
///
/// Empty means off, because that is how compose files pass a variable that is unset
/// on the host (`HERALD_DEV=${HERALD_DEV:-}`). Anything else is refused rather than
/// read as "on" (clap's `FalseyValueParser` took `disabled` or a typo for true), so a
/// value meant to turn dev mode off can never turn it on.
pub fn parse_switch(value: &str) -> Result<bool, String> {
    const ON: [&str; 4] = ["1", "true", "yes", "on"];
    const OFF: [&str; 4] = ["0", "false", "no", "off"];
    if value.is_empty() {
        return Ok(false);
    }
    if ON.iter().any(|w| w.eq_ignore_ascii_case(value)) {
        Ok(true)
    } else if OFF.iter().any(|w| w.eq_ignore_ascii_case(value)) {
        Ok(false)
    } else {
        Err(format!(
            "expected {} (on) or {} (off), any case; empty means off",
            ON.join(", "),
            OFF.join(", ")
        ))
    }
}

/// Parses `HERALD_MAX_PENDING_HANDSHAKES`: a whole number of at least 1.
///
/// A budget of 0 admits no connection at all (every client is closed 4429 before its
/// `hello`), and the neighbouring limits read 0 as "no limit", so an operator writing 0
/// would get a node that starts, reports healthy and serves nobody. Refused at startup.
pub fn parse_pending_budget(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err(
            "must be at least 1: 0 would refuse every client (there is no \"no limit\" value)"
                .into(),
        ),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Smallest and largest `HERALD_ACK_TIMEOUT_MS` (0 turns unacked detection off).
pub const ACK_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 100..=3_600_000;

/// Parses `HERALD_ACK_TIMEOUT_MS`: 0 (off) or a whole number of milliseconds in
/// [`ACK_TIMEOUT_RANGE`].
pub fn parse_ack_timeout(value: &str) -> Result<u64, String> {
    let ms: u64 = value.parse().map_err(|e| format!("{e}"))?;
    if ms == 0 || ACK_TIMEOUT_RANGE.contains(&ms) {
        Ok(ms)
    } else {
        Err(format!(
            "must be 0 (off) or {}..={} ms",
            ACK_TIMEOUT_RANGE.start(),
            ACK_TIMEOUT_RANGE.end()
        ))
    }
}

/// The longest `WAIT` a publish may do: it must end well before the command timeout.
pub const MAX_WAIT_TIMEOUT_MS: u64 = 1_500;

impl Default for Config {
    /// The documented defaults, without reading the environment (for tests and embedding).
    fn default() -> Self {
        Config::parse_from_defaults()
    }
}

impl Config {
    fn parse_from_defaults() -> Self {
        // Parse an empty command line with env lookups disabled, so the defaults have a
        // single source: the attributes above.
        let cmd = <Config as clap::CommandFactory>::command();
        let cmd = cmd.mut_args(|a| a.env(None::<&str>));
        let matches = cmd
            .try_get_matches_from(["herald"])
            .expect("defaults parse");
        <Config as clap::FromArgMatches>::from_arg_matches(&matches).expect("defaults parse")
    }

    /// The heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    /// The header read timeout of HTTP connections.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms.max(1))
    }

    /// The time one write (a batch, a reply, a recovery) to a client may take.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms.max(1))
    }

    /// The drain window.
    pub fn drain(&self) -> Duration {
        Duration::from_millis(self.drain_ms)
    }

    /// The connect burst in force: at least every connection a user may hold here.
    pub fn user_connect_burst(&self) -> u32 {
        self.max_user_connect_burst
            .max(self.max_connections_per_user)
    }

    /// The subscribe burst in force: at least every channel a user's connections may
    /// hold here together (when the per-user connection limit bounds that).
    pub fn user_subscribe_burst(&self) -> u32 {
        let held = u64::from(self.max_connections_per_user) * self.max_subscriptions as u64;
        self.max_user_subscribe_burst
            .max(held.min(u64::from(u32::MAX)) as u32)
    }
}

#[cfg(test)]
mod tests;
