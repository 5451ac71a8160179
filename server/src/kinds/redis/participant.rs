//! A participant: one subscription on a lock channel, answering pings
//! with its record; once granted, the held lock.

use super::Inner;
use super::link::{Driver, LinkSink};
use super::resp::Reply;
use super::wire::{PROTOCOL_VERSION, WireMode, release_channel};
use crate::fds::FdToken;
use crate::kinds::{Confirmation, OnLost};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::timeout;

/// A live subscription on a lock channel: the reader task answers pings
/// with the participant's current record.
pub(super) struct Participant {
    pub(super) holder_id: String,
    /// The lock channel (the lock's name).
    pub(super) channel: String,
    /// (mode, elected) as advertised in ping replies.
    pub(super) wire: Mutex<(WireMode, bool)>,
    /// Set when the subscription ended.
    pub(super) dead: AtomicBool,
    /// Installed at grant: tells the table the lock was lost.
    pub(super) on_lost: Mutex<Option<OnLost>>,
    /// The task answering pings.
    pub(super) task: Mutex<Option<tokio::task::AbortHandle>>,
    /// Sends on the subscription connection itself (the release's
    /// UNSUBSCRIBE).
    pub(super) sink: LinkSink,
    /// The connection's driver: dropping it closes the connection.
    pub(super) driver: Mutex<Option<Driver>>,
    /// A release ended the subscription cleanly (no subscription left).
    pub(super) ended: AtomicBool,
}

impl Participant {
    pub(super) fn set(&self, mode: WireMode, elected: bool) {
        *self.wire.lock().unwrap_or_else(|e| e.into_inner()) = (mode, elected);
    }

    pub(super) fn record(&self) -> String {
        let (mode, elected) = *self.wire.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::json!({
            "holder_id": self.holder_id,
            "mode": mode.as_str(),
            "protocol": PROTOCOL_VERSION,
            "elected": elected,
        })
        .to_string()
    }

    /// The lock ended on Redis's side: tell the table (once) and close.
    pub(super) fn lose(&self, detail: &str) {
        self.dead.store(true, Ordering::Release);
        let on_lost = self
            .on_lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(on_lost) = on_lost {
            on_lost(detail.to_string());
        }
        self.close();
    }

    pub(super) fn close(&self) {
        self.dead.store(true, Ordering::Release);
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
        drop(self.driver.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    /// Proves the subscription was still alive, and ends it, for a
    /// release: an UNSUBSCRIBE on its own connection, answered by Redis
    /// within `limit`. Redis answers on any live connection, subscribed or
    /// not; the proof is that the connection was alive, because only the
    /// connection itself can drop its subscription (a reaper closes the
    /// connection). A connection Redis closed (reaped by another instance
    /// while this one was paused) fails. Unsubscribing here, not
    /// when the connection closes later, frees the lock on Redis before
    /// the release is answered and the next waiter contends.
    pub(super) fn confirm(self: &Arc<Self>, limit: Duration) -> Confirmation {
        let participant = self.clone();
        Box::pin(async move {
            let closed = || "the redis connection holding the lock was closed".to_string();
            if participant.dead.load(Ordering::Acquire) {
                return Err(closed());
            }
            let channel = &participant.channel;
            let unsubscribe = redis::cmd("UNSUBSCRIBE").arg(channel).clone();
            match timeout(limit, participant.sink.send(&[unsubscribe])).await {
                Ok(Some(replies)) if !participant.dead.load(Ordering::Acquire) => {
                    match replies.as_slice() {
                        [Reply::Push(words)] if words.first() == Some(&unsubscribe_word()) => {
                            let clean = replies[0] == unsubscribed(channel);
                            participant.ended.store(clean, Ordering::Release);
                            Ok(())
                        }
                        _ => Err(format!("Redis did not confirm the release: {replies:?}")),
                    }
                }
                Ok(_) => Err(closed()),
                Err(_) => Err(format!(
                    "Redis did not confirm within {limit:?} that the lock was still held"
                )),
            }
        })
    }
}

/// Ends a held lock's subscription on its own connection, in one write:
/// `UNSUBSCRIBE` (unless the release did already: `unsubscribed`), the
/// connection's name cleared (it goes back to the pool), and the release
/// announced to padlockd waiters elsewhere.
pub(super) fn ending(channel: &str, unsubscribed: bool) -> Vec<redis::Cmd> {
    let mut commands = Vec::with_capacity(3);
    if !unsubscribed {
        commands.push(redis::cmd("UNSUBSCRIBE").arg(channel).clone());
    }
    commands.push(redis::cmd("CLIENT").arg("SETNAME").arg("").clone());
    commands.push(
        redis::cmd("PUBLISH")
            .arg(release_channel(channel))
            .arg("released")
            .clone(),
    );
    commands
}

/// Whether the replies to [`ending`] left the connection clean: no
/// subscription left, no name.
pub(super) fn ended_cleanly(channel: &str, unsubscribed: bool, replies: &[Reply]) -> bool {
    let rest = match (unsubscribed, replies) {
        (true, rest) => rest,
        (false, [first, rest @ ..]) if *first == self::unsubscribed(channel) => rest,
        (false, _) => return false,
    };
    matches!(rest, [Reply::Simple(ok), Reply::Int(_)] if ok == b"OK")
}

/// The reply to `UNSUBSCRIBE <channel>` that leaves no subscription.
fn unsubscribed(channel: &str) -> Reply {
    Reply::Push(vec![
        unsubscribe_word(),
        Reply::Bulk(Some(channel.as_bytes().to_vec())),
        Reply::Int(0),
    ])
}

fn unsubscribe_word() -> Reply {
    Reply::Bulk(Some(b"unsubscribe".to_vec()))
}

/// The one owner of a participant's subscription: dropping it closes the
/// subscription and its connection, on every path (released, failed,
/// cancelled, demoted), so no subscription outlives its waiter.
pub(super) struct Membership(pub(super) Arc<Participant>);

impl Drop for Membership {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl std::ops::Deref for Membership {
    type Target = Arc<Participant>;

    fn deref(&self) -> &Arc<Participant> {
        &self.0
    }
}

/// Answers every ping on the lock channel until the connection ends (or
/// the task is aborted).
pub(super) async fn answer_pings(
    inner: Arc<Inner>,
    participant: Arc<Participant>,
    mut messages: mpsc::Receiver<Vec<u8>>,
    _counted: Option<FdToken>,
) {
    while let Some(payload) = messages.recv().await {
        answer(&inner, &participant, &payload).await;
    }
    participant.lose("the redis subscription connection closed");
}

/// Answers one ping with the participant's record.
async fn answer(inner: &Inner, participant: &Participant, payload: &[u8]) {
    let response_channel = serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("response_channel")?.as_str().map(str::to_string))
        .filter(|c| !c.is_empty());
    if let Some(channel) = response_channel {
        let sent: redis::RedisResult<u64> = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(participant.record())
            .query_async(&mut inner.commands())
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "cannot answer a redis lock ping");
        }
    }
}

/// The lock as held: dropping it closes the subscription and announces the
/// release to waiting padlockd instances.
pub(super) struct HeldSubscription {
    pub(super) inner: Arc<Inner>,
    pub(super) key: u64,
    pub(super) membership: Membership,
    pub(super) name: String,
    /// The descriptor the connection counts as, until it is closed or
    /// pooled.
    pub(super) counted: Option<FdToken>,
}

impl Drop for HeldSubscription {
    fn drop(&mut self) {
        self.inner
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        // A release, not a loss: nobody is told.
        self.membership
            .on_lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let was_alive = !self.membership.dead.load(Ordering::Acquire);
        // The connection outlives the participant only to go back to the
        // pool (it is closed if that fails).
        let driver = self
            .membership
            .driver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.membership.close();
        if !was_alive {
            return;
        }
        let ended = self.membership.ended.load(Ordering::Acquire);
        if !ended {
            // No release proved the connection alive: announce it on the
            // command connection too, in case this one is stuck.
            let mut commands = self.inner.commands();
            let channel = release_channel(&self.name);
            tokio::spawn(async move {
                let _: redis::RedisResult<u64> = redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg("released")
                    .query_async(&mut commands)
                    .await;
            });
        }
        if let Some(driver) = driver {
            let sink = self.membership.sink.clone();
            let counted = self.counted.take();
            self.inner
                .recycle(sink, (driver, counted), &self.name, ended);
        }
    }
}
