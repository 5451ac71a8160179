//! Kinds of lock: how a grant is held in the outside world.
//!
//! The lock table decides *who* is next; a kind decides whether the outside
//! world (other processes' flocks, other padlockd instances) lets that
//! waiter in right now, and which requests and holders its rules allow.
//! Each kind is one module behind [`Backend`]; the table never sees file
//! descriptors and names no kind.

pub mod file;
pub mod redis;
pub mod semaphore;

use crate::error::LockError;
use padlock_proto::{Kind, Mode};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

/// A lock held in the outside world. Dropping it releases it (for flock
/// kinds: closing the file descriptor drops the flock; for Redis: closing
/// the subscription connection).
pub struct Held {
    /// The semaphore slot this grant occupies.
    pub slot: Option<u32>,
    /// The fence, when the kind draws its own (Redis: `INCR <name>-fence`);
    /// otherwise the table draws one from its fence counters.
    pub fence: Option<u64>,
    /// Whether the lock still holds on the backend; checked under the
    /// table's lock at grant time, so a lock lost between being taken and
    /// being granted is never handed out.
    alive: Option<Box<dyn Fn() -> bool + Send + Sync>>,
    /// Proves, with a round trip, that the lock still holds on the backend
    /// (see [`Held::confirm`]).
    confirm: Option<Box<dyn Fn() -> Confirmation + Send + Sync>>,
    _resource: Box<dyn Send + Sync>,
}

/// Resolves to `Ok` when the lock was still held when it ran, or to why it
/// is not.
pub type Confirmation = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

impl Held {
    pub fn new(slot: Option<u32>, resource: impl Send + Sync + 'static) -> Held {
        Held {
            slot,
            fence: None,
            alive: None,
            confirm: None,
            _resource: Box::new(resource),
        }
    }

    pub fn with_fence(mut self, fence: u64) -> Held {
        self.fence = Some(fence);
        self
    }

    pub fn with_liveness(mut self, alive: impl Fn() -> bool + Send + Sync + 'static) -> Held {
        self.alive = Some(Box::new(alive));
        self
    }

    pub fn with_confirmation(
        mut self,
        confirm: impl Fn() -> Confirmation + Send + Sync + 'static,
    ) -> Held {
        self.confirm = Some(Box::new(confirm));
        self
    }

    pub fn is_alive(&self) -> bool {
        self.alive.as_ref().is_none_or(|alive| alive())
    }

    /// Asks the backend whether the lock still holds, for a release: a
    /// holder whose lock was taken from it while padlockd could not notice
    /// (paused, partitioned) must be told it was lost, not that it
    /// released. `None`: this kind cannot lose a lock without padlockd
    /// knowing (a flock lives as long as its descriptor).
    pub fn confirm(&self) -> Option<Confirmation> {
        self.confirm.as_ref().map(|confirm| confirm())
    }
}

/// An acquisition that takes network round trips (Redis). It resolves once
/// the lock is held, retrying inside for as long as it takes; dropping it
/// cancels the attempt and lets go of anything taken so far.
pub type Contention = Pin<Box<dyn Future<Output = Result<Held, LockError>> + Send>>;

/// Called by a kind, at most once, when a lock it granted ends on the
/// backend's side (a Redis connection broke): the table tells the holder
/// `Lost{backend}` with this detail.
pub type OnLost = Box<dyn FnOnce(String) + Send + Sync>;

/// What the table asks of a kind for the head of a queue.
pub struct Request<'a> {
    pub name: &'a str,
    pub mode: Mode,
    /// Semaphore size (0 for other kinds).
    pub limit: u32,
    /// Slots this server's holders occupy (semaphores).
    pub own_slots: &'a [u32],
    /// One attempt only (try-lock): a contention ends with
    /// `LockError::NotAcquired` instead of retrying.
    pub try_once: bool,
    pub on_lost: OnLost,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("slot", &self.slot).finish()
    }
}

/// What a kind answers when asked to take a lock without waiting.
pub enum Attempt {
    /// Taken; hold on to it.
    Taken(Held),
    /// Someone outside this server holds it (another process, another
    /// padlockd): the table retries with a short backoff.
    Busy,
    /// Run this to completion to take it (the table runs it as a task and
    /// grants the head of the queue when it resolves).
    Contend(Contention),
}

/// This server's holders of one lock, as a kind's rules see them.
#[derive(Debug, Clone, Copy)]
pub struct Holders {
    pub count: usize,
    /// Every holder holds in shared mode (true when there are none).
    pub all_shared: bool,
    /// The lock's limit (semaphores; 0 otherwise).
    pub limit: u32,
}

/// One kind of lock: how it is taken in the outside world, and its rules.
pub trait Backend: Send + Sync {
    /// Tries, without blocking, to take `req.name` for one more holder. The
    /// table has already checked that its own holders admit the request
    /// ([`Backend::admits`]).
    fn try_acquire(&self, req: Request<'_>) -> Result<Attempt, LockError>;

    /// Refuses new requests while the backend is known to be down.
    fn check_available(&self) -> Result<(), LockError> {
        Ok(())
    }

    /// Refuses names this kind cannot lock (beyond the rules every name
    /// follows), before the request joins a queue.
    fn check_name(&self, _name: &str) -> Result<(), LockError> {
        Ok(())
    }

    /// Refuses a mode or limit this kind does not take. By default a lock
    /// has no limit and takes either mode.
    fn check_request(&self, kind: Kind, _mode: Mode, limit: u32) -> Result<(), LockError> {
        if limit == 0 {
            return Ok(());
        }
        Err(LockError::InvalidArgument(format!(
            "limit {limit} was given for a {kind} lock; only semaphores take a limit"
        )))
    }

    /// Do this server's `holders` leave room for one more in `mode`? By
    /// default an exclusive holder is alone and shared holders share.
    fn admits(&self, holders: Holders, mode: Mode) -> bool {
        match mode {
            Mode::Exclusive => holders.count == 0,
            Mode::Shared => holders.all_shared,
        }
    }

    /// Its locks are files in the lock directory, which other padlockd
    /// processes may share: they take turns (see [`crate::locks`]).
    fn in_lock_dir(&self) -> bool {
        false
    }
}

/// The kinds a server serves, and for the others why not.
#[derive(Default)]
pub struct Backends {
    pub(crate) served: HashMap<Kind, Box<dyn Backend>>,
    pub(crate) not_served: HashMap<Kind, String>,
}

impl Backends {
    pub fn new() -> Backends {
        Backends::default()
    }

    /// Serves `kind` with `backend`.
    pub fn serve(&mut self, kind: Kind, backend: impl Backend + 'static) {
        self.served.insert(kind, Box::new(backend));
    }

    /// Says why `kind` is not served, to a client that asks for it.
    pub fn explain(&mut self, kind: Kind, why: impl Into<String>) {
        self.not_served.insert(kind, why.into());
    }
}
