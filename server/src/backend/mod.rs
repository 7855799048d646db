//! The backend: what every node of a cluster shares, as small capability traits.
//!
//! Each capability lives in its own file with its own data types, and each has a
//! memory implementation ([`memory::MemoryBackend`], a single node) and a Redis one
//! ([`redis::RedisBackend`], a cluster), split by capability too:
//! - [`streams::Streams`]: offsets, epochs and history;
//! - [`routing::Routing`]: pub/sub between nodes and the event stream to the node;
//! - [`presence::PresenceStore`]: presence per channel and node;
//! - [`nodes::NodeRegistry`]: the live nodes;
//! - [`users::UserControl`]: user commands and revocations;
//! - [`receipts::ReceiptStore`]: acks and the unacked schedule;
//! - [`webhooks::WebhookStore`]: the webhook state and event log;
//! - [`health::Health`]: connection health and shutdown.
//!
//! The backend imports only the leaves (config, clock). The node gives each of its
//! services only the capability it uses; only the wiring (`lib.rs`) sees a whole
//! [`Backend`]. A new backend is one file per capability.

pub mod error;
pub mod health;
pub mod memory;
pub mod nodes;
pub mod presence;
pub mod receipts;
pub mod redis;
pub mod routing;
pub mod settings;
pub mod streams;
pub mod users;
pub mod webhooks;

use std::sync::Arc;

use crate::config::Config;

use error::BackendError;
use settings::BackendSettings;

/// Every capability of one backend, each as its own handle on the same connection.
/// Only the wiring holds this; it hands each service the one handle it uses.
pub struct Backend {
    /// Offsets, epochs and history.
    pub streams: Arc<dyn streams::Streams>,
    /// Pub/sub between nodes and the event stream.
    pub routing: Arc<dyn routing::Routing>,
    /// Presence per channel and node.
    pub presence: Arc<dyn presence::PresenceStore>,
    /// The registry of live nodes.
    pub nodes: Arc<dyn nodes::NodeRegistry>,
    /// User commands and revocations.
    pub users: Arc<dyn users::UserControl>,
    /// Acks and the unacked schedule.
    pub receipts: Arc<dyn receipts::ReceiptStore>,
    /// The webhook store, when webhooks are configured.
    pub webhooks: Option<Arc<dyn webhooks::WebhookStore>>,
    /// Connection health and shutdown.
    pub health: Arc<dyn health::Health>,
    /// The memory backend itself, for its periodic expiry (`None` on Redis).
    pub memory: Option<Arc<memory::MemoryBackend>>,
}

impl Backend {
    /// Every handle of one backend `b` (one allocation, each field a coercion of it).
    fn of<B>(
        b: Arc<B>,
        webhooks: Option<Arc<dyn webhooks::WebhookStore>>,
        memory: Option<Arc<memory::MemoryBackend>>,
    ) -> Self
    where
        B: streams::Streams
            + routing::Routing
            + presence::PresenceStore
            + nodes::NodeRegistry
            + users::UserControl
            + receipts::ReceiptStore
            + health::Health,
    {
        Self {
            streams: b.clone(),
            routing: b.clone(),
            presence: b.clone(),
            nodes: b.clone(),
            users: b.clone(),
            receipts: b.clone(),
            health: b,
            webhooks,
            memory,
        }
    }

    /// Connects the backend `config` names, with `settings` (derived from it):
    /// memory without `HERALD_REDIS_URL`, else Redis. The webhook store is opened only
    /// with `webhook_settings`.
    pub async fn connect(
        config: &Config,
        settings: BackendSettings,
        node_id: &str,
        webhook_settings: Option<webhooks::WebhookStoreSettings>,
    ) -> Result<Self, BackendError> {
        Ok(match &config.redis_url {
            None => {
                let m = Arc::new(memory::MemoryBackend::new(settings));
                let w = webhook_settings.map(|s| m.webhook_store(s));
                Self::of(Arc::clone(&m), w, Some(m))
            }
            Some(url) => {
                let r =
                    Arc::new(redis::connect(url, &config.redis_prefix, node_id, settings).await?);
                let w = webhook_settings.map(|s| r.webhook_store(s));
                Self::of(r, w, None)
            }
        })
    }
}
