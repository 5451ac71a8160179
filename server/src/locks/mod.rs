//! The lock table: the one source of truth about who holds and who waits.
//!
//! Per (name, kind) there is one lock: its holders and a FIFO queue of
//! waiters. The queue *is* the lock (as in etcd's mutex recipe): grants go
//! strictly in arrival order, the head of the queue is the only waiter that
//! may be granted, shared waiters at the head are granted together, and a
//! waiting writer holds back the readers that arrived after it.
//!
//! A waiter is granted when the table's own holders admit it *and* its kind
//! (flock, Redis) lets it in. When a holder of this server leaves, the next
//! waiter is granted in the same call, with no polling. When the kind says
//! someone outside this server holds the lock, a background task retries
//! with a short bounded backoff until it is free or the queue empties.
//!
//! **Locks of different names do not contend.** The table is split into
//! shards by a hash of the name (a few per core, see [`shard_count`]), each
//! behind its own `std::sync::Mutex`; the caps, ids and draining are
//! atomics. Events get their number, and are sent, under one short event
//! lock, so that they are numbered in the order they happen across shards.
//!
//! **Nothing that touches the outside world runs under a shard's mutex.**
//! A mutex is held only for in-memory bookkeeping and never across an
//! `.await`. Taking a lock in the outside
//! world (opening and flocking files, drawing a fence, a Redis round trip)
//! is an *attempt*: the head of a queue is marked as being attempted under
//! the mutex, the attempt runs without it, and its outcome is committed
//! under the mutex again. One attempt per lock runs at a time; locks of
//! other names are never held up by it, nor are listing, health and
//! shutdown. File attempts never block (see [`crate::fs`]); Redis
//! attempts are network round trips and run as tasks.
//!
//! **Fair to other processes.** Two padlockd sharing a lock directory (or
//! one with its own busy queue) would otherwise starve each other: a local
//! handoff happens in microseconds, an outside waiter polls every few
//! milliseconds and always finds the lock taken. So a process whose head
//! is blocked by an outside holder announces it (a shared flock in
//! `.padlock/wanted/`, see [`fence::Fences::announce`]) and polls faster,
//! and a process about to hand a lock to its next local waiter first looks
//! for such an announcement and, when there is one, leaves the lock free
//! until the other process has taken it (its announcement goes away), for
//! at most [`YIELD_MAX`]: processes with waiters take turns.
//!
//! Transports (gRPC, HTTP) talk to the table through [`LockTable::acquire`]
//! and the [`Ticket`] it returns: the ticket receives [`Notice`]s, and
//! dropping it leaves the queue or releases the lock.

mod admit;
pub mod fence;
mod mailbox;
use crate::name;
mod queue;
mod session;
mod ticket;
mod types;
mod view;

use queue::After;
pub use session::{Released, Session, Step};
pub use ticket::Ticket;
pub use types::*;
pub use view::{Detail, HolderView, LockView, Page, WaiterView};

use crate::kinds::{Attempt, Backend, Backends, Contention, Held, Holders, Request};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// Backoff while an outside holder blocks the head of a queue: starts at
/// 1 ms and doubles up to this cap, so an outside release is noticed within
/// about this long.
pub const RETRY_CAP: Duration = Duration::from_millis(20);
const RETRY_FIRST: Duration = Duration::from_millis(1);
/// The backoff cap while this process announces its blocked waiters to the
/// others: it polls faster so that it notices a lock left free for it.
pub const ANNOUNCED_RETRY_CAP: Duration = Duration::from_millis(2);
/// How long, at most, a process leaves a lock free at a handoff for another
/// process that announced waiters (it stops as soon as the announcement
/// goes away: the other process took the lock, or its waiter left).
pub const YIELD_MAX: Duration = Duration::from_millis(25);
/// How often a yielding process looks whether the announcement is gone.
const YIELD_POLL: Duration = Duration::from_millis(1);

/// Locks are ordered by name, then kind, so that lists come in pages.
type Key = (Arc<str>, Kind);

/// A waiter or holder: who it is, kept for inspection, and its mailbox.
#[derive(Debug)]
struct Entry {
    id: u64,
    owner: String,
    peer: String,
    /// When the waiter arrived; once granted, when it was granted.
    since: SystemTime,
    mode: Mode,
    labels: BTreeMap<String, String>,
    /// When a waiter gives up (wall clock, for views), if it ever does.
    deadline: Option<SystemTime>,
    /// Try-lock: never queue behind anyone.
    try_once: bool,
    tx: mailbox::Sender,
    /// The timer that ends the wait at its deadline (a queued waiter with
    /// one); stopped when the entry is granted or dropped.
    expiry: Option<Expiry>,
}

/// A waiter's deadline, kept by the table itself: the wait ends on time
/// even when nothing polls the waiter's session (its client reads nothing,
/// so HTTP/2 stops polling the response that drives it). Dropping it stops
/// the timer.
#[derive(Debug)]
struct Expiry(tokio::task::AbortHandle);

impl Drop for Expiry {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Holder {
    entry: Entry,
    fence: u64,
    /// The lock in the outside world; dropping it releases it.
    held: Held,
}

/// The head of a queue whose acquisition runs outside its shard's mutex.
struct Attempting {
    id: u64,
    /// The task running a network acquisition (Redis); `None` while a
    /// caller runs a file attempt itself.
    task: Option<tokio::task::AbortHandle>,
}

struct Lock {
    /// Semaphore slot count (0 for other kinds).
    limit: u32,
    holders: Vec<Holder>,
    waiters: VecDeque<Entry>,
    attempt: Option<Attempting>,
    /// Something changed while an attempt ran (a holder left): the attempt's
    /// owner tries again at once instead of backing off.
    repump: bool,
    /// Id of the task that retries while a holder outside this server
    /// blocks the head of the queue (0: none), and its next delay.
    retry_task: u64,
    backoff: Duration,
    /// This process's announcement that its head is blocked by a holder
    /// outside it (file and semaphore kinds).
    announced: Option<fence::Announcement>,
    /// The lock is left free for another process that announced waiters,
    /// at most until then.
    yield_until: Option<tokio::time::Instant>,
}

impl Lock {
    fn new(limit: u32) -> Lock {
        Lock {
            limit,
            holders: Vec::new(),
            waiters: VecDeque::new(),
            attempt: None,
            repump: false,
            retry_task: 0,
            backoff: RETRY_FIRST,
            announced: None,
            yield_until: None,
        }
    }

    /// This server's holders, as a kind's rules see them.
    fn holders(&self) -> Holders {
        Holders {
            count: self.holders.len(),
            all_shared: self.holders.iter().all(|h| h.entry.mode == Mode::Shared),
            limit: self.limit,
        }
    }

    /// Takes the head of the queue. An emptied queue gives its room back:
    /// a held lock with nobody waiting keeps no spare slots.
    fn pop_head(&mut self) -> Entry {
        let head = self.waiters.pop_front().expect("head exists");
        if self.waiters.is_empty() {
            self.waiters = VecDeque::new();
        }
        head
    }

    fn is_idle(&self) -> bool {
        self.holders.is_empty() && self.waiters.is_empty() && self.attempt.is_none()
    }
}

/// The locks whose names hash to one shard.
#[derive(Default)]
struct Shard {
    locks: BTreeMap<Key, Lock>,
}

/// How many shards a table has: a power of two, about four per core, so
/// that names rarely share a mutex with a busy one.
pub fn shard_count() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores * 4).next_power_of_two().clamp(8, 256)
}

struct Shared {
    shards: Box<[Mutex<Shard>]>,
    /// Picks a name's shard; keyed at random per process, so that names
    /// cannot be chosen to pile up in one shard.
    hasher: std::hash::RandomState,
    /// The next request (and retry task) id.
    next_id: AtomicU64,
    /// Set once, before drain empties the shards one by one; a request
    /// placed in a shard checks it under that shard's mutex.
    draining: AtomicBool,
    /// Tells whoever waits for it that the table drains.
    drain_signal: tokio::sync::watch::Sender<bool>,
    /// Tickets alive: waiting and holding requests (`--max-holds`).
    holds: AtomicUsize,
    /// Locks tracked across the shards (`--max-locks`).
    tracked: AtomicUsize,
    events: tokio::sync::broadcast::Sender<Event>,
    /// Called with every event, synchronously, under the event lock: for
    /// metrics and history that must not miss events when subscribers lag.
    observer: std::sync::OnceLock<Observer>,
    /// The last event's [`Event::seq`]. Held while an event is numbered,
    /// observed and sent (always inside a shard's mutex, never around one),
    /// so numbers follow the order of the sends.
    event_seq: Mutex<u64>,
    kinds: HashMap<Kind, Box<dyn Backend>>,
    /// Why the other kinds are not served.
    not_served: HashMap<Kind, String>,
    fences: fence::Fences,
    limits: Limits,
}

/// The lock table. Cheap to clone; all clones share one table.
#[derive(Clone)]
pub struct LockTable {
    shared: Arc<Shared>,
}

impl LockTable {
    pub fn new(kinds: Backends, fences: fence::Fences, limits: Limits) -> LockTable {
        Self::with_shards(kinds, fences, limits, shard_count())
    }

    /// A table of `shards` shards (rounded up to a power of two).
    pub fn with_shards(
        kinds: Backends,
        fences: fence::Fences,
        limits: Limits,
        shards: usize,
    ) -> LockTable {
        let shards = shards.max(1).next_power_of_two();
        LockTable {
            shared: Arc::new(Shared {
                shards: (0..shards).map(|_| Mutex::default()).collect(),
                hasher: std::hash::RandomState::new(),
                next_id: AtomicU64::new(1),
                draining: AtomicBool::new(false),
                drain_signal: tokio::sync::watch::channel(false).0,
                holds: AtomicUsize::new(0),
                tracked: AtomicUsize::new(0),
                events: tokio::sync::broadcast::channel(EVENT_BACKLOG).0,
                observer: std::sync::OnceLock::new(),
                event_seq: Mutex::new(0),
                kinds: kinds.served,
                not_served: kinds.not_served,
                fences,
                limits,
            }),
        }
    }

    /// The shard that holds the lock `key`, locked.
    fn shard(&self, key: &Key) -> MutexGuard<'_, Shard> {
        let shards = &self.shared.shards;
        let hash = self.shared.hasher.hash_one(&*key.0) as usize;
        lock(&shards[hash & (shards.len() - 1)])
    }

    /// Each shard in turn, locked one at a time.
    fn each_shard(&self) -> impl Iterator<Item = MutexGuard<'_, Shard>> {
        self.shared.shards.iter().map(lock)
    }

    fn new_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// One open request fewer (`--max-holds`).
    fn unhold(&self) {
        let _ = self
            .shared
            .holds
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Stops tracking `key` when it has nobody left.
    fn forget_if_idle(&self, st: &mut Shard, key: &Key) {
        if st.locks.get(key).is_some_and(Lock::is_idle) {
            st.locks.remove(key);
            self.shared.tracked.fetch_sub(1, Ordering::AcqRel);
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// Live events from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// Installs the one observer that sees every event synchronously (see
    /// [`Observer`]). Returns false when one is already installed.
    pub fn observe(&self, observer: Observer) -> bool {
        self.shared.observer.set(observer).is_ok()
    }

    fn emit(&self, key: &Key, id: u64, what: EventKind) {
        let observer = self.shared.observer.get();
        let subscribed = self.shared.events.receiver_count() > 0;
        if observer.is_none() && !subscribed {
            return;
        }
        // Every emit runs under its shard's mutex, so a lock's events are
        // in order; the event lock numbers them in the order of the sends.
        let mut seq = lock(&self.shared.event_seq);
        *seq += 1;
        let event = Event {
            seq: *seq,
            at: SystemTime::now(),
            kind: key.1,
            name: key.0.clone(),
            id,
            what,
        };
        if let Some(observe) = observer {
            observe(&event);
        }
        if subscribed {
            let _ = self.shared.events.send(event);
        }
    }

    /// Removes holder or waiter `id` of `key` (a ticket was dropped, or
    /// released). Returns true when it was a holder at that moment.
    fn leave(&self, key: &Key, id: u64) -> bool {
        let mut after = After::default();
        let mut was_holder = false;
        let pump = {
            self.unhold();
            let mut st = self.shard(key);
            let Some(lock) = st.locks.get_mut(key) else {
                return false;
            };
            let mut pump = None;
            if let Some(i) = lock.holders.iter().position(|h| h.entry.id == id) {
                let holder = lock.holders.swap_remove(i);
                let held_for = elapsed(holder.entry.since);
                // Dropping `held` (after the mutex) releases the flock.
                after.release.push(holder.held);
                self.emit(key, id, EventKind::Released { held_for });
                was_holder = true;
                pump = Some(true); // a handoff
            } else if let Some(i) = lock.waiters.iter().position(|w| w.id == id) {
                self.remove_waiter(key, lock, i, &mut after);
                // A new head may be grantable (e.g. readers behind a writer).
                pump = (i == 0).then_some(false);
            }
            self.forget_if_idle(&mut st, key);
            pump
        };
        after.finish();
        if let Some(handoff) = pump {
            self.pump(key, handoff);
        }
        was_holder
    }

    /// Takes waiter `i` out of `lock`'s queue (it gave up, or its wait
    /// ended): stops an acquisition running for it and closes the head's
    /// announcement.
    fn remove_waiter(&self, key: &Key, lock: &mut Lock, i: usize, after: &mut After) -> Entry {
        let id = lock.waiters[i].id;
        if let Some(task) = lock
            .attempt
            .take_if(|a| a.id == id && a.task.is_some())
            .and_then(|a| a.task)
        {
            task.abort();
        }
        let waiter = lock.waiters.remove(i).expect("index is in range");
        self.emit(
            key,
            id,
            EventKind::Abandoned {
                waited: elapsed(waiter.since),
            },
        );
        if i == 0 {
            // The head's announcement was for it.
            if let Some(note) = lock.announced.take() {
                after.close.push(note);
            }
        }
        waiter
    }

    /// Ends waiter `id`'s wait at its deadline: it leaves the queue and is
    /// told `Failed` (not acquired). Its ticket, dropped once the session
    /// reads that, gives back its place under `--max-holds`. Nothing
    /// happens when it was granted or has left meanwhile.
    fn expire(&self, key: &Key, id: u64) {
        let mut after = After::default();
        let was_head = {
            let mut st = self.shard(key);
            let Some(lock) = st.locks.get_mut(key) else {
                return;
            };
            let Some(i) = lock.waiters.iter().position(|w| w.id == id) else {
                return;
            };
            let waiter = self.remove_waiter(key, lock, i, &mut after);
            // The wait asked for (as the session's own timer says it),
            // not the time it took this timer to run.
            let wait = waiter
                .deadline
                .and_then(|at| at.duration_since(waiter.since).ok())
                .unwrap_or_else(|| elapsed(waiter.since));
            let err = not_acquired(key, lock, wait);
            after.tell.push((waiter.tx, Notice::Failed(err)));
            self.forget_if_idle(&mut st, key);
            i == 0
        };
        after.finish();
        if was_head {
            self.pump(key, false);
        }
    }

    /// Starts the timer that ends waiter `id`'s wait at `at`.
    fn expiry(&self, key: &Key, id: u64, at: tokio::time::Instant) -> Expiry {
        let (table, key) = (Arc::downgrade(&self.shared), key.clone());
        let timer = tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            if let Some(shared) = table.upgrade() {
                LockTable { shared }.expire(&key, id);
            }
        });
        Expiry(timer.abort_handle())
    }

    /// Ends holder `id` of lock `kind`/`name` with `Lost{reason}`. Returns
    /// false when there is no such holder.
    pub fn revoke(
        &self,
        kind: Kind,
        name: &str,
        id: u64,
        reason: LostReason,
        detail: &str,
    ) -> bool {
        let key: Key = (Arc::from(name), kind);
        let mut after = After::default();
        {
            let mut st = self.shard(&key);
            let Some(lock) = st.locks.get_mut(&key) else {
                return false;
            };
            let Some(i) = lock.holders.iter().position(|h| h.entry.id == id) else {
                return false;
            };
            let Holder { entry, held, .. } = lock.holders.swap_remove(i);
            self.emit(
                &key,
                id,
                EventKind::Lost {
                    reason,
                    held_for: elapsed(entry.since),
                },
            );
            // Release first, then tell: once told, the holder may act on it.
            after.release.push(held);
            let notice = Notice::Lost {
                reason,
                detail: detail.to_string(),
            };
            after.tell.push((entry.tx, notice));
        }
        after.finish();
        self.pump(&key, true);
        true
    }

    /// Stops granting: every holder gets `Lost{shutdown}`, every waiter
    /// `Failed(Draining)`, and later acquires are refused. Shard by shard,
    /// after the flag is set (see [`LockTable::place`]).
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::Release);
        self.shared.drain_signal.send_replace(true);
        for mut st in self.each_shard() {
            let mut after = After::default();
            let locks = std::mem::take(&mut st.locks);
            self.shared.tracked.fetch_sub(locks.len(), Ordering::AcqRel);
            for (key, lock) in locks {
                if let Some(task) = lock.attempt.and_then(|a| a.task) {
                    task.abort();
                }
                for Holder { entry, held, .. } in lock.holders {
                    let what = EventKind::Lost {
                        reason: LostReason::Shutdown,
                        held_for: elapsed(entry.since),
                    };
                    self.emit(&key, entry.id, what);
                    after.release.push(held);
                    let notice = Notice::Lost {
                        reason: LostReason::Shutdown,
                        detail: "padlockd is shutting down".into(),
                    };
                    after.tell.push((entry.tx, notice));
                }
                for waiter in lock.waiters {
                    self.emit(
                        &key,
                        waiter.id,
                        EventKind::Abandoned {
                            waited: elapsed(waiter.since),
                        },
                    );
                    after
                        .tell
                        .push((waiter.tx, Notice::Failed(LockError::Draining)));
                }
            }
            drop(st);
            after.finish();
        }
    }

    /// The kinds this server serves, in order.
    pub fn kinds(&self) -> Vec<Kind> {
        let mut kinds: Vec<Kind> = self.shared.kinds.keys().copied().collect();
        kinds.sort();
        kinds
    }

    /// The kinds whose backend refuses requests right now (Redis down).
    pub fn unavailable(&self) -> Vec<(Kind, LockError)> {
        let mut down: Vec<(Kind, LockError)> = self
            .shared
            .kinds
            .iter()
            .filter_map(|(kind, backend)| backend.check_available().err().map(|e| (*kind, e)))
            .collect();
        down.sort_by_key(|(kind, _)| *kind);
        down
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// Resolves once the table drains (at once if it does already).
    pub async fn drained(&self) {
        let mut signal = self.shared.drain_signal.subscribe();
        let _ = signal.wait_for(|draining| *draining).await;
    }
}

/// Not acquired: who holds `lock` now (the first three owners).
fn not_acquired(key: &Key, lock: &Lock, waited: Duration) -> LockError {
    LockError::NotAcquired {
        name: name::printable(&key.0),
        holders: lock.holders.len(),
        held_by: lock
            .holders
            .iter()
            .take(3)
            .map(|h| name::printable(&h.entry.owner))
            .collect(),
        waited,
    }
}

/// Locks a mutex of the table. A panic while one was held must not wedge
/// every later client; each step leaves the state consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn elapsed(since: SystemTime) -> Duration {
    since.elapsed().unwrap_or_default()
}

#[cfg(test)]
mod tests;
