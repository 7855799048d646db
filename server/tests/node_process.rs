//! The real `herald` binary: configuration from the environment (`HERALD_DEV` and its
//! accepted words), the startup rules (no keys off loopback, a missing or short key outside
//! dev mode: one line on stderr, exit status 2) and SIGTERM handling (exit within the
//! drain window plus 5 s).

#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;
#[path = "support/process.rs"]
mod process;

use std::time::Duration;

use client::{Client, Closed};
use process::{start_refused, NodeProcess};
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
    // The documented words in any case; empty is how compose passes an unset variable.
    for (value, status) in [
        ("1", 200),
        ("TRUE", 200),
        ("0", 404),
        ("Off", 404),
        ("", 404),
    ] {
        let n = NodeProcess::start("dev-words", &[("HERALD_DEV", value)]);
        n.wait_ready(Duration::from_secs(10)).await;
        assert_eq!(
            dev_token_status(&n).await,
            status,
            "keys configured and HERALD_DEV={value:?}"
        );
    }
}

/// The one line a refused start prints, after checking the exit status (2, like a bad
/// flag).
fn refused(env: &[(&str, &str)]) -> String {
    let r = start_refused(env);
    assert_eq!(r.status.code(), Some(2), "{env:?}: {r:?}");
    r.stderr
}

#[test]
fn herald_dev_refuses_other_values() {
    let keys = [
        ("HERALD_LISTEN", "127.0.0.1:0"),
        ("HERALD_JWT_SECRET", node::SECRET),
        ("HERALD_API_KEY", node::API_KEY),
    ];
    for bad in ["disabled", "none", "ture", "y", "2", " on"] {
        // With keys (where it would turn dev mode on) and without (where dev mode would
        // be on anyway on loopback): the value is wrong either way.
        for env in [&keys[..], &keys[..1]] {
            let mut env = env.to_vec();
            env.push(("HERALD_DEV", bad));
            let stderr = refused(&env);
            assert!(
                stderr.contains(&format!("'{bad}'")) && stderr.contains("--dev"),
                "HERALD_DEV={bad:?}: {stderr}"
            );
        }
    }
}

/// `HERALD_MAX_PENDING_HANDSHAKES=0` used to start a node that closed every client 4429
/// before its `hello` (the budget admitted nobody) while `/healthz` said ok; 0 reads as
/// "no limit" for the per-IP and per-user limits, so it is an easy mistake.
#[test]
fn a_pending_handshake_budget_of_zero_refuses_to_start() {
    let stderr = refused(&[
        ("HERALD_LISTEN", "127.0.0.1:0"),
        ("HERALD_JWT_SECRET", node::SECRET),
        ("HERALD_API_KEY", node::API_KEY),
        ("HERALD_MAX_PENDING_HANDSHAKES", "0"),
    ]);
    assert!(
        stderr.contains("--max-pending-handshakes") && stderr.contains("at least 1"),
        "{stderr}"
    );
}

#[test]
fn no_keys_off_loopback_refuses_to_start() {
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let stderr = refused(&[("HERALD_LISTEN", listen)]);
        assert!(stderr.starts_with("herald: cannot start: "), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.contains("HERALD_JWT_SECRET") && stderr.contains("HERALD_API_KEY"),
            "{stderr}"
        );
        assert!(stderr.contains(listen), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_keys_on_loopback_is_dev_mode() {
    // README's "Two commands": `herald` with nothing set serves a dev node on loopback.
    let n = NodeProcess::start_without_keys("dev-implicit", &[]);
    n.wait_ready(Duration::from_secs(10)).await;
    assert_eq!(dev_token_status(&n).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_short_keys_refuse_to_start_outside_dev_mode() {
    let short = "s".repeat(31);
    let listen = ("HERALD_LISTEN", "127.0.0.1:0");
    let secret = ("HERALD_JWT_SECRET", node::SECRET);
    let api_key = ("HERALD_API_KEY", node::API_KEY);
    for (env, named) in [
        (
            vec![listen, ("HERALD_JWT_SECRET", &short), api_key],
            "HERALD_JWT_SECRET",
        ),
        (
            vec![listen, secret, ("HERALD_API_KEY", &short)],
            "HERALD_API_KEY",
        ),
        (vec![listen, api_key], "HERALD_JWT_SECRET"),
        (vec![listen, secret], "HERALD_API_KEY"),
        (
            vec![("HERALD_LISTEN", "0.0.0.0:0"), ("HERALD_API_KEY", &short)],
            "HERALD_JWT_SECRET",
        ),
    ] {
        let stderr = refused(&env);
        assert!(stderr.starts_with("herald: cannot start: "), "{stderr}");
        assert!(stderr.contains(named), "{env:?}: {stderr}");
        assert!(!stderr.contains(&short), "a key is never printed: {stderr}");
    }
    // Dev mode takes short keys, on any address (deploy/cluster.env's).
    let n = NodeProcess::start(
        "dev-short",
        &[
            ("HERALD_DEV", "1"),
            ("HERALD_JWT_SECRET", "short"),
            ("HERALD_API_KEY", "short"),
        ],
    );
    n.wait_ready(Duration::from_secs(10)).await;
    assert_eq!(dev_token_status(&n).await, 200);
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
