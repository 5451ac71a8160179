//! File descriptors: how many the locks may use.
//!
//! Every held file or semaphore lock is an open file, and every redis lock
//! a connection to Redis: without a budget, one client holding enough locks
//! would leave padlockd no descriptor to accept a connection or answer a
//! health check. So at start padlockd raises its soft `RLIMIT_NOFILE` to
//! the hard limit and keeps a **reserve** for connections and its own
//! files; locks may use the rest. A grant that would go past it is refused
//! with RESOURCE_EXHAUSTED, and the client's other locks, other clients and
//! the server are unharmed.
//!
//! The reserve is `max(256, min(limit / 4, max_connections + 128))`: room
//! for every allowed connection when the limit is large, a quarter of the
//! descriptors when it is not, and never less than 256. The redis kind's
//! idle connections (its pool, at most 32) live in the reserve too.
//!
//! **Spares.** A descriptor that is cheaper to keep than to open again (a
//! fence counter, drawn from at every grant of its name) can be kept open
//! as a spare, in a fixed table of [`SPARE_SLOTS`] slots by key. A spare
//! counts against the budget like a held lock, but only while there is
//! room: it is kept only when the budget has a descriptor free, and when a
//! lock finds the budget spent, every spare is closed and the lock counted
//! in their place. So spares never cost a client a grant.

use crate::error::LockError;
use std::hash::BuildHasher;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Slots of the table of spare descriptors (a power of two): at most this
/// many are kept open.
pub const SPARE_SLOTS: usize = 1024;

/// A descriptor kept open for reuse, and what it was opened as.
#[derive(Debug)]
pub struct Spare {
    key: Box<str>,
    fd: OwnedFd,
}

impl Spare {
    /// `fd`, opened as `key` (e.g. the file's path beneath a root).
    pub fn new(key: impl Into<Box<str>>, fd: OwnedFd) -> Spare {
        Spare {
            key: key.into(),
            fd,
        }
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

/// The descriptors locks may use, and how many they use now.
pub struct Descriptors {
    /// The soft `RLIMIT_NOFILE` after raising it.
    pub limit: usize,
    /// Kept for connections, the listener, logs and padlockd's own files.
    pub reserve: usize,
    /// Descriptors locks may hold at once: `limit - reserve`.
    pub budget: usize,
    /// Lock descriptors and spares counted now.
    used: AtomicUsize,
    /// Spare descriptors by a hash of their key; each counted in `used`.
    spares: Box<[Mutex<Option<Spare>>]>,
    hasher: std::hash::RandomState,
}

impl std::fmt::Debug for Descriptors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Descriptors")
            .field("limit", &self.limit)
            .field("reserve", &self.reserve)
            .field("budget", &self.budget)
            .field("used", &self.used())
            .finish_non_exhaustive()
    }
}

/// One descriptor counted against the budget until dropped.
#[derive(Debug)]
pub struct FdToken(Arc<Descriptors>);

impl Drop for FdToken {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Fewest descriptors kept back for connections and the server's own use.
const MIN_RESERVE: usize = 256;

impl Descriptors {
    /// Raises the soft descriptor limit to the hard one and plans the
    /// budget for a server accepting up to `max_connections`.
    pub fn raise_and_plan(max_connections: usize) -> Arc<Descriptors> {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let mut limit = getrlimit(Resource::Nofile);
        if limit.current != limit.maximum {
            let wanted = limit.maximum;
            limit.current = wanted;
            if let Err(err) = setrlimit(Resource::Nofile, limit) {
                tracing::warn!(%err, "cannot raise the open-file limit");
            }
        }
        let soft = getrlimit(Resource::Nofile)
            .current
            .map_or(usize::MAX / 2, |n| {
                usize::try_from(n).unwrap_or(usize::MAX / 2)
            });
        Arc::new(Descriptors::plan(soft, max_connections))
    }

    /// The budget for a descriptor limit of `limit`.
    pub fn plan(limit: usize, max_connections: usize) -> Descriptors {
        let reserve = (limit / 4)
            .min(max_connections.saturating_add(128))
            .max(MIN_RESERVE)
            .min(limit);
        Descriptors {
            limit,
            reserve,
            budget: limit - reserve,
            used: AtomicUsize::new(0),
            spares: (0..SPARE_SLOTS).map(|_| Mutex::default()).collect(),
            hasher: std::hash::RandomState::new(),
        }
    }

    /// No budget to speak of (unit tests).
    pub fn unlimited() -> Arc<Descriptors> {
        Arc::new(Descriptors::plan(usize::MAX / 2, 0))
    }

    /// Descriptors locks and spares use now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Counts one more lock descriptor. When the budget is spent, the
    /// spares are closed to make room; refused when that is not enough.
    pub fn take(self: &Arc<Self>) -> Result<FdToken, LockError> {
        if self.count_one() || {
            self.shed();
            self.count_one()
        } {
            return Ok(FdToken(self.clone()));
        }
        Err(LockError::NoDescriptors {
            budget: self.budget,
            limit: self.limit,
        })
    }

    /// Counts one descriptor if the budget has room.
    fn count_one(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < self.budget).then_some(used + 1)
            })
            .is_ok()
    }

    fn slot(&self, key: &str) -> std::sync::MutexGuard<'_, Option<Spare>> {
        let slot = &self.spares[self.hasher.hash_one(key) as usize % SPARE_SLOTS];
        slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The spare kept as `key`, if there is one: it is the caller's now
    /// (and no longer counted), so no one else uses it meanwhile.
    pub fn reuse(&self, key: &str) -> Option<Spare> {
        let spare = {
            let mut slot = self.slot(key);
            match &*slot {
                Some(spare) if *spare.key == *key => slot.take(),
                _ => None,
            }
        }?;
        self.used.fetch_sub(1, Ordering::AcqRel);
        Some(spare)
    }

    /// Keeps `spare` open for a later [`reuse`](Self::reuse), in place of
    /// whatever its slot held; closes it instead when the budget has no
    /// room.
    pub fn keep(&self, spare: Spare) {
        if !self.count_one() {
            return;
        }
        let old = self.slot(&spare.key).replace(spare);
        if old.is_some() {
            self.used.fetch_sub(1, Ordering::AcqRel);
        }
        // (`old` is closed here, outside the slot's mutex.)
    }

    /// Closes every spare.
    fn shed(&self) {
        for slot in self.spares.iter() {
            let spare = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            if spare.is_some() {
                self.used.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_a_reserve_and_counts() {
        let small = Descriptors::plan(1024, 10_000);
        assert_eq!((small.reserve, small.budget), (256, 768));
        let here = Descriptors::plan(20_000, 10_000);
        assert_eq!((here.reserve, here.budget), (5_000, 15_000));
        let big = Descriptors::plan(1 << 20, 10_000);
        assert_eq!(big.reserve, 10_128);
        let tiny = Descriptors::plan(100, 10);
        assert_eq!((tiny.reserve, tiny.budget), (100, 0));

        let fds = Arc::new(Descriptors::plan(258, 0));
        assert_eq!(fds.budget, 2);
        let a = fds.take().unwrap();
        let _b = fds.take().unwrap();
        assert!(matches!(
            fds.take(),
            Err(LockError::NoDescriptors { budget: 2, .. })
        ));
        drop(a);
        assert_eq!(fds.used(), 1);
        fds.take().unwrap();
    }

    fn spare(key: &str) -> Spare {
        Spare::new(key, rustix::io::dup(std::io::stdin()).unwrap())
    }

    #[test]
    fn spares_count_only_while_there_is_room_and_give_way_to_locks() {
        let fds = Arc::new(Descriptors::plan(259, 0));
        assert_eq!(fds.budget, 3);
        fds.keep(spare("a"));
        fds.keep(spare("b"));
        assert_eq!(fds.used(), 2);
        // Only by its key, and only once.
        assert!(fds.reuse("c").is_none());
        let a = fds.reuse("a").unwrap();
        assert_eq!(a.key.as_ref(), "a");
        assert!(fds.reuse("a").is_none());
        assert_eq!(fds.used(), 1);
        fds.keep(a);
        // A lock takes the last free descriptor; a spare is not kept
        // without room; the next lock closes the spares to get one.
        let one = fds.take().unwrap();
        assert_eq!(fds.used(), 3);
        fds.keep(spare("c"));
        assert_eq!(fds.used(), 3);
        assert!(fds.reuse("c").is_none());
        let two = fds.take().unwrap();
        let three = fds.take().unwrap();
        assert_eq!(fds.used(), 3);
        assert!(fds.reuse("a").is_none() && fds.reuse("b").is_none());
        assert!(fds.take().is_err(), "three locks fill a budget of three");
        drop((one, two, three));
        assert_eq!(fds.used(), 0);
    }

    #[test]
    fn a_spare_replaces_the_one_in_its_slot() {
        let fds = Arc::new(Descriptors::plan(usize::MAX / 2, 0));
        for i in 0..SPARE_SLOTS * 3 {
            fds.keep(spare(&i.to_string()));
        }
        let kept = fds.used();
        assert!(
            (SPARE_SLOTS / 2..=SPARE_SLOTS).contains(&kept),
            "{kept} spares kept"
        );
        let reused = (0..SPARE_SLOTS * 3)
            .filter(|i| fds.reuse(&i.to_string()).is_some())
            .count();
        assert_eq!(reused, kept, "each counted spare is there to reuse");
        assert_eq!(fds.used(), 0);
    }
}
