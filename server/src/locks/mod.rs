//! The lock table: the one source of truth about who holds and who waits.
//!
//! Per (kind, name) there is one [`Lock`]: its holders and a FIFO queue of
//! waiters. The queue *is* the lock (as in etcd's mutex recipe): grants go
//! strictly in arrival order, the head of the queue is the only waiter that
//! may be granted, shared waiters at the head are granted together, and a
//! waiting writer holds back the readers that arrived after it.
//!
//! A waiter is granted when the table's own holders admit it *and* its kind
//! (flock, Redis) lets it in. When a holder of this server leaves, the next
//! waiter is granted in the same call, with no polling. When the kind says
//! someone outside this server holds the lock, one background task per lock
//! retries with a short bounded backoff until it is free or the queue empties.
//!
//! The state sits behind one `std::sync::Mutex`, never held across an
//! `.await`. Transports (gRPC, HTTP) talk to the table through
//! [`LockTable::acquire`] and the [`Ticket`] it returns: the ticket receives
//! [`Notice`]s, and dropping it leaves the queue or releases the lock.

pub mod fence;
mod mailbox;
pub mod name;

use crate::kinds::{Attempt, Contention, Held, Kind as KindImpl, Request};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// What is locked, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    File,
    Semaphore,
    Redis,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Semaphore => "semaphore",
            Kind::Redis => "redis",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Exclusive,
    Shared,
}

/// Why a holder lost its lock without asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    Shutdown,
    Revoked,
    Backend,
}

/// Errors of the lock table, mapped to gRPC and HTTP statuses once, in the
/// transports.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LockError {
    #[error("invalid lock name '{name}': {why}")]
    InvalidName { name: String, why: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error(
        "semaphore '{name}' has limit {current} while it has holders or waiters; \
         this request asked for limit {requested}"
    )]
    LimitMismatch {
        name: String,
        current: u32,
        requested: u32,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("lock '{name}' already has {cap} waiters (the server's --max-waiters-per-lock)")]
    TooManyWaiters { name: String, cap: usize },
    #[error("the server already tracks {cap} locks (the server's --max-locks)")]
    TooManyLocks { cap: usize },
    #[error(
        "lock '{name}' is held ({holders} holder(s) on this server, or a process outside it) and was not acquired within {waited:?}"
    )]
    NotAcquired {
        name: String,
        holders: usize,
        waited: Duration,
    },
    #[error("the server is shutting down and grants no more locks")]
    Draining,
    #[error("lock backend failed: {0}")]
    Backend(String),
}

/// Limits the table enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_locks: usize,
    pub max_waiters_per_lock: usize,
    pub max_semaphore_limit: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_locks: 100_000,
            max_waiters_per_lock: 10_000,
            max_semaphore_limit: 1024,
        }
    }
}

/// A request to hold a lock, already decoded from the wire.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    pub name: String,
    pub kind: Kind,
    pub mode: Mode,
    /// Slot count for semaphores; ignored (must be 0) for other kinds.
    pub limit: u32,
    /// Free text naming the client.
    pub owner: String,
    /// The client's network address.
    pub peer: String,
    pub labels: BTreeMap<String, String>,
    /// Try once: fail with [`LockError::NotAcquired`] instead of queueing.
    pub try_only: bool,
}

/// What the table tells a ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Still waiting, at this 1-based position.
    Queued {
        position: u32,
        holders: u32,
    },
    Granted(Grant),
    /// The lock ended without the holder asking.
    Lost {
        reason: LostReason,
        detail: String,
    },
    /// The waiter was removed from the queue without a grant.
    Failed(LockError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub holder_id: u64,
    pub fence: u64,
    pub slot: Option<u32>,
    pub mode: Mode,
}

/// Something that happened to a lock, for live inspection (SSE), metrics
/// and logs. Sent on a broadcast channel: slow subscribers miss events
/// (and are told so by the channel), the table never waits for them.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: SystemTime,
    pub kind: Kind,
    pub name: Arc<str>,
    /// The holder or waiter the event is about.
    pub id: u64,
    pub what: EventKind,
}

#[derive(Debug, Clone)]
pub enum EventKind {
    /// A waiter joined the queue (it was not granted at once).
    Queued {
        position: u32,
        mode: Mode,
        owner: String,
    },
    /// A waiter became a holder after waiting `waited`.
    Granted {
        fence: u64,
        slot: Option<u32>,
        mode: Mode,
        owner: String,
        waited: Duration,
    },
    /// A holder released (or its client went away) after holding `held`.
    Released { held: Duration },
    /// A holder's lock ended without its asking.
    Lost { reason: LostReason, held: Duration },
    /// A waiter left the queue without a grant (cancelled, timed out,
    /// disconnected, refused) after waiting `waited`.
    Abandoned { waited: Duration },
}

/// Sees every [`Event`] as it happens, under the table's mutex: it must be
/// quick and must not call back into the table. Metrics use it, because a
/// broadcast subscriber can fall behind and miss events.
pub type Observer = Arc<dyn Fn(&Event) + Send + Sync>;

/// Capacity of the event channel: how far a subscriber may fall behind.
pub const EVENT_BACKLOG: usize = 4096;

/// A read-only view of one lock, for inspection.
#[derive(Debug, Clone)]
pub struct LockView {
    pub name: String,
    pub kind: Kind,
    pub mode: Option<Mode>,
    pub limit: u32,
    pub holders: Vec<HolderView>,
    pub waiters: Vec<WaiterView>,
}

#[derive(Debug, Clone)]
pub struct HolderView {
    pub id: u64,
    pub owner: String,
    pub peer: String,
    pub since: SystemTime,
    pub fence: u64,
    pub slot: Option<u32>,
    pub mode: Mode,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct WaiterView {
    pub id: u64,
    pub owner: String,
    pub peer: String,
    pub position: u32,
    pub since: SystemTime,
    pub mode: Mode,
    pub labels: BTreeMap<String, String>,
}

/// Counts, for server info and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub locks: usize,
    pub holders: usize,
    pub waiters: usize,
}

type Key = (Kind, Arc<str>);

/// Who a holder or waiter is; kept for inspection.
#[derive(Debug)]
struct Client {
    id: u64,
    owner: String,
    peer: String,
    /// When the waiter arrived; once granted, when it was granted.
    since: SystemTime,
    mode: Mode,
    labels: BTreeMap<String, String>,
    /// Try-lock: never queue behind anyone.
    try_once: bool,
    tx: mailbox::Sender,
}

struct Holder {
    client: Client,
    fence: u64,
    /// The lock in the outside world; dropping it releases it.
    held: Held,
}

#[derive(Default)]
struct Lock {
    /// Semaphore slot count (0 for other kinds).
    limit: u32,
    holders: Vec<Holder>,
    waiters: VecDeque<Client>,
    /// Id of the task retrying this lock because a holder outside this
    /// server blocks the head of the queue (0: none).
    retry_task: u64,
    /// The waiter whose network acquisition (Redis) is running, and the
    /// task running it. Nobody behind it is granted meanwhile.
    contender: Option<(u64, tokio::task::AbortHandle)>,
}

impl Lock {
    /// Do this server's holders leave room for one more holder in `mode`?
    fn admits(&self, kind: Kind, mode: Mode) -> bool {
        match kind {
            Kind::Semaphore => self.holders.len() < self.limit as usize,
            _ => match mode {
                Mode::Exclusive => self.holders.is_empty(),
                Mode::Shared => self.holders.iter().all(|h| h.client.mode == Mode::Shared),
            },
        }
    }

    fn is_idle(&self) -> bool {
        self.holders.is_empty() && self.waiters.is_empty()
    }
}

struct State {
    locks: HashMap<Key, Lock>,
    next_id: u64,
    draining: bool,
}

struct Shared {
    state: Mutex<State>,
    events: tokio::sync::broadcast::Sender<Event>,
    /// Called with every event, synchronously, under the table's mutex:
    /// for metrics that must not miss events when subscribers lag.
    observer: std::sync::OnceLock<Observer>,
    kinds: HashMap<Kind, Box<dyn KindImpl>>,
    fences: fence::Fences,
    limits: Limits,
}

/// The lock table. Cheap to clone; all clones share one table.
#[derive(Clone)]
pub struct LockTable {
    shared: Arc<Shared>,
}

/// Backoff while an outside holder blocks the head of a queue: starts at
/// 1 ms and doubles up to this cap, so an outside release is noticed within
/// about this long.
pub const RETRY_CAP: Duration = Duration::from_millis(20);

impl LockTable {
    pub fn new(
        kinds: HashMap<Kind, Box<dyn KindImpl>>,
        fences: fence::Fences,
        limits: Limits,
    ) -> LockTable {
        LockTable {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    locks: HashMap::new(),
                    next_id: 1,
                    draining: false,
                }),
                events: tokio::sync::broadcast::channel(EVENT_BACKLOG).0,
                observer: std::sync::OnceLock::new(),
                kinds,
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
        let event = Event {
            at: SystemTime::now(),
            kind: key.0,
            name: key.1.clone(),
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

    /// Joins the queue for a lock. The returned ticket has already received
    /// `Granted` when the lock was free, or `Queued` otherwise.
    pub fn acquire(&self, req: AcquireRequest) -> Result<Ticket, LockError> {
        name::validate(&req.name)?;
        let limits = &self.shared.limits;
        match (req.kind, req.limit) {
            (Kind::Semaphore, 0) => {
                return Err(LockError::InvalidArgument(
                    "a semaphore needs a limit of at least 1".into(),
                ));
            }
            (Kind::Semaphore, n) if n > limits.max_semaphore_limit => {
                return Err(LockError::InvalidArgument(format!(
                    "semaphore limit {n} is above the server's maximum of {} (--max-semaphore-limit)",
                    limits.max_semaphore_limit
                )));
            }
            (Kind::Semaphore, _) if req.mode == Mode::Shared => {
                return Err(LockError::InvalidArgument(
                    "semaphore slots are exclusive; mode 'shared' does not apply to semaphores"
                        .into(),
                ));
            }
            (Kind::Semaphore, _) | (_, 0) => {}
            (kind, n) => {
                return Err(LockError::InvalidArgument(format!(
                    "limit {n} was given for a {} lock; only semaphores take a limit",
                    kind.as_str()
                )));
            }
        }
        match self.shared.kinds.get(&req.kind) {
            Some(kind) => kind.check_available()?,
            None if req.kind == Kind::Redis => {
                return Err(LockError::Unavailable(
                    "the redis kind is not configured on this server: start padlockd with \
                     --redis-url redis://HOST:PORT (or PADLOCK_REDIS_URL)"
                        .into(),
                ));
            }
            None => {
                return Err(LockError::Unavailable(format!(
                    "this server does not serve {} locks (see its --kinds)",
                    req.kind.as_str()
                )));
            }
        }

        let (tx, rx) = mailbox::mailbox();
        let mut st = self.state();
        if st.draining {
            return Err(LockError::Draining);
        }
        let key: Key = (req.kind, Arc::from(req.name.as_str()));
        let tracked = st.locks.len();
        let lock = match st.locks.get_mut(&key) {
            Some(lock) => lock,
            None if tracked >= limits.max_locks => {
                return Err(LockError::TooManyLocks {
                    cap: limits.max_locks,
                });
            }
            None => st.locks.entry(key.clone()).or_insert_with(|| Lock {
                limit: req.limit,
                ..Lock::default()
            }),
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
        let lock = st.locks.get_mut(&key).expect("entry was just checked");
        lock.waiters.push_back(Client {
            id,
            owner: req.owner,
            peer: req.peer,
            since: SystemTime::now(),
            mode: req.mode,
            labels: req.labels,
            try_once: req.try_only,
            tx,
        });
        self.pump(&mut st, &key);

        let lock = st.locks.get_mut(&key);
        let waiting = lock
            .as_ref()
            .and_then(|l| l.waiters.iter().position(|w| w.id == id));
        if let (Some(lock), Some(index)) = (lock, waiting) {
            // A try-lock whose network attempt is running gets its answer
            // from that attempt (it makes one try only).
            let contending = lock.contender.as_ref().is_some_and(|(c, _)| *c == id);
            if req.try_only && !contending {
                lock.waiters.remove(index);
                let holders = lock.holders.len();
                self.forget_if_idle(&mut st, &key);
                return Err(LockError::NotAcquired {
                    name: name::printable(&key.1),
                    holders,
                    waited: Duration::ZERO,
                });
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
        }
        drop(st);
        Ok(Ticket {
            table: self.clone(),
            key,
            id,
            notices: rx,
        })
    }

    /// Grants the head of the queue for as long as it can be granted, and
    /// makes sure a retry task runs while an outside holder blocks the head.
    fn pump(&self, st: &mut State, key: &Key) {
        if self.grant_ready(st, key) {
            let retry_id = st.next_id;
            if let Some(lock) = st.locks.get_mut(key).filter(|l| l.retry_task == 0) {
                st.next_id += 1;
                lock.retry_task = retry_id;
                self.spawn_retry(key.clone(), retry_id);
            }
        }
    }

    /// Grants waiters from the head of the queue while they can be granted.
    /// Returns true when the head is blocked by a holder outside this server.
    fn grant_ready(&self, st: &mut State, key: &Key) -> bool {
        let Some(lock) = st.locks.get_mut(key) else {
            return false;
        };
        let kind = &self.shared.kinds[&key.0];
        while let Some(head) = lock.waiters.front() {
            if lock.contender.is_some() || !lock.admits(key.0, head.mode) {
                return false;
            }
            let own_slots: Vec<u32> = lock.holders.iter().filter_map(|h| h.held.slot).collect();
            let request = Request {
                name: &key.1,
                mode: head.mode,
                limit: lock.limit,
                own_slots: &own_slots,
                try_once: head.try_once,
                on_lost: self.on_lost(key.clone(), head.id),
            };
            match kind.try_acquire(request) {
                Ok(Attempt::Taken(held)) => {
                    let client = lock.waiters.pop_front().expect("head exists");
                    self.grant(key, lock, client, held);
                }
                Ok(Attempt::Busy) => return true,
                Ok(Attempt::Contend(contention)) => {
                    let id = head.id;
                    let task = self.spawn_contention(key.clone(), id, contention);
                    lock.contender = Some((id, task));
                    return false;
                }
                Err(err) => self.fail_head(key, lock, err),
            }
        }
        false
    }

    /// Makes `client` a holder of `lock` with `held`, and tells it so.
    fn grant(&self, key: &Key, lock: &mut Lock, mut client: Client, held: Held) {
        let fence = match held.fence {
            Some(fence) => fence,
            None => match self.shared.fences.next(key.0.as_str(), &key.1) {
                Ok(fence) => fence,
                Err(err) => {
                    let err =
                        LockError::Backend(format!("cannot advance the fence counter: {err}"));
                    let _ = client.tx.send(Notice::Failed(err));
                    let what = EventKind::Abandoned {
                        waited: elapsed(client.since),
                    };
                    self.emit(key, client.id, what);
                    return;
                }
            },
        };
        let grant = Grant {
            holder_id: client.id,
            fence,
            slot: held.slot,
            mode: client.mode,
        };
        // The receiver lives in the Ticket, whose Drop removes the waiter
        // under this mutex first, so a closed mailbox cannot happen here;
        // if it ever did, `held` is dropped and the lock stays free.
        if client.tx.send(Notice::Granted(grant)).is_ok() {
            let now = SystemTime::now();
            let waited = now.duration_since(client.since).unwrap_or_default();
            client.since = now;
            let what = EventKind::Granted {
                fence,
                slot: held.slot,
                mode: client.mode,
                owner: client.owner.clone(),
                waited,
            };
            self.emit(key, client.id, what);
            lock.holders.push(Holder {
                client,
                fence,
                held,
            });
        }
    }

    /// What a kind calls when a lock it granted to holder `id` ends on the
    /// backend's side.
    fn on_lost(&self, key: Key, id: u64) -> crate::kinds::OnLost {
        let table = Arc::downgrade(&self.shared);
        Box::new(move |detail: String| {
            if let Some(shared) = table.upgrade() {
                LockTable { shared }.revoke(key.0, &key.1, id, LostReason::Backend, &detail);
            }
        })
    }

    /// Runs a network acquisition for waiter `id` and grants it (or fails
    /// it) when it resolves.
    fn spawn_contention(
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

    fn finish_contention(&self, key: &Key, id: u64, outcome: Result<Held, LockError>) {
        let mut st = self.state();
        let Some(lock) = st.locks.get_mut(key) else {
            return;
        };
        if lock.contender.as_ref().is_none_or(|(c, _)| *c != id) {
            return; // cancelled meanwhile; dropping `outcome` lets go of it
        }
        lock.contender = None;
        if lock.waiters.front().is_some_and(|w| w.id == id) {
            match outcome {
                // Lost between being taken and now: contend again (pump).
                Ok(held) if !held.is_alive() => drop(held),
                Ok(held) => {
                    let client = lock.waiters.pop_front().expect("head exists");
                    self.grant(key, lock, client, held);
                }
                Err(err) => self.fail_head(key, lock, err),
            }
        }
        self.pump(&mut st, key);
        self.forget_if_idle(&mut st, key);
    }

    /// Removes the head of the queue with `err`.
    fn fail_head(&self, key: &Key, lock: &mut Lock, err: LockError) {
        let waiter = lock.waiters.pop_front().expect("head exists");
        let _ = waiter.tx.send(Notice::Failed(err));
        self.emit(
            key,
            waiter.id,
            EventKind::Abandoned {
                waited: elapsed(waiter.since),
            },
        );
    }

    /// Retries a lock whose head is blocked by a holder outside this server,
    /// with a backoff from 1 ms up to [`RETRY_CAP`], until the head is
    /// granted, the queue empties, or another task takes over.
    fn spawn_retry(&self, key: Key, task_id: u64) {
        let table = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(1);
            loop {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_CAP);
                let mut st = table.state();
                match st.locks.get(&key) {
                    Some(lock) if lock.retry_task == task_id => {}
                    _ => return,
                }
                if !table.grant_ready(&mut st, &key) {
                    if let Some(lock) = st.locks.get_mut(&key) {
                        lock.retry_task = 0;
                    }
                    return;
                }
            }
        });
    }

    /// Removes holder or waiter `id` of `key` (a ticket was dropped).
    fn leave(&self, key: &Key, id: u64) {
        let mut st = self.state();
        let Some(lock) = st.locks.get_mut(key) else {
            return;
        };
        if let Some(i) = lock.holders.iter().position(|h| h.client.id == id) {
            // Dropping the holder drops its `Held`: the flock is released.
            let holder = lock.holders.swap_remove(i);
            let held = elapsed(holder.client.since);
            drop(holder);
            self.emit(key, id, EventKind::Released { held });
            self.pump(&mut st, key);
        } else if let Some(i) = lock.waiters.iter().position(|w| w.id == id) {
            if let Some((_, task)) = lock.contender.take_if(|(c, _)| *c == id) {
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
                // A new head may be grantable (e.g. readers behind a writer).
                self.pump(&mut st, key);
            }
        }
        self.forget_if_idle(&mut st, key);
    }

    fn forget_if_idle(&self, st: &mut State, key: &Key) {
        if st.locks.get(key).is_some_and(Lock::is_idle) {
            st.locks.remove(key);
        }
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
        let mut st = self.state();
        let key: Key = (kind, Arc::from(name));
        let Some(lock) = st.locks.get_mut(&key) else {
            return false;
        };
        let Some(i) = lock.holders.iter().position(|h| h.client.id == id) else {
            return false;
        };
        let Holder { client, held, .. } = lock.holders.swap_remove(i);
        // Release first, then tell: once told, the holder may act on it.
        drop(held);
        let _ = client.tx.send(Notice::Lost {
            reason,
            detail: detail.to_string(),
        });
        self.emit(
            &key,
            id,
            EventKind::Lost {
                reason,
                held: elapsed(client.since),
            },
        );
        self.pump(&mut st, &key);
        self.forget_if_idle(&mut st, &key);
        true
    }

    /// Stops granting: every holder gets `Lost{shutdown}`, every waiter
    /// `Failed(Draining)`, and later acquires are refused.
    pub fn drain(&self) {
        let mut st = self.state();
        st.draining = true;
        for (key, lock) in std::mem::take(&mut st.locks) {
            if let Some((_, task)) = lock.contender {
                task.abort();
            }
            for Holder { client, held, .. } in lock.holders {
                drop(held);
                let _ = client.tx.send(Notice::Lost {
                    reason: LostReason::Shutdown,
                    detail: "padlockd is shutting down".into(),
                });
                let what = EventKind::Lost {
                    reason: LostReason::Shutdown,
                    held: elapsed(client.since),
                };
                self.emit(&key, client.id, what);
            }
            for waiter in lock.waiters {
                let _ = waiter.tx.send(Notice::Failed(LockError::Draining));
                self.emit(
                    &key,
                    waiter.id,
                    EventKind::Abandoned {
                        waited: elapsed(waiter.since),
                    },
                );
            }
        }
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

    /// Every lock with holders or waiters, optionally filtered, sorted by
    /// name then kind.
    pub fn list(&self, kind: Option<Kind>, prefix: &str) -> Vec<LockView> {
        let st = self.state();
        let mut views: Vec<LockView> = st
            .locks
            .iter()
            .filter(|((k, n), _)| kind.is_none_or(|want| *k == want) && n.starts_with(prefix))
            .map(|(key, lock)| view(key, lock))
            .collect();
        views.sort_by(|a, b| (&a.name, a.kind).cmp(&(&b.name, b.kind)));
        views
    }

    /// One lock, if it has holders or waiters.
    pub fn get(&self, kind: Kind, name: &str) -> Option<LockView> {
        let st = self.state();
        let key: Key = (kind, Arc::from(name));
        st.locks.get(&key).map(|lock| view(&key, lock))
    }

    pub fn totals(&self) -> Totals {
        let st = self.state();
        st.locks.values().fold(
            Totals {
                locks: st.locks.len(),
                ..Totals::default()
            },
            |mut t, lock| {
                t.holders += lock.holders.len();
                t.waiters += lock.waiters.len();
                t
            },
        )
    }
}

fn elapsed(since: SystemTime) -> Duration {
    since.elapsed().unwrap_or_default()
}

fn view(key: &Key, lock: &Lock) -> LockView {
    LockView {
        name: key.1.to_string(),
        kind: key.0,
        mode: lock.holders.first().map(|h| h.client.mode),
        limit: lock.limit,
        holders: lock
            .holders
            .iter()
            .map(|h| HolderView {
                id: h.client.id,
                owner: h.client.owner.clone(),
                peer: h.client.peer.clone(),
                since: h.client.since,
                fence: h.fence,
                slot: h.held.slot,
                mode: h.client.mode,
                labels: h.client.labels.clone(),
            })
            .collect(),
        waiters: lock
            .waiters
            .iter()
            .enumerate()
            .map(|(i, w)| WaiterView {
                id: w.id,
                owner: w.owner.clone(),
                peer: w.peer.clone(),
                position: i as u32 + 1,
                since: w.since,
                mode: w.mode,
                labels: w.labels.clone(),
            })
            .collect(),
    }
}

/// A place in a lock's queue, then the lock itself. Dropping the ticket
/// leaves the queue or releases the lock.
pub struct Ticket {
    table: LockTable,
    key: Key,
    id: u64,
    /// Queued, Granted, Lost or Failed, in that order of life.
    pub notices: mailbox::Receiver,
}

impl Ticket {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn kind(&self) -> Kind {
        self.key.0
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.table.leave(&self.key, self.id);
    }
}

#[cfg(test)]
mod tests;
