//! A bystander session: bad input on one connection must not disturb the others, so
//! tests keep a second client (user `watcher`) and check that it still gets its pushes.
//! Needs the including test to declare `client`, `node` and `panics` modules too.

#![allow(dead_code)]

use herald_server::Config;
use serde_json::json;

use super::client::Client;
use super::node::TestNode;

/// A node (with the panic watcher on) and a bystander session of user `watcher`.
pub async fn node_and_watcher(config: Config) -> (TestNode, Client) {
    super::panics::watch_panics();
    let n = TestNode::start(config).await;
    let (w, _) = Client::hello(&n.ws_url(), &n.token("watcher", &[], &[]), json!({})).await;
    (n, w)
}

/// The bystander still gets a push to its user, intact.
pub async fn assert_undisturbed(n: &TestNode, w: &mut Client) {
    let (status, body) = n
        .publish(json!({"user": "watcher", "data": {"still": "here"}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let m = w.next_message().await;
    assert_eq!(m["type"], "message", "{m}");
    assert_eq!(m["channel"], "user:watcher", "{m}");
    assert_eq!(m["offset"], body["offset"]);
    assert_eq!(m["data"], json!({"still": "here"}));
}
