//! The memory backend's Health.

use async_trait::async_trait;

use super::MemoryBackend;
use crate::backend::health::Health;

#[async_trait]
impl Health for MemoryBackend {
    fn is_healthy(&self) -> bool {
        true
    }

    async fn shutdown(&self) {}
}
