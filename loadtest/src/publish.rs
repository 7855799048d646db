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
    /// `<api>/v1/publish/batch` per node.
    batch_urls: Vec<String>,
    auth: String,
}

/// The API's answer to a publish.
#[derive(Debug, Clone, Deserialize)]
pub struct Published {
    /// The message's offset.
    pub offset: u64,
    /// The channel's epoch the offset belongs to.
    #[serde(default)]
    pub epoch: String,
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
            batch_urls: apis
                .iter()
                .map(|a| format!("{}/v1/publish/batch", a.trim_end_matches('/')))
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
        let url = &self.urls[node % self.urls.len()];
        let response = self.post(url, body, "publish").await?;
        response.json().await.context("publish answer")
    }

    /// POSTs `body` to `url` with the API key; anything but 200 is an error naming `what`.
    async fn post(&self, url: &str, body: String, what: &str) -> anyhow::Result<reqwest::Response> {
        let response = self
            .client
            .post(url)
            .header("authorization", &self.auth)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| format!("{what} request"))?;
        let status = response.status();
        if status != 200 {
            let text = response.text().await.unwrap_or_default();
            return Err(anyhow!("{what} answered {status}: {}", text.trim()));
        }
        Ok(response)
    }

    /// Publishes a batch (`bodies` are single publish request bodies) through node
    /// `node` with `POST /v1/publish/batch`: one result per message, in order.
    pub async fn publish_batch(
        &self,
        node: usize,
        bodies: &[String],
    ) -> anyhow::Result<Vec<Result<Published, String>>> {
        let body = format!(r#"{{"messages":[{}]}}"#, bodies.join(","));
        let url = &self.batch_urls[node % self.batch_urls.len()];
        let response = self.post(url, body, "batch publish").await?;
        let answer: BatchAnswer = response.json().await.context("batch publish answer")?;
        if answer.results.len() != bodies.len() {
            return Err(anyhow!(
                "batch publish answered {} results for {} messages",
                answer.results.len(),
                bodies.len()
            ));
        }
        Ok(answer
            .results
            .into_iter()
            .map(|r| match r {
                BatchResult::Published(p) => Ok(p),
                BatchResult::Error { error } => Err(error.to_string()),
            })
            .collect())
    }
}

#[derive(Deserialize)]
struct BatchAnswer {
    results: Vec<BatchResult>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum BatchResult {
    Published(Published),
    Error { error: serde_json::Value },
}

/// A publish body for user `user`.
pub fn to_user(user: &str, data: &str) -> String {
    format!(r#"{{"user":"{user}","data":{data}}}"#)
}

/// A publish body for channel `channel`.
pub fn to_channel(channel: &str, data: &str) -> String {
    format!(r#"{{"channel":"{channel}","data":{data}}}"#)
}
