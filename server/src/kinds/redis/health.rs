//! The health monitor: pings Redis, and when it fails or hangs tells every
//! holder on it that its lock is lost and refuses new requests until Redis
//! answers again.

use super::Inner;
use super::participant::Participant;
use crate::error::LockError;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::time::{sleep, timeout};

/// Pings Redis forever; on failure tells every holder it lost its lock.
pub(super) async fn monitor(inner: std::sync::Weak<Inner>) {
    loop {
        let interval = match inner.upgrade() {
            Some(inner) => inner.config.health_interval,
            None => return,
        };
        sleep(interval).await;
        let Some(inner) = inner.upgrade() else { return };
        inner.check_health().await;
    }
}

impl Inner {
    pub(super) async fn check_health(&self) {
        let mut commands = self.commands.clone();
        let ping = timeout(
            self.config.health_timeout,
            redis::cmd("PING").query_async::<String>(&mut commands),
        )
        .await;
        let failure = match ping {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("Redis at {} failed: {e}", self.url)),
            Err(_) => Some(format!(
                "Redis at {} did not answer a ping within {:?}",
                self.url, self.config.health_timeout
            )),
        };
        match failure {
            None => {
                if !self.healthy.swap(true, Ordering::AcqRel) {
                    tracing::info!(url = %self.url, "redis is answering");
                }
            }
            Some(reason) => {
                if self.healthy.swap(false, Ordering::AcqRel) {
                    tracing::warn!(%reason, "redis is down: every redis holder loses its lock");
                }
                *self.down_reason.lock().unwrap_or_else(|e| e.into_inner()) = reason.clone();
                self.pool.lock().unwrap_or_else(|e| e.into_inner()).clear();
                let held: Vec<Arc<Participant>> = {
                    let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                    held.drain().map(|(_, p)| p).collect()
                };
                for participant in held {
                    participant.lose(&reason);
                }
            }
        }
    }

    pub(super) fn unavailable(&self) -> LockError {
        let reason = self
            .down_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        LockError::Unavailable(format!("the redis backend is unavailable: {reason}"))
    }
}
