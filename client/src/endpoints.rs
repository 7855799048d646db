//! Choosing the node to connect to: the configured endpoints in rotation, with
//! `GET /v1/connect` for [`Endpoint::Discover`] ones.
//!
//! Each attempt walks the endpoints once, starting after the one used last time, and
//! takes the first URL that is not the node just lost. A dead node stays in `/v1/connect`
//! answers until its registry entry expires, so a discovered URL equal to the one that
//! just failed is passed over while another endpoint can offer something else; it is
//! used only when nothing else is available (it may be back by then).

use std::future::Future;
use std::time::Duration;

use serde::Deserialize;

use crate::config::Endpoint;

/// The `/v1/connect` answer (only the field the client needs).
#[derive(Deserialize)]
struct ConnectAnswer {
    url: String,
}

/// The endpoints and where the next attempt starts.
pub(crate) struct Endpoints {
    list: Vec<Endpoint>,
    cursor: usize,
    http: reqwest::Client,
}

/// A URL to connect to, and which endpoint gave it.
pub(crate) struct Picked {
    pub(crate) index: usize,
    pub(crate) url: String,
}

impl Endpoints {
    /// The endpoints, with `timeout` for each `/v1/connect` request.
    pub(crate) fn new(list: Vec<Endpoint>, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .unwrap_or_default();
        Self {
            list,
            cursor: 0,
            http,
        }
    }

    /// Finds a URL, avoiding `avoid` when possible. The future owns what it needs, so
    /// the connection task can answer commands while it runs.
    pub(crate) fn pick(
        &self,
        avoid: Option<String>,
    ) -> impl Future<Output = Result<Picked, String>> + Send + 'static {
        let n = self.list.len();
        let order: Vec<(usize, Endpoint)> = (0..n)
            .map(|i| (self.cursor + i) % n)
            .map(|i| (i, self.list[i].clone()))
            .collect();
        let http = self.http.clone();
        async move {
            let mut fallback = None;
            let mut errors = Vec::new();
            for (index, endpoint) in order {
                let url = match endpoint {
                    Endpoint::WebSocket(url) => url,
                    Endpoint::Discover(base) => match discover(&http, &base).await {
                        Ok(url) => url,
                        Err(e) => {
                            tracing::debug!(%base, error = %e, "/v1/connect failed");
                            errors.push(e);
                            continue;
                        }
                    },
                };
                if avoid.as_deref() == Some(url.as_str()) {
                    fallback.get_or_insert(Picked { index, url });
                    continue;
                }
                return Ok(Picked { index, url });
            }
            fallback.ok_or_else(|| errors.join("; "))
        }
    }

    /// The next attempt starts after the endpoint that was just used.
    pub(crate) fn used(&mut self, index: usize) {
        self.cursor = (index + 1) % self.list.len();
    }
}

/// Asks one node (or balancer) for the URL of the least-loaded node.
async fn discover(http: &reqwest::Client, base: &str) -> Result<String, String> {
    let url = format!("{}/v1/connect", base.trim_end_matches('/'));
    let response = http
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("{url}: HTTP {status}"));
    }
    let answer: ConnectAnswer = response
        .json()
        .await
        .map_err(|e| format!("{url}: bad answer: {e}"))?;
    Ok(answer.url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws(list: &[&str]) -> Endpoints {
        Endpoints::new(
            list.iter()
                .map(|u| Endpoint::WebSocket(u.to_string()))
                .collect(),
            Duration::from_secs(1),
        )
    }

    #[tokio::test]
    async fn rotates_and_avoids_the_lost_node() {
        let mut e = ws(&["ws://a/ws", "ws://b/ws", "ws://c/ws"]);
        let p = e.pick(None).await.unwrap();
        assert_eq!(p.url, "ws://a/ws");
        e.used(p.index);
        let p = e.pick(Some("ws://b/ws".into())).await.unwrap();
        assert_eq!(p.url, "ws://c/ws");
        e.used(p.index);
        assert_eq!(e.pick(None).await.unwrap().url, "ws://a/ws");
    }

    #[tokio::test]
    async fn the_lost_node_is_the_last_resort() {
        let e = ws(&["ws://a/ws"]);
        assert_eq!(
            e.pick(Some("ws://a/ws".into())).await.unwrap().url,
            "ws://a/ws"
        );
    }

    #[tokio::test]
    async fn failed_discovery_is_an_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = Endpoints::new(
            vec![Endpoint::Discover(format!("http://127.0.0.1:{port}"))],
            Duration::from_secs(1),
        );
        assert!(e.pick(None).await.is_err());
    }
}
