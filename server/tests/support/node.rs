//! A Herald node in the test process, on 127.0.0.1 port 0, with its own config.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use herald_server::auth::{now_secs, Claims, TokenSigner};
use herald_server::Config;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The JWT secret of test nodes.
pub const SECRET: &str = herald_testkit::SECRET;
/// The API key of test nodes.
pub const API_KEY: &str = herald_testkit::API_KEY;

/// A config for tests: fixed keys, not dev mode, short timers.
pub fn test_config() -> Config {
    Config {
        jwt_secret: Some(SECRET.into()),
        api_key: Some(API_KEY.into()),
        drain_ms: 1_000,
        unsubscribe_delay_ms: 200,
        node_ttl_secs: 3,
        ..Config::default()
    }
}

/// A running node.
pub struct TestNode {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its config.
    pub config: Config,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestNode {
    /// Starts a node with `config` on a free loopback port.
    pub async fn start(config: Config) -> TestNode {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let cfg = config.clone();
        let task = tokio::spawn(async move {
            herald_server::run(listener, cfg, async move {
                let _ = stopped.await;
            })
            .await
            .expect("node runs");
        });
        let node = TestNode {
            addr,
            config,
            stop: Some(stop),
            task: Some(task),
        };
        node.wait_ready().await;
        node
    }

    /// Starts a node with [`test_config`].
    pub async fn start_default() -> TestNode {
        Self::start(test_config()).await
    }

    /// `ws://…/ws`
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// `http://…`
    pub fn http(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits (10 s at most) until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let url = format!("{}/readyz", self.http());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = reqwest::get(&url).await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "node not ready in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A token for `user` allowed to subscribe to `channels` and publish to `publish`.
    pub fn token(&self, user: &str, channels: &[&str], publish: &[&str]) -> String {
        token(user, channels, publish)
    }

    /// Signals shutdown and waits for `run` to return; returns how long that took.
    pub async fn shutdown(mut self) -> Duration {
        let started = Instant::now();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("node stops in time")
                .expect("node task");
        }
        started.elapsed()
    }

    /// Signals shutdown without waiting.
    pub fn begin_shutdown(&mut self) -> JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("running")
    }

    /// An authorized HTTP GET; returns status and JSON body.
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = reqwest::Client::new()
            .get(format!("{}{path}", self.http()))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// An authorized `POST /v1/publish`; returns status and JSON body.
    pub async fn publish(&self, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/publish", self.http()))
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// Reads one metric's value from `/metrics` (the sum over its label sets).
    pub async fn metric(&self, name: &str) -> f64 {
        herald_testkit::metric(&self.http(), name).await
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[allow(unused_imports)] // not every test file reads metrics
pub use herald_testkit::metric_value;

/// A token signed with [`SECRET`].
pub fn token(user: &str, channels: &[&str], publish: &[&str]) -> String {
    TokenSigner::hs256(SECRET.as_bytes()).sign(&Claims {
        sub: user.into(),
        exp: now_secs() + 3600,
        nbf: None,
        iat: None,
        channels: Some(channels.iter().map(|s| s.to_string()).collect()),
        publish: Some(publish.iter().map(|s| s.to_string()).collect()),
    })
}

/// An authorized `POST /v1/publish` to the node at `http` (`http://host:port`), within
/// 5 s; returns status and JSON body, or `(0, Null)` when no answer came.
pub async fn publish_to(
    client: &reqwest::Client,
    http: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = client
        .post(format!("{http}/v1/publish"))
        .bearer_auth(API_KEY)
        .json(&body)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    match r {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(serde_json::Value::Null))
        }
        Err(_) => (0, serde_json::Value::Null),
    }
}
