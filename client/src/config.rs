//! The client's settings and the [`ClientBuilder`] that collects and checks them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use herald_protocol::channel::validate_channel;
use herald_protocol::StreamPosition;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};

use crate::endpoints::has_scheme;
pub use crate::endpoints::Endpoint;
use crate::error::Error;

/// An error from a token callback.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The future a token callback returns.
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>>;

/// Where tokens come from.
#[derive(Clone)]
pub(crate) enum TokenSource {
    /// One token for the client's life; a 4401 stops the client.
    Static(String),
    /// Asked at the first connect, after every 4401, and on `expiring` (refresh).
    Provider(Arc<dyn Fn() -> TokenFuture + Send + Sync>),
}

/// The checked settings, shared with the connection task.
pub(crate) struct Config {
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) token: TokenSource,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) initial: Vec<(String, Option<StreamPosition>)>,
    pub(crate) request_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) stable_after: Duration,
    pub(crate) event_buffer: usize,
    /// The HTTP client of `/v1/connect` (with the TLS configuration below, when built
    /// with `tls`).
    pub(crate) http: reqwest::Client,
    /// The TLS configuration of `wss://` handshakes.
    #[cfg(feature = "tls")]
    pub(crate) tls: Arc<rustls::ClientConfig>,
    pub(crate) auto_ack: bool,
}

/// Builds a [`Client`]: endpoints, token, and optional tuning. See the crate docs for an
/// example.
pub struct ClientBuilder {
    endpoints: Vec<Endpoint>,
    token: Option<TokenSource>,
    headers: Vec<(String, String)>,
    initial: Vec<(String, Option<StreamPosition>)>,
    request_timeout: Duration,
    connect_timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    stable_after: Duration,
    event_buffer: usize,
    #[cfg(feature = "tls")]
    trust: crate::tls::Trust,
    auto_ack: bool,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            token: None,
            headers: Vec::new(),
            initial: Vec::new(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            stable_after: Duration::from_secs(5),
            event_buffer: 1024,
            #[cfg(feature = "tls")]
            trust: crate::tls::Trust::default(),
            auto_ack: true,
        }
    }
}

impl ClientBuilder {
    /// A builder with the default settings and no endpoint yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a WebSocket URL to connect to directly: `ws://host:port/ws`, or
    /// `wss://host/ws` with the `tls` feature (on by default; without it, `start()`
    /// refuses `wss://`).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.endpoints.push(Endpoint::WebSocket(url.into()));
        self
    }

    /// Adds a node's or balancer's HTTP base URL (`http://host:port`, or `https://host`
    /// with the `tls` feature) whose `/v1/connect` names the node to connect to.
    pub fn discover(mut self, http_base: impl Into<String>) -> Self {
        self.endpoints.push(Endpoint::Discover(http_base.into()));
        self
    }

    /// Adds an endpoint.
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// Uses one fixed token. If the server refuses it (4401), the client stops with
    /// [`StopReason::Unauthorized`](crate::StopReason::Unauthorized). It cannot be
    /// refreshed, so a session ends at the token's `exp` (v1.1 servers close it then).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(TokenSource::Static(token.into()));
        self
    }

    /// Gets tokens from a callback: once before the first connect, again each time the
    /// server refuses the current token (4401, for example after it expired), and when
    /// the server says the session's token is `expiring` (the client then refreshes the
    /// open session with it; return a new token each time). Between those, reconnects
    /// reuse the last token. A callback error counts as a failed attempt: the client
    /// backs off and asks again (or, for a refresh, retries shortly until the expiry).
    pub fn token_provider<F, Fut, E>(mut self, provider: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let provider = Arc::new(move || -> TokenFuture {
            let fut = provider();
            Box::pin(async move { fut.await.map_err(Into::into) })
        });
        self.token = Some(TokenSource::Provider(provider));
        self
    }

    /// Sends this `Origin` header with the WebSocket handshake (nodes with
    /// `HERALD_ALLOWED_ORIGINS` check it).
    pub fn origin(self, origin: impl Into<String>) -> Self {
        self.header("Origin", origin)
    }

    /// Sends an extra HTTP header with the WebSocket handshake.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Follows a channel from the first `hello` on (its current position; no history).
    pub fn subscribe(mut self, channel: impl Into<String>) -> Self {
        self.initial.push((channel.into(), None));
        self
    }

    /// Follows a channel from the first `hello` on, continuing after a stored position.
    pub fn subscribe_from(mut self, channel: impl Into<String>, since: StreamPosition) -> Self {
        self.initial.push((channel.into(), Some(since)));
        self
    }

    /// How long a command may wait for its reply, including the wait for a connection
    /// (default 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long one `/v1/connect` request, and the WebSocket handshake together with
    /// `hello` → `welcome`, may each take before the attempt counts as failed
    /// (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Reconnect backoff: the first delay is drawn from `0..=initial`, each further
    /// failure doubles the ceiling up to `max` (defaults 250 ms and 30 s). A session
    /// that stayed up for 5 s resets it.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max;
        self
    }

    /// How many events may wait for the application (default 1024). When they are not
    /// read, the client stops reading the socket, and the server eventually closes a
    /// connection that does not keep up (4509); the client then resumes.
    pub fn event_buffer(mut self, events: usize) -> Self {
        self.event_buffer = events.max(1);
        self
    }

    /// Trusts the root certificates of this PEM bundle (one or more `CERTIFICATE`
    /// blocks; other blocks are skipped) for `wss://` and `https://`, besides the
    /// built-in ones: a private CA, or the test CA of a staging deployment. May be
    /// called several times. A bundle without a certificate, or one that does not parse,
    /// makes `start()` fail with [`Error::Config`].
    #[cfg(feature = "tls")]
    pub fn tls_root_certificates_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.trust.extra_pem.push(pem.as_ref().to_vec());
        self
    }

    /// Whether to trust the built-in roots (the Mozilla list of `webpki-roots`; default
    /// true). Turn them off to trust only the certificates added with
    /// [`tls_root_certificates_pem`](Self::tls_root_certificates_pem) (then at least
    /// one is required). Server certificates are always verified: there is no option
    /// to accept an untrusted or invalid one.
    #[cfg(feature = "tls")]
    pub fn tls_built_in_roots(mut self, trust: bool) -> Self {
        self.trust.built_in = trust;
        self
    }

    /// Whether the client acknowledges the messages of the personal channel `user:<sub>`
    /// on its own (default: on). A message counts as seen once it is handed to the
    /// application (put on [`Events`]); acks are coalesced: at most one `ack` frame per
    /// [`ACK_DELAY`](crate::ACK_DELAY), carrying the latest offset. Turn it off to ack
    /// yourself with [`Client::ack`] once the user has really seen the messages: the
    /// server reports messages that no device acked in time (`message.unacked`, for a
    /// mobile push).
    pub fn auto_ack(mut self, on: bool) -> Self {
        self.auto_ack = on;
        self
    }

    /// The checked settings, or what is wrong with them.
    pub(crate) fn check(self) -> Result<Config, Error> {
        if self.endpoints.is_empty() {
            return Err(Error::Config(
                "no endpoint: add a url() or discover()".into(),
            ));
        }
        for endpoint in &self.endpoints {
            check_endpoint(endpoint).map_err(Error::Config)?;
        }
        let token = self
            .token
            .ok_or_else(|| Error::Config("no token: set token() or token_provider()".into()))?;
        let mut headers = Vec::with_capacity(self.headers.len());
        for (name, value) in self.headers {
            let n = HeaderName::try_from(name.as_str())
                .map_err(|e| Error::Config(format!("header name {name:?}: {e}")))?;
            let v = HeaderValue::try_from(value.as_str())
                .map_err(|e| Error::Config(format!("header {name}: {e}")))?;
            headers.push((n, v));
        }
        for (channel, _) in &self.initial {
            check_channel(channel)?;
        }
        #[cfg(feature = "tls")]
        let tls = crate::tls::client_config(&self.trust).map_err(Error::Config)?;
        let http = reqwest::Client::builder()
            .timeout(self.connect_timeout)
            .redirect(crate::endpoints::redirect_policy());
        #[cfg(feature = "tls")]
        let http = http.use_preconfigured_tls(rustls::ClientConfig::clone(&tls));
        let http = http
            .build()
            .map_err(|e| Error::Config(format!("HTTP client for /v1/connect: {e}")))?;
        Ok(Config {
            endpoints: self.endpoints,
            token,
            headers,
            initial: self.initial,
            request_timeout: self.request_timeout,
            connect_timeout: self.connect_timeout,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
            stable_after: self.stable_after,
            event_buffer: self.event_buffer,
            http,
            #[cfg(feature = "tls")]
            tls,
            auto_ack: self.auto_ack,
        })
    }
}

/// Checks an endpoint's scheme: `ws://` or `http://`, and with the `tls` feature also
/// `wss://` or `https://`. Done at `start()` rather than failing every attempt later.
fn check_endpoint(endpoint: &Endpoint) -> Result<(), String> {
    let (url, plain, secure) = match endpoint {
        Endpoint::WebSocket(u) => (u, "ws://", "wss://"),
        Endpoint::Discover(u) => (u, "http://", "https://"),
    };
    if has_scheme(url, plain) {
        return Ok(());
    }
    if has_scheme(url, secure) {
        return if cfg!(feature = "tls") {
            Ok(())
        } else {
            Err(format!(
                "{url:?}: {secure} needs the `tls` feature of herald-client (this build has no TLS)"
            ))
        };
    }
    let allowed = if cfg!(feature = "tls") {
        format!("{plain} or {secure}")
    } else {
        format!("{plain} ({secure} needs the `tls` feature)")
    };
    Err(format!("{url:?} should start with {allowed}"))
}

/// Checks a channel name locally, so a bad name never reaches (or closes) a connection.
pub(crate) fn check_channel(channel: &str) -> Result<(), Error> {
    validate_channel(channel).map_err(|e| Error::InvalidChannel {
        channel: channel.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(b: ClientBuilder) -> String {
        match b.check() {
            Err(Error::Config(m)) | Err(Error::InvalidChannel { reason: m, .. }) => m,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(err(ClientBuilder::new().token("t")).contains("no endpoint"));
        assert!(err(ClientBuilder::new().url("ws://h/ws")).contains("no token"));
        assert!(err(ClientBuilder::new().url("http://h/ws").token("t")).contains("ws://"));
        assert!(err(ClientBuilder::new().discover("ws://h").token("t")).contains("http://"));
        #[cfg(not(feature = "tls"))]
        {
            let e = err(ClientBuilder::new().url("wss://h/ws").token("t"));
            assert!(e.contains("`tls` feature"), "{e}");
            let e = err(ClientBuilder::new().discover("https://h").token("t"));
            assert!(e.contains("`tls` feature"), "{e}");
        }
        assert!(!err(ClientBuilder::new()
            .url("ws://h/ws")
            .token("t")
            .subscribe("bad name"))
        .is_empty());
        assert!(err(ClientBuilder::new()
            .url("ws://h/ws")
            .token("t")
            .header("Bad Name", "v"))
        .contains("header"));
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_endpoints_and_roots() {
        for b in [
            ClientBuilder::new().url("wss://h/ws"),
            ClientBuilder::new().url("WSS://h/ws"),
            ClientBuilder::new().discover("https://h"),
        ] {
            assert!(b.token("t").check().is_ok());
        }
        let e = err(ClientBuilder::new()
            .url("wss://h/ws")
            .token("t")
            .tls_root_certificates_pem("junk"));
        assert!(e.contains("CERTIFICATE"), "{e}");
        let e = err(ClientBuilder::new()
            .url("wss://h/ws")
            .token("t")
            .tls_built_in_roots(false));
        assert!(e.contains("no trusted root"), "{e}");
    }

    #[test]
    fn schemes() {
        assert!(check_endpoint(&Endpoint::WebSocket("ws://h/ws".into())).is_ok());
        assert!(check_endpoint(&Endpoint::Discover("HTTP://h".into())).is_ok());
        assert!(check_endpoint(&Endpoint::WebSocket("wss".into())).is_err());
        assert!(check_endpoint(&Endpoint::Discover("".into())).is_err());
        assert!(has_scheme("wss://x", "wss://") && !has_scheme("ws://x", "wss://"));
    }

    #[test]
    fn start_needs_a_runtime() {
        let r = ClientBuilder::new().url("ws://h/ws").token("t").start();
        assert!(matches!(r, Err(Error::Config(m)) if m.contains("tokio")));
    }
}
