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
//! as a spare, in a fixed table of [`SPARE_SLOTS`] slots by key. Spares
//! only fill the room locks leave: one is kept only while locks and spares
//! together are below the budget, whether a lock is refused depends on the
//! locks alone, and a lock that brings the two past the budget closes
//! every spare. So spares never cost a client a grant; while a lock sheds
//! them, the descriptors in use may pass the budget by the few spares
//! being kept at that instant, which the reserve absorbs.

use crate::error::LockError;
use std::hash::BuildHasher;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Slots of the table of spare descriptors (a power of two): at most this
/// many are kept open.
pub const SPARE_SLOTS: usize = 1024;

/// A descriptor kept open for reuse, and what it was opened as: `key`
/// (e.g. a file's path beneath a root) in the namespace `of` (its user).
#[derive(Debug)]
pub struct Spare {
    of: &'static str,
    key: Box<str>,
    fd: OwnedFd,
}

impl Spare {
    pub fn new(of: &'static str, key: impl Into<Box<str>>, fd: OwnedFd) -> Spare {
        Spare {
            of,
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
    /// Lock descriptors counted now.
    used: AtomicUsize,
    /// Spares counted now: those in `slots`, and those on their way in or
    /// out of one.
    spares: AtomicUsize,
    /// Spare descriptors by a hash of their key.
    slots: Box<[Mutex<Option<Spare>>]>,
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
            spares: AtomicUsize::new(0),
            slots: (0..SPARE_SLOTS).map(|_| Mutex::default()).collect(),
            hasher: std::hash::RandomState::new(),
        }
    }

    /// No budget to speak of (unit tests).
    pub fn unlimited() -> Arc<Descriptors> {
        Arc::new(Descriptors::plan(usize::MAX / 2, 0))
    }

    /// Descriptors locks and spares use now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire) + self.spares.load(Ordering::Acquire)
    }

    /// Counts one more lock descriptor, or refuses when locks use the
    /// whole budget. Spares never make it refuse: when they and the locks
    /// come to more than the budget, they are closed.
    pub fn take(self: &Arc<Self>) -> Result<FdToken, LockError> {
        let counted = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < self.budget).then_some(used + 1)
            });
        let Ok(before) = counted else {
            return Err(LockError::NoDescriptors {
                budget: self.budget,
                limit: self.limit,
            });
        };
        if before + 1 + self.spares.load(Ordering::Acquire) > self.budget {
            self.shed();
        }
        Ok(FdToken(self.clone()))
    }

    fn slot(&self, of: &str, key: &str) -> std::sync::MutexGuard<'_, Option<Spare>> {
        let slot = &self.slots[self.hasher.hash_one((of, key)) as usize % self.slots.len()];
        slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The spare kept as `key` in `of`, if there is one: it is the
    /// caller's now (and no longer counted), so no one else uses it
    /// meanwhile.
    pub fn reuse(&self, of: &str, key: &str) -> Option<Spare> {
        let spare = {
            let mut slot = self.slot(of, key);
            match &*slot {
                Some(spare) if spare.of == of && *spare.key == *key => slot.take(),
                _ => None,
            }
        }?;
        self.spares.fetch_sub(1, Ordering::AcqRel);
        Some(spare)
    }

    /// Keeps `spare` open for a later [`reuse`](Self::reuse), in place of
    /// whatever its slot held; closes it instead when locks and spares
    /// already fill the budget.
    pub fn keep(&self, spare: Spare) {
        let room = self
            .spares
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |spares| {
                (self.used.load(Ordering::Acquire) + spares < self.budget).then_some(spares + 1)
            });
        if room.is_err() {
            return;
        }
        let old = self.slot(spare.of, &spare.key).replace(spare);
        if old.is_some() {
            self.spares.fetch_sub(1, Ordering::AcqRel);
        }
        // (`old` is closed here, outside the slot's mutex.)
    }

    /// Closes every spare.
    fn shed(&self) {
        for slot in self.slots.iter() {
            let spare = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            if spare.is_some() {
                self.spares.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// A table of `slots` spares instead of [`SPARE_SLOTS`] (unit tests).
    #[cfg(test)]
    pub fn with_spare_slots(mut self, slots: usize) -> Descriptors {
        self.slots = (0..slots).map(|_| Mutex::default()).collect();
        self
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
        Spare::new("test", key, rustix::io::dup(std::io::stdin()).unwrap())
    }

    #[test]
    fn spares_fill_only_the_room_locks_leave() {
        // A budget of three, and one slot, so every key shares it.
        let fds = Arc::new(Descriptors::plan(259, 0).with_spare_slots(1));
        assert_eq!(fds.budget, 3);
        fds.keep(spare("a"));
        assert_eq!(fds.used(), 1);
        fds.keep(spare("b"));
        assert_eq!(fds.used(), 1, "b took a's slot, and a was closed");
        // Only by its key, in its namespace, and only once.
        assert!(fds.reuse("test", "a").is_none());
        assert!(fds.reuse("other", "b").is_none());
        let b = fds.reuse("test", "b").unwrap();
        assert!(fds.reuse("test", "b").is_none());
        assert_eq!(fds.used(), 0);
        fds.keep(b);
        // Two locks and the spare fill the budget: the spare stays, and
        // no other is kept beside them.
        let one = fds.take().unwrap();
        let two = fds.take().unwrap();
        assert_eq!(fds.used(), 3);
        fds.keep(spare("c"));
        assert!(fds.reuse("test", "c").is_none(), "kept past the budget");
        let b = fds
            .reuse("test", "b")
            .expect("the spare stays while it fits");
        fds.keep(b);
        // The third lock is not refused for the spare: it closes it.
        let three = fds.take().unwrap();
        assert_eq!(fds.used(), 3);
        assert!(fds.reuse("test", "b").is_none());
        fds.keep(spare("d"));
        assert!(
            fds.reuse("test", "d").is_none(),
            "kept with the budget spent"
        );
        assert!(fds.take().is_err(), "three locks fill a budget of three");
        drop((one, two, three));
        assert_eq!(fds.used(), 0);
    }

    #[test]
    fn spares_are_bounded_by_their_slots() {
        let fds = Arc::new(Descriptors::plan(usize::MAX / 2, 0).with_spare_slots(8));
        for i in 0..24 {
            fds.keep(spare(&i.to_string()));
        }
        let kept = fds.used();
        assert!((1..=8).contains(&kept), "{kept} spares kept in 8 slots");
        let reused = (0..24)
            .filter(|i| fds.reuse("test", &i.to_string()).is_some())
            .count();
        assert_eq!(reused, kept, "each counted spare is there to reuse");
        assert_eq!(fds.used(), 0);
    }
}
