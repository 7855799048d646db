//! Follows a user's notifications (and optional channels) and prints every event.
//!
//! Against a dev-mode node (`cargo run --release --bin herald`):
//!
//! ```sh
//! cargo run -p herald-client --example notifications -- --url ws://127.0.0.1:8080/ws --user alice
//! # in another shell: push to alice through the server API (the node prints its dev API key)
//! curl -X POST http://127.0.0.1:8080/v1/publish -H "Authorization: Bearer $KEY" \
//!   -d '{"user":"alice","data":{"text":"hello"}}'
//! ```
//!
//! Without `--token`, tokens come from the node's `/dev/token?user=` (dev mode only),
//! fetched again whenever the node refuses one. With `--channel room:1`, each line typed
//! on stdin is published to that channel. Stop and restart the node, or run a
//! `scripts/dev-cluster` and stop its nodes, to watch the client reconnect and resume.
//!
//! Behind a TLS balancer: `--url wss://push.example.com/ws --token …`, with `--ca ca.pem`
//! when its certificate comes from a private CA.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use herald_client::{Client, Event};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser)]
#[command(about = "Print a Herald user's notifications")]
struct Args {
    /// WebSocket URL of a node (repeat for several).
    #[arg(long)]
    url: Vec<String>,
    /// HTTP base URL of a node or balancer to ask `/v1/connect` (repeat for several).
    #[arg(long)]
    discover: Vec<String>,
    /// The user to connect as (for dev tokens).
    #[arg(long, default_value = "alice")]
    user: String,
    /// A token; without one, dev tokens are fetched from the node.
    #[arg(long)]
    token: Option<String>,
    /// Channels to follow besides the personal one; stdin lines go to the first.
    #[arg(long)]
    channel: Vec<String>,
    /// PEM file of a CA to trust for `wss://` and `https://`, besides the built-in roots.
    #[cfg(feature = "tls")]
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
}

/// `ws://host:port/ws` → `http://host:port`.
fn http_base(ws_url: &str) -> String {
    let rest = ws_url
        .strip_prefix("ws://")
        .map(|r| format!("http://{r}"))
        .or_else(|| {
            ws_url
                .strip_prefix("wss://")
                .map(|r| format!("https://{r}"))
        })
        .unwrap_or_else(|| ws_url.to_owned());
    rest.trim_end_matches("/ws").to_owned()
}

async fn dev_token(base: String, user: String) -> anyhow::Result<String> {
    let answer: Value = reqwest::Client::new()
        .get(format!("{base}/dev/token"))
        .query(&[("user", user.as_str())])
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .error_for_status()
        .context("/dev/token (is the node in dev mode?)")?
        .json()
        .await?;
    answer["token"]
        .as_str()
        .map(str::to_owned)
        .context("no token in the /dev/token answer")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "herald_client=warn".into()))
        .init();
    let args = Args::parse();
    if args.url.is_empty() && args.discover.is_empty() {
        bail!("give at least one --url or --discover");
    }
    let mut builder = Client::builder();
    for url in &args.url {
        builder = builder.url(url);
    }
    for base in &args.discover {
        builder = builder.discover(base);
    }
    for channel in &args.channel {
        builder = builder.subscribe(channel);
    }
    #[cfg(feature = "tls")]
    if let Some(path) = &args.ca {
        let pem = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        builder = builder.tls_root_certificates_pem(pem);
    }
    builder = match args.token {
        Some(token) => builder.token(token),
        None => {
            let base = match args.discover.first() {
                Some(base) => base.clone(),
                None => http_base(&args.url[0]),
            };
            let user = args.user.clone();
            builder.token_provider(move || dev_token(base.clone(), user.clone()))
        }
    };
    let (client, mut events) = builder.start()?;

    // Lines typed on stdin are published to the first channel.
    if let Some(channel) = args.channel.first().cloned() {
        let client = client.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match client.publish(&channel, &json!({ "text": line })).await {
                    Ok(position) => println!("published as #{}", position.offset),
                    Err(e) => println!("publish failed: {e}"),
                }
            }
        });
    }

    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Message(m)) => println!("{} #{} {}", m.channel, m.offset, m.data),
                // Ephemeral messages (typing indicators): no offset, never stored.
                Some(Event::Ephemeral(e)) => println!(
                    "{} (ephemeral from {}) {}",
                    e.channel,
                    e.from.as_deref().unwrap_or("the server"),
                    e.data
                ),
                Some(Event::Connected(c)) => {
                    println!("connected to {} as {} ({})", c.node, c.user, c.url)
                }
                Some(Event::Subscribed(s)) => println!(
                    "following {} at #{}{}{}",
                    s.channel,
                    s.position.offset,
                    if s.recovered { " (recovered)" } else { "" },
                    if s.by_server { " (added by the server)" } else { "" }
                ),
                Some(Event::Resync(r)) => {
                    println!("lost continuity on {}: reload it ({:?})", r.channel, r.cause)
                }
                Some(Event::Disconnected(d)) => {
                    println!("disconnected: {:?}; retry in {:?}", d.reason, d.retry_in)
                }
                Some(Event::SubscribeFailed { channel, error }) => {
                    println!("cannot follow {channel}: {}", error.message)
                }
                Some(Event::Unsubscribed { channel, reason }) => {
                    println!("no longer following {channel} ({reason})")
                }
                Some(Event::Stopped(reason)) => {
                    println!("stopped: {reason:?}");
                    break;
                }
                None => break,
            },
            _ = tokio::signal::ctrl_c() => {
                client.close().await;
            }
        }
    }
    Ok(())
}
