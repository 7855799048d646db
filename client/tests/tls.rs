//! The SDK over TLS against a real TLS endpoint: HAProxy terminates TLS with a
//! certificate this test makes (rcgen: a CA and a server certificate for 127.0.0.1 and
//! `localhost`) in front of real `herald` nodes sharing a real Redis. The nodes speak
//! plain HTTP/WebSocket, as in production behind a TLS-terminating balancer.
//!
//! HAProxy listens with TLS on one port for all nodes (`leastconn`) and on one port per
//! node; nodes that advertise `wss://` say that per-node port in `HERALD_PUBLIC_URL`, so
//! `/v1/connect` asked over `https://` answers `wss://` URLs. Its admin socket lets a
//! test cut the proxied connections while HAProxy keeps running. The configuration is
//! generated here; `deploy/haproxy-*.cfg` stay plain.
//!
//! Traffic only to 127.0.0.1.

#![cfg(feature = "tls")]

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use herald_client::{Client, ClientBuilder, DisconnectReason, Events, State};
use herald_testkit::process::{free_port, NodeProcess};
use herald_testkit::redis::RedisServer;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use serde_json::json;
use support::{assert_exactly_once, publish, token_for, Publisher, Recorder, WAIT};

/// A test CA and a server certificate it signed.
struct Pki {
    /// The CA's certificate: what a client is told to trust.
    ca_pem: String,
    /// The server certificate followed by its private key (HAProxy's `crt` file).
    server_pem: String,
}

/// A fresh CA named `name`, and a certificate from it for `127.0.0.1` and `localhost`.
fn pki(name: &str) -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, format!("herald test CA {name}"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    server
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let key = KeyPair::generate().unwrap();
    let cert = server.signed_by(&key, &*ca).unwrap();
    Pki {
        ca_pem: ca.pem(),
        server_pem: format!("{}{}", cert.pem(), key.serialize_pem()),
    }
}

/// A running HAProxy terminating TLS, killed (and its files removed) on drop.
struct TlsBalancer {
    /// The TLS port in front of every node.
    port: u16,
    /// The TLS port in front of node i alone.
    node_ports: Vec<u16>,
    dir: PathBuf,
    child: Child,
}

impl TlsBalancer {
    /// Starts HAProxy with `pem` (certificate and key) on `port` (all `nodes`) and on
    /// `node_ports[i]` (node i), and waits until every port accepts connections. `Err`
    /// when HAProxy exits first (most likely a port taken since `free_port()` chose it).
    fn start(
        pem: &str,
        port: u16,
        node_ports: &[u16],
        nodes: &[&NodeProcess],
    ) -> Result<TlsBalancer, String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "herald-tls-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let crt = dir.join("server.pem");
        std::fs::write(&crt, pem).unwrap();
        let admin = dir.join("admin.sock");
        let mut cfg = format!(
            "global
    log stdout format raw local0 notice
    stats socket {admin} level admin

defaults
    mode http
    log global
    timeout connect 5s
    timeout http-request 10s
    timeout client 30s
    timeout server 30s
    timeout tunnel 75s

frontend all
    bind 127.0.0.1:{port} ssl crt {crt}
    default_backend nodes

backend nodes
    balance leastconn
",
            admin = admin.display(),
            crt = crt.display(),
        );
        for node in nodes {
            cfg.push_str(&format!("    server {} {}\n", node.id, node.addr));
        }
        for (node, p) in nodes.iter().zip(node_ports) {
            cfg.push_str(&format!(
                "
frontend direct_{id}
    bind 127.0.0.1:{p} ssl crt {crt}
    default_backend only_{id}

backend only_{id}
    server {id} {addr}
",
                id = node.id,
                addr = node.addr,
                crt = crt.display(),
            ));
        }
        let cfg_path = dir.join("haproxy.cfg");
        std::fs::write(&cfg_path, cfg).unwrap();
        let log = dir.join("haproxy.log");
        let mut child = Command::new("haproxy")
            .arg("-f")
            .arg(&cfg_path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("haproxy.err")).unwrap())
            .spawn()
            .expect("spawn haproxy (apt-get install haproxy)");
        let deadline = Instant::now() + Duration::from_secs(10);
        let ports: Vec<u16> = std::iter::once(port)
            .chain(node_ports.iter().copied())
            .collect();
        while !ports
            .iter()
            .all(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok())
        {
            if let Ok(Some(status)) = child.try_wait() {
                let err = format!(
                    "haproxy exited ({status}): {}",
                    std::fs::read_to_string(dir.join("haproxy.err")).unwrap_or_default()
                );
                let _ = std::fs::remove_dir_all(&dir);
                return Err(err);
            }
            assert!(Instant::now() < deadline, "haproxy did not listen in 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(TlsBalancer {
            port,
            node_ports: node_ports.to_vec(),
            dir,
            child,
        })
    }

    /// `wss://127.0.0.1:<port>/ws`, through the balancer.
    fn wss_url(&self) -> String {
        format!("wss://127.0.0.1:{}/ws", self.port)
    }

    /// `https://127.0.0.1:<port>`, through the balancer.
    fn https(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Runs one command on HAProxy's admin socket; returns its answer.
    fn admin(&self, command: &str) -> String {
        let mut socket = UnixStream::connect(self.dir.join("admin.sock")).expect("admin socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        socket.write_all(format!("{command}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = socket.read_to_string(&mut answer);
        answer
    }

    /// Cuts every connection proxied to `server` (HAProxy itself keeps running).
    fn drop_sessions(&self, server: &str) {
        for backend in ["nodes".to_owned(), format!("only_{server}")] {
            let answer = self.admin(&format!("shutdown sessions server {backend}/{server}"));
            assert!(answer.trim().is_empty(), "haproxy admin: {answer}");
        }
    }
}

impl Drop for TlsBalancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Redis, two nodes and HAProxy with `pki`'s certificate in front of them. With
/// `advertise_wss`, each node's `HERALD_PUBLIC_URL` is its own `wss://` port on HAProxy;
/// otherwise nodes advertise their plain `ws://` address (the default).
struct Setup {
    lb: TlsBalancer,
    nodes: Vec<NodeProcess>,
    _redis: RedisServer,
}

impl Setup {
    async fn start(test: &str, pki: &Pki, advertise_wss: bool) -> Setup {
        support::logs();
        let redis = RedisServer::start();
        let url = redis.url();
        let prefix = format!("t{}:tls-{test}:", std::process::id());
        // The TLS ports are chosen before the nodes start (a node advertises its own), and
        // any socket on the machine may take one before HAProxy binds it: then start over
        // with new ports, as support/haproxy.rs does.
        let mut failures = Vec::new();
        let (lb, nodes) = loop {
            let port = free_port();
            let node_ports = [free_port(), free_port()];
            let mut nodes = Vec::new();
            for (i, p) in node_ports.iter().enumerate() {
                let public = format!("wss://127.0.0.1:{p}/ws");
                let mut env = vec![
                    ("HERALD_REDIS_URL", url.as_str()),
                    ("HERALD_REDIS_PREFIX", prefix.as_str()),
                    ("HERALD_HISTORY_SIZE", "10000"),
                ];
                if advertise_wss {
                    env.push(("HERALD_PUBLIC_URL", public.as_str()));
                }
                nodes.push(NodeProcess::start(&format!("node{i}"), &env));
            }
            for node in &nodes {
                node.wait_ready(WAIT).await;
            }
            match TlsBalancer::start(
                &pki.server_pem,
                port,
                &node_ports,
                &nodes.iter().collect::<Vec<_>>(),
            ) {
                Ok(lb) => break (lb, nodes),
                Err(e) if failures.len() < 4 => failures.push(e),
                Err(e) => panic!("haproxy failed 5 times: {failures:?} {e}"),
            }
        };
        Setup {
            lb,
            nodes,
            _redis: redis,
        }
    }
}

fn token(user: &str) -> String {
    token_for(user, &["room:*"], &["room:*"], 3600)
}

/// A builder that trusts `ca` besides the built-in roots, with short backoff.
fn trusting(ca: &str) -> ClientBuilder {
    Client::builder()
        .tls_root_certificates_pem(ca)
        .backoff(Duration::from_millis(100), Duration::from_millis(500))
}

fn start(builder: ClientBuilder, user: &str) -> (Client, Recorder) {
    let (client, events): (Client, Events) = builder.token(token(user)).start().unwrap();
    (client, Recorder::start(events))
}

#[tokio::test]
async fn wss_through_haproxy_subscribes_receives_and_publishes() {
    let pki = pki("main");
    let setup = Setup::start("wss", &pki, false).await;
    let room = "room:tls";
    let (client, rec) = start(trusting(&pki.ca_pem).url(setup.lb.wss_url()), "alice");

    client.subscribe(room).await.expect("subscribe over wss");
    let first = publish(&setup.nodes[0].http(), room, json!({"n": 0})).await;
    let second = client
        .publish(room, &json!({"n": 1}))
        .await
        .expect("publish over wss");
    assert_eq!(second.offset, first + 1);
    rec.wait("both messages over wss", WAIT, |r| {
        r.offsets(room).len() == 2
    })
    .await;
    rec.with(|r| {
        assert_eq!(r.offsets(room), vec![first, first + 1]);
        let data: Vec<_> = r.messages[room]
            .iter()
            .map(|m| m.data["n"].clone())
            .collect();
        assert_eq!(data, vec![json!(0), json!(1)]);
        assert_eq!(r.connected.len(), 1, "{:?}", r.disconnected);
        assert_eq!(r.connected[0].url, setup.lb.wss_url());
        assert_eq!(r.connected[0].user, "alice");
    });
    client.close().await;
}

#[tokio::test]
async fn discovery_over_https_answers_wss_nodes() {
    let pki = pki("discovery");
    let setup = Setup::start("discovery", &pki, true).await;
    let room = "room:found";
    // Only the test CA: the discovered node URLs are verified like the balancer's.
    let (client, rec) = start(
        trusting(&pki.ca_pem)
            .tls_built_in_roots(false)
            .discover(setup.lb.https()),
        "bob",
    );
    client.subscribe(room).await.expect("subscribe");
    rec.wait("connected", WAIT, |r| !r.connected.is_empty())
        .await;
    let (url, node) = rec.with(|r| (r.connected[0].url.clone(), r.connected[0].node.clone()));
    let i = setup
        .nodes
        .iter()
        .position(|n| n.id == node)
        .expect("a known node");
    assert_eq!(
        url,
        format!("wss://127.0.0.1:{}/ws", setup.lb.node_ports[i]),
        "connected to the URL /v1/connect answered over https"
    );
    let offset = publish(&setup.nodes[1 - i].http(), room, json!({"hi": "tls"})).await;
    rec.wait("the message", WAIT, |r| r.offsets(room) == vec![offset])
        .await;
    client.close().await;
}

#[tokio::test]
async fn an_untrusted_certificate_is_refused_without_plaintext_fallback() {
    let served = pki("served");
    let other = pki("other");
    let setup = Setup::start("untrusted", &served, false).await;
    // Trusts another CA (plus the built-in roots), or only the built-in roots.
    let (wrong_ca, wrong_rec) = start(trusting(&other.ca_pem).url(setup.lb.wss_url()), "carol");
    let (public_only, public_rec) = start(
        Client::builder()
            .discover(setup.lb.https())
            .backoff(Duration::from_millis(100), Duration::from_millis(500)),
        "dave",
    );
    for (who, rec) in [("wss", &wrong_rec), ("https", &public_rec)] {
        rec.wait("three refused attempts", WAIT, |r| {
            r.disconnected.len() >= 3
        })
        .await;
        rec.with(|r| {
            assert!(
                r.connected.is_empty(),
                "{who}: connected: {:?}",
                r.connected
            );
            for d in &r.disconnected {
                match &d.reason {
                    DisconnectReason::Tls(m) => assert!(
                        m.contains("UnknownIssuer") && m.contains("trusted roots"),
                        "{who}: {m}"
                    ),
                    other => panic!("{who}: not a TLS error: {other:?}"),
                }
                assert!(d.retry_in.is_some(), "{who}: keeps trying, over TLS");
            }
        });
    }
    assert!(matches!(
        wrong_ca.state(),
        State::Reconnecting | State::Connecting
    ));

    // The right CA, but nodes that advertise plain ws:// URLs: refused too, since the
    // token would travel in clear after the application asked for https.
    let (mixed, mixed_rec) = start(trusting(&served.ca_pem).discover(setup.lb.https()), "erin");
    mixed_rec
        .wait("a refused plaintext answer", WAIT, |r| {
            !r.disconnected.is_empty()
        })
        .await;
    mixed_rec.with(|r| {
        assert!(r.connected.is_empty(), "connected: {:?}", r.connected);
        match &r.disconnected[0].reason {
            DisconnectReason::NoEndpoint(m) => assert!(m.contains("plaintext"), "{m}"),
            other => panic!("not refused for plaintext: {other:?}"),
        }
    });

    // The TLS port is TLS only: a plain ws:// to it fails, so none of these tests can
    // pass over plaintext by accident.
    let plain = format!("ws://127.0.0.1:{}/ws", setup.lb.port);
    let (plain_client, plain_rec) = start(trusting(&served.ca_pem).url(plain), "gina");
    plain_rec
        .wait("a refused plaintext attempt", WAIT, |r| {
            !r.disconnected.is_empty()
        })
        .await;
    plain_rec.with(|r| assert!(r.connected.is_empty(), "{:?}", r.connected));

    // No connection ever reached a node.
    for node in &setup.nodes {
        let sessions =
            herald_testkit::metric(&node.http(), "herald_connections_accepted_total").await;
        assert_eq!(sessions, 0.0, "{} accepted a connection", node.id);
    }
    for client in [wrong_ca, public_only, mixed, plain_client] {
        client.close().await;
    }
}

#[tokio::test]
async fn reconnects_over_tls_after_haproxy_drops_the_connection() {
    let pki = pki("drop");
    let setup = Setup::start("drop", &pki, false).await;
    let room = "room:steady";
    let (client, rec) = start(trusting(&pki.ca_pem).url(setup.lb.wss_url()), "frank");
    client.subscribe(room).await.expect("subscribe");
    let publisher = Publisher::start(
        setup.nodes[0].http(),
        vec![room.to_owned()],
        Duration::from_millis(10),
    );
    rec.wait("messages flowing", WAIT, |r| r.offsets(room).len() >= 10)
        .await;

    let node = rec.with(|r| r.connected[0].node.clone());
    setup.lb.drop_sessions(&node);
    rec.wait("a second session over wss", WAIT, |r| {
        r.connected.len() >= 2
    })
    .await;
    let seen = publisher.count();
    publisher.wait_count(seen + 20).await;
    let accepted = publisher.stop().await;
    let last = accepted[room].last().unwrap().0;
    rec.wait("every message", WAIT, |r| r.last(room) >= last)
        .await;
    rec.with(|r| {
        assert!(
            matches!(
                r.disconnected[0].reason,
                DisconnectReason::ConnectionLost(_) | DisconnectReason::Closed { .. }
            ),
            "{:?}",
            r.disconnected[0]
        );
        assert!(r.connected.iter().all(|c| c.url == setup.lb.wss_url()));
        assert_exactly_once("frank", r, room, &accepted[room]);
    });
    client.close().await;
}
