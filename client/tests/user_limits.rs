//! The SDK meets a user's spent connect budget (close 4429 after `hello`) with its
//! backoff, not with a reconnect loop, and gets in once the budget refills.

mod support;

use std::time::Duration;

use herald_client::Client;
use herald_testkit::process::NodeProcess;
use herald_testkit::API_KEY;
use serde_json::json;
use support::{token_for, Recorder, WAIT};

/// Connects refused by the user's budget so far.
async fn refused(node: &NodeProcess) -> f64 {
    herald_testkit::metric(&node.http(), "herald_user_limited_total").await
}

#[tokio::test]
async fn a_spent_connect_budget_is_met_with_backoff() {
    // One connect per 10 s, no burst beyond it.
    let node = NodeProcess::start(
        "user-connects",
        &[
            ("HERALD_MAX_CONNECTIONS_PER_USER", "1"),
            ("HERALD_MAX_USER_CONNECTS_PER_MIN", "6"),
            ("HERALD_MAX_USER_CONNECT_BURST", "1"),
        ],
    );
    node.wait_ready(Duration::from_secs(15)).await;
    let (client, events) = Client::builder()
        .url(node.ws_url())
        // The default backoff's 30 s cap would only make the test wait for the refill.
        .backoff(Duration::from_millis(250), Duration::from_secs(2))
        .token_provider(|| {
            std::future::ready(Ok::<_, std::io::Error>(token_for("alice", &[], &[], 600)))
        })
        .start()
        .unwrap();
    let rec = Recorder::start(events);
    rec.wait("the first session", WAIT, |r| r.connected.len() == 1)
        .await;
    // The backend sends the user away with "reconnect" (4401): the client reconnects at
    // once, and its user's budget is spent.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/users/alice/disconnect", node.http()))
        .bearer_auth(API_KEY)
        .json(&json!({"reconnect": true}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("API call");
    assert_eq!(r.status(), 200);
    let watch = Duration::from_secs(4);
    tokio::time::sleep(watch).await;
    let attempts = refused(&node).await;
    eprintln!("{attempts} refused connects in {watch:?}");
    // Hammering would be hundreds of hellos in 4 s; a backoff from 250 ms that doubles
    // (full jitter) is a handful.
    assert!(
        (1.0..=10.0).contains(&attempts),
        "{attempts} refused connects in {watch:?}"
    );
    // The budget refills (10 s for one connect) and the client is back on its own.
    rec.wait("back after the refill", WAIT, |r| r.connected.len() == 2)
        .await;
    client.close().await;
}
