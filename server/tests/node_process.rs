//! The real `herald` binary: configuration from the environment (`HERALD_DEV=1`) and
//! SIGTERM handling (exit within the drain window plus 5 s).

#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;
#[path = "support/process.rs"]
mod process;

use std::time::Duration;

use client::{Client, Closed};
use process::NodeProcess;
use serde_json::json;

async fn dev_token_status(n: &NodeProcess) -> u16 {
    reqwest::get(format!("{}/dev/token?user=alice", n.http()))
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_dev_from_the_environment() {
    let on = NodeProcess::start("dev-on", &[("HERALD_DEV", "1")]);
    on.wait_ready(Duration::from_secs(10)).await;
    assert_eq!(
        dev_token_status(&on).await,
        200,
        "HERALD_DEV=1 turns dev mode on"
    );
    let off = NodeProcess::start("dev-off", &[("HERALD_DEV", "0")]);
    off.wait_ready(Duration::from_secs(10)).await;
    assert_eq!(
        dev_token_status(&off).await,
        404,
        "keys configured and HERALD_DEV=0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_in_time() {
    let mut n = NodeProcess::start("term", &[("HERALD_DRAIN_MS", "2000")]);
    n.wait_ready(Duration::from_secs(10)).await;
    let (mut c, _) = Client::hello(&n.ws_url(), &node::token("alice", &[], &[]), json!({})).await;
    let took = tokio::task::spawn_blocking(move || {
        let took = n.terminate(Duration::from_secs(7));
        (n, took)
    });
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await,
        Closed::Code(4503)
    );
    let reconnect = c.recv().await;
    assert_eq!(reconnect["type"], "reconnect", "{reconnect}");
    let (_n, took) = took.await.unwrap();
    assert!(took < Duration::from_secs(7), "exited after {took:?}");
}
