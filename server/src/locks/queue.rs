//! The queue of each lock: its head is granted for as long as it can be.
//! An attempt on the outside world is marked under its shard's mutex, run
//! without it, and committed under it again; one attempt per lock at a
//! time. A holder outside this server makes the head retry with a backoff
//! (a task per lock); a backend that takes round trips (Redis) runs its
//! contention as a task; processes sharing the lock directory take turns.

use super::*;

/// What the head of a queue is tried with, outside the mutex.
pub(super) struct Job {
    pub(super) id: u64,
    pub(super) mode: Mode,
    pub(super) limit: u32,
    pub(super) own_slots: Vec<u32>,
    pub(super) try_once: bool,
    /// A holder of this process just left: look for other processes'
    /// announced waiters before handing the lock on.
    pub(super) handoff: bool,
    /// This process already announces the head as blocked.
    pub(super) announced: bool,
}

/// How an attempt ended.
pub(super) enum Outcome {
    Taken(Held, u64),
    /// Someone outside this server holds it; with this process's
    /// announcement of its blocked waiter, when one could be made.
    Busy(Option<fence::Announcement>),
    /// Another process announced waiters: the lock is left free for it.
    Yield,
    Contend(Contention),
    Failed(LockError),
}

/// What the pump does after committing an outcome.
pub(super) enum Next {
    /// Try the (new) head of the queue.
    Again,
    /// An outside holder blocks the head: a retry task runs.
    Blocked,
    /// The lock is left to another process for a moment: a retry runs.
    Yielded,
    Done,
}

/// Things to drop or tell once the shard's mutex is released: closing a
/// descriptor or a connection is not done under it.
#[derive(Default)]
pub(super) struct After {
    pub(super) release: Vec<Held>,
    pub(super) close: Vec<fence::Announcement>,
    pub(super) tell: Vec<(mailbox::Sender, Notice)>,
}

impl After {
    /// Lets go of whatever an attempt that no longer counts took.
    pub(super) fn drop_outcome(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Taken(held, _) => self.release.push(held),
            Outcome::Busy(Some(note)) => self.close.push(note),
            _ => {}
        }
    }

    pub(super) fn finish(self) {
        drop(self.release);
        drop(self.close);
        for (tx, notice) in self.tell {
            let _ = tx.send(notice);
        }
    }
}

impl LockTable {
    /// Grants the head of the queue for as long as it can be granted,
    /// running each attempt outside the mutex, and starts a retry task
    /// when a holder outside this server blocks the head. `handoff`: a
    /// holder of this process just left.
    pub(super) fn pump(&self, key: &Key, mut handoff: bool) {
        loop {
            let (job, own_note) = {
                let mut st = self.shard(key);
                let backend = self.shared.kinds.get(&key.1).map(Box::as_ref);
                match next_job(&mut st, key, backend, handoff) {
                    Some(picked) => picked,
                    None => return,
                }
            };
            drop(own_note);
            handoff = false;
            let outcome = self.attempt(key, &job);
            let mut after = After::default();
            let next = {
                let mut st = self.shard(key);
                self.conclude(&mut st, key, &job, outcome, &mut after)
            };
            after.finish();
            if !matches!(next, Next::Again) {
                return;
            }
        }
    }

    /// Tries to take the lock for `job`, without the shard's mutex.
    pub(super) fn attempt(&self, key: &Key, job: &Job) -> Outcome {
        let Some(kind) = self.shared.kinds.get(&key.1) else {
            return Outcome::Failed(self.not_served(key.1));
        };
        // Lock files are shared with other processes: when other
        // padlockd share the directory, take turns with those that
        // announced waiters.
        let fences = &self.shared.fences;
        let shared_dir = kind.in_lock_dir() && fences.others_alive();
        if job.handoff && shared_dir && fences.is_wanted(key.1.as_str(), &key.0) {
            return Outcome::Yield;
        }
        let request = Request {
            name: &key.0,
            mode: job.mode,
            limit: job.limit,
            own_slots: &job.own_slots,
            try_once: job.try_once,
            on_lost: self.on_lost(key.clone(), job.id),
        };
        match kind.try_acquire(request) {
            Ok(Attempt::Taken(held)) => self.with_fence(key, held),
            Ok(Attempt::Busy) if shared_dir && !job.try_once && !job.announced => {
                Outcome::Busy(fences.announce(key.1.as_str(), &key.0))
            }
            Ok(Attempt::Busy) => Outcome::Busy(None),
            Ok(Attempt::Contend(contention)) => Outcome::Contend(contention),
            Err(err) => Outcome::Failed(err),
        }
    }

    /// Draws the fence of a lock just taken (unless its kind drew one).
    /// Runs without the mutex, while the lock is held, so fences follow the
    /// order of grants across every process sharing the lock directory.
    pub(super) fn with_fence(&self, key: &Key, held: Held) -> Outcome {
        if let Some(fence) = held.fence {
            return Outcome::Taken(held, fence);
        }
        match self.shared.fences.next(key.1.as_str(), &key.0) {
            Ok(fence) => Outcome::Taken(held, fence),
            // Another process has the counter locked: let go, retry soon.
            Err(fence::FenceError::Busy) => Outcome::Busy(None),
            Err(err) => Outcome::Failed(LockError::Backend(format!(
                "cannot advance the fence counter: {err}"
            ))),
        }
    }

    /// Commits an attempt's outcome and arranges what it calls for: a
    /// retry while an outside holder blocks the head, a look soon while the
    /// lock is left to another process; a lock left idle is forgotten.
    pub(super) fn conclude(
        &self,
        st: &mut Shard,
        key: &Key,
        job: &Job,
        outcome: Outcome,
        after: &mut After,
    ) -> Next {
        let next = self.commit(st, key, job, outcome, after);
        match next {
            Next::Blocked => self.ensure_retry(st, key, None),
            Next::Yielded => self.ensure_retry(st, key, Some(YIELD_POLL)),
            Next::Again | Next::Done => {}
        }
        self.forget_if_idle(st, key);
        next
    }

    /// Applies the outcome of the attempt for `job`, under the mutex.
    pub(super) fn commit(
        &self,
        st: &mut Shard,
        key: &Key,
        job: &Job,
        outcome: Outcome,
        after: &mut After,
    ) -> Next {
        let Some(lock) = st.locks.get_mut(key) else {
            // Drained meanwhile.
            after.drop_outcome(outcome);
            return Next::Done;
        };
        if lock.attempt.as_ref().is_none_or(|a| a.id != job.id) {
            after.drop_outcome(outcome);
            return Next::Done;
        }
        if let Outcome::Contend(contention) = outcome {
            if lock.waiters.front().is_none_or(|w| w.id != job.id) {
                // The waiter left while its attempt was being set up.
                lock.attempt = None;
                drop(contention);
                return Next::Again;
            }
            let task = self.spawn_contention(key.clone(), job.id, contention);
            lock.attempt = Some(Attempting {
                id: job.id,
                task: Some(task),
            });
            return Next::Done;
        }
        lock.attempt = None;
        let repump = std::mem::take(&mut lock.repump);
        let is_head = lock.waiters.front().is_some_and(|w| w.id == job.id);
        if let Outcome::Busy(Some(note)) = outcome {
            // Keep one announcement while the head stays blocked.
            if is_head && lock.announced.is_none() {
                lock.announced = Some(note);
            } else {
                after.close.push(note);
            }
            return self.commit_busy(key, lock, job, (is_head, repump), after);
        }
        match outcome {
            Outcome::Taken(held, fence) if is_head && held.is_alive() => {
                let entry = lock.pop_head();
                lock.backoff = RETRY_FIRST;
                lock.yield_until = None;
                if let Some(note) = lock.announced.take() {
                    after.close.push(note);
                }
                self.grant(key, lock, entry, held, fence, after);
                Next::Again
            }
            // The waiter left meanwhile, or the lock was lost between being
            // taken and now: let go of it, and go on with the queue.
            Outcome::Taken(held, _) => {
                after.release.push(held);
                Next::Again
            }
            Outcome::Busy(_) => self.commit_busy(key, lock, job, (is_head, repump), after),
            Outcome::Yield if is_head && !repump => {
                if lock.yield_until.is_none() {
                    lock.yield_until = tokio::time::Instant::now().checked_add(YIELD_MAX);
                }
                Next::Yielded
            }
            Outcome::Yield => Next::Again,
            Outcome::Failed(err) if is_head => {
                self.fail_head(key, lock, err, after);
                Next::Again
            }
            Outcome::Failed(_) => Next::Again,
            Outcome::Contend(_) => unreachable!("handled above"),
        }
    }

    /// The head was found blocked by a holder outside this process.
    pub(super) fn commit_busy(
        &self,
        key: &Key,
        lock: &mut Lock,
        job: &Job,
        (is_head, repump): (bool, bool),
        after: &mut After,
    ) -> Next {
        if !is_head {
            return Next::Again;
        }
        // Whoever the lock was left to has it now: stop yielding.
        lock.yield_until = None;
        if job.try_once {
            let err = not_acquired(key, lock, Duration::ZERO);
            self.fail_head(key, lock, err, after);
            return Next::Again;
        }
        if repump { Next::Again } else { Next::Blocked }
    }

    /// Makes `entry` a holder of `lock` with `held`, and tells it so.
    pub(super) fn grant(
        &self,
        key: &Key,
        lock: &mut Lock,
        mut entry: Entry,
        held: Held,
        fence: u64,
        after: &mut After,
    ) {
        let grant = Grant {
            holder_id: entry.id,
            fence,
            slot: held.slot,
            mode: entry.mode,
        };
        // The receiver lives in the Ticket, whose Drop removes the waiter
        // under this mutex first, so a closed mailbox cannot happen here;
        // if it ever did, `held` is let go and the lock stays free.
        if entry.tx.send(Notice::Granted(grant)).is_err() {
            after.release.push(held);
            return;
        }
        // A holder has no deadline: its wait's timer stops.
        entry.expiry = None;
        let now = SystemTime::now();
        let waited = now.duration_since(entry.since).unwrap_or_default();
        entry.since = now;
        let what = EventKind::Granted {
            fence,
            slot: held.slot,
            mode: entry.mode,
            owner: entry.owner.clone(),
            waited,
        };
        self.emit(key, entry.id, what);
        // Most locks have one holder: room for exactly one at first.
        lock.holders
            .reserve_exact(usize::from(lock.holders.capacity() == 0));
        lock.holders.push(Holder { entry, fence, held });
    }

    /// Removes the head of the queue with `err`.
    pub(super) fn fail_head(&self, key: &Key, lock: &mut Lock, err: LockError, after: &mut After) {
        let waiter = lock.pop_head();
        if let Some(note) = lock.announced.take() {
            after.close.push(note);
        }
        self.emit(
            key,
            waiter.id,
            EventKind::Abandoned {
                waited: elapsed(waiter.since),
            },
        );
        after.tell.push((waiter.tx, Notice::Failed(err)));
    }

    /// What a kind calls when a lock it granted to holder `id` ends on the
    /// backend's side.
    pub(super) fn on_lost(&self, key: Key, id: u64) -> crate::kinds::OnLost {
        let table = Arc::downgrade(&self.shared);
        Box::new(move |detail: String| {
            if let Some(shared) = table.upgrade() {
                LockTable { shared }.revoke(key.1, &key.0, id, LostReason::Backend, &detail);
            }
        })
    }

    /// Runs a network acquisition for waiter `id` and grants it (or fails
    /// it) when it resolves.
    pub(super) fn spawn_contention(
        &self,
        key: Key,
        id: u64,
        contention: Contention,
    ) -> tokio::task::AbortHandle {
        let table = Arc::downgrade(&self.shared);
        let task = tokio::spawn(async move {
            let outcome = contention.await;
            if let Some(shared) = table.upgrade() {
                LockTable { shared }.finish_contention(&key, id, outcome);
            }
        });
        task.abort_handle()
    }

    pub(super) fn finish_contention(&self, key: &Key, id: u64, outcome: Result<Held, LockError>) {
        let job = Job {
            id,
            mode: Mode::Exclusive,
            limit: 0,
            own_slots: Vec::new(),
            try_once: false,
            handoff: false,
            announced: false,
        };
        let outcome = match outcome {
            Ok(held) => self.with_fence(key, held),
            Err(err) => Outcome::Failed(err),
        };
        let mut after = After::default();
        let mut st = self.shard(key);
        let current = st
            .locks
            .get(key)
            .and_then(|lock| lock.attempt.as_ref())
            .is_some_and(|a| a.id == id);
        if !current {
            // Cancelled meanwhile: let go of what was taken, unlocked.
            drop(st);
            drop(outcome);
            return;
        }
        // A contention that ended Busy (fence counter) is retried like any
        // other: the head is attempted again below.
        self.conclude(&mut st, key, &job, outcome, &mut after);
        drop(st);
        after.finish();
        self.pump(key, false);
    }

    /// Makes sure a task retries `key` while an outside holder blocks it.
    /// `delay`: when to retry (default: the lock's backoff, which grows).
    pub(super) fn ensure_retry(&self, st: &mut Shard, key: &Key, delay: Option<Duration>) {
        let Some(lock) = st.locks.get_mut(key).filter(|l| l.retry_task == 0) else {
            return;
        };
        let task_id = self.new_id();
        lock.retry_task = task_id;
        // While this process announces its waiters, it polls faster.
        let cap = if lock.announced.is_some() {
            ANNOUNCED_RETRY_CAP
        } else {
            RETRY_CAP
        };
        let delay = delay.unwrap_or(lock.backoff.min(cap));
        lock.backoff = (lock.backoff * 2).min(cap);
        let table = Arc::downgrade(&self.shared);
        let key = key.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let Some(shared) = table.upgrade() else {
                return;
            };
            let table = LockTable { shared };
            {
                let mut st = table.shard(&key);
                match st.locks.get_mut(&key) {
                    Some(lock) if lock.retry_task == task_id => lock.retry_task = 0,
                    _ => return,
                }
            }
            // Blocked again: the pump starts the next retry, later.
            table.pump(&key, false);
        });
    }
}

/// Marks the head of the queue of `key` as attempted and says how to try
/// it; `None` when there is nothing to try now. At a handoff, this
/// process's own announcement comes back too, to be withdrawn before the
/// attempt looks for others'.
fn next_job(
    st: &mut Shard,
    key: &Key,
    backend: Option<&dyn Backend>,
    handoff: bool,
) -> Option<(Job, Option<fence::Announcement>)> {
    let lock = st.locks.get_mut(key)?;
    if lock.attempt.is_some() {
        // The attempt's owner looks again when it is done.
        lock.repump = true;
        return None;
    }
    let head = lock.waiters.front()?;
    // (A kind that is not served never gets a queue: it is refused first.)
    if !backend.is_some_and(|b| b.admits(lock.holders(), head.mode)) {
        return None;
    }
    // While the lock is left to another process, every attempt looks
    // first whether that process still wants it.
    let yielding = match lock.yield_until {
        Some(until) if tokio::time::Instant::now() < until => true,
        Some(_) => {
            lock.yield_until = None;
            false
        }
        None => false,
    };
    let job = Job {
        id: head.id,
        mode: head.mode,
        limit: lock.limit,
        own_slots: lock.holders.iter().filter_map(|h| h.held.slot).collect(),
        try_once: head.try_once,
        handoff: handoff || yielding,
        announced: lock.announced.is_some() && !handoff,
    };
    lock.attempt = Some(Attempting {
        id: head.id,
        task: None,
    });
    lock.repump = false;
    let own_note = if handoff { lock.announced.take() } else { None };
    Some((job, own_note))
}
