//! The `file` kind: `flock(2)` on `<lock-dir>/<name>`.
//!
//! Compatible with portalocker's `Lock` and `flock(1)`: the file is opened
//! with `O_CREAT|O_WRONLY|O_APPEND|O_CLOEXEC`, mode 0666 minus umask (what
//! Python's `open(path, 'a')` does), and locked with `LOCK_EX` or `LOCK_SH`.
//! Each holder has its own open file description, so shared holders are
//! independent and closing one releases exactly that holder. Files are never
//! deleted: deleting a lock file that someone else has open breaks flock.

use super::fs::{Root, is_escape};
use super::{Attempt, Held, Kind, Request};
use crate::locks::{LockError, Mode};
use rustix::fs::{FlockOperation, OFlags, flock};
use rustix::io::Errno;
use std::io;
use std::os::fd::OwnedFd;

/// Flags portalocker (Python `open(path, 'a')`) uses for lock files.
pub const LOCK_FILE_FLAGS: OFlags = OFlags::WRONLY.union(OFlags::APPEND);
/// 0666, reduced by the process umask.
pub const LOCK_FILE_MODE: rustix::fs::Mode = rustix::fs::Mode::from_raw_mode(0o666);

pub struct FileKind {
    root: std::sync::Arc<Root>,
}

impl FileKind {
    pub fn new(root: std::sync::Arc<Root>) -> FileKind {
        FileKind { root }
    }
}

impl Kind for FileKind {
    fn try_acquire(&self, req: Request<'_>) -> Result<Attempt, LockError> {
        let op = match req.mode {
            Mode::Exclusive => FlockOperation::NonBlockingLockExclusive,
            Mode::Shared => FlockOperation::NonBlockingLockShared,
        };
        Ok(match try_flock(&self.root, req.name, op)? {
            Some(fd) => Attempt::Taken(Held::new(None, fd)),
            None => Attempt::Busy,
        })
    }
}

/// Opens `rel` beneath `root` as a lock file and tries `op` on it.
/// `Ok(None)` means another open file description holds a conflicting lock.
pub fn try_flock(root: &Root, rel: &str, op: FlockOperation) -> Result<Option<OwnedFd>, LockError> {
    let fd = root
        .open_file(rel, LOCK_FILE_FLAGS, LOCK_FILE_MODE)
        .map_err(|e| open_error(rel, e))?;
    match flock(&fd, op) {
        Ok(()) => Ok(Some(fd)),
        Err(Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(LockError::Backend(format!(
            "flock on '{}' failed: {e}",
            crate::locks::name::printable(rel)
        ))),
    }
}

/// Maps an error from opening a lock file to what the client is told.
fn open_error(rel: &str, err: io::Error) -> LockError {
    let name = crate::locks::name::printable(rel);
    if is_escape(&err) {
        return LockError::InvalidName {
            name,
            why: "it resolves outside the lock directory (through a symlink)".into(),
        };
    }
    match err.raw_os_error().map(Errno::from_raw_os_error) {
        Some(Errno::ISDIR) | Some(Errno::NOTDIR) => LockError::InvalidName {
            name,
            why: format!(
                "it clashes with an existing directory or file in the lock directory ({err})"
            ),
        },
        Some(Errno::NAMETOOLONG) => LockError::InvalidName {
            name,
            why: "a path component is too long for the file system".into(),
        },
        _ => LockError::Backend(format!("cannot open lock file '{name}': {err}")),
    }
}
