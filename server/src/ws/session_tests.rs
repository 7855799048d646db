//! The session's rules over a socket made of channels (`socket::pair`): no network, no
//! listener, a node assembled on the memory backend. The integration tests in
//! `server/tests/` cover the same protocol through real sockets.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tungstenite::Message;

use super::socket::{pair, Client};
use super::{finish, serve_session};
use crate::node::Node;
use crate::Config;

const WAIT: Duration = Duration::from_secs(5);

/// A node on the memory backend, in dev mode (loopback, no keys), with `change` applied
/// to its configuration.
async fn node_with(change: impl FnOnce(&mut Config)) -> Arc<Node> {
    let mut config = Config::default();
    change(&mut config);
    crate::assemble(config).await.expect("assemble").node
}

/// A token of `user` that may subscribe and publish anywhere.
fn token(node: &Node, user: &str) -> String {
    node.keys
        .dev_signer
        .as_ref()
        .expect("dev mode signs tokens")
        .dev_token(user, 3600)
}

/// Runs one connection of the node over a fake socket, as `ws::run` does after the
/// upgrade, and sends `hello` with `user`'s token.
fn connect(node: &Arc<Node>, user: &str) -> Client {
    let (client, mut socket) = pair();
    let pending = node
        .admit("127.0.0.1".parse().expect("an address"))
        .unwrap_or_else(|_| panic!("admitted"));
    let node2 = Arc::clone(node);
    tokio::spawn(async move {
        let end = serve_session(&node2, &mut socket, pending).await;
        finish(&node2, &mut socket, end).await;
    });
    send(
        &client,
        json!({"type": "hello", "token": token(node, user)}),
    );
    client
}

fn send(client: &Client, frame: Value) {
    client
        .tx
        .send(Ok(Message::Text(frame.to_string().into())))
        .expect("the session reads");
}

/// The next JSON frame the session wrote, skipping pings.
async fn next(client: &mut Client) -> Value {
    loop {
        let m = tokio::time::timeout(WAIT, client.rx.recv())
            .await
            .expect("a frame in time")
            .expect("the session is still writing");
        match m {
            Message::Text(text) => {
                let v: Value = serde_json::from_str(&text).expect("JSON");
                if v["type"] != "ping" {
                    return v;
                }
            }
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// The close code the session ended with.
async fn closed(client: &mut Client) -> u16 {
    loop {
        let m = tokio::time::timeout(WAIT, client.rx.recv())
            .await
            .expect("a frame in time")
            .expect("a close frame before the end");
        if let Message::Close(frame) = m {
            return frame.expect("a close code").code.into();
        }
    }
}

#[tokio::test]
async fn hello_gets_welcome_with_the_personal_channel() {
    let node = node_with(|_| {}).await;
    let mut alice = connect(&node, "alice");
    let welcome = next(&mut alice).await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["user"], "alice");
    assert_eq!(welcome["subscriptions"]["user:alice"]["offset"], 0);
}

#[tokio::test]
async fn a_frame_that_is_not_a_command_closes_4400() {
    let node = node_with(|_| {}).await;
    let mut alice = connect(&node, "alice");
    next(&mut alice).await;
    alice
        .tx
        .send(Ok(Message::Text("not json".into())))
        .expect("sent");
    assert_eq!(closed(&mut alice).await, 4400);
}

#[tokio::test]
async fn a_publish_reaches_a_subscriber_once_in_offset_order() {
    let node = node_with(|_| {}).await;
    let mut alice = connect(&node, "alice");
    let mut bob = connect(&node, "bob");
    next(&mut alice).await;
    next(&mut bob).await;
    send(
        &bob,
        json!({"type": "subscribe", "id": 1, "channel": "room:1"}),
    );
    let reply = next(&mut bob).await;
    assert_eq!(reply["result"]["offset"], 0, "{reply}");
    for i in 1..=3 {
        send(
            &alice,
            json!({"type": "publish", "id": i, "channel": "room:1", "data": i}),
        );
        let reply = next(&mut alice).await;
        assert_eq!(reply["result"]["offset"], i, "{reply}");
    }
    for i in 1..=3 {
        let m = next(&mut bob).await;
        assert_eq!(m["type"], "message");
        assert_eq!(m["offset"], i);
        assert_eq!(m["data"], i);
        assert_eq!(m["from"], "alice", "the server sets `from`");
    }
}

#[tokio::test]
async fn a_second_subscribe_is_refused_and_the_session_stays() {
    let node = node_with(|_| {}).await;
    let mut bob = connect(&node, "bob");
    next(&mut bob).await;
    send(
        &bob,
        json!({"type": "subscribe", "id": 1, "channel": "room:1"}),
    );
    next(&mut bob).await;
    send(
        &bob,
        json!({"type": "subscribe", "id": 2, "channel": "room:1"}),
    );
    let reply = next(&mut bob).await;
    assert_eq!(reply["id"], 2);
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
    send(
        &bob,
        json!({"type": "unsubscribe", "id": 3, "channel": "room:1"}),
    );
    assert_eq!(next(&mut bob).await["result"], json!({}));
}

#[tokio::test]
async fn the_subscription_limit_is_a_reply_error() {
    let node = node_with(|c| c.max_subscriptions = 2).await;
    let mut bob = connect(&node, "bob");
    next(&mut bob).await;
    // The personal channel takes one of the two.
    send(&bob, json!({"type": "subscribe", "id": 1, "channel": "a"}));
    assert!(next(&mut bob).await["error"].is_null());
    send(&bob, json!({"type": "subscribe", "id": 2, "channel": "b"}));
    let reply = next(&mut bob).await;
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
}

#[tokio::test]
async fn a_resume_recovers_exactly_what_was_missed() {
    let node = node_with(|_| {}).await;
    let mut alice = connect(&node, "alice");
    let welcome = next(&mut alice).await;
    let epoch = welcome["subscriptions"]["user:alice"]["epoch"].clone();
    for i in 1..=3 {
        send(
            &alice,
            json!({"type": "publish", "id": i, "channel": "room:9", "data": i}),
        );
        next(&mut alice).await;
    }
    let room_epoch = {
        send(
            &alice,
            json!({"type": "subscribe", "id": 9, "channel": "room:9"}),
        );
        next(&mut alice).await["result"]["epoch"].clone()
    };
    assert!(!epoch.is_null());
    let (mut bob, mut socket) = pair();
    let pending = node
        .admit("127.0.0.1".parse().expect("an address"))
        .unwrap_or_else(|_| panic!("admitted"));
    let node2 = Arc::clone(&node);
    tokio::spawn(async move {
        let end = serve_session(&node2, &mut socket, pending).await;
        finish(&node2, &mut socket, end).await;
    });
    send(
        &bob,
        json!({"type": "hello", "token": token(&node, "bob"),
               "resume": {"room:9": {"offset": 1, "epoch": room_epoch}}}),
    );
    let welcome = next(&mut bob).await;
    assert_eq!(
        welcome["subscriptions"]["room:9"]["recovered"], true,
        "{welcome}"
    );
    let offsets: Vec<Value> = [next(&mut bob).await, next(&mut bob).await]
        .iter()
        .map(|m| m["offset"].clone())
        .collect();
    assert_eq!(offsets, vec![json!(2), json!(3)]);
}

#[tokio::test]
async fn a_revoked_user_is_refused_at_hello() {
    let node = node_with(|_| {}).await;
    let now = crate::clock::now_secs();
    node.users
        .command(
            "mallory",
            &crate::backend::users::UserCommand::Revoke {
                before: now + 10,
                until: now + 3600,
            },
        )
        .await
        .expect("revoked");
    let mut mallory = connect(&node, "mallory");
    assert_eq!(closed(&mut mallory).await, 4401);
}
