//! Whether the backend is connected, and stopping it.

use async_trait::async_trait;

/// The backend's connection as a whole (what centrifuge calls a `Closer`).
#[async_trait]
pub trait Health: Send + Sync + 'static {
    /// Whether the broker is connected and delivering; `/readyz` reports it.
    fn is_healthy(&self) -> bool;

    /// Stops background work and closes connections.
    async fn shutdown(&self);
}
