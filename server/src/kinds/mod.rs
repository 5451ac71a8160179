//! Kinds of lock: how a grant is held in the outside world.
//!
//! The lock table decides *who* is next; a kind decides whether the outside
//! world (other processes' flocks, other padlockd instances) lets that
//! waiter in right now. Each kind is one module behind [`Kind`]; the table
//! never sees file descriptors.

pub mod file;
pub mod fs;
pub mod semaphore;

use crate::locks::{LockError, Mode};

/// A lock held in the outside world. Dropping it releases it (for flock
/// kinds: closing the file descriptor drops the flock).
pub struct Held {
    /// The semaphore slot this grant occupies.
    pub slot: Option<u32>,
    _resource: Box<dyn Send + Sync>,
}

impl Held {
    pub fn new(slot: Option<u32>, resource: impl Send + Sync + 'static) -> Held {
        Held {
            slot,
            _resource: Box::new(resource),
        }
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("slot", &self.slot).finish()
    }
}

/// What a kind answers when asked to take a lock without waiting.
#[derive(Debug)]
pub enum Attempt {
    /// Taken; hold on to it.
    Taken(Held),
    /// Someone outside this server holds it (another process, another
    /// padlockd): the table retries with a short backoff.
    Busy,
}

/// One kind of lock.
pub trait Kind: Send + Sync {
    /// Tries once, without blocking, to take `name` for one more holder in
    /// `mode`. The table has already checked that its own holders admit the
    /// request; `limit` is the semaphore size and `own_slots` the slots this
    /// server's holders occupy (both unused by non-semaphore kinds).
    fn try_acquire(
        &self,
        name: &str,
        mode: Mode,
        limit: u32,
        own_slots: &[u32],
    ) -> Result<Attempt, LockError>;
}
