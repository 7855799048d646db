//! Choosing the node to connect to: the configured endpoints in rotation, with
//! `GET /v1/connect` for [`Endpoint::Discover`] ones.
//!
//! Each attempt walks the endpoints once, starting after the one used last time, and
//! takes the first URL that is not the node just lost. A dead node stays in `/v1/connect`
//! answers until its registry entry expires, so a discovered URL equal to the one that
//! just failed is passed over while another endpoint can offer something else; it is
//! used only when nothing else is available (it may be back by then).
//!
//! Over TLS nothing falls back to plaintext: an `https://` discovery endpoint must answer
//! a `wss://` URL ([`check_discovered`]), and redirects never go from `https` to `http`
//! ([`redirect_policy`]).

use std::future::Future;

use serde::Deserialize;

/// Where the client can connect. Endpoints are tried in the order they were added; after
/// a disconnect or a failed attempt the client moves on to the next one, so it prefers
/// another node than the one it just lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A WebSocket URL to connect to directly (`ws://host:port/ws`, or `wss://` with the
    /// `tls` feature).
    WebSocket(String),
    /// The HTTP base URL of any node or of the balancer (`http://host:port`, or
    /// `https://` with the `tls` feature): the client asks its `GET /v1/connect` for the
    /// least-loaded node's URL, then connects there directly. Asked again before every
    /// attempt. An `https://` endpoint must answer `wss://` URLs: a `ws://` one is refused,
    /// as the token would then travel in clear.
    Discover(String),
}

/// Whether `url` starts with `scheme` (`"wss://"`), ignoring ASCII case as URL schemes do.
pub(crate) fn has_scheme(url: &str, scheme: &str) -> bool {
    url.get(..scheme.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(scheme))
}

/// The most redirects one `/v1/connect` request follows.
const MAX_REDIRECTS: usize = 5;

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

/// Why no endpoint gave a URL.
#[derive(Debug)]
pub(crate) struct PickFailed {
    /// Every endpoint's failure, joined.
    pub(crate) message: String,
    /// Whether a TLS handshake failure was among them (reported as
    /// [`DisconnectReason::Tls`](crate::DisconnectReason::Tls): it needs attention,
    /// not patience).
    pub(crate) tls: bool,
}

/// One endpoint's discovery failure.
struct Failure {
    message: String,
    tls: bool,
}

/// A URL to connect to, and which endpoint gave it.
pub(crate) struct Picked {
    pub(crate) index: usize,
    pub(crate) url: String,
}

impl Endpoints {
    /// The endpoints; `http` asks `/v1/connect` (its timeout bounds each request).
    pub(crate) fn new(list: Vec<Endpoint>, http: reqwest::Client) -> Self {
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
    ) -> impl Future<Output = Result<Picked, PickFailed>> + Send + 'static {
        let n = self.list.len();
        let order: Vec<(usize, Endpoint)> = (0..n)
            .map(|i| (self.cursor + i) % n)
            .map(|i| (i, self.list[i].clone()))
            .collect();
        let http = self.http.clone();
        async move {
            let mut fallback = None;
            let mut errors = Vec::new();
            let mut tls = false;
            for (index, endpoint) in order {
                let url = match endpoint {
                    Endpoint::WebSocket(url) => url,
                    Endpoint::Discover(base) => match discover(&http, &base).await {
                        Ok(url) => url,
                        Err(e) => {
                            tracing::debug!(%base, error = %e.message, "/v1/connect failed");
                            tls |= e.tls;
                            errors.push(e.message);
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
            fallback.ok_or_else(|| PickFailed {
                message: errors.join("; "),
                tls,
            })
        }
    }

    /// The next attempt starts after the endpoint that was just used.
    pub(crate) fn used(&mut self, index: usize) {
        self.cursor = (index + 1) % self.list.len();
    }
}

/// Asks one node (or balancer) for the URL of the least-loaded node.
async fn discover(http: &reqwest::Client, base: &str) -> Result<String, Failure> {
    let url = format!("{}/v1/connect", base.trim_end_matches('/'));
    let failed = |message: String| Failure {
        message,
        tls: false,
    };
    let response = http
        .get(&url)
        .send()
        .await
        .map_err(|e| request_failed(&url, &e))?;
    let status = response.status();
    if !status.is_success() {
        return Err(failed(format!("{url}: HTTP {status}")));
    }
    let answer: ConnectAnswer = response
        .json()
        .await
        .map_err(|e| failed(format!("{url}: bad answer: {e}")))?;
    check_discovered(base, &answer.url).map_err(|e| failed(format!("{url}: {e}")))?;
    Ok(answer.url)
}

/// Describes a failed `/v1/connect` request. reqwest's own message names only the URL,
/// so the causes are added: the TLS one alone when there is one, else the whole chain.
fn request_failed(url: &str, error: &reqwest::Error) -> Failure {
    #[cfg(feature = "tls")]
    if let Some(tls) = crate::tls::tls_cause(error) {
        return Failure {
            message: crate::tls::describe(url, tls),
            tls: true,
        };
    }
    let mut message = format!("{url}: {error}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    Failure {
        message,
        tls: false,
    }
}

/// Checks a URL that the discovery endpoint `base` answered: a WebSocket URL, and a
/// `wss://` one when `base` was asked over `https://`, since a `ws://` URL there would
/// send the token in clear after the application asked for TLS (browsers refuse such
/// mixed content too).
pub(crate) fn check_discovered(base: &str, url: &str) -> Result<(), String> {
    let secure = has_scheme(url, "wss://");
    if !secure && !has_scheme(url, "ws://") {
        return Err(format!("answered {url:?}, not a ws:// or wss:// URL"));
    }
    if has_scheme(base, "https://") && !secure {
        return Err(format!(
            "answered {url:?} over https: refusing a plaintext ws:// URL from a TLS endpoint (set the nodes' HERALD_PUBLIC_URL to wss://)"
        ));
    }
    if secure && !cfg!(feature = "tls") {
        return Err(format!(
            "answered {url:?}: wss:// needs the `tls` feature of herald-client (this build has no TLS)"
        ));
    }
    Ok(())
}

/// Whether a redirect is followed: at most [`MAX_REDIRECTS`], and never from `https` back
/// to `http`. `hops` are the schemes of the URLs requested so far, the first one
/// included; `next` is the scheme the redirect points to.
fn redirect_allowed(hops: &[&str], next: &str) -> Result<(), String> {
    if hops.len() > MAX_REDIRECTS {
        return Err(format!("more than {MAX_REDIRECTS} redirects"));
    }
    if hops.iter().any(|s| s.eq_ignore_ascii_case("https")) && !next.eq_ignore_ascii_case("https") {
        return Err("refusing a redirect from https to plaintext http".into());
    }
    Ok(())
}

/// The redirect policy of `/v1/connect` requests ([`redirect_allowed`]).
pub(crate) fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let hops: Vec<&str> = attempt.previous().iter().map(|u| u.scheme()).collect();
        match redirect_allowed(&hops, attempt.url().scheme()) {
            Ok(()) => attempt.follow(),
            Err(e) => attempt.error(e),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(1))
            .redirect(redirect_policy())
            .build()
            .unwrap()
    }

    fn ws(list: &[&str]) -> Endpoints {
        Endpoints::new(
            list.iter()
                .map(|u| Endpoint::WebSocket(u.to_string()))
                .collect(),
            http(),
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
            http(),
        );
        let failed = e.pick(None).await.err().unwrap();
        assert!(!failed.tls);
        assert!(failed.message.contains("/v1/connect"), "{}", failed.message);
    }

    #[test]
    fn discovered_urls_never_downgrade() {
        assert!(check_discovered("http://lb", "ws://n/ws").is_ok());
        assert!(check_discovered("HTTPS://lb", "ws://n/ws")
            .unwrap_err()
            .contains("plaintext"));
        assert!(check_discovered("http://lb", "http://n/ws").is_err());
        assert!(check_discovered("http://lb", "").is_err());
        let secure = check_discovered("https://lb", "wss://n/ws");
        assert_eq!(secure.is_ok(), cfg!(feature = "tls"), "{secure:?}");
        assert_eq!(
            check_discovered("http://lb", "wss://n/ws").is_ok(),
            cfg!(feature = "tls")
        );
    }

    #[test]
    fn redirects_are_bounded_and_never_leave_https() {
        assert!(redirect_allowed(&["http"], "https").is_ok());
        assert!(redirect_allowed(&["http", "https"], "https").is_ok());
        assert!(redirect_allowed(&["https"], "http").is_err());
        assert!(redirect_allowed(&["http"; MAX_REDIRECTS], "http").is_ok());
        assert!(redirect_allowed(&["http"; MAX_REDIRECTS + 1], "http").is_err());
    }
}
