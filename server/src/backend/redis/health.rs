//! The Redis backend's Health.

use async_trait::async_trait;
use fred::interfaces::ClientLike;

use super::RedisBackend;
use crate::backend::health::Health;
use std::sync::atomic::Ordering;

#[async_trait]
impl Health for RedisBackend {
    fn is_healthy(&self) -> bool {
        let inner = &self.inner;
        !inner.cancel.is_cancelled()
            && inner.client.is_connected()
            && inner.sub.is_connected()
            && inner.synced.load(Ordering::SeqCst)
            && inner.probe_ok.load(Ordering::SeqCst)
    }

    async fn shutdown(&self) {
        self.stop().await;
    }
}
