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
//! **Nothing that touches the outside world runs under the table's mutex.**
//! The state sits behind one `std::sync::Mutex`, held only for in-memory
//! bookkeeping and never across an `.await`. Taking a lock in the outside
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

pub mod fence;
mod mailbox;
pub mod name;
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
}

struct Holder {
    entry: Entry,
    fence: u64,
    /// The lock in the outside world; dropping it releases it.
    held: Held,
}

/// The head of a queue whose acquisition runs outside the table's mutex.
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

    fn is_idle(&self) -> bool {
        self.holders.is_empty() && self.waiters.is_empty() && self.attempt.is_none()
    }
}

struct State {
    locks: BTreeMap<Key, Lock>,
    next_id: u64,
    draining: bool,
    /// Tickets alive: waiting and holding requests (`--max-holds`).
    holds: usize,
}

struct Shared {
    state: Mutex<State>,
    events: tokio::sync::broadcast::Sender<Event>,
    /// Called with every event, synchronously, under the table's mutex:
    /// for metrics that must not miss events when subscribers lag.
    observer: std::sync::OnceLock<Observer>,
    /// The last event's [`Event::seq`]; bumped under the table's mutex.
    event_seq: std::sync::atomic::AtomicU64,
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
        LockTable {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    locks: BTreeMap::new(),
                    next_id: 1,
                    draining: false,
                    holds: 0,
                }),
                events: tokio::sync::broadcast::channel(EVENT_BACKLOG).0,
                observer: std::sync::OnceLock::new(),
                event_seq: std::sync::atomic::AtomicU64::new(0),
                kinds: kinds.served,
                not_served: kinds.not_served,
                fences,
                limits,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock must not wedge every later client;
        // the state is updated so that each step leaves it consistent.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
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
        // Every emit runs under the table's mutex, so numbers follow the
        // order of the sends.
        let seq = 1 + self
            .shared
            .event_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let event = Event {
            seq,
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

    /// Checks a request against the rules that need no state: the name,
    /// the kind and its limit, owner, labels and wait.
    fn check(&self, req: &AcquireRequest) -> Result<(), LockError> {
        let limits = &self.shared.limits;
        name::validate(&req.name, limits.max_name_components)?;
        let Some(backend) = self.shared.kinds.get(&req.kind) else {
            return Err(self.not_served(req.kind));
        };
        backend.check_request(req.kind, req.mode, req.limit)?;
        req.check_metadata()?;
        backend.check_available()?;
        backend.check_name(&req.name)
    }

    /// Why a kind is refused that this server does not serve.
    fn not_served(&self, kind: Kind) -> LockError {
        LockError::Unavailable(match self.shared.not_served.get(&kind) {
            Some(why) => why.clone(),
            None => format!("this server does not serve {kind} locks (see its --kinds)"),
        })
    }

    /// Joins the queue for a lock. The returned ticket has already received
    /// `Granted` when the lock was free, or `Queued` otherwise.
    pub fn acquire(&self, req: AcquireRequest) -> Result<Ticket, LockError> {
        self.check(&req)?;
        let quota = req.quota.as_ref().map(|quota| quota.take()).transpose()?;
        let key: Key = (Arc::from(req.name.as_str()), req.kind);
        let try_once = req.try_once();
        let deadline = req.deadline();
        let (tx, notices) = mailbox::mailbox();
        let id = self.place(&key, req, tx)?;
        // From here on the ticket owns the place: dropping it cleans up.
        let ticket = Ticket {
            table: self.clone(),
            key: key.clone(),
            id,
            deadline,
            notices,
            _quota: quota,
            placed: true,
        };
        self.pump(&key, false);
        self.settle(ticket, try_once)
    }

    /// Admits a request under the server's caps and puts it at the end of
    /// its lock's queue (the lock is tracked from now on); its id.
    fn place(&self, key: &Key, req: AcquireRequest, tx: mailbox::Sender) -> Result<u64, LockError> {
        let limits = &self.shared.limits;
        let since = SystemTime::now();
        let try_once = req.try_once();
        let gives_up = req
            .wait
            .filter(|w| !w.is_zero())
            .and_then(|w| since.checked_add(w));
        let mut st = self.state();
        if st.draining {
            return Err(LockError::Draining);
        }
        if st.holds >= limits.max_holds {
            return Err(LockError::TooManyHolds {
                cap: limits.max_holds,
            });
        }
        let tracked = st.locks.len();
        let lock = match st.locks.get_mut(key) {
            Some(lock) => lock,
            None if tracked >= limits.max_locks => {
                return Err(LockError::TooManyLocks {
                    cap: limits.max_locks,
                });
            }
            None => st.locks.entry(key.clone()).or_insert(Lock::new(req.limit)),
        };
        if lock.limit != req.limit {
            return Err(LockError::LimitMismatch {
                name: name::printable(&req.name),
                current: lock.limit,
                requested: req.limit,
            });
        }
        if lock.waiters.len() >= limits.max_waiters_per_lock {
            return Err(LockError::TooManyWaiters {
                name: name::printable(&req.name),
                cap: limits.max_waiters_per_lock,
            });
        }
        let id = st.next_id;
        st.next_id += 1;
        st.holds += 1;
        let lock = st.locks.get_mut(key).expect("entry was just checked");
        lock.waiters.push_back(Entry {
            id,
            owner: req.owner,
            peer: req.peer,
            since,
            mode: req.mode,
            labels: req.labels,
            deadline: gives_up,
            try_once,
            tx,
        });
        Ok(id)
    }

    /// After the first pump: a request already granted (or failed) has its
    /// notice; a try-lock that is not being attempted is withdrawn, not
    /// acquired; any other request waits, and is told its place.
    fn settle(&self, mut ticket: Ticket, try_once: bool) -> Result<Ticket, LockError> {
        let (key, id) = (ticket.key.clone(), ticket.id);
        let mut st = self.state();
        let Some(lock) = st.locks.get_mut(&key) else {
            return Ok(ticket); // drained meanwhile: the ticket was told
        };
        let Some(index) = lock.waiters.iter().position(|w| w.id == id) else {
            return Ok(ticket); // granted (or failed) already
        };
        // A try-lock being attempted right now gets its answer from that
        // attempt (it makes one try only); otherwise it is not granted.
        let attempted = lock.attempt.as_ref().is_some_and(|a| a.id == id);
        if try_once && !attempted {
            // Withdrawn quietly: it was never announced as queued.
            lock.waiters.remove(index);
            let err = not_acquired(&key, lock, Duration::ZERO);
            st.holds -= 1;
            forget_if_idle(&mut st, &key);
            drop(st);
            ticket.placed = false;
            drop(ticket);
            if index == 0 {
                // Readers held back by this writer may go now.
                self.pump(&key, false);
            }
            return Err(err);
        }
        let waiter = &lock.waiters[index];
        let _ = waiter.tx.send(Notice::Queued {
            position: index as u32 + 1,
            holders: lock.holders.len() as u32,
        });
        let what = EventKind::Queued {
            position: index as u32 + 1,
            mode: waiter.mode,
            owner: waiter.owner.clone(),
        };
        self.emit(&key, id, what);
        Ok(ticket)
    }

    /// Removes holder or waiter `id` of `key` (a ticket was dropped, or
    /// released). Returns true when it was a holder at that moment.
    fn leave(&self, key: &Key, id: u64) -> bool {
        let mut after = After::default();
        let mut was_holder = false;
        let pump = {
            let mut st = self.state();
            st.holds = st.holds.saturating_sub(1);
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
                // A new head may be grantable (e.g. readers behind a writer).
                pump = (i == 0).then_some(false);
            }
            forget_if_idle(&mut st, key);
            pump
        };
        after.finish();
        if let Some(handoff) = pump {
            self.pump(key, handoff);
        }
        was_holder
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
            let mut st = self.state();
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
    /// `Failed(Draining)`, and later acquires are refused.
    pub fn drain(&self) {
        let mut after = After::default();
        {
            let mut st = self.state();
            st.draining = true;
            for (key, lock) in std::mem::take(&mut st.locks) {
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
        }
        after.finish();
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
        self.state().draining
    }

    /// A page of the locks with holders or waiters whose name starts with
    /// `prefix` (and of `kind`, if given), in (name, kind) order, after the
    /// lock `after`: at most `limit` locks, and fewer when their details
    /// reach `detail.byte_budget`.
    pub fn list(
        &self,
        kind: Option<Kind>,
        prefix: &str,
        after: Option<(&str, Kind)>,
        limit: usize,
        detail: &Detail,
    ) -> Page {
        let st = self.state();
        view::page(&st.locks, kind, prefix, after, limit, detail)
    }

    /// One lock, if it has holders or waiters, with at most what `detail`
    /// allows of its holders and waiters.
    pub fn get(&self, kind: Kind, name: &str, detail: &Detail) -> Option<LockView> {
        let st = self.state();
        let key: Key = (Arc::from(name), kind);
        st.locks
            .get(&key)
            .map(|lock| view::view(&key, lock, detail))
    }

    /// The lock that holder `id` holds, as (name, kind). Looks through
    /// every lock: for an administrator's revoke by id.
    pub fn holder_lock(&self, id: u64) -> Option<(String, Kind)> {
        let st = self.state();
        st.locks
            .iter()
            .find(|(_, lock)| lock.holders.iter().any(|h| h.entry.id == id))
            .map(|((name, kind), _)| (name.to_string(), *kind))
    }

    /// Counts, for server info and metrics; `prefix` limits them to the
    /// names starting with it.
    pub fn totals(&self, prefix: &str) -> Totals {
        let st = self.state();
        let mut totals = Totals {
            holds: if prefix.is_empty() { st.holds } else { 0 },
            ..Totals::default()
        };
        for (_, lock) in view::under(&st.locks, prefix) {
            totals.locks += 1;
            totals.holders += lock.holders.len();
            totals.waiters += lock.waiters.len();
        }
        if !prefix.is_empty() {
            totals.holds = totals.holders + totals.waiters;
        }
        totals
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

fn forget_if_idle(st: &mut State, key: &Key) {
    if st.locks.get(key).is_some_and(Lock::is_idle) {
        st.locks.remove(key);
    }
}

fn elapsed(since: SystemTime) -> Duration {
    since.elapsed().unwrap_or_default()
}

#[cfg(test)]
mod tests;
