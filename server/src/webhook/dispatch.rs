//! Delivery to one webhook URL: at least once, in log order, one node at a time.
//!
//! Each node runs one dispatcher per configured URL, but only the holder of the URL's
//! lease (in the store, renewed while it works) sends: one sender per URL makes the
//! order of the log the order of delivery, so a user's events arrive in order. The
//! holder reads a batch after the URL's cursor, POSTs it signed, and on a 2xx moves
//! the cursor. Anything else (another status, a timeout, a connection error) is
//! retried: the *same* batch, same ids, with exponential backoff and jitter, until it
//! succeeds. A holder that dies stops renewing; within the lease (the node TTL)
//! another node takes the lease and sends everything after the cursor again, so
//! events the dead node had not delivered are delivered by another.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::{sign, Webhooks};
use crate::backend::webhooks::{Batch, StoredEvent};

/// First pause after a failed attempt; it doubles up to the configured cap.
pub const RETRY_BASE: Duration = Duration::from_millis(500);
/// How often the lease holder looks for new events when it has none (events
/// appended by this node wake it at once).
pub const POLL_EVERY: Duration = Duration::from_millis(250);
/// Pause after the store failed (Redis down).
const STORE_RETRY: Duration = Duration::from_secs(1);

/// The id of a URL in the store (lease and cursor names): a hash, so that a URL's
/// credentials never land in Redis keys.
pub fn target_id(url: &reqwest::Url) -> String {
    let digest = Sha256::digest(url.as_str().as_bytes());
    digest[..12].iter().map(|b| format!("{b:02x}")).collect()
}

/// The pause before attempt `attempt + 1` (0 after the first failure): `RETRY_BASE ×
/// 2^attempt`, capped at `max`, times a jitter factor `jitter` in [0.5, 1] so that
/// nodes and URLs do not retry in step.
pub fn backoff(attempt: u32, max: Duration, jitter: f64) -> Duration {
    let exp = RETRY_BASE.saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
    exp.min(max).mul_f64(jitter.clamp(0.5, 1.0))
}

/// The request body of a batch: `{"events":[…]}`, from the stored JSON, untouched.
pub fn body(events: &[StoredEvent]) -> String {
    let mut s = String::with_capacity(12 + events.iter().map(|e| e.json.len() + 1).sum::<usize>());
    s.push_str(r#"{"events":["#);
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&e.json);
    }
    s.push_str("]}");
    s
}

/// Why an attempt failed, for the log.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("answered {0}")]
    Status(u16),
    #[error("{0}")]
    Http(#[from] reqwest::Error),
}

/// Builds the HTTP client: bounded time, no redirects (a webhook that moved is a
/// configuration error, and following it would send signed events elsewhere).
pub(super) fn client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// One POST. The answer's body is never read: only the status counts.
async fn post(
    http: &reqwest::Client,
    url: &reqwest::Url,
    secret: &[u8],
    body: &str,
) -> Result<(), AttemptError> {
    let signature = sign::header(secret, crate::clock::now_secs(), body.as_bytes());
    let response = http
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(sign::HEADER, signature)
        .body(body.to_owned())
        .send()
        .await?;
    let status = response.status();
    drop(response);
    if status.is_success() {
        Ok(())
    } else {
        Err(AttemptError::Status(status.as_u16()))
    }
}

/// Waits `pause` while keeping the lease; `false` when the lease was lost (another
/// node sends now) or `stop` came.
async fn hold(
    webhooks: &Webhooks,
    target: &str,
    pause: Duration,
    stop: &CancellationToken,
) -> bool {
    let renew = webhooks.settings.node_ttl / 3;
    let end = tokio::time::Instant::now() + pause;
    loop {
        let now = tokio::time::Instant::now();
        if now >= end {
            return true;
        }
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep((end - now).min(renew)) => {}
        }
        if let Ok(false) = webhooks.store.claim(target, &webhooks.node_id).await {
            return false;
        }
    }
}

/// Sends `batch` until it is delivered (`true`) or the lease is lost or `stop` came.
async fn deliver(
    webhooks: &Webhooks,
    http: &reqwest::Client,
    url: &reqwest::Url,
    target: &str,
    batch: &Batch,
    stop: &CancellationToken,
) -> bool {
    let m = &webhooks.metrics.webhooks;
    let body = body(&batch.events);
    let last = batch.events.last().map_or(0, |e| e.n);
    let count = batch.events.len() as u64;
    let mut attempt: u32 = 0;
    loop {
        // Keep the lease while the request runs (it may take the whole timeout).
        let request = post(http, url, &webhooks.settings.secret, &body);
        let renew_every = webhooks.settings.node_ttl / 3;
        tokio::pin!(request);
        let result = loop {
            tokio::select! {
                _ = stop.cancelled() => return false,
                r = &mut request => break r,
                _ = tokio::time::sleep(renew_every) => {
                    let _ = webhooks.store.claim(target, &webhooks.node_id).await;
                }
            }
        };
        match result {
            Ok(()) => {
                m.delivered.inc_by(count);
                m.requests
                    .get_or_create(&crate::metrics::OutcomeLabel { outcome: "ok" })
                    .inc();
                // Delivered; if the cursor cannot move now (Redis down), the batch is
                // sent again later: at least once.
                loop {
                    match webhooks.store.ack(target, &webhooks.node_id, last).await {
                        Ok(held) => return held,
                        Err(e) => {
                            tracing::debug!(error = %e, "webhooks: could not record a delivery; retrying");
                            if !hold(webhooks, target, STORE_RETRY, stop).await {
                                return false;
                            }
                        }
                    }
                }
            }
            Err(e) => {
                m.requests
                    .get_or_create(&crate::metrics::OutcomeLabel { outcome: "failed" })
                    .inc();
                m.retried.inc_by(count);
                let pause = backoff(
                    attempt,
                    webhooks.settings.retry_max,
                    rand::rng().random_range(0.5..=1.0),
                );
                if attempt == 0 || attempt.is_multiple_of(10) {
                    tracing::warn!(url = %redacted(url), error = %e, events = count, attempt, retry_in_ms = pause.as_millis() as u64, "webhook delivery failed; retrying");
                }
                attempt = attempt.saturating_add(1);
                if !hold(webhooks, target, pause, stop).await {
                    return false;
                }
            }
        }
    }
}

/// The URL for logs: scheme, host, port and path, without credentials or query.
fn redacted(url: &reqwest::Url) -> String {
    format!(
        "{}://{}{}{}",
        url.scheme(),
        url.host_str().unwrap_or(""),
        url.port().map(|p| format!(":{p}")).unwrap_or_default(),
        url.path()
    )
}

/// The dispatcher of one URL, until `stop`. See the module doc.
pub(super) async fn run(webhooks: Arc<Webhooks>, url: reqwest::Url, stop: CancellationToken) {
    let target = target_id(&url);
    let http = webhooks.http.clone();
    let m = &webhooks.metrics.webhooks;
    let standby = webhooks.settings.node_ttl / 2;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let wait = match webhooks
            .store
            .read(&target, &webhooks.node_id, webhooks.settings.batch_size)
            .await
        {
            Err(e) => {
                tracing::debug!(error = %e, "webhooks: could not read the log; retrying");
                STORE_RETRY
            }
            // Another node sends to this URL; take over if its lease lapses.
            Ok(None) => standby,
            Ok(Some(batch)) if batch.events.is_empty() => POLL_EVERY,
            Ok(Some(batch)) => {
                if batch.trimmed > 0 {
                    m.trimmed.inc_by(batch.trimmed);
                    tracing::error!(url = %redacted(&url), lost = batch.trimmed, "webhook events were trimmed from the log before delivery (HERALD_WEBHOOK_RETENTION)");
                }
                deliver(&webhooks, &http, &url, &target, &batch, &stop).await;
                continue;
            }
        };
        let woken = webhooks.appended.notified();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = woken => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let max = Duration::from_secs(60);
        assert_eq!(backoff(0, max, 1.0), Duration::from_millis(500));
        assert_eq!(backoff(1, max, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(3, max, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(10, max, 1.0), max);
        assert_eq!(backoff(u32::MAX, max, 1.0), max);
        assert_eq!(backoff(0, max, 0.5), Duration::from_millis(250));
        assert_eq!(
            backoff(0, max, 0.0),
            Duration::from_millis(250),
            "jitter clamped"
        );
        assert_eq!(
            backoff(5, Duration::from_millis(100), 1.0),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn body_joins_stored_events() {
        let e = |n, j: &str| StoredEvent { n, json: j.into() };
        assert_eq!(body(&[]), r#"{"events":[]}"#);
        let b = body(&[e(1, r#"{"a":1}"#), e(2, r#"{"b":2}"#)]);
        assert_eq!(b, r#"{"events":[{"a":1},{"b":2}]}"#);
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["events"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn targets_hide_the_url() {
        let a = reqwest::Url::parse("https://u:pw@h.example/hook?k=1").unwrap();
        let b = reqwest::Url::parse("https://h.example/hook").unwrap();
        assert_eq!(target_id(&a).len(), 24);
        assert_ne!(target_id(&a), target_id(&b));
        assert!(!target_id(&a).contains("pw"));
        assert_eq!(redacted(&a), "https://h.example/hook");
    }
}
