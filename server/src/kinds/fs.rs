//! Opening files beneath the lock directory, and never outside it.
//!
//! Every path a client can influence is resolved with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` relative to a directory
//! descriptor, so neither `..` nor a symlink can reach outside the lock
//! directory: the kernel refuses with `EXDEV`. Missing parent directories are
//! created one component at a time, each `mkdirat` relative to a parent that
//! was itself opened beneath the root.

use rustix::fs::{Mode, OFlags, ResolveFlags, mkdirat, openat2};
use rustix::io::Errno;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

/// A directory that files are opened beneath.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
}

const BENEATH: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

impl Root {
    /// Opens (creating it and its parents if needed) the directory `path`.
    pub fn open(path: &Path) -> io::Result<Root> {
        std::fs::create_dir_all(path)?;
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root { fd })
    }

    /// A directory beneath this root (created if missing), as a new root.
    pub fn subdir(&self, rel: &str) -> io::Result<Root> {
        self.mkdirs(rel)?;
        let fd = openat2(
            &self.fd,
            rel,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            BENEATH,
        )?;
        Ok(Root { fd })
    }

    /// Opens `rel` beneath the root with `flags | O_CREAT | O_CLOEXEC`,
    /// creating missing parent directories (mode 0777 minus umask).
    pub fn open_file(&self, rel: &str, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        let flags = flags | OFlags::CREATE | OFlags::CLOEXEC;
        match openat2(&self.fd, rel, flags, mode, BENEATH) {
            Err(Errno::NOENT) if rel.contains('/') => {
                let parent = &rel[..rel.rfind('/').unwrap_or(0)];
                self.mkdirs(parent)?;
                Ok(openat2(&self.fd, rel, flags, mode, BENEATH)?)
            }
            other => Ok(other?),
        }
    }

    /// Creates every directory on the relative path `rel`, walking one
    /// component at a time beneath the root.
    fn mkdirs(&self, rel: &str) -> io::Result<()> {
        let mut end = 0;
        while end < rel.len() {
            let next = rel[end..].find('/').map_or(rel.len(), |i| end + i);
            let parent = &rel[..end.saturating_sub(1)];
            let component = &rel[end..next];
            let made = if parent.is_empty() {
                mkdirat(&self.fd, component, Mode::from_raw_mode(0o777))
            } else {
                let dir = openat2(
                    &self.fd,
                    parent,
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                    BENEATH,
                )?;
                mkdirat(&dir, component, Mode::from_raw_mode(0o777))
            };
            match made {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            end = next + 1;
        }
        Ok(())
    }
}

/// Does this error say that a path tried to leave the root?
pub fn is_escape(err: &io::Error) -> bool {
    // EXDEV: resolution left the root; ELOOP: a magic link or symlink loop.
    matches!(err.raw_os_error(), Some(code) if code == Errno::XDEV.raw_os_error() || code == Errno::LOOP.raw_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_nested_files_beneath_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        root.open_file("a/b/c", OFlags::WRONLY, Mode::from_raw_mode(0o666))
            .unwrap();
        assert!(dir.path().join("a/b/c").is_file());
    }

    #[test]
    fn symlinks_cannot_escape() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("f"), dir.path().join("f")).unwrap();
        let root = Root::open(dir.path()).unwrap();
        for rel in ["out/x", "out/new/x", "f", "../x"] {
            let err = root
                .open_file(rel, OFlags::WRONLY, Mode::from_raw_mode(0o666))
                .unwrap_err();
            assert!(is_escape(&err), "{rel}: {err}");
        }
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }
}
