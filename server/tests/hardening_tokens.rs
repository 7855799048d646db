//! Token and key attacks that `node_auth` does not already cover: API key
//! guessing (the comparison is constant-time on SHA-256 digests; the figures show no
//! difference between classes of wrong keys worth measuring), and claims of the wrong
//! type or out of range (floats, strings, huge numbers, arrays) plus header fields that
//! try to point the verifier at another key (`jku`, `x5u`, `kid`, `jwk`).
//!
//! `alg: none`, HS256 signed with the public key, expired, not yet valid, wrong
//! signature, huge token, missing `sub`, wildcard escapes, cross-user subscriptions and
//! forged Origins are in `node_auth`.

#[path = "support/bystander.rs"]
mod bystander;
#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;
#[path = "support/panics.rs"]
mod panics;

use std::time::{Duration, Instant};

use bystander::{assert_undisturbed, node_and_watcher};
use client::{Client, Closed};
use herald_server::auth::{now_secs, ApiKey};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use panics::assert_no_server_panic;
use serde_json::{json, Value};

/// Wrong keys by class, and the right one.
fn key_classes() -> Vec<(&'static str, Option<String>)> {
    let key = node::API_KEY;
    let mut last_wrong = key.to_string();
    last_wrong.pop();
    last_wrong.push('!');
    let mut first_wrong = key.to_string();
    first_wrong.replace_range(0..1, "!");
    vec![
        ("no header", None),
        ("empty", Some(String::new())),
        ("one char", Some("x".into())),
        ("same length, first char wrong", Some(first_wrong)),
        ("same length, last char wrong", Some(last_wrong)),
        ("the key plus one char", Some(format!("{key}x"))),
        ("4 KiB", Some("k".repeat(4096))),
        ("the right key", Some(key.to_string())),
    ]
}

fn stats(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    (samples[samples.len() / 2], mean)
}

/// API key guessing: every wrong key gets 401, and neither the comparison itself nor a
/// whole request shows a timing difference between classes of wrong keys (a key right
/// but for its last character costs what a one-character key costs). Printed as figures,
/// not asserted: timing assertions do not belong in tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guessing_shows_no_timing_difference() {
    const ROUNDS: usize = 300;
    const COMPARES: usize = 20_000;
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    let classes = key_classes();

    // The comparison alone, in process.
    let api_key = ApiKey::new(node::API_KEY);
    let mut compare = Vec::new();
    // Warm up first: the first class measured would otherwise pay for cold caches.
    for (_, key) in &classes {
        for _ in 0..COMPARES / 10 {
            std::hint::black_box(api_key.matches(key.as_deref().unwrap_or("")));
        }
    }
    for (name, key) in &classes {
        let presented = key.clone().unwrap_or_default();
        let started = Instant::now();
        let mut hits = 0;
        for _ in 0..COMPARES {
            hits += usize::from(api_key.matches(std::hint::black_box(&presented)));
        }
        let ns = started.elapsed().as_nanos() as f64 / COMPARES as f64;
        assert_eq!(hits > 0, *name == "the right key", "{name}");
        compare.push(ns);
    }

    // Whole requests over one keep-alive connection, classes interleaved so that drift
    // of the machine hits every class alike.
    let client = reqwest::Client::new();
    let url = format!("{}/v1/nodes", n.http());
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); classes.len()];
    for _ in 0..ROUNDS {
        for (i, (name, key)) in classes.iter().enumerate() {
            let mut req = client.get(&url);
            if let Some(k) = key {
                req = req.header("authorization", format!("Bearer {k}"));
            }
            let started = Instant::now();
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let _ = r.bytes().await;
            samples[i].push(started.elapsed().as_secs_f64() * 1e6);
            let want = if *name == "the right key" { 200 } else { 401 };
            assert_eq!(status, want, "{name}");
        }
    }
    let mut lines = Vec::new();
    for (i, (name, _)) in classes.iter().enumerate() {
        let (median, mean) = stats(samples[i].clone());
        lines.push(format!(
            "  {name:<32} compare {:>6.0} ns; request median {median:>6.0} µs, mean {mean:>6.0} µs",
            compare[i]
        ));
    }
    eprintln!(
        "measured: API key timing ({COMPARES} compares, {ROUNDS} requests per class):\n{}",
        lines.join("\n")
    );
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

fn sign_with(header: Header, claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

async fn refused(url: &str, token: &str, what: &str) {
    let mut c = Client::connect(url).await;
    c.send(json!({"type": "hello", "token": token})).await;
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await,
        Closed::Code(4401),
        "{what} must be refused with 4401"
    );
}

/// Claims of the wrong type or out of range are refused with 4401; header fields that
/// name another key are ignored (the configured key alone decides), so a token signed
/// with another key is refused whatever its header says.
#[tokio::test]
async fn malformed_claims_and_key_pointing_headers_are_refused() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    let url = n.ws_url();
    let now = now_secs();
    let hs = |claims: &Value| sign_with(Header::new(Algorithm::HS256), claims, node::SECRET);
    let cases = [
        (
            "exp as a float",
            json!({"sub": "a", "exp": (now + 60) as f64 + 0.5}),
        ),
        (
            "exp as a string",
            json!({"sub": "a", "exp": (now + 60).to_string()}),
        ),
        ("exp beyond u64", json!({"sub": "a", "exp": 1e20})),
        ("exp negative", json!({"sub": "a", "exp": -1})),
        ("exp null", json!({"sub": "a", "exp": null})),
        (
            "nbf beyond u64",
            json!({"sub": "a", "exp": now + 60, "nbf": 1e20}),
        ),
        (
            "nbf far ahead",
            json!({"sub": "a", "exp": now + 60, "nbf": u64::MAX}),
        ),
        ("sub an array", json!({"sub": ["a"], "exp": now + 60})),
        (
            "sub an object",
            json!({"sub": {"id": "a"}, "exp": now + 60}),
        ),
        ("sub with a NUL", json!({"sub": "a\u{0}b", "exp": now + 60})),
        (
            "sub of a personal channel",
            json!({"sub": "user:bob", "exp": now + 60}),
        ),
        ("sub a wildcard", json!({"sub": "*", "exp": now + 60})),
        (
            "channels a string",
            json!({"sub": "a", "exp": now + 60, "channels": "room:*"}),
        ),
        (
            "channels with a number",
            json!({"sub": "a", "exp": now + 60, "channels": [1]}),
        ),
        (
            "publish an object",
            json!({"sub": "a", "exp": now + 60, "publish": {"*": true}}),
        ),
        ("claims an array", json!([{"sub": "a", "exp": now + 60}])),
    ];
    for (what, claims) in &cases {
        refused(&url, &hs(claims), what).await;
    }
    // Headers that point elsewhere do not change which key verifies.
    let claims = json!({"sub": "alice", "exp": now + 60});
    for field in ["jku", "x5u", "kid"] {
        let mut header = Header::new(Algorithm::HS256);
        match field {
            "jku" => header.jku = Some("http://127.0.0.1:1/keys.json".into()),
            "x5u" => header.x5u = Some("http://127.0.0.1:1/cert.pem".into()),
            _ => header.kid = Some("../../etc/passwd".into()),
        }
        let forged = sign_with(header.clone(), &claims, "attacker-secret");
        refused(&url, &forged, &format!("{field} with another key")).await;
        // With the right key the header field is simply ignored.
        let (_c, welcome) =
            Client::hello(&url, &sign_with(header, &claims, node::SECRET), json!({})).await;
        assert_eq!(welcome["user"], "alice", "{field}");
    }
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}
