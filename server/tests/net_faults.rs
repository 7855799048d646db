//! Network faults, the way distributed systems are tested: Redis, every node and the
//! clients each run in their own Linux network namespace, joined by veth links to a
//! router namespace (`herald_testkit::netns`). Faults are what a real network does:
//! a partition drops packets both ways (no FIN, no reset: connections just go silent),
//! a lossy link drops 5 % of them at random (nftables on the router), a slow link adds
//! 100 ms and a jitter each way (the userspace `FaultProxy`, since the kernel's netem is
//! not always there). Nothing but namespace-only 10.77.x.y addresses is used.
//!
//! The processes are the real ones (`redis-server`, the `herald` binary) started with
//! `ip netns exec`. The clients are the tests' followers (resilient recording clients,
//! `support/follower.rs`) in the test process: the test thread moves into the clients'
//! namespace before it builds its runtime, so every socket it opens is there.
//!
//! Each scenario runs a push load and prints one `measured:` line: sent (accepted by
//! the API), delivered, lost, duplicated, reordered and resyncs, counted by
//! `support/ledger.rs`. Lost, duplicated and reordered must be 0; a resync only counts
//! where history could not cover the gap, and here it always can, so resyncs must be 0
//! too: the clients get the messages themselves. Nodes run with a 1 s heartbeat so that
//! dead links are found within seconds. The scenarios run one at a time (they share
//! the machine's two cores), about 20 s each.

#[path = "support/follower.rs"]
mod follower;
#[path = "support/ledger.rs"]
mod ledger;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use follower::{Follower, Options, Record};
use herald_testkit::netns::Lab;
use herald_testkit::process::NodeProcess;
use herald_testkit::proxy::FaultProxy;
use herald_testkit::redis::{RedisOptions, RedisServer};
use herald_testkit::sentinel::RedisSentinel;
use herald_testkit::{token, API_KEY};
use ledger::{Ledger, Tally};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The nodes' heartbeat: a client silent for twice this is closed (4408).
const HEARTBEAT_MS: u64 = 1_000;
/// A follower drops a connection silent for this long: two heartbeats and a margin.
const CLIENT_IDLE: Duration = Duration::from_millis(2_500);
/// Contract: a node cut off from Redis has moved its clients within this.
const MOVE_WITHIN: Duration = Duration::from_secs(5);
/// Contract: after a partition heals, nodes deliver again within this.
const DELIVER_WITHIN: Duration = Duration::from_secs(1);
/// What the assertions allow above a contract on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(750);

/// One scenario at a time: each starts several processes on a 2-core machine.
fn serial() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Redis, `n` nodes and the clients, each in its namespace. Fields drop in order: the
/// processes first, the lab (the namespaces) last.
struct Net {
    nodes: Vec<NodeProcess>,
    /// One Redis in host `redis`, or:
    redis: Option<RedisServer>,
    /// a Sentinel topology: the primary in `redis`, the replica in `replica`, three
    /// sentinels in `sentinels`.
    sentinel: Option<RedisSentinel>,
    /// The clients' own source address, apart from the test's HTTP calls (the host's
    /// main address): a partition of the clients leaves the test's view intact.
    clients: Ipv4Addr,
    lab: Lab,
}

impl Net {
    /// Builds the lab, moves this thread into the clients' namespace, starts Redis and
    /// `nodes` nodes on it.
    fn start(test: &str, nodes: usize, extra: &[(&str, &str)]) -> Net {
        let mut net = Net::hosts(nodes);
        let url = net.redis_url();
        for i in 0..nodes {
            net.start_node(test, i, &url, extra);
        }
        net
    }

    /// The lab with `nodes` node hosts, and Redis; no node started yet.
    fn hosts(nodes: usize) -> Net {
        Net::lab(nodes, false)
    }

    /// The lab with `nodes` node hosts and Redis, or a Sentinel topology.
    fn lab(nodes: usize, sentinel: bool) -> Net {
        assert!(
            Lab::available(),
            "network-fault tests need root, iproute2 and nftables (scripts/test installs them)"
        );
        let mut names = vec!["redis".to_owned(), "clients".to_owned()];
        names.extend((0..nodes).map(|i| format!("node{i}")));
        if sentinel {
            names.extend(["replica".to_owned(), "sentinels".to_owned()]);
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut lab = Lab::new(&names);
        let clients = lab.add_address("clients");
        lab.enter("clients");
        let place = |name: &str| (lab.host(name).ns.clone(), lab.addr(name));
        let (redis, sentinel) = if sentinel {
            let topology = RedisSentinel::start_in_netns(
                [place("redis"), place("replica")],
                place("sentinels"),
            );
            (None, Some(topology))
        } else {
            let redis = RedisServer::start_with(RedisOptions {
                netns: Some(lab.host("redis").ns.clone()),
                ..RedisOptions::default()
            });
            (Some(redis), None)
        };
        Net {
            nodes: Vec::new(),
            redis,
            sentinel,
            clients,
            lab,
        }
    }

    /// `redis://<redis host>:<port>`, or the sentinels' `redis-sentinel://…` URL.
    fn redis_url(&self) -> String {
        match (&self.redis, &self.sentinel) {
            (Some(r), _) => format!("redis://{}:{}", self.lab.addr("redis"), r.port()),
            (None, Some(s)) => s.url(),
            (None, None) => unreachable!("a lab has Redis"),
        }
    }

    fn start_node(&mut self, test: &str, i: usize, redis_url: &str, extra: &[(&str, &str)]) {
        let prefix = format!("h{}:{test}:", std::process::id());
        let heartbeat = HEARTBEAT_MS.to_string();
        let mut env: Vec<(&str, &str)> = vec![
            ("HERALD_REDIS_URL", redis_url),
            ("HERALD_REDIS_PREFIX", &prefix),
            ("HERALD_HISTORY_SIZE", "5000"),
            ("HERALD_HEARTBEAT_MS", &heartbeat),
        ];
        env.extend_from_slice(extra);
        let name = format!("node{i}");
        let host = self.lab.host(&name).clone();
        self.nodes.push(NodeProcess::start_in_netns(
            &host.ns,
            host.addr,
            &format!("{test}{i}"),
            &env,
        ));
    }

    async fn wait_ready(&self) {
        for n in &self.nodes {
            n.wait_ready(Duration::from_secs(20)).await;
        }
    }

    /// The addresses of the nodes `which`.
    fn node_addrs(&self, which: &[usize]) -> Vec<Ipv4Addr> {
        which
            .iter()
            .flat_map(|i| self.lab.addrs(&format!("node{i}")))
            .collect()
    }
}

/// A tokio runtime on this thread, in the namespace it is in now.
fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn users(test: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{test}-u{i}")).collect()
}

/// A follower per user, each on the personal channel, from the clients' address;
/// follower `i` starts at `targets[i % len]` and moves to the next one on a reconnect.
fn followers(net: &Net, users: &[String], targets: &[SocketAddr]) -> Vec<Follower> {
    users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            Follower::start(Options {
                targets: targets.to_vec(),
                start: i,
                source: Some(net.clients.into()),
                token: token(u, &[], &[]),
                idle: Some(CLIENT_IDLE),
                ..Options::default()
            })
        })
        .collect()
}

async fn joined(followers: &[Follower], users: &[String]) {
    follower::assert_joined(followers, users, Duration::from_secs(20)).await;
}

/// Publishers at work in a push load, each at most one publish per 20 ms: up to
/// 200 a second, fewer when the network is slow.
const PUBLISHERS: usize = 4;

/// Publishes to the users' personal channels, round robin, through the nodes `via`
/// (round robin too), from [`PUBLISHERS`] tasks until `stop`, recording what was
/// accepted.
fn push_load(
    via: Vec<String>,
    users: Vec<String>,
    stop: CancellationToken,
) -> (tokio::task::JoinHandle<()>, Arc<Ledger>) {
    push_load_with(PUBLISHERS, via, users, stop)
}

/// [`push_load`] with `publishers` tasks (a divisor of the number of users, so that
/// each channel has one publisher).
fn push_load_with(
    publishers: usize,
    via: Vec<String>,
    users: Vec<String>,
    stop: CancellationToken,
) -> (tokio::task::JoinHandle<()>, Arc<Ledger>) {
    let ledger = Arc::new(Ledger::default());
    let (via, users) = (Arc::new(via), Arc::new(users));
    let workers: Vec<_> = (0..publishers)
        .map(|w| {
            let (l, via, users, stop) = (
                Arc::clone(&ledger),
                Arc::clone(&via),
                Arc::clone(&users),
                stop.clone(),
            );
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut i = w;
                while !stop.is_cancelled() {
                    let body = json!({"user": users[i % users.len()], "data": {"i": i}});
                    l.publish(&http, &via[i % via.len()], API_KEY, &body).await;
                    i += publishers;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    let task = tokio::spawn(async move {
        for w in workers {
            let _ = w.await;
        }
    });
    (task, ledger)
}

/// Stops the load, waits until every follower has every accepted message (or `wait`
/// runs out), stops them and counts.
async fn finish(
    load: (tokio::task::JoinHandle<()>, Arc<Ledger>),
    stop: CancellationToken,
    followers: Vec<Follower>,
    users: &[String],
    wait: Duration,
) -> (Tally, Vec<Record>, Arc<Ledger>) {
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), load.0).await;
    let ledger = load.1;
    let channels = |i: usize| vec![format!("user:{}", users[i])];
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline
        && !followers
            .iter()
            .enumerate()
            .all(|(i, f)| ledger.caught_up(&f.snapshot(), &channels(i)))
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let records = follower::stop_all(followers).await;
    let tally = ledger.tally(&records, channels);
    (tally, records, ledger)
}

/// Prints the scenario's counts and asserts none was lost, duplicated or reordered,
/// and that no resync replaced messages history still had.
fn report(scenario: &str, tally: &Tally, ledger: &Ledger, extra: &str) {
    println!(
        "measured: {scenario}: sent {} delivered {} lost {} duplicated {} reordered {} \
         resyncs {} unconfirmed {}{extra}",
        ledger.total(),
        tally.delivered,
        tally.lost,
        tally.duplicates,
        tally.violations,
        tally.discontinuities,
        ledger.unconfirmed(),
    );
    assert!(ledger.total() > 0, "{scenario}: nothing was accepted");
    tally.assert_exact();
}

/// How long after `since` each follower's first welcome from node `node` came; `None`
/// for a follower that has none.
fn moved_after(records: &[Record], node: &str, since: Instant) -> Vec<Option<Duration>> {
    records
        .iter()
        .map(|r| {
            r.welcomes
                .iter()
                .find(|(at, n)| *at > since && n == node)
                .map(|(at, _)| at.duration_since(since))
        })
        .collect()
}

/// `herald_connections` of the node at `http`, asked within 2 s (-1: no answer).
async fn connections(http: &str) -> f64 {
    let asked = reqwest::Client::new()
        .get(format!("{http}/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    match asked {
        Ok(r) => match r.text().await {
            Ok(text) => herald_testkit::metric_value(&text, "herald_connections"),
            Err(_) => -1.0,
        },
        Err(_) => -1.0,
    }
}

async fn readyz(http: &str) -> bool {
    let r = reqwest::Client::new()
        .get(format!("{http}/readyz"))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    matches!(r, Ok(r) if r.status() == 200)
}

/// Waits until `/readyz` of every `http` says `want`, within `wait`; returns when each
/// did, from `since`.
async fn wait_readiness(http: &[String], want: bool, since: Instant, wait: Duration) -> Duration {
    for h in http {
        while readyz(h).await != want {
            assert!(since.elapsed() < wait, "{h}/readyz never turned {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    since.elapsed()
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// One node loses Redis while its clients stay connected to it, and another node is
/// fine: within 5 s the cut-off node sends its clients `reconnect` (reason
/// `unavailable`) and 4503, and they resume on the other node from history, missing
/// nothing. After the heal the node is ready again within a second.
#[test]
fn a_node_cut_off_from_redis_moves_its_clients_to_a_ready_peer() {
    let _one = serial();
    let net = Net::start("cutoff", 2, &[]);
    block_on(async {
        net.wait_ready().await;
        let users = users("cutoff", 20);
        let targets: Vec<SocketAddr> = net.nodes.iter().map(|n| n.addr).collect();
        // Everyone on node 0 first (start 0, and every reconnect goes to node 1).
        let fs: Vec<Follower> = users
            .iter()
            .map(|u| {
                Follower::start(Options {
                    targets: targets.clone(),
                    source: Some(net.clients.into()),
                    token: token(u, &[], &[]),
                    idle: Some(CLIENT_IDLE),
                    ..Options::default()
                })
            })
            .collect();
        joined(&fs, &users).await;
        let stop = CancellationToken::new();
        let load = push_load(vec![net.nodes[1].http()], users.clone(), stop.clone());
        tokio::time::sleep(Duration::from_secs(2)).await;

        let cut = net
            .lab
            .partition(&[net.lab.addr("redis")], &net.node_addrs(&[0]));
        let t0 = Instant::now();
        let unready =
            wait_readiness(&[net.nodes[0].http()], false, t0, Duration::from_secs(10)).await;
        // Every follower welcomed by node 1 since the cut.
        let deadline = t0 + Duration::from_secs(20);
        while fs
            .iter()
            .any(|f| moved_after(&[f.snapshot()], &net.nodes[1].id, t0)[0].is_none())
        {
            assert!(
                Instant::now() < deadline,
                "clients were not moved off the cut-off node"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let moves: Vec<Duration> = fs
            .iter()
            .filter_map(|f| moved_after(&[f.snapshot()], &net.nodes[1].id, t0)[0])
            .collect();
        let first = *moves.iter().min().unwrap();
        let last = *moves.iter().max().unwrap();
        // The partition lasts 8 s in all; messages keep flowing through node 1.
        tokio::time::sleep(Duration::from_secs(8).saturating_sub(t0.elapsed())).await;
        net.lab.heal(cut);
        let healed = Instant::now();
        let ready = wait_readiness(
            &[net.nodes[0].http()],
            true,
            healed,
            Duration::from_secs(15),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;

        let (tally, records, ledger) =
            finish(load, stop, fs, &users, Duration::from_secs(15)).await;
        let unavailable = records
            .iter()
            .filter(|r| r.reconnects.iter().any(|(_, why)| why == "unavailable"))
            .count();
        report(
            "cut-off node",
            &tally,
            &ledger,
            &format!(
                "; /readyz 503 after {}; clients moved {}..{} after the cut ({unavailable} of {} \
                 told `unavailable`); ready {} after the heal",
                secs(unready),
                secs(first),
                secs(last),
                records.len(),
                secs(ready)
            ),
        );
        assert_eq!(
            unavailable,
            records.len(),
            "every client was told `unavailable`"
        );
        assert!(last <= MOVE_WITHIN + SLACK, "moved after {last:?}");
        assert!(
            ready <= DELIVER_WITHIN + SLACK,
            "ready {ready:?} after the heal"
        );
    });
}

/// Every node loses Redis at once while a push load runs, then the partition heals:
/// no node can serve, so nobody is moved (no reconnect storm); the clients stay on
/// their sockets and, within a second of the heal, get what is published again, and
/// in the end everything accepted, once and in order.
#[test]
fn a_partition_of_every_node_from_redis_heals_under_load() {
    let _one = serial();
    let net = Net::start("heal", 2, &[]);
    block_on(async {
        net.wait_ready().await;
        let users = users("heal", 20);
        let targets: Vec<SocketAddr> = net.nodes.iter().map(|n| n.addr).collect();
        let fs = followers(&net, &users, &targets);
        joined(&fs, &users).await;
        let stop = CancellationToken::new();
        let via: Vec<String> = net.nodes.iter().map(NodeProcess::http).collect();
        let load = push_load(via.clone(), users.clone(), stop.clone());
        tokio::time::sleep(Duration::from_secs(3)).await;

        let cut = net
            .lab
            .partition(&[net.lab.addr("redis")], &net.node_addrs(&[0, 1]));
        let t0 = Instant::now();
        let unready = wait_readiness(&via, false, t0, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_secs(8).saturating_sub(t0.elapsed())).await;
        let before = load.1.total();
        net.lab.heal(cut);
        let healed = Instant::now();
        // The first publish accepted after the heal: every follower of its channel
        // must have it within a second of the heal.
        let deadline = healed + Duration::from_secs(15);
        while load.1.total() == before {
            assert!(
                Instant::now() < deadline,
                "no publish accepted after the heal"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let accepted = healed.elapsed();
        let targets: Vec<(usize, String, u64)> = users
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let c = format!("user:{u}");
                let last = load.1.last(&c);
                (i, c, last)
            })
            .collect();
        for (i, channel, last) in &targets {
            assert!(
                fs[*i]
                    .wait_for(channel, *last, Duration::from_secs(15))
                    .await,
                "{channel} never got offset {last} after the heal"
            );
        }
        let delivered = healed.elapsed();
        let ready = wait_readiness(&via, true, healed, Duration::from_secs(15)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;

        let (tally, records, ledger) =
            finish(load, stop, fs, &users, Duration::from_secs(15)).await;
        let reconnected = records.iter().filter(|r| r.connects() > 1).count();
        report(
            "every node cut off, healed",
            &tally,
            &ledger,
            &format!(
                "; /readyz 503 after {}; after the heal: first publish accepted {}, delivered \
                 to every client {}, nodes ready {}; clients that reconnected {reconnected}",
                secs(unready),
                secs(accepted),
                secs(delivered),
                secs(ready)
            ),
        );
        assert_eq!(reconnected, 0, "nobody may move when no node can serve");
        assert!(
            delivered <= DELIVER_WITHIN + SLACK,
            "delivering again {delivered:?} after the heal"
        );
    });
}

/// The clients lose their node (packets dropped both ways: no FIN, no reset) while
/// the node keeps Redis: the node closes their sessions within two heartbeats, the
/// clients give up the silent socket within theirs, and they resume on the other node
/// with nothing lost.
#[test]
fn clients_cut_off_from_their_node_resume_on_another() {
    let _one = serial();
    let net = Net::start("clientcut", 2, &[]);
    block_on(async {
        net.wait_ready().await;
        let users = users("clientcut", 20);
        let targets: Vec<SocketAddr> = net.nodes.iter().map(|n| n.addr).collect();
        let fs: Vec<Follower> = users
            .iter()
            .map(|u| {
                Follower::start(Options {
                    targets: targets.clone(),
                    source: Some(net.clients.into()),
                    token: token(u, &[], &[]),
                    idle: Some(CLIENT_IDLE),
                    ..Options::default()
                })
            })
            .collect();
        joined(&fs, &users).await;
        let stop = CancellationToken::new();
        let load = push_load(vec![net.nodes[1].http()], users.clone(), stop.clone());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let node0 = net.nodes[0].http();
        let before = connections(&node0).await;
        assert_eq!(before, users.len() as f64, "everyone on node 0");

        let cut = net.lab.partition(&[net.clients], &net.node_addrs(&[0]));
        let t0 = Instant::now();
        // The node's side: the sessions end (4408) after two heartbeats of silence.
        while connections(&node0).await != 0.0 {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "node 0 kept the dead sessions"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let node_side = t0.elapsed();
        let deadline = t0 + Duration::from_secs(15);
        while fs
            .iter()
            .any(|f| moved_after(&[f.snapshot()], &net.nodes[1].id, t0)[0].is_none())
        {
            assert!(
                Instant::now() < deadline,
                "clients did not leave the silent node"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let client_side = fs
            .iter()
            .filter_map(|f| moved_after(&[f.snapshot()], &net.nodes[1].id, t0)[0])
            .max()
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        net.lab.heal(cut);

        let (tally, _, ledger) = finish(load, stop, fs, &users, Duration::from_secs(15)).await;
        report(
            "clients cut off from their node",
            &tally,
            &ledger,
            &format!(
                "; node closed the silent sessions after {}, clients resumed on the other \
                 node after {} (heartbeat {HEARTBEAT_MS} ms, client idle limit {} ms)",
                secs(node_side),
                secs(client_side),
                CLIENT_IDLE.as_millis()
            ),
        );
        let heartbeat = Duration::from_millis(HEARTBEAT_MS);
        assert!(
            node_side <= heartbeat * 3 + SLACK,
            "node noticed after {node_side:?}"
        );
        assert!(
            client_side <= CLIENT_IDLE + heartbeat + SLACK,
            "clients noticed after {client_side:?}"
        );
    });
}

/// 5 % of the packets lost at random between the clients and the nodes and between
/// the nodes and Redis, both ways, under a push load: TCP repairs what it can, the
/// protocol the rest; nothing lost, duplicated or reordered.
#[test]
fn five_percent_packet_loss_everywhere_loses_nothing() {
    let _one = serial();
    let net = Net::start("loss", 2, &[]);
    block_on(async {
        net.wait_ready().await;
        let users = users("loss", 20);
        let targets: Vec<SocketAddr> = net.nodes.iter().map(|n| n.addr).collect();
        let fs = followers(&net, &users, &targets);
        joined(&fs, &users).await;
        let nodes = net.node_addrs(&[0, 1]);
        let to_clients = net.lab.loss(&[net.clients], &nodes, 5);
        let to_redis = net.lab.loss(&[net.lab.addr("redis")], &nodes, 5);
        let stop = CancellationToken::new();
        let via: Vec<String> = net.nodes.iter().map(NodeProcess::http).collect();
        let load = push_load(via, users.clone(), stop.clone());
        tokio::time::sleep(Duration::from_secs(12)).await;
        stop.cancel();
        tokio::time::sleep(Duration::from_secs(2)).await;
        net.lab.heal(to_clients);
        net.lab.heal(to_redis);
        let (tally, records, ledger) =
            finish(load, stop, fs, &users, Duration::from_secs(20)).await;
        let reconnects: usize = records.iter().map(|r| r.connects() - 1).sum();
        report(
            "5 % loss",
            &tally,
            &ledger,
            &format!("; reconnects {reconnects}"),
        );
    });
}

/// 100 ms (+ up to 40 ms of jitter) each way between the clients and the nodes and
/// between the nodes and Redis, under a push load: everything arrives, late, once and
/// in order.
#[test]
fn a_slow_jittery_network_loses_nothing() {
    let _one = serial();
    let mut net = Net::hosts(2);
    block_on(async {
        let latency = Duration::from_millis(100);
        let jitter = Duration::from_millis(40);
        // Nodes reach Redis through a proxy in the clients' namespace, and the clients
        // reach each node through one of their own.
        let redis: SocketAddr = net
            .redis_url()
            .trim_start_matches("redis://")
            .parse()
            .unwrap();
        let listen: SocketAddr = SocketAddr::new(net.lab.addr("clients").into(), 0);
        let to_redis = FaultProxy::start_on(listen, redis).await;
        to_redis.set_latency(latency, jitter);
        let url = format!("redis://{}", to_redis.addr());
        for i in 0..2 {
            net.start_node("slow", i, &url, &[]);
        }
        net.wait_ready().await;
        let mut to_nodes = Vec::new();
        for n in &net.nodes {
            let p = FaultProxy::start(n.addr).await;
            p.set_latency(latency, jitter);
            to_nodes.push(p);
        }
        let users = users("slow", 20);
        let targets: Vec<SocketAddr> = to_nodes.iter().map(FaultProxy::addr).collect();
        let fs: Vec<Follower> = users
            .iter()
            .enumerate()
            .map(|(i, u)| {
                Follower::start(Options {
                    targets: targets.clone(),
                    start: i,
                    token: token(u, &[], &[]),
                    idle: Some(CLIENT_IDLE),
                    ..Options::default()
                })
            })
            .collect();
        joined(&fs, &users).await;
        let stop = CancellationToken::new();
        let via: Vec<String> = net.nodes.iter().map(NodeProcess::http).collect();
        // Each publish waits for a round trip to Redis through the slow link.
        let load = push_load_with(20, via, users.clone(), stop.clone());
        tokio::time::sleep(Duration::from_secs(12)).await;
        let (tally, records, ledger) =
            finish(load, stop, fs, &users, Duration::from_secs(20)).await;
        let reconnects: usize = records.iter().map(|r| r.connects() - 1).sum();
        report(
            "100 ms + 40 ms jitter",
            &tally,
            &ledger,
            &format!("; reconnects {reconnects}"),
        );
        drop(to_nodes);
        drop(to_redis);
    });
}

/// The Redis primary is cut off from everyone (nodes, replica, sentinels) while a push
/// load runs: the sentinels promote the replica, the nodes follow it through the
/// sentinels, and later the partition heals and the old primary rejoins as a replica.
/// A promoted replica starts new epochs (replication is asynchronous, so it may lack
/// the primary's last writes): each channel gets one `resync`, and an accepted message
/// may be announced by it instead of delivered; nothing else is missed, nothing comes
/// twice or out of order.
#[test]
fn a_partitioned_sentinel_primary_fails_over_and_heals_under_load() {
    let _one = serial();
    let mut net = Net::lab(2, true);
    let url = net.redis_url();
    for i in 0..2 {
        net.start_node("sentinel", i, &url, &[]);
    }
    block_on(async {
        net.wait_ready().await;
        let users = users("sentinel", 20);
        let targets: Vec<SocketAddr> = net.nodes.iter().map(|n| n.addr).collect();
        let fs = followers(&net, &users, &targets);
        joined(&fs, &users).await;
        let stop = CancellationToken::new();
        let via: Vec<String> = net.nodes.iter().map(NodeProcess::http).collect();
        let load = push_load(via.clone(), users.clone(), stop.clone());
        tokio::time::sleep(Duration::from_secs(3)).await;

        let mut others = net.node_addrs(&[0, 1]);
        others.extend(net.lab.addrs("replica"));
        others.extend(net.lab.addrs("sentinels"));
        let cut = net.lab.partition(&net.lab.addrs("redis"), &others);
        let t0 = Instant::now();
        let before = load.1.total();
        // Publishing works again once a node reached the promoted replica.
        let deadline = t0 + Duration::from_secs(30);
        tokio::time::sleep(Duration::from_secs(3)).await;
        while load.1.total() <= before + 50 {
            assert!(
                Instant::now() < deadline,
                "publishing never resumed after the failover"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let failed_over = t0.elapsed();
        let ready = wait_readiness(&via, true, t0, Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        // The old primary comes back; the sentinels make it a replica (within their
        // failover timeout), meanwhile the nodes keep using the new one.
        net.lab.heal(cut);
        tokio::time::sleep(Duration::from_secs(3)).await;

        let (tally, records, ledger) =
            finish(load, stop, fs, &users, Duration::from_secs(20)).await;
        // Each channel's new epoch numbers from 1 again, reusing offsets of the old
        // one: a duplicate is the same (epoch, offset) twice.
        let duplicates: usize = records
            .iter()
            .flat_map(|r| r.channels.values())
            .map(|c| {
                let unique: std::collections::BTreeSet<&(String, u64)> =
                    c.messages.iter().collect();
                c.messages.len() - unique.len()
            })
            .sum();
        // Per channel: a message missing where no resync announced a new epoch is lost.
        let (mut silent, mut announced) = (0, 0);
        for (i, r) in records.iter().enumerate() {
            let one = ledger.tally(std::slice::from_ref(r), |_| {
                vec![format!("user:{}", users[i])]
            });
            if one.discontinuities == 0 {
                silent += one.lost;
            } else {
                announced += one.lost;
            }
        }
        println!(
            "measured: sentinel primary partitioned: sent {} delivered {} lost {silent} \
             duplicated {duplicates} reordered {} resyncs {} (deliveries that reused an offset of \
             the old epoch: {}; accepted messages announced by a resync: {announced}) unconfirmed {}; \
             publishing again {} after the cut, all nodes ready {}",
            ledger.total(),
            tally.delivered,
            tally.violations,
            tally.discontinuities,
            tally.duplicates,
            ledger.unconfirmed(),
            secs(failed_over),
            secs(ready),
        );
        assert_eq!(
            (silent, duplicates, tally.violations),
            (0, 0, 0),
            "{tally:?}"
        );
        assert!(
            tally.discontinuities <= 2 * users.len() as u64,
            "at most a resync per channel and node switch: {tally:?}"
        );
    });
}
