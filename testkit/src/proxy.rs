//! A TCP fault proxy: put it between a node and Redis (or anything else that speaks
//! TCP) and break the network on command.
//!
//! The proxy forwards every accepted connection to one upstream address, byte for byte,
//! in both directions. A test then changes its mode:
//!
//! - [`FaultProxy::cut`]: closes every open connection at once (both sides see the
//!   connection end); new connections are accepted and forwarded again. Models a reset
//!   connection: a restarted firewall, a NAT entry that expired, a killed proxy.
//! - [`FaultProxy::black_hole`]: stops forwarding in both directions *without closing*:
//!   bytes stay in the kernel's buffers, and new connections are accepted but get no
//!   answer. Models a network partition or a half-open connection, the case that only
//!   a liveness check can detect. [`FaultProxy::restore`] delivers what was held, in
//!   order, as TCP would after a partition heals.
//! - [`FaultProxy::black_hole_upstream_port`]: the same for one connection only, named
//!   by its local port towards the upstream (what Redis' `CLIENT LIST` shows as
//!   `addr`): for instance only a node's pub/sub connection, while its commands flow.
//! - [`FaultProxy::set_latency`]: delays every chunk by a base plus a random jitter,
//!   each way, in order: a slow link without the kernel's `netem`.
//! - [`FaultProxy::reject`]: closes every open connection and every new one at once,
//!   until [`FaultProxy::restore`]. Models an upstream that cannot be reached.
//! - [`FaultProxy::hold_matching`]: holds back every connection, open or new, from the
//!   moment it sends a chunk containing a byte pattern (e.g. `SUBSCRIBE`: only a node's
//!   pub/sub connection; `EVAL`: its command connection), until
//!   [`FaultProxy::release`]: the chunk and what follows wait, unsent, in both
//!   directions. A test then decides exactly when each kind of connection comes back,
//!   whatever the order in which they reconnected.
//!
//! ```no_run
//! # async fn demo() {
//! use herald_testkit::proxy::FaultProxy;
//! let proxy = FaultProxy::start("127.0.0.1:6379".parse().unwrap()).await;
//! let url = format!("redis://{}", proxy.addr()); // give this to the node
//! proxy.black_hole(); // the node's connections go silent
//! proxy.restore(); // and come back, with what was held
//! proxy.cut(); // every connection is closed; reconnects work
//! # }
//! ```
//!
//! Everything runs as tasks on the caller's tokio runtime; dropping the proxy stops it
//! and closes its connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// What the proxy does with traffic now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward every byte.
    Forward,
    /// Forward nothing, close nothing.
    BlackHole,
    /// Close every connection, open or new.
    Reject,
}

/// Shared state of the proxy and its connection tasks.
struct Shared {
    mode: watch::Sender<Mode>,
    /// Bumped by every cut: connections opened under an older generation close.
    cuts: watch::Sender<u64>,
    open: AtomicUsize,
    accepted: AtomicUsize,
    /// Open connections.
    conns: Mutex<Vec<Conn>>,
    /// Hold rules, by id (index); an inactive rule holds nothing new.
    rules: Mutex<Vec<(Vec<u8>, bool)>>,
    /// Delay of every chunk, each way: (base, jitter) in microseconds.
    latency: Mutex<(u64, u64)>,
    /// Percent of chunks held for a retransmission time (see `set_loss`).
    loss: AtomicUsize,
}

/// One open connection.
struct Conn {
    /// Local port towards the upstream.
    port: u16,
    /// The connection's own black hole switch.
    hold: watch::Sender<bool>,
    /// The hold rule that holds it, if any.
    held_by: Option<usize>,
}

/// A rule of [`FaultProxy::hold_matching`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldRule(usize);

impl Shared {
    fn conns(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds the connection on `port` if `window` contains an active rule's pattern.
    fn inspect(&self, port: u16, window: &[u8]) {
        let rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let Some(rule) = rules.iter().position(|(pattern, active)| {
            *active && window.windows(pattern.len()).any(|w| w == &pattern[..])
        }) else {
            return;
        };
        for conn in self.conns().iter_mut() {
            if conn.port == port && conn.held_by.is_none() {
                conn.held_by = Some(rule);
                conn.hold.send_replace(true);
            }
        }
    }
}

/// A running fault proxy. See the module doc.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port that forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        Self::start_on("127.0.0.1:0".parse().expect("address"), upstream).await
    }

    /// Starts a proxy listening on `listen` (port 0: a free one) that forwards to
    /// `upstream`.
    pub async fn start_on(listen: SocketAddr, upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind(listen).await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            mode: watch::Sender::new(Mode::Forward),
            cuts: watch::Sender::new(0),
            open: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
            rules: Mutex::new(Vec::new()),
            latency: Mutex::new((0, 0)),
            loss: AtomicUsize::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, upstream, Arc::clone(&shared)));
        FaultProxy {
            addr,
            upstream,
            shared,
            accept,
        }
    }

    /// Where the proxy listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where it forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    /// Closes every open connection now; later connections are forwarded (unless the
    /// proxy is black-holed or rejecting).
    pub fn cut(&self) {
        self.shared.cuts.send_modify(|g| *g += 1);
    }

    /// Stops forwarding in both directions without closing anything.
    pub fn black_hole(&self) {
        self.shared.mode.send_replace(Mode::BlackHole);
    }

    /// Closes every open connection and refuses new ones (accepts and closes them
    /// at once) until [`FaultProxy::restore`].
    pub fn reject(&self) {
        self.shared.mode.send_replace(Mode::Reject);
        self.cut();
    }

    /// Black-holes one open connection: the one whose local port towards the
    /// upstream is `port`. Returns whether there was one.
    pub fn black_hole_upstream_port(&self, port: u16) -> bool {
        let conns = self.shared.conns();
        let mut found = false;
        for conn in conns.iter() {
            if conn.port == port {
                conn.hold.send_replace(true);
                found = true;
            }
        }
        found
    }

    /// Local ports towards the upstream of the connections open now.
    pub fn upstream_ports(&self) -> Vec<u16> {
        self.shared.conns().iter().map(|c| c.port).collect()
    }

    /// Forwards again, every connection; bytes held by a black hole are delivered
    /// first, in order. Hold rules stay active (see [`FaultProxy::release`]) but
    /// release what they held.
    pub fn restore(&self) {
        self.shared.mode.send_replace(Mode::Forward);
        for conn in self.shared.conns().iter_mut() {
            conn.held_by = None;
            conn.hold.send_replace(false);
        }
    }

    /// From now on, holds back every connection from the first chunk it sends (towards
    /// the upstream) that contains `pattern`: that chunk and everything after it, both
    /// ways, wait until [`FaultProxy::release`]. A pattern split over two reads is
    /// still found.
    pub fn hold_matching(&self, pattern: &[u8]) -> HoldRule {
        assert!(
            !pattern.is_empty() && pattern.len() <= TAIL,
            "pattern of 1..={TAIL} bytes"
        );
        let mut rules = self.shared.rules.lock().unwrap_or_else(|e| e.into_inner());
        rules.push((pattern.to_vec(), true));
        HoldRule(rules.len() - 1)
    }

    /// Ends a hold rule: the connections it holds forward what they held, in order, and
    /// new chunks are no longer checked against it.
    pub fn release(&self, rule: HoldRule) {
        if let Some(r) = self
            .shared
            .rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(rule.0)
        {
            r.1 = false;
        }
        for conn in self.shared.conns().iter_mut() {
            if conn.held_by == Some(rule.0) {
                conn.held_by = None;
                conn.hold.send_replace(false);
            }
        }
    }

    /// Connections a hold rule holds back now.
    pub fn held(&self, rule: HoldRule) -> usize {
        self.shared
            .conns()
            .iter()
            .filter(|c| c.held_by == Some(rule.0))
            .count()
    }

    /// Delays every chunk, in each direction, by `base` plus a random share of
    /// `jitter` (uniform), keeping the order of the bytes (a chunk never overtakes the
    /// one before it). Zero for both: no delay. Applies to open connections too.
    pub fn set_latency(&self, base: Duration, jitter: Duration) {
        *self
            .shared
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner()) =
            (base.as_micros() as u64, jitter.as_micros() as u64);
    }

    /// Loss as a TCP connection lives it, for links a test cannot drop packets on
    /// (see [`crate::netns`] for real packet loss): `percent` % of the chunks, at
    /// random, arrive [`RETRANSMIT`] late, as a lost segment does after Linux's
    /// shortest retransmission timeout, and hold back what follows them. 0: none.
    pub fn set_loss(&self, percent: u32) {
        self.shared
            .loss
            .store(percent.min(100) as usize, Ordering::SeqCst);
    }

    /// Connections open through the proxy now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Connections accepted since the start (a reconnect shows up here).
    pub fn accepted_connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.mode.send_replace(Mode::Reject);
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if *shared.mode.borrow() == Mode::Reject {
            drop(client);
            continue;
        }
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let generation = Generation::now(&shared.cuts);
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let port = server.local_addr().map(|a| a.port()).unwrap_or(0);
            let hold = watch::Sender::new(false);
            shared.conns().push(Conn {
                port,
                hold: hold.clone(),
                held_by: None,
            });
            shared.open.fetch_add(1, Ordering::SeqCst);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            // Whichever direction ends first (EOF, error, cut) ends the connection:
            // dropping both halves of both sockets closes them.
            tokio::select! {
                _ = pipe(client_read, server_write, &shared, &hold, Some(port)) => {}
                _ = pipe(server_read, client_write, &shared, &hold, None) => {}
                _ = generation.cut() => {}
            }
            shared.conns().retain(|c| c.port != port);
            shared.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// How late a "lost" chunk arrives ([`FaultProxy::set_loss`]): Linux's minimum RTO.
pub const RETRANSMIT: Duration = Duration::from_millis(200);

/// Bytes of the previous chunk kept to find a pattern split over two reads; also the
/// longest pattern.
const TAIL: usize = 64;

/// Copies one direction, honouring the mode: nothing is read while black-holed, and a
/// chunk read just before a black hole is held until the proxy forwards again.
/// `inspect`: this is the direction towards the upstream of the connection on that port,
/// checked against the hold rules.
async fn pipe(
    from: tokio::net::tcp::OwnedReadHalf,
    to: tokio::net::tcp::OwnedWriteHalf,
    shared: &Shared,
    hold: &watch::Sender<bool>,
    inspect: Option<u16>,
) {
    // The reader stamps each chunk with the moment it may leave (now, or later with a
    // latency); the writer sends it then. An EOF ends the reader; the writer sends what
    // is queued, then ends too.
    let (tx, rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::join!(
        read_side(from, tx, shared, hold, inspect),
        write_side(to, rx, shared, hold)
    );
}

async fn read_side(
    mut from: tokio::net::tcp::OwnedReadHalf,
    tx: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
    shared: &Shared,
    hold: &watch::Sender<bool>,
    inspect: Option<u16>,
) {
    let mut mode = shared.mode.subscribe();
    let mut hold = hold.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    let mut window: Vec<u8> = Vec::new();
    let mut last = Instant::now();
    let mut seed = Instant::now().elapsed().as_nanos() as u64 | 1;
    loop {
        if forwarding(&mut mode, &mut hold).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(port) = inspect {
            window.extend_from_slice(&buf[..n]);
            shared.inspect(port, &window);
            let keep = window.len().saturating_sub(TAIL);
            window.drain(..keep);
        }
        let (base, jitter) = *shared.latency.lock().unwrap_or_else(|e| e.into_inner());
        // xorshift: enough randomness for a jitter, without a dependency.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut delay = base + if jitter > 0 { seed % jitter } else { 0 };
        let loss = shared.loss.load(Ordering::Relaxed) as u64;
        if loss > 0 && (seed >> 32) % 100 < loss {
            delay += RETRANSMIT.as_micros() as u64;
        }
        let at = (Instant::now() + Duration::from_micros(delay)).max(last);
        last = at;
        if tx.send((at, buf[..n].to_vec())).is_err() {
            return;
        }
    }
}

async fn write_side(
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    shared: &Shared,
    hold: &watch::Sender<bool>,
) {
    let mut mode = shared.mode.subscribe();
    let mut hold = hold.subscribe();
    while let Some((at, bytes)) = rx.recv().await {
        tokio::time::sleep_until(at.into()).await;
        if forwarding(&mut mode, &mut hold).await.is_err() {
            return;
        }
        if to.write_all(&bytes).await.is_err() {
            return;
        }
    }
}

/// Waits until the proxy forwards and this connection is not held; `Err` when the
/// connection must close.
async fn forwarding(
    mode: &mut watch::Receiver<Mode>,
    hold: &mut watch::Receiver<bool>,
) -> Result<(), ()> {
    loop {
        let now = *mode.borrow_and_update();
        let held = *hold.borrow_and_update();
        match now {
            Mode::Reject => return Err(()),
            Mode::Forward if !held => return Ok(()),
            _ => {
                let changed = tokio::select! {
                    r = mode.changed() => r,
                    r = hold.changed() => r,
                };
                if changed.is_err() {
                    return Err(());
                }
            }
        }
    }
}

/// The cut generation a connection was opened under.
struct Generation {
    rx: watch::Receiver<u64>,
    at: u64,
}

impl Generation {
    fn now(cuts: &watch::Sender<u64>) -> Self {
        let rx = cuts.subscribe();
        let at = *rx.borrow();
        Self { rx, at }
    }

    /// Resolves when a cut happened after the connection opened.
    async fn cut(mut self) {
        loop {
            if *self.rx.borrow_and_update() != self.at {
                return;
            }
            if self.rx.changed().await.is_err() {
                // The proxy is gone.
                return;
            }
        }
    }
}
