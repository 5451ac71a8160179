//! The `file` kind: `flock(2)` on `<lock-dir>/<name>`.
//!
//! Compatible with portalocker's `Lock` and `flock(1)`: the file is opened
//! with `O_CREAT|O_WRONLY|O_APPEND|O_CLOEXEC`, mode 0666 minus umask (what
//! Python's `open(path, 'a')` does), and locked with `LOCK_EX` or `LOCK_SH`.
//! Each holder has its own open file description, so shared holders are
//! independent and closing one releases exactly that holder. Files are never
//! deleted: deleting a lock file that someone else has open breaks flock.

use super::{Attempt, Backend, Held, Request};
use crate::error::LockError;
use crate::fds::{Descriptors, FdToken};
use crate::fs::{OpenError, Root};
use padlock_proto::Mode;
use rustix::fs::{FlockOperation, OFlags, flock};
use rustix::io::Errno;
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// Flags portalocker (Python `open(path, 'a')`) uses for lock files.
pub const LOCK_FILE_FLAGS: OFlags = OFlags::WRONLY.union(OFlags::APPEND);
/// 0666, reduced by the process umask.
pub const LOCK_FILE_MODE: rustix::fs::Mode = rustix::fs::Mode::from_raw_mode(0o666);

pub struct FileKind {
    root: Arc<Root>,
    fds: Arc<Descriptors>,
}

impl FileKind {
    pub fn new(root: Arc<Root>, fds: Arc<Descriptors>) -> FileKind {
        FileKind { root, fds }
    }
}

impl Backend for FileKind {
    fn in_lock_dir(&self) -> bool {
        true
    }

    fn try_acquire(&self, req: Request<'_>) -> Result<Attempt, LockError> {
        let op = match req.mode {
            Mode::Exclusive => FlockOperation::NonBlockingLockExclusive,
            Mode::Shared => FlockOperation::NonBlockingLockShared,
        };
        Ok(match try_flock(&self.root, &self.fds, req.name, op)? {
            Some(file) => Attempt::Taken(Held::new(None, file)),
            None => Attempt::Busy,
        })
    }
}

/// An open, flocked lock file, counted against the descriptor budget.
pub struct LockFile {
    _fd: OwnedFd,
    _counted: FdToken,
}

/// Opens `rel` beneath `root` as a lock file and tries `op` on it, without
/// blocking. `Ok(None)` means another open file description holds a
/// conflicting lock (or a lease on the file is being broken).
pub fn try_flock(
    root: &Root,
    fds: &Arc<Descriptors>,
    rel: &str,
    op: FlockOperation,
) -> Result<Option<LockFile>, LockError> {
    let counted = fds.take()?;
    let fd = match root.open_file(rel, LOCK_FILE_FLAGS, LOCK_FILE_MODE) {
        Ok(fd) => fd,
        Err(OpenError::Leased) => return Ok(None),
        Err(err) => return Err(open_error(rel, err, fds)),
    };
    match flock(&fd, op) {
        Ok(()) => Ok(Some(LockFile {
            _fd: fd,
            _counted: counted,
        })),
        Err(Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(LockError::Backend(format!(
            "flock on '{}' failed: {e}",
            crate::name::printable(rel)
        ))),
    }
}

/// Maps an error from opening a lock file to what the client is told.
fn open_error(rel: &str, err: OpenError, fds: &Descriptors) -> LockError {
    let name = crate::name::printable(rel);
    match err {
        OpenError::Symlink | OpenError::NotRegular(_) | OpenError::Clash(_) => {
            LockError::InvalidName {
                name,
                why: err.to_string(),
            }
        }
        OpenError::NoDescriptors(_) => LockError::NoDescriptors {
            budget: fds.budget,
            limit: fds.limit,
        },
        OpenError::Io(e) if e.raw_os_error() == Some(Errno::NAMETOOLONG.raw_os_error()) => {
            LockError::InvalidName {
                name,
                why: "a path component is too long for the file system".into(),
            }
        }
        other => LockError::Backend(format!("cannot open lock file '{name}': {other}")),
    }
}
