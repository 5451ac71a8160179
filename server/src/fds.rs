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

use crate::error::LockError;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The descriptors locks may use, and how many they use now.
#[derive(Debug)]
pub struct Descriptors {
    /// The soft `RLIMIT_NOFILE` after raising it.
    pub limit: usize,
    /// Kept for connections, the listener, logs and padlockd's own files.
    pub reserve: usize,
    /// Descriptors locks may hold at once: `limit - reserve`.
    pub budget: usize,
    used: AtomicUsize,
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
        }
    }

    /// No budget to speak of (unit tests).
    pub fn unlimited() -> Arc<Descriptors> {
        Arc::new(Descriptors::plan(usize::MAX / 2, 0))
    }

    /// Descriptors locks use now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Counts one more lock descriptor, or refuses when the budget is spent.
    pub fn take(self: &Arc<Self>) -> Result<FdToken, LockError> {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < self.budget).then_some(used + 1)
            });
        match taken {
            Ok(_) => Ok(FdToken(self.clone())),
            Err(_) => Err(LockError::NoDescriptors {
                budget: self.budget,
                limit: self.limit,
            }),
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
}
