//! Publishing through the HTTP API (`POST /v1/publish`), the way an application backend
//! pushes. One shared keep-alive client: it keeps a pool of connections per node.

use std::time::Duration;

use anyhow::{anyhow, Context};
use serde::Deserialize;

/// Publishes to the nodes' HTTP APIs.
pub struct Publisher {
    client: reqwest::Client,
    /// `<api>/v1/publish` per node.
    urls: Vec<String>,
    auth: String,
}

/// The API's answer to a publish.
#[derive(Debug, Deserialize)]
pub struct Published {
    /// The message's offset.
    pub offset: u64,
}

impl Publisher {
    /// A publisher for these API base URLs (`http://host:port`).
    pub fn new(apis: &[String], api_key: &str) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            client,
            urls: apis
                .iter()
                .map(|a| format!("{}/v1/publish", a.trim_end_matches('/')))
                .collect(),
            auth: format!("Bearer {api_key}"),
        })
    }

    /// Number of API endpoints.
    pub fn nodes(&self) -> usize {
        self.urls.len()
    }

    /// Publishes `body` (a complete publish request JSON) through node `node`. Only an
    /// answer 200 with an offset is a success.
    pub async fn publish(&self, node: usize, body: String) -> anyhow::Result<Published> {
        let response = self
            .client
            .post(&self.urls[node % self.urls.len()])
            .header("authorization", &self.auth)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .context("publish request")?;
        let status = response.status();
        if status != 200 {
            let text = response.text().await.unwrap_or_default();
            return Err(anyhow!("publish answered {status}: {}", text.trim()));
        }
        response.json().await.context("publish answer")
    }
}

/// A publish body for user `user`.
pub fn to_user(user: &str, data: &str) -> String {
    format!(r#"{{"user":"{user}","data":{data}}}"#)
}

/// A publish body for channel `channel`.
pub fn to_channel(channel: &str, data: &str) -> String {
    format!(r#"{{"channel":"{channel}","data":{data}}}"#)
}
