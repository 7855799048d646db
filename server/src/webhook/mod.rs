//! Webhooks: tell the backend, at least once and in order per user, when users go
//! online or offline and channels become occupied or vacated (and any other event
//! appended through [`Webhooks::append`], such as `message.unacked`).
//!
//! - [`tracker`]: this node's side of presence: counts local sessions per user and per
//!   channel, and reports the first / last one to the broker in batches, off the
//!   session's path. The broker decides what is a real transition, cluster-wide
//!   ([`crate::backend::webhooks`]).
//! - [`dispatch`]: for each URL, the one node holding its lease POSTs batches of the
//!   log, signed ([`sign`]), retrying the same batch with backoff until a 2xx.
//! - [`Settings`]: the configuration, checked at startup.
//!
//! Personal channels (`user:<id>`) produce no channel events: `user.online` and
//! `user.offline` already say it. The offline grace applies to channels too, so a room
//! whose only member reconnects does not flap.

pub mod dispatch;
pub mod sign;
pub mod tracker;
pub mod unacked;

use std::sync::Arc;
use std::time::Duration;

use herald_protocol::channel::personal_channel_owner;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::error::BackendError;
use crate::backend::webhooks::{WebhookStore, WebhookStoreSettings};
use crate::config::Config;
use crate::metrics::Metrics;

/// What appending an event takes ([`Webhooks::append`]), and the subjects' names.
pub use crate::backend::webhooks::{channel_subject, user_subject, NewEvent};

/// Most events per request that `HERALD_WEBHOOK_BATCH_SIZE` may ask for.
pub const MAX_BATCH: usize = 1_000;
/// Least `HERALD_WEBHOOK_RETENTION`.
pub const MIN_RETENTION: usize = 1_000;

/// Why the webhook settings were refused at startup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// A URL that is not `http://` or `https://` with a host.
    #[error("HERALD_WEBHOOK_URL: `{0}` is not an http:// or https:// URL")]
    BadUrl(String),
    /// URLs without a secret.
    #[error("HERALD_WEBHOOK_SECRET is required when HERALD_WEBHOOK_URL is set")]
    MissingSecret,
    /// A secret under 32 bytes outside dev mode.
    #[error(
        "HERALD_WEBHOOK_SECRET must be at least {} bytes outside dev mode",
        crate::auth::MIN_KEY_BYTES
    )]
    WeakSecret,
    /// A number out of its range.
    #[error("{0}")]
    OutOfRange(String),
    /// The HTTP client could not be built (its TLS setup failed).
    #[error("webhook HTTP client: {0}")]
    Http(String),
}

/// The webhook configuration, checked. Its `Debug` shows neither the secret nor the
/// URLs (a URL may carry credentials).
#[derive(Clone)]
pub struct Settings {
    /// Receivers.
    pub urls: Vec<reqwest::Url>,
    /// The signing key.
    pub secret: Arc<[u8]>,
    /// `HERALD_OFFLINE_GRACE_MS`.
    pub grace: Duration,
    /// Events per request.
    pub batch_size: usize,
    /// Events kept in the log.
    pub retention: usize,
    /// One request's time limit.
    pub timeout: Duration,
    /// The longest pause between attempts.
    pub retry_max: Duration,
    /// The node TTL: how soon a dead node's users start their grace, and a dead
    /// dispatcher's lease expires.
    pub node_ttl: Duration,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("urls", &self.urls.len())
            .field("secret", &"<redacted>")
            .field("grace", &self.grace)
            .field("batch_size", &self.batch_size)
            .field("retention", &self.retention)
            .field("timeout", &self.timeout)
            .field("retry_max", &self.retry_max)
            .field("node_ttl", &self.node_ttl)
            .finish()
    }
}

impl Settings {
    /// The webhook settings of `config`; `None` without `HERALD_WEBHOOK_URL`. `dev`:
    /// dev mode, where a short secret is allowed.
    pub fn from_config(config: &Config, dev: bool) -> Result<Option<Self>, SettingsError> {
        let urls: Vec<&str> = config
            .webhook_url
            .iter()
            .flatten()
            .map(|u| u.trim())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Ok(None);
        }
        let urls = urls
            .into_iter()
            .map(|u| match reqwest::Url::parse(u) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                    Ok(url)
                }
                _ => Err(SettingsError::BadUrl(u.to_owned())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let secret = config
            .webhook_secret
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or(SettingsError::MissingSecret)?;
        if !dev && secret.len() < crate::auth::MIN_KEY_BYTES {
            return Err(SettingsError::WeakSecret);
        }
        if !(1..=MAX_BATCH).contains(&config.webhook_batch_size) {
            return Err(SettingsError::OutOfRange(format!(
                "HERALD_WEBHOOK_BATCH_SIZE must be 1–{MAX_BATCH}"
            )));
        }
        if config.webhook_retention < MIN_RETENTION {
            return Err(SettingsError::OutOfRange(format!(
                "HERALD_WEBHOOK_RETENTION must be at least {MIN_RETENTION}"
            )));
        }
        if config.webhook_timeout_ms == 0 || config.webhook_retry_max_ms == 0 {
            return Err(SettingsError::OutOfRange(
                "HERALD_WEBHOOK_TIMEOUT_MS and HERALD_WEBHOOK_RETRY_MAX_MS must be at least 1"
                    .into(),
            ));
        }
        Ok(Some(Self {
            urls,
            secret: secret.as_bytes().into(),
            grace: Duration::from_millis(config.offline_grace_ms),
            batch_size: config.webhook_batch_size,
            retention: config.webhook_retention,
            timeout: Duration::from_millis(config.webhook_timeout_ms),
            retry_max: Duration::from_millis(config.webhook_retry_max_ms),
            node_ttl: crate::backend::settings::BackendSettings::from_config(config).node_ttl,
        }))
    }

    /// What the broker's store needs.
    pub fn store_settings(&self) -> WebhookStoreSettings {
        WebhookStoreSettings {
            grace: self.grace,
            node_ttl: self.node_ttl,
            // A dead dispatcher's URL is taken over within the node TTL.
            lease: self.node_ttl,
            retention: self.retention,
        }
    }
}

/// This node's webhooks: the tracker, the dispatchers and the store they share.
pub struct Webhooks {
    /// The broker's log and presence state; [`Webhooks::append`] is the way in.
    pub store: Arc<dyn WebhookStore>,
    /// This node's local sessions per user and channel.
    pub tracker: tracker::Tracker,
    settings: Settings,
    node_id: String,
    metrics: Arc<Metrics>,
    /// Wakes this node's dispatchers when it appended events.
    appended: Notify,
    /// The HTTP client of every dispatcher (one connection pool).
    http: reqwest::Client,
}

impl Webhooks {
    /// Webhooks of node `node_id`, kept in `store` (opened with
    /// [`Settings::store_settings`]).
    pub fn new(
        settings: Settings,
        store: Arc<dyn WebhookStore>,
        node_id: String,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SettingsError> {
        let http =
            dispatch::client(settings.timeout).map_err(|e| SettingsError::Http(e.to_string()))?;
        Ok(Self {
            http,
            store,
            tracker: tracker::Tracker::default(),
            settings,
            node_id,
            metrics,
            appended: Notify::new(),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// A session of `user` started on this node.
    pub fn user_connected(&self, user: &str) {
        self.tracker.add(user_subject(user));
    }

    /// A session of `user` ended on this node.
    pub fn user_disconnected(&self, user: &str) {
        self.tracker.remove(user_subject(user));
    }

    /// A session joined `channel` (personal channels are left out: see the module doc).
    pub fn channel_joined(&self, channel: &str) {
        if personal_channel_owner(channel).is_none() {
            self.tracker.add(channel_subject(channel));
        }
    }

    /// A session left `channel`.
    pub fn channel_left(&self, channel: &str) {
        if personal_channel_owner(channel).is_none() {
            self.tracker.remove(channel_subject(channel));
        }
    }

    /// Appends an event of any type to the cluster's log (it gets `id`, `seq` and `at`
    /// there) and wakes this node's dispatchers. On an error the event may still have
    /// been appended (an answer lost after Redis ran the script); appending it again
    /// makes a second event with another id.
    pub async fn append(&self, event: &NewEvent) -> Result<(), BackendError> {
        self.store.append(event).await?;
        self.appended.notify_waiters();
        Ok(())
    }

    /// Starts the tracker's reports and sweeps and one dispatcher per URL; they run
    /// until `stop`.
    pub fn spawn(self: &Arc<Self>, stop: CancellationToken) {
        tokio::spawn(tracker::run(Arc::clone(self), stop.clone()));
        for url in &self.settings.urls {
            tokio::spawn(dispatch::run(Arc::clone(self), url.clone(), stop.clone()));
        }
    }

    /// After the drain: reports the last departures, lets go of anything left, and
    /// gives up this node's leases, so other nodes deliver at once.
    pub async fn finish(&self) {
        tracker::flush(self).await;
        if let Err(e) = self.store.leave(&self.node_id).await {
            tracing::warn!(error = %e, "webhooks: could not leave; the node TTL will do it");
        }
        for url in &self.settings.urls {
            let _ = self
                .store
                .release(&dispatch::target_id(url), &self.node_id)
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Config {
        Config::parse_from(std::iter::once("herald").chain(args.iter().copied()))
    }

    #[test]
    fn settings_rules() {
        assert!(Settings::from_config(&parse(&[]), false).unwrap().is_none());
        let long = "k".repeat(32);
        let s = Settings::from_config(
            &parse(&[
                "--webhook-url",
                "http://127.0.0.1:9/a, https://x.example/h",
                "--webhook-secret",
                &long,
            ]),
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.urls.len(), 2);
        let debug = format!("{s:?}");
        assert!(
            !debug.contains(&long) && !debug.contains("x.example"),
            "{debug}"
        );
        assert_eq!(
            (s.grace, s.batch_size, s.retention),
            (Duration::from_secs(5), 100, 100_000)
        );
        let err = |args: &[&str], dev| Settings::from_config(&parse(args), dev).unwrap_err();
        assert_eq!(
            err(&["--webhook-url", "http://h/"], false),
            SettingsError::MissingSecret
        );
        assert_eq!(
            err(
                &["--webhook-url", "http://h/", "--webhook-secret", "short"],
                false
            ),
            SettingsError::WeakSecret
        );
        assert!(Settings::from_config(
            &parse(&["--webhook-url", "http://h/", "--webhook-secret", "short"]),
            true
        )
        .is_ok());
        for bad in ["ftp://h/", "h:80", "http://", "not a url"] {
            assert!(
                matches!(
                    err(&["--webhook-url", bad, "--webhook-secret", &long], false),
                    SettingsError::BadUrl(_)
                ),
                "{bad}"
            );
        }
        for (flag, v) in [
            ("--webhook-batch-size", "0"),
            ("--webhook-batch-size", "1001"),
            ("--webhook-retention", "999"),
            ("--webhook-timeout-ms", "0"),
        ] {
            assert!(
                matches!(
                    err(
                        &[
                            "--webhook-url",
                            "http://h/",
                            "--webhook-secret",
                            &long,
                            flag,
                            v
                        ],
                        false
                    ),
                    SettingsError::OutOfRange(_)
                ),
                "{flag} {v}"
            );
        }
    }
}
