//! Authentication and authorization (docs/protocol.md "Configuration", "Tokens and permissions", "Channel and user names"): every kind of bad token is
//! closed with 4401, RS256/ES256/EdDSA tokens are accepted with a public key file, the
//! `channels` and `publish` claims are enforced with `forbidden` replies, the personal
//! channel is its owner's alone, the Origin allowlist closes with 4403, dev mode turns
//! on exactly when the contract says, and keys that break the startup rules (§7: none off
//! loopback, one missing, shorter than 32 bytes) stop the start.

#[path = "support/bystander.rs"]
mod bystander;
#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;
#[path = "support/panics.rs"]
mod panics;

use bystander::{assert_undisturbed, node_and_watcher};
use panics::{assert_no_server_panic, watch_panics};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use client::{Client, Closed};
use herald_server::auth::{now_secs, KeyError, MIN_KEY_BYTES};
use herald_server::{Config, StartError};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use node::TestNode;
use serde_json::{json, Value};

fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now_secs() + 3600, "channels": ["room:*"], "publish": ["room:*"]})
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("sign")
}

fn hs(alg: Algorithm, secret: &str, claims: &Value) -> String {
    sign(alg, &EncodingKey::from_secret(secret.as_bytes()), claims)
}

/// An unsigned token: `{"alg":"none"}` header, claims, empty signature.
fn unsigned(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}.",
        base64url(header.to_string().as_bytes()),
        base64url(claims.to_string().as_bytes())
    )
}

/// Connects, sends `hello` with `hello` as the frame, and expects 4401.
async fn refused(n: &TestNode, hello: Value, what: &str) {
    let mut c = Client::connect(&n.ws_url()).await;
    c.send(hello).await;
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await,
        Closed::Code(4401),
        "{what} must be refused with 4401"
    );
}

async fn refused_token(n: &TestNode, token: &str, what: &str) {
    refused(n, json!({"type": "hello", "token": token}), what).await;
}

async fn accepted(n: &TestNode, token: &str, user: &str) {
    let (mut c, w) = Client::hello(&n.ws_url(), token, json!({})).await;
    assert_eq!(w["user"], user, "{w}");
    assert!(
        w["subscriptions"][format!("user:{user}")].is_object(),
        "{w}"
    );
    let (status, body) = n.publish(json!({"user": user, "data": "hi"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.next_message().await["data"], "hi");
}

#[test]
fn base64url_matches_known_vectors() {
    assert_eq!(base64url(b""), "");
    assert_eq!(base64url(b"f"), "Zg");
    assert_eq!(base64url(b"fo"), "Zm8");
    assert_eq!(base64url(b"foo"), "Zm9v");
    assert_eq!(base64url(b"foob"), "Zm9vYg");
    assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
}

#[tokio::test]
async fn bad_hs256_tokens_are_refused_with_4401() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    let now = now_secs();
    // Sanity: the hand-made HS256 path is accepted.
    accepted(
        &n,
        &hs(Algorithm::HS256, node::SECRET, &claims("alice")),
        "alice",
    )
    .await;

    refused_token(
        &n,
        &hs(Algorithm::HS256, "wrong-secret", &claims("alice")),
        "bad signature",
    )
    .await;
    let mut tampered = hs(Algorithm::HS256, node::SECRET, &claims("alice"));
    tampered.pop();
    tampered.push('A');
    refused_token(&n, &tampered, "tampered signature").await;
    let forged_claims = format!(
        "{}.{}.{}",
        hs(Algorithm::HS256, node::SECRET, &claims("alice"))
            .split('.')
            .next()
            .unwrap(),
        base64url(claims("mallory").to_string().as_bytes()),
        hs(Algorithm::HS256, node::SECRET, &claims("alice"))
            .split('.')
            .nth(2)
            .unwrap(),
    );
    refused_token(&n, &forged_claims, "claims swapped under a valid signature").await;
    let expired = json!({"sub": "alice", "exp": now - 5});
    refused_token(&n, &hs(Algorithm::HS256, node::SECRET, &expired), "expired").await;
    let early = json!({"sub": "alice", "exp": now + 3600, "nbf": now + 600});
    refused_token(
        &n,
        &hs(Algorithm::HS256, node::SECRET, &early),
        "not yet valid (nbf)",
    )
    .await;
    let no_exp = json!({"sub": "alice"});
    refused_token(
        &n,
        &hs(Algorithm::HS256, node::SECRET, &no_exp),
        "without exp",
    )
    .await;
    let no_sub = json!({"exp": now + 3600});
    refused_token(
        &n,
        &hs(Algorithm::HS256, node::SECRET, &no_sub),
        "without sub",
    )
    .await;
    for bad_sub in [
        json!(""),
        json!("a b"),
        json!("a:b"),
        json!("x".repeat(129)),
        json!(42),
        json!(null),
    ] {
        let c = json!({"sub": bad_sub, "exp": now + 3600});
        refused_token(
            &n,
            &hs(Algorithm::HS256, node::SECRET, &c),
            &format!("sub {bad_sub}"),
        )
        .await;
    }
    // Other algorithms than the configured HS256, even with the right secret.
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        refused_token(
            &n,
            &hs(alg, node::SECRET, &claims("alice")),
            &format!("{alg:?}"),
        )
        .await;
    }
    // alg none, in a few spellings.
    for alg in ["none", "None", "NONE", "nOnE"] {
        let t = unsigned(&json!({"alg": alg, "typ": "JWT"}), &claims("alice"));
        refused_token(&n, &t, &format!("alg {alg}")).await;
    }
    // alg none with the HS256 signature kept.
    let signed = hs(Algorithm::HS256, node::SECRET, &claims("alice"));
    let parts: Vec<&str> = signed.split('.').collect();
    let t = format!(
        "{}.{}.{}",
        base64url(br#"{"alg":"none","typ":"JWT"}"#),
        parts[1],
        parts[2]
    );
    refused_token(&n, &t, "alg none with a signature").await;
    // An unknown algorithm.
    let t = format!(
        "{}.{}.{}",
        base64url(br#"{"alg":"XS999","typ":"JWT"}"#),
        parts[1],
        parts[2]
    );
    refused_token(&n, &t, "unknown alg").await;
    // Not a JWT at all, and a huge but validly signed token (> 8 KiB).
    for junk in ["x", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9..", "🙂.🙂.🙂"] {
        refused_token(&n, junk, &format!("junk token {junk:?}")).await;
    }
    let patterns: Vec<String> = (0..600).map(|i| format!("room:{i:05}")).collect();
    let huge = json!({"sub": "alice", "exp": now + 3600, "channels": patterns});
    let huge = hs(Algorithm::HS256, node::SECRET, &huge);
    assert!(huge.len() > 8 * 1024, "{}", huge.len());
    refused_token(&n, &huge, "huge token").await;
    // Missing token: no field, null, empty string.
    refused(&n, json!({"type": "hello"}), "hello without token").await;
    refused(&n, json!({"type": "hello", "token": null}), "null token").await;
    refused(&n, json!({"type": "hello", "token": ""}), "empty token").await;

    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "herald-test-{tag}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Generates a key pair with openssl: returns (private PEM, public key file).
fn key_pair(dir: &Path, name: &str, genpkey: &[&str]) -> (Vec<u8>, PathBuf) {
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let mut args = vec!["genpkey"];
    args.extend_from_slice(genpkey);
    args.extend_from_slice(&["-out", private.to_str().unwrap()]);
    openssl(&args);
    openssl(&[
        "pkey",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    (std::fs::read(&private).unwrap(), public)
}

const RSA: &[&str] = &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];
const EC: &[&str] = &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
const ED: &[&str] = &["-algorithm", "ED25519"];

fn public_key_config(public: &Path) -> Config {
    Config {
        jwt_secret: None,
        jwt_public_key_file: Some(public.to_path_buf()),
        ..node::test_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_tokens_with_a_public_key_file() {
    let dir = TempDir::new("rs256");
    let (private, public) = key_pair(&dir.0, "rsa", RSA);
    let (other, _) = key_pair(&dir.0, "rsa2", RSA);
    let (ec_private, _) = key_pair(&dir.0, "ec", EC);
    let key = EncodingKey::from_rsa_pem(&private).unwrap();
    let (n, mut w) = pk_node_and_watcher(&public, Algorithm::RS256, &key).await;
    let other = EncodingKey::from_rsa_pem(&other).unwrap();
    public_key_basics(&n, &public, Algorithm::RS256, &key, &other).await;

    // The confusion again with the PEM trimmed, as some libraries read it.
    let pem = std::fs::read(&public).unwrap();
    let pem_trimmed = String::from_utf8(pem.clone()).unwrap();
    let confused = hs(Algorithm::HS256, pem_trimmed.trim(), &claims("alice"));
    refused_token(&n, &confused, "HS256 signed with the trimmed public key").await;
    // The test secret of other nodes means nothing here.
    refused_token(
        &n,
        &hs(Algorithm::HS256, node::SECRET, &claims("alice")),
        "HS256",
    )
    .await;
    // The same key with other RSA algorithms; another key type.
    for alg in [Algorithm::RS384, Algorithm::RS512, Algorithm::PS256] {
        refused_token(&n, &sign(alg, &key, &claims("alice")), &format!("{alg:?}")).await;
    }
    let es = EncodingKey::from_ec_pem(&ec_private).unwrap();
    refused_token(&n, &sign(Algorithm::ES256, &es, &claims("alice")), "ES256").await;
    let expired = json!({"sub": "alice", "exp": now_secs() - 5});
    refused_token(&n, &sign(Algorithm::RS256, &key, &expired), "expired RS256").await;
    let no_sub = json!({"exp": now_secs() + 60});
    refused_token(
        &n,
        &sign(Algorithm::RS256, &key, &no_sub),
        "RS256 without sub",
    )
    .await;

    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

/// With a public key file, `node.token()` (HS256) does not work: a bystander that uses the
/// node's own algorithm.
async fn pk_node_and_watcher(
    public: &Path,
    alg: Algorithm,
    key: &EncodingKey,
) -> (TestNode, Client) {
    watch_panics();
    let n = TestNode::start(public_key_config(public)).await;
    let (w, _) = Client::hello(&n.ws_url(), &sign(alg, key, &claims("watcher")), json!({})).await;
    (n, w)
}

/// What every public-key algorithm must get right: its own token is accepted; HS256
/// signed with the public key's PEM (the classic confusion), the same algorithm signed by
/// another key, and `alg: none` are refused.
async fn public_key_basics(
    n: &TestNode,
    public: &Path,
    alg: Algorithm,
    key: &EncodingKey,
    other: &EncodingKey,
) {
    accepted(n, &sign(alg, key, &claims("alice")), "alice").await;
    let pem = std::fs::read(public).unwrap();
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&pem),
        &claims("alice"),
    );
    refused_token(n, &confused, "HS256 signed with the public key").await;
    refused_token(
        n,
        &sign(alg, other, &claims("alice")),
        &format!("{alg:?} by another key"),
    )
    .await;
    refused_token(
        n,
        &unsigned(&json!({"alg": "none"}), &claims("alice")),
        "alg none",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens_with_a_public_key_file() {
    let dir = TempDir::new("es256");
    let (private, public) = key_pair(&dir.0, "ec", EC);
    let (other, _) = key_pair(&dir.0, "ec2", EC);
    let (rsa, _) = key_pair(&dir.0, "rsa", RSA);
    let key = EncodingKey::from_ec_pem(&private).unwrap();
    let (n, mut w) = pk_node_and_watcher(&public, Algorithm::ES256, &key).await;
    let other = EncodingKey::from_ec_pem(&other).unwrap();
    public_key_basics(&n, &public, Algorithm::ES256, &key, &other).await;
    let rsa = EncodingKey::from_rsa_pem(&rsa).unwrap();
    refused_token(&n, &sign(Algorithm::RS256, &rsa, &claims("alice")), "RS256").await;

    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eddsa_tokens_with_a_public_key_file() {
    let dir = TempDir::new("eddsa");
    let (private, public) = key_pair(&dir.0, "ed", ED);
    let (other, _) = key_pair(&dir.0, "ed2", ED);
    let key = EncodingKey::from_ed_pem(&private).unwrap();
    let (n, mut w) = pk_node_and_watcher(&public, Algorithm::EdDSA, &key).await;
    let other = EncodingKey::from_ed_pem(&other).unwrap();
    public_key_basics(&n, &public, Algorithm::EdDSA, &key, &other).await;
    let early = json!({"sub": "alice", "exp": now_secs() + 3600, "nbf": now_secs() + 600});
    refused_token(
        &n,
        &sign(Algorithm::EdDSA, &key, &early),
        "nbf in the future",
    )
    .await;

    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

#[tokio::test]
async fn a_public_key_file_that_is_not_a_key_stops_the_start() {
    let dir = TempDir::new("badkey");
    let path = dir.0.join("junk.pem");
    std::fs::write(
        &path,
        "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let run = herald_server::run(listener, public_key_config(&path), std::future::pending());
    let r = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("run returns at once");
    assert!(r.is_err(), "a node must not start with an unreadable key");
    let missing = public_key_config(&dir.0.join("missing.pem"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        herald_server::run(listener, missing, std::future::pending()),
    )
    .await
    .expect("run returns at once");
    assert!(r.is_err(), "a node must not start with a missing key file");
}

fn assert_error(reply: &Value, code: &str) {
    assert_eq!(reply["type"], "reply", "{reply}");
    assert_eq!(reply["error"]["code"], code, "{reply}");
    assert!(reply.get("result").is_none(), "{reply}");
}

fn assert_ok(reply: &Value) {
    assert!(reply["error"].is_null(), "{reply}");
    assert!(reply["result"].is_object(), "{reply}");
}

async fn hello_with(n: &TestNode, user: &str, channels: &[&str], publish: &[&str]) -> Client {
    Client::hello(&n.ws_url(), &n.token(user, channels, publish), json!({}))
        .await
        .0
}

#[tokio::test]
async fn subscribing_to_another_users_personal_channel_is_forbidden() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    // Even a token that allows every channel, or `user:*`, or `user:bob` by name.
    let mut a = hello_with(&n, "alice", &["*", "user:*", "user:bob"], &[]).await;
    let mut b = hello_with(&n, "bob", &[], &[]).await;
    for channel in ["user:bob", "user:watcher", "user:alice2", "user:"] {
        let r = a
            .request(json!({"type": "subscribe", "channel": channel}))
            .await;
        if channel == "user:" {
            // Not a valid user id: forbidden or bad_request, but never allowed.
            assert!(r["error"].is_object(), "{r}");
        } else {
            assert_error(&r, "forbidden");
        }
        let r = a
            .request(json!({"type": "presence", "channel": channel}))
            .await;
        assert!(r["error"].is_object(), "presence of {channel}: {r}");
    }
    // A resume of another user's channel at hello is not honoured either.
    let (mut a2, welcome) = Client::hello(
        &n.ws_url(),
        &n.token("alice", &["*"], &[]),
        json!({"user:bob": {"offset": 0, "epoch": "x"}}),
    )
    .await;
    assert!(
        welcome["subscriptions"].get("user:bob").is_none(),
        "{welcome}"
    );
    // Pushes to bob reach bob and not alice; the connection stays.
    let (_, body) = n.publish(json!({"user": "bob", "data": "for bob"})).await;
    assert_eq!(b.next_message().await["offset"], body["offset"]);
    assert!(a.silent_for(Duration::from_millis(200)).await);
    assert!(a2.silent_for(Duration::from_millis(50)).await);
    let r = a
        .request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;
    assert_ok(&r);
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

#[tokio::test]
async fn channels_claim_is_enforced() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    let mut a = hello_with(&n, "alice", &["room:*", "news"], &[]).await;
    for channel in [
        "admin",
        "news2",
        "new",
        "roomy",
        "room",
        "lobby:room:1",
        "Room:1",
    ] {
        let r = a
            .request(json!({"type": "subscribe", "channel": channel}))
            .await;
        assert_error(&r, "forbidden");
        let r = a
            .request(json!({"type": "presence", "channel": channel}))
            .await;
        assert_error(&r, "forbidden");
    }
    for channel in ["news", "room:1", "room:a:b", "room:"] {
        let r = a
            .request(json!({"type": "subscribe", "channel": channel}))
            .await;
        assert_ok(&r);
    }
    let r = a
        .request(json!({"type": "presence", "channel": "room:1"}))
        .await;
    assert_ok(&r);
    // No channels claim at all: only the personal channel.
    let mut b = hello_with(&n, "bob", &[], &[]).await;
    let r = b
        .request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;
    assert_error(&r, "forbidden");
    let r = b
        .request(json!({"type": "presence", "channel": "user:bob"}))
        .await;
    assert_ok(&r);
    // A forbidden subscription delivers nothing.
    n.publish(json!({"channel": "admin", "data": 1})).await;
    assert!(b.silent_for(Duration::from_millis(200)).await);
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

#[tokio::test]
async fn wildcard_escapes_in_claims_grant_nothing() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    let patterns = [
        "room*:*", "**", "*room", "room:*x", "r*m:1", "", " *", "room:.*", "room:%",
    ];
    let mut a = hello_with(&n, "alice", &patterns, &patterns).await;
    for channel in [
        "room1:x", "roomA:b", "room:1", "x", "room", "room:x", "r:1", "rom:1", "room:1x",
    ] {
        let r = a
            .request(json!({"type": "subscribe", "channel": channel}))
            .await;
        assert_error(&r, "forbidden");
        let r = a
            .request(json!({"type": "publish", "channel": channel, "data": 1}))
            .await;
        assert_error(&r, "forbidden");
    }
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

#[tokio::test]
async fn publish_claim_is_enforced() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    // May subscribe to news and rooms, may publish only to rooms.
    let mut a = hello_with(&n, "alice", &["room:*", "news"], &["room:*"]).await;
    let r = a
        .request(json!({"type": "subscribe", "channel": "news"}))
        .await;
    assert_ok(&r);
    for channel in ["news", "admin", "user:alice", "user:bob"] {
        let r = a
            .request(json!({"type": "publish", "channel": channel, "data": "x"}))
            .await;
        assert_error(&r, "forbidden");
    }
    // No publish claim at all.
    let mut b = hello_with(&n, "bob", &["room:*"], &[]).await;
    let r = b
        .request(json!({"type": "publish", "channel": "room:1", "data": "x"}))
        .await;
    assert_error(&r, "forbidden");
    // Nothing was published by the refused commands.
    for channel in ["news", "admin", "room:1", "user:alice", "user:bob"] {
        let (_, h) = n.get(&format!("/v1/channels/{channel}/history")).await;
        assert_eq!(h["offset"], 0, "{channel}: {h}");
    }
    assert!(a.silent_for(Duration::from_millis(100)).await);
    // The allowed publish works, on the same connection.
    let r = a
        .request(json!({"type": "publish", "channel": "room:1", "data": "x"}))
        .await;
    assert_eq!(r["result"]["offset"], 1, "{r}");
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

#[tokio::test]
async fn the_personal_channel_cannot_be_left() {
    let (n, mut w) = node_and_watcher(node::test_config()).await;
    let mut a = hello_with(&n, "alice", &["room:*"], &[]).await;
    let r = a
        .request(json!({"type": "unsubscribe", "channel": "user:alice"}))
        .await;
    assert_error(&r, "forbidden");
    let (_, body) = n
        .publish(json!({"user": "alice", "data": "still yours"}))
        .await;
    let m = a.next_message().await;
    assert_eq!(
        (m["channel"].clone(), m["offset"].clone()),
        (json!("user:alice"), body["offset"].clone())
    );
    // Unsubscribing a channel one is not in is harmless.
    let r = a
        .request(json!({"type": "unsubscribe", "channel": "room:9"}))
        .await;
    assert_eq!(r["result"], json!({}), "{r}");
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

fn origin_config() -> Config {
    Config {
        allowed_origins: Some(vec![
            "https://app.example".into(),
            "https://b.example".into(),
        ]),
        ..node::test_config()
    }
}

#[tokio::test]
async fn forged_origin_is_closed_4403() {
    let (n, mut w) = node_and_watcher(origin_config()).await;
    for origin in [
        "https://evil.example",
        "https://app.example.evil.com",
        "http://app.example",
        "https://app.example:8443",
        "null",
    ] {
        let mut c = Client::connect_with(&n.ws_url(), &[("Origin", origin)]).await;
        let tok = n.token("alice", &[], &[]);
        let _ = c
            .try_send_text(&json!({"type": "hello", "token": tok}).to_string())
            .await;
        assert_eq!(
            c.expect_close(Duration::from_secs(5)).await,
            Closed::Code(4403),
            "origin {origin}"
        );
    }
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

#[tokio::test]
async fn allowed_origin_and_no_origin_connect() {
    let (n, mut w) = node_and_watcher(origin_config()).await;
    for origin in ["https://app.example", "https://b.example"] {
        let mut c = Client::connect_with(&n.ws_url(), &[("Origin", origin)]).await;
        c.send(json!({"type": "hello", "token": n.token("alice", &[], &[])}))
            .await;
        let welcome = c.recv().await;
        assert_eq!(welcome["type"], "welcome", "origin {origin}: {welcome}");
    }
    // `w` connected without an Origin header.
    assert_undisturbed(&n, &mut w).await;
    assert_no_server_panic();
}

fn dev_config(jwt: bool, api: bool, dev: bool) -> Config {
    let base = node::test_config();
    Config {
        jwt_secret: if jwt { base.jwt_secret.clone() } else { None },
        api_key: if api { base.api_key.clone() } else { None },
        dev,
        ..base
    }
}

async fn dev_token(n: &TestNode, query: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{}/dev/token{query}", n.http()))
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn dev_mode_without_keys_hands_out_working_tokens() {
    watch_panics();
    let n = TestNode::start(dev_config(false, false, false)).await;
    let (status, body) = dev_token(&n, "?user=alice").await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().expect("a token").to_owned();
    let (mut c, welcome) = Client::hello(&n.ws_url(), &token, json!({})).await;
    assert_eq!(welcome["user"], "alice");
    // Dev tokens may subscribe and publish, but not to someone else's personal channel.
    let r = c
        .request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;
    assert_ok(&r);
    let r = c
        .request(json!({"type": "subscribe", "channel": "user:bob"}))
        .await;
    assert_error(&r, "forbidden");
    // The configured test key is not this node's key: the API stays closed to it.
    let (status, _) = n.publish(json!({"user": "alice", "data": 1})).await;
    assert_eq!(status, 401);
    for bad in ["", "?user=", "?user=a%20b", "?user=a:b"] {
        let (status, body) = dev_token(&n, bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{body}");
    }
    assert_no_server_panic();
}

#[tokio::test]
async fn no_dev_mode_when_a_key_is_configured() {
    watch_panics();
    let n = TestNode::start(dev_config(true, true, false)).await;
    let (status, body) = dev_token(&n, "?user=alice").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    // With one key only the node does not start in dev mode, nor with a random key in
    // place of the other: it refuses to start, naming what is missing.
    for (jwt, api, missing) in [
        (false, true, "HERALD_JWT_SECRET"),
        (true, false, "HERALD_API_KEY"),
    ] {
        let err = start_error("127.0.0.1:0", dev_config(jwt, api, false)).await;
        assert!(
            matches!(err, StartError::Keys(KeyError::Missing(_))),
            "jwt {jwt} api {api}: {err}"
        );
        assert!(err.to_string().starts_with(missing), "{err}");
    }
    assert_no_server_panic();
}

/// Runs a node on a listener bound to `addr` and expects it to refuse to start.
async fn start_error(addr: &str, config: Config) -> StartError {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let run = herald_server::run(listener, config, std::future::pending());
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("run returns at once")
        .expect_err("the node must refuse to start")
}

#[tokio::test]
async fn no_implicit_dev_mode_off_loopback() {
    // The listener decides, not `config.listen` (here still the default 127.0.0.1:8080):
    // on every interface, a node without keys does not start.
    let err = start_error("0.0.0.0:0", dev_config(false, false, false)).await;
    assert!(
        matches!(err, StartError::Keys(KeyError::NoKeysOffLoopback { .. })),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("HERALD_JWT_SECRET") && text.contains("HERALD_API_KEY"),
        "{text}"
    );
    // Explicit dev mode runs there (a dev cluster in containers).
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let node = tokio::spawn(herald_server::run(
        listener,
        dev_config(false, false, true),
        async move {
            let _ = stopped.await;
        },
    ));
    let url = format!("http://127.0.0.1:{port}/dev/token?user=alice");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = reqwest::get(&url).await {
            assert_eq!(r.status(), 200);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "dev node not up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    node.await.unwrap().expect("the dev node ran");
}

#[tokio::test]
async fn short_keys_stop_the_start_outside_dev_mode() {
    let short = "x".repeat(MIN_KEY_BYTES - 1);
    let short_secret = Config {
        jwt_secret: Some(short.clone()),
        ..node::test_config()
    };
    let err = start_error("127.0.0.1:0", short_secret).await;
    assert!(
        matches!(
            err,
            StartError::Keys(KeyError::TooShort {
                name: "HERALD_JWT_SECRET",
                ..
            })
        ),
        "{err}"
    );
    let short_api_key = Config {
        api_key: Some(short.clone()),
        ..node::test_config()
    };
    let err = start_error("127.0.0.1:0", short_api_key).await;
    assert!(
        matches!(
            err,
            StartError::Keys(KeyError::TooShort {
                name: "HERALD_API_KEY",
                ..
            })
        ),
        "{err}"
    );
    // Dev mode takes them.
    let n = TestNode::start(Config {
        jwt_secret: Some("s".into()),
        api_key: Some("k".into()),
        dev: true,
        ..node::test_config()
    })
    .await;
    assert_eq!(dev_token(&n, "?user=alice").await.0, 200);
}

#[tokio::test]
async fn dev_flag_with_keys_turns_dev_mode_on() {
    watch_panics();
    let n = TestNode::start(dev_config(true, true, true)).await;
    let (status, body) = dev_token(&n, "?user=carol").await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap();
    let (mut c, welcome) = Client::hello(&n.ws_url(), token, json!({})).await;
    assert_eq!(welcome["user"], "carol");
    // A shared dev cluster keeps its configured keys: tokens signed with the secret
    // connect, and the configured API key works.
    let (_, _) = Client::hello(&n.ws_url(), &n.token("dave", &[], &[]), json!({})).await;
    let (status, body) = n.publish(json!({"user": "carol", "data": "hi"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.next_message().await["data"], "hi");
    assert_no_server_panic();
}
