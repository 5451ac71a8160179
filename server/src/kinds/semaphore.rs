//! The `semaphore` kind: `limit` slots, each an exclusive flock on
//! `<lock-dir>/<name>.<NN>.lock` (`NN` = slot number, at least two digits).
//!
//! This is portalocker's `BoundedSemaphore(limit, name, directory=lock_dir)`
//! layout (`'{name}.{number:02d}.lock'`), so Python processes and padlock
//! clients share the same slots. A grant takes the lowest free slot, as
//! portalocker does.

use super::file::try_flock;
use super::{Attempt, Backend, Held, Holders, Request};
use crate::error::LockError;
use crate::fds::Descriptors;
use crate::fs::Root;
use padlock_proto::{Kind, Mode};
use rustix::fs::FlockOperation;
use std::sync::Arc;

pub struct SemaphoreKind {
    root: Arc<Root>,
    fds: Arc<Descriptors>,
    /// The largest limit a request may ask for (`--max-semaphore-limit`).
    max_limit: u32,
}

impl SemaphoreKind {
    pub fn new(root: Arc<Root>, fds: Arc<Descriptors>, max_limit: u32) -> SemaphoreKind {
        SemaphoreKind {
            root,
            fds,
            max_limit,
        }
    }
}

/// The file name of slot `slot` of semaphore `name`.
pub fn slot_file(name: &str, slot: u32) -> String {
    format!("{name}.{slot:02}.lock")
}

impl Backend for SemaphoreKind {
    fn check_request(&self, _kind: Kind, mode: Mode, limit: u32) -> Result<(), LockError> {
        let refuse = |why: String| Err(LockError::InvalidArgument(why));
        if limit == 0 {
            return refuse("a semaphore needs a limit of at least 1".into());
        }
        if limit > self.max_limit {
            return refuse(format!(
                "semaphore limit {limit} is above the server's maximum of {} \
                 (--max-semaphore-limit)",
                self.max_limit
            ));
        }
        if mode == Mode::Shared {
            return refuse(
                "semaphore slots are exclusive; mode 'shared' does not apply to semaphores".into(),
            );
        }
        Ok(())
    }

    /// One holder per slot, up to the limit.
    fn admits(&self, holders: Holders, _mode: Mode) -> bool {
        holders.count < holders.limit as usize
    }

    fn in_lock_dir(&self) -> bool {
        true
    }

    fn try_acquire(&self, req: Request<'_>) -> Result<Attempt, LockError> {
        for slot in (0..req.limit).filter(|s| !req.own_slots.contains(s)) {
            let file = slot_file(req.name, slot);
            let op = FlockOperation::NonBlockingLockExclusive;
            if let Some(file) = try_flock(&self.root, &self.fds, &file, op)? {
                return Ok(Attempt::Taken(Held::new(Some(slot), file)));
            }
        }
        Ok(Attempt::Busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use padlock_proto::Mode;

    #[test]
    fn slot_files_match_portalocker() {
        assert_eq!(slot_file("jobs/db", 0), "jobs/db.00.lock");
        assert_eq!(slot_file("x", 7), "x.07.lock");
        assert_eq!(slot_file("x", 123), "x.123.lock");
    }

    #[test]
    fn takes_lowest_free_slot_and_reports_busy() {
        let dir = tempfile::tempdir().unwrap();
        let root = Arc::new(Root::open(dir.path()).unwrap());
        let kind = SemaphoreKind::new(root, Descriptors::unlimited(), 1024);
        let take = |own: &[u32]| {
            let req = Request {
                name: "s",
                mode: Mode::Exclusive,
                limit: 2,
                own_slots: own,
                try_once: true,
                on_lost: Box::new(|_| {}),
            };
            match kind.try_acquire(req).unwrap() {
                Attempt::Taken(h) => Some(h),
                _ => None,
            }
        };
        let first = take(&[]).unwrap();
        assert_eq!(first.slot, Some(0));
        let second = take(&[]).unwrap();
        assert_eq!(second.slot, Some(1));
        assert!(take(&[]).is_none());
        drop(first);
        assert_eq!(take(&[1]).unwrap().slot, Some(0));
    }
}
