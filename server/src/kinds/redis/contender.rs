//! One padlock waiter contending for a redis lock: joins the channel,
//! probes, applies the [`super::election`] rules' decisions, confirms a
//! promotion, draws the fence, and retries with a backoff.

use super::Inner;
use super::conn::io_error;
use super::election::{self, Decision, Verdict};
use super::participant::{HeldSubscription, Membership, Participant, answer_pings};
use super::wire::{Record, WireMode, hex_id, release_channel};
use crate::error::LockError;
use crate::fds::FdToken;
use crate::kinds::{Held, OnLost};
use padlock_proto::Mode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{Instant, sleep, timeout};

/// Waits between failed attempts (Redis refusing or not answering) double
/// from the retry interval up to this, so a failing backend costs a
/// waiter at most a few connection attempts per second, then fewer.
pub(super) const ERROR_BACKOFF_CAP: Duration = Duration::from_secs(5);

/// One padlock waiter contending for a Redis lock, following
/// portalocker's `RedisLock.acquire` step by step.
pub(super) struct Contender {
    pub(super) inner: Arc<Inner>,
    pub(super) name: String,
    pub(super) mode: Mode,
    pub(super) try_once: bool,
    pub(super) holder_id: String,
    pub(super) participant: Option<Membership>,
    /// Won the writers' election (portalocker's `writer_elected`).
    pub(super) elected: bool,
    /// The descriptor this waiter's subscription (then lock) counts as.
    pub(super) counted: Option<FdToken>,
}

impl Contender {
    pub(super) async fn run(mut self, on_lost: OnLost) -> Result<Held, LockError> {
        // Wakes this waiter when a padlockd elsewhere releases the lock.
        let mut wakeups = None;
        let mut failures: u32 = 0;
        loop {
            let mut wait = self.inner.config.retry_interval;
            match self.attempt().await {
                Ok(Some(fence)) => {
                    // Redis just answered a whole acquisition: it is up.
                    self.inner.healthy.store(true, Ordering::Release);
                    return Ok(self.hold(fence, on_lost));
                }
                Ok(None) if self.try_once => {
                    return Err(LockError::NotAcquired {
                        name: crate::name::printable(&self.name),
                        holders: 0,
                        held_by: Vec::new(),
                        waited: Duration::ZERO,
                    });
                }
                Ok(None) => failures = 0,
                Err(e) => {
                    // Dropping the membership closes its subscription.
                    self.participant = None;
                    self.elected = false;
                    // A Redis without RESP3 (older than 6, met after
                    // startup) can never grant: say so instead of waiting.
                    if self.try_once || e.kind() == redis::ErrorKind::RESP3NotSupported {
                        return Err(LockError::Unavailable(format!("redis: {e}")));
                    }
                    if failures == 0 {
                        tracing::warn!(name = %self.name, error = %e, "redis lock attempt failed; retrying");
                    }
                    failures = failures.saturating_add(1);
                    wait = wait
                        .saturating_mul(1 << failures.min(8))
                        .min(ERROR_BACKOFF_CAP);
                    wakeups = None;
                }
            }
            if wakeups.is_none() && failures == 0 {
                // One more connection: counted, or done without.
                if let Ok(counted) = self.inner.fds.take() {
                    wakeups = self
                        .inner
                        .subscribe(None, &[&release_channel(&self.name)], None)
                        .await
                        .ok()
                        .map(|subscribed| (subscribed, counted));
                }
            }
            let jitter = 0.5
                + f64::from(hex_id().map_or(0, |h| u8::from_str_radix(&h[..2], 16).unwrap_or(0)))
                    / 255.0;
            let poll = wait.mul_f64(jitter);
            match wakeups.as_mut() {
                Some((subscribed, _)) => {
                    // The connection ended: poll instead, and let the
                    // next turn open another.
                    if let Ok(None) = timeout(poll, subscribed.link.messages.recv()).await {
                        wakeups = None;
                        sleep(poll).await;
                    }
                }
                None => sleep(poll).await,
            }
        }
    }

    /// The subscription becomes the held lock.
    pub(super) fn hold(mut self, fence: u64, on_lost: OnLost) -> Held {
        let membership = self
            .participant
            .take()
            .expect("a granted attempt is subscribed");
        *membership.on_lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(on_lost);
        let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed);
        self.inner
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, Arc::clone(&membership));
        // `dead` is set before `on_lost` runs, and the table checks
        // liveness under its lock when it grants: a subscription that dies
        // before the grant is never granted, one that dies after is revoked.
        let alive = Arc::clone(&membership);
        let confirming = Arc::clone(&membership);
        let limit = self.inner.config.health_timeout;
        let held = HeldSubscription {
            inner: self.inner.clone(),
            key,
            membership,
            name: self.name.clone(),
            counted: self.counted.take(),
        };
        Held::new(None, held)
            .with_fence(fence)
            .with_liveness(move || !alive.dead.load(Ordering::Acquire))
            .with_confirmation(move || confirming.confirm(limit))
    }

    pub(super) fn exclusive(&self) -> bool {
        self.mode == Mode::Exclusive
    }

    pub(super) fn participant(&self) -> &Participant {
        self.participant.as_ref().expect("subscribed")
    }

    /// Subscribes as a fresh participant (pending writer or reader) and
    /// counts the channel's subscribers in the same round trip, drawing the
    /// fence when this one is alone: `(subscribers, fence when alone)`.
    ///
    /// Alone means the lock is ours, with no confirming probe: the count
    /// runs on the subscription's own connection, right behind the
    /// subscription, atomically with the fence. A rival that subscribes
    /// later sees this subscriber, so it must ask for its record, and every
    /// ping published after the count reaches this connection after the
    /// count's reply, when the participant already advertises `exclusive`
    /// (pings that came before it are answered after it, with the same
    /// record). portalocker's confirming probe guards the window between
    /// its count and its switch to `exclusive`, in which a rival could
    /// have read it as `pending`; here that window does not exist.
    pub(super) async fn join(&mut self) -> redis::RedisResult<(u64, Option<u64>)> {
        let client_name = format!("{}-lock-{}", self.name, self.holder_id);
        let count = self.inner.fence_if_alone_command(&self.name);
        let subscribed = self
            .inner
            .subscribe(Some(&client_name), &[&self.name], Some(&count))
            .await?;
        let reply = subscribed
            .then
            .ok_or_else(|| io_error("no reply to the subscriber count"))?;
        let (subscribers, fence) = self.inner.fence_if_alone_reply(&self.name, reply)?;
        if subscribers == 0 {
            // Counted right behind its own subscription: at least this one.
            return Err(io_error("Redis counted no subscriber right after a subscription").into());
        }
        let mode = match (self.exclusive(), subscribers <= 1) {
            (true, true) => WireMode::Exclusive,
            (true, false) => WireMode::Pending,
            (false, _) => WireMode::Shared,
        };
        let link = subscribed.link;
        let participant = Arc::new(Participant {
            holder_id: self.holder_id.clone(),
            channel: self.name.clone(),
            wire: Mutex::new((mode, false)),
            dead: AtomicBool::new(false),
            on_lost: Mutex::new(None),
            task: Mutex::new(None),
            sink: link.sink,
            driver: Mutex::new(Some(link.driver)),
            ended: AtomicBool::new(false),
        });
        let task = tokio::spawn(answer_pings(
            self.inner.clone(),
            participant.clone(),
            link.messages,
            None,
        ));
        *participant.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
        self.participant = Some(Membership(participant));
        self.elected = false;
        Ok((subscribers, fence))
    }

    /// Unsubscribes to retry later (portalocker's `_unsubscribe`).
    pub(super) fn leave(&mut self) {
        // Dropping the membership closes the subscription.
        self.participant = None;
        self.elected = false;
    }

    /// One acquisition attempt; `Some(fence)` when the lock is now held.
    pub(super) async fn attempt(&mut self) -> redis::RedisResult<Option<u64>> {
        if self
            .participant
            .as_ref()
            .is_some_and(|p| p.dead.load(Ordering::Acquire))
        {
            self.leave();
        }
        let joined = match self.participant {
            None => Some(self.join().await?),
            Some(_) => None,
        };
        let mut fence = None;
        let subscribers = match joined {
            // Alone behind a fresh subscription: held (see `join`).
            Some((_, Some(alone_fence))) => return Ok(self.granted(alone_fence)),
            Some((subscribers, None)) => subscribers,
            None if self.exclusive() => self.inner.numsub(&self.name).await?,
            None => {
                // A reader alone on the channel holds it: count and fence at once.
                let (subscribers, alone_fence) = self.inner.fence_if_alone(&self.name).await?;
                fence = alone_fence;
                subscribers
            }
        };
        if subscribers <= 1 {
            if self.exclusive() {
                self.participant().set(WireMode::Exclusive, self.elected);
            }
        } else {
            let holders = self.inner.collect(&self.name, subscribers).await?;
            if !self.resolve(holders) {
                return Ok(None);
            }
        }
        if self.exclusive() {
            match self.confirm_promotion().await? {
                Confirm::Demoted => return Ok(None),
                Confirm::Confirmed(confirmed_fence) => fence = confirmed_fence,
            }
        }
        let fence = match fence {
            Some(fence) => fence,
            None => self.inner.draw_fence(&self.name).await?,
        };
        Ok(self.granted(fence))
    }

    /// The lock was won with `fence`, unless the subscription died on the
    /// way.
    fn granted(&mut self, fence: u64) -> Option<u64> {
        if self.participant().dead.load(Ordering::Acquire) {
            self.leave();
            return None;
        }
        Some(fence)
    }

    /// This contender, as the election rules see it.
    fn me(&self) -> election::Me<'_> {
        election::Me {
            holder_id: &self.holder_id,
            exclusive: self.exclusive(),
            elected: self.elected,
            try_once: self.try_once,
        }
    }

    /// Applies the election's decision on a probe: true when the lock is
    /// ours.
    fn resolve(&mut self, holders: Option<Vec<Record>>) -> bool {
        match election::resolve(self.me(), holders.as_deref()) {
            Decision::Take => {
                if self.exclusive() {
                    self.elected = true;
                    self.participant().set(WireMode::Exclusive, true);
                }
                true
            }
            Decision::Keep { elected } => {
                if elected && !self.elected {
                    // Readers that came first finish; no new reader joins.
                    self.participant().set(WireMode::Pending, true);
                }
                self.elected = elected;
                false
            }
            Decision::Leave => {
                self.leave();
                false
            }
        }
    }

    /// portalocker's `_confirm_exclusive_promotion`: with the exclusive
    /// record visible, probe once more; a rival that promoted on an equally
    /// stale view is resolved by holder id and the loser demotes.
    pub(super) async fn confirm_promotion(&mut self) -> redis::RedisResult<Confirm> {
        let deadline = Instant::now() + self.inner.config.probe_timeout;
        loop {
            // Alone: confirmed, and the fence is drawn in the same step.
            let (subscribers, fence) = self.inner.fence_if_alone(&self.name).await?;
            if subscribers <= 1 {
                return Ok(Confirm::Confirmed(fence));
            }
            if let Some(holders) = self.inner.collect(&self.name, subscribers).await? {
                match election::confirm(self.me(), &holders) {
                    Verdict::Confirmed => return Ok(Confirm::Confirmed(None)),
                    Verdict::Demote => break,
                    Verdict::Retry => {}
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            sleep(self.inner.config.retry_interval / 2).await;
        }
        self.participant().set(WireMode::Pending, false);
        self.leave();
        Ok(Confirm::Demoted)
    }
}

/// How a writer's promotion ended.
pub(super) enum Confirm {
    /// Demoted: unsubscribed, to retry.
    Demoted,
    /// The lock is ours; with the fence when it was drawn on the way.
    Confirmed(Option<u64>),
}
