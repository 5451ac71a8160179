//! Opening files beneath the lock directory, and never outside it, without
//! ever blocking.
//!
//! Every path a client can influence is resolved with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`
//! relative to a directory descriptor: neither `..` nor a symlink is ever
//! followed, so no name reaches outside the lock directory, nor into
//! padlockd's own state (`.padlock/`) through a link, nor names one file
//! twice (two names for one file would have two fence sequences). The
//! kernel refuses such paths with `EXDEV` or `ELOOP`.
//!
//! Opening never waits: files are opened with `O_NONBLOCK`, so a FIFO
//! without a reader fails at once (`ENXIO`) instead of blocking until
//! someone opens its other end, and a file with a lease fails with
//! `EWOULDBLOCK` instead of waiting for the lease to be broken. Whatever
//! was opened must then be a regular file: a FIFO, socket or device in the
//! lock directory is refused for that name.
//!
//! Missing parent directories are created one component at a time, each
//! `mkdirat` relative to a parent that was itself opened beneath the root.

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, fstat, mkdirat, openat2};
use rustix::io::Errno;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

/// A directory that files are opened beneath.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    /// Mode of the directories created beneath it (before the umask).
    dir_mode: Mode,
}

const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Why a file beneath a root could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The path leads through a symlink (or outside the root).
    #[error(
        "its path goes through a symlink; padlockd does not follow symlinks in the lock directory"
    )]
    Symlink,
    /// The path exists but is not a regular file.
    #[error("it is {0} in the lock directory, not a regular file")]
    NotRegular(&'static str),
    /// A part of the path is a file where a directory is needed, or the
    /// other way round.
    #[error("it clashes with an existing directory or file in the lock directory ({0})")]
    Clash(io::Error),
    /// Someone holds a lease on the file: it can be opened once the lease
    /// is broken (the kernel has asked its holder to let go).
    #[error("another process holds a lease on it")]
    Leased,
    /// The process has no descriptor left.
    #[error("padlockd has no file descriptor left ({0})")]
    NoDescriptors(io::Error),
    #[error("{0}")]
    Io(io::Error),
}

impl From<Errno> for OpenError {
    fn from(errno: Errno) -> OpenError {
        match errno {
            // EXDEV: resolution left the root; ELOOP: a symlink (or a loop).
            Errno::XDEV | Errno::LOOP => OpenError::Symlink,
            Errno::ISDIR | Errno::NOTDIR => OpenError::Clash(errno.into()),
            // O_WRONLY|O_NONBLOCK on a FIFO without a reader, or a socket.
            Errno::NXIO => OpenError::NotRegular("a FIFO or a socket"),
            Errno::WOULDBLOCK => OpenError::Leased,
            Errno::MFILE | Errno::NFILE => OpenError::NoDescriptors(errno.into()),
            other => OpenError::Io(other.into()),
        }
    }
}

impl From<OpenError> for io::Error {
    fn from(err: OpenError) -> io::Error {
        match err {
            OpenError::Io(err) => err,
            other => io::Error::other(other.to_string()),
        }
    }
}

impl Root {
    /// Opens (creating it and its parents if needed) the directory `path`;
    /// directories made beneath it get mode 0777 minus the umask.
    pub fn open(path: &Path) -> io::Result<Root> {
        std::fs::create_dir_all(path)?;
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root {
            fd,
            dir_mode: Mode::from_raw_mode(0o777),
        })
    }

    /// The directory `name` right beneath this root, for this process only:
    /// created with mode 0700 (an existing one is set to 0700), and refused
    /// when it is a symlink or not a directory. Directories made beneath it
    /// are 0700 too.
    pub fn private_subdir(&self, name: &str) -> io::Result<Root> {
        match mkdirat(&self.fd, name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match openat2(&self.fd, name, flags, Mode::empty(), BENEATH) {
            Ok(fd) => fd,
            Err(Errno::LOOP | Errno::XDEV | Errno::NOTDIR) => {
                let what =
                    match rustix::fs::statat(&self.fd, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                    {
                        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                            "a symlink"
                        }
                        _ => "not a directory",
                    };
                return Err(io::Error::other(format!(
                    "'{name}' is {what}; it must be a directory of padlockd's own (remove it)"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        // Someone else's directory (made while padlockd was stopped, in a
        // lock directory others may write) would be theirs to rewrite.
        let owner = fstat(&fd)?.st_uid;
        let me = rustix::process::geteuid().as_raw();
        if owner != me {
            return Err(io::Error::other(format!(
                "'{name}' belongs to user {owner}, not to padlockd's user {me}: remove it (or \
                 chown it) so that padlockd can keep its state there"
            )));
        }
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700))?;
        Ok(Root {
            fd,
            dir_mode: Mode::from_raw_mode(0o700),
        })
    }

    /// The descriptor of the directory (for fsync).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Opens the regular file `rel` beneath the root with
    /// `flags | O_CREAT | O_NONBLOCK | O_NOCTTY | O_CLOEXEC`, creating
    /// missing parent directories. Never blocks; never follows a symlink;
    /// refuses anything but a regular file.
    pub fn open_file(&self, rel: &str, flags: OFlags, mode: Mode) -> Result<OwnedFd, OpenError> {
        let flags = flags | OFlags::CREATE | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        let fd = match openat2(&self.fd, rel, flags, mode, BENEATH) {
            Err(Errno::NOENT) if rel.contains('/') => {
                let parent = &rel[..rel.rfind('/').unwrap_or(0)];
                self.mkdirs(parent)?;
                openat2(&self.fd, rel, flags, mode, BENEATH)?
            }
            other => other?,
        };
        let stat = fstat(&fd).map_err(OpenError::from)?;
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile => Ok(fd),
            FileType::Fifo => Err(OpenError::NotRegular("a FIFO")),
            FileType::Socket => Err(OpenError::NotRegular("a socket")),
            FileType::CharacterDevice | FileType::BlockDevice => {
                Err(OpenError::NotRegular("a device"))
            }
            FileType::Directory => Err(OpenError::Clash(Errno::ISDIR.into())),
            _ => Err(OpenError::NotRegular("not a regular file")),
        }
    }

    /// Creates every directory on the relative path `rel`, walking one
    /// component at a time beneath the root.
    fn mkdirs(&self, rel: &str) -> Result<(), OpenError> {
        let mut end = 0;
        while end < rel.len() {
            let next = rel[end..].find('/').map_or(rel.len(), |i| end + i);
            let parent = &rel[..end.saturating_sub(1)];
            let component = &rel[end..next];
            let made = if parent.is_empty() {
                mkdirat(&self.fd, component, self.dir_mode)
            } else {
                let dir = openat2(
                    &self.fd,
                    parent,
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                    BENEATH,
                )?;
                mkdirat(&dir, component, self.dir_mode)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    fn open(root: &Root, rel: &str) -> Result<OwnedFd, OpenError> {
        root.open_file(rel, OFlags::WRONLY, Mode::from_raw_mode(0o666))
    }

    #[test]
    fn creates_nested_files_beneath_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        open(&root, "a/b/c").unwrap();
        assert!(dir.path().join("a/b/c").is_file());
    }

    #[test]
    fn symlinks_are_never_followed() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("f"), dir.path().join("f")).unwrap();
        // Links that stay inside are not followed either.
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink("real", dir.path().join("inside")).unwrap();
        std::os::unix::fs::symlink("real/x", dir.path().join("x")).unwrap();
        let root = Root::open(dir.path()).unwrap();
        for rel in [
            "out/x",
            "out/new/x",
            "f",
            "../x",
            "inside/y",
            "inside/new/y",
            "x",
        ] {
            let err = open(&root, rel).unwrap_err();
            assert!(matches!(err, OpenError::Symlink), "{rel}: {err}");
        }
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        assert_eq!(
            std::fs::read_dir(dir.path().join("real")).unwrap().count(),
            0
        );
    }

    #[test]
    fn fifos_and_sockets_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o666),
            0,
        )
        .unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).unwrap();
        let root = Root::open(dir.path()).unwrap();
        assert!(matches!(
            open(&root, "fifo").unwrap_err(),
            OpenError::NotRegular(_)
        ));
        // With a reader at the other end, the open succeeds: still refused.
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(dir.path().join("fifo"))
            .unwrap();
        assert!(matches!(
            open(&root, "fifo").unwrap_err(),
            OpenError::NotRegular("a FIFO")
        ));
        assert!(matches!(
            open(&root, "sock").unwrap_err(),
            OpenError::NotRegular(_)
        ));
        assert!(matches!(
            open(&root, "fifo/x").unwrap_err(),
            OpenError::Clash(_)
        ));
    }

    #[test]
    fn private_subdirs_are_0700_and_never_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        std::fs::create_dir(dir.path().join("open")).unwrap();
        std::fs::set_permissions(
            dir.path().join("open"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        for name in ["state", "open"] {
            let sub = root.private_subdir(name).unwrap();
            let mode = std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700, "{name}");
            sub.open_file("a/b", OFlags::RDWR, Mode::from_raw_mode(0o600))
                .unwrap();
            let inner = std::fs::metadata(dir.path().join(name).join("a"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(inner & 0o077, 0, "{name}/a is {inner:o}");
        }
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("link")).unwrap();
        let err = root.private_subdir("link").unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        std::fs::write(dir.path().join("file"), "").unwrap();
        assert!(root.private_subdir("file").is_err());
    }
}
