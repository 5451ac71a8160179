//! Fencing tokens that never go backwards.
//!
//! Each (kind, name) has a counter file under `<lock-dir>/.padlock/fences/<kind>/`
//! holding the last fence in decimal (see [`counter_path`] for its name). A
//! grant takes an exclusive flock on that file, reads it, writes the next
//! value and unlocks, so two padlockd processes sharing one lock directory
//! draw from one sequence.
//!
//! Drawing a fence never waits: the counter's flock is tried without
//! blocking, a few times (another padlockd holds it for microseconds), and
//! then the draw reports [`FenceError::Busy`] so the caller retries later.
//! A process that keeps a counter locked delays only that name. `.padlock/`
//! is 0700 and its files 0600, so only padlockd's own user can open them.
//!
//! The same directory carries the **announcements** that keep padlockd
//! processes sharing a lock directory fair to each other: a process whose
//! waiters are blocked by a holder outside it keeps a shared flock on
//! `.padlock/wanted/<kind>/<name>.want` (see [`Fences::announce`]); a
//! process about to hand a lock from one of its holders to the next of its
//! own waiters first looks for such an announcement
//! ([`Fences::is_wanted`]) and, if there is one, leaves the lock free for a
//! moment so the other process can take it. None of that happens unless
//! another padlockd shares the directory: each one keeps an exclusive
//! flock on its own file in `.padlock/instances/` for as long as it runs
//! ([`Fences::others_alive`]).
//!
//! **Fences are leased in blocks.** A counter file holds the highest fence
//! reserved for its name, not the last one handed out. A process that finds
//! the file still at the end of its own last reservation (no other process
//! has drawn since) hands out the next fence of that block from memory: a
//! grant then costs the counter's flock, read and unlock, and no write (the
//! counter's descriptor stays open between draws, as a spare of
//! [`Descriptors`]: closed when locks need the room). Otherwise it reserves
//! a new block (read, write the block's end) and starts handing out from
//! it. The checks run under the counter's exclusive flock, and every
//! process reserves above what the file says, so fences stay strictly
//! increasing across processes: a process that drew after another's
//! reservation drew above that block, and the first process, seeing the
//! file moved, reserves above it in turn. Blocks start at one fence after
//! another process has written (processes that take turns write once per
//! grant, as before) and double while this process stays the only one
//! drawing, up to [`LEASE_MAX`]. Fences left unused in a block are skipped,
//! never handed out later. The leases live in a fixed table of
//! [`LEASE_SLOTS`] slots by name, so their memory does not grow with the
//! names; a name whose slot was taken by another simply reserves again.
//!
//! Writing without `fsync` keeps a grant at a few microseconds; the page
//! cache survives a crash of padlockd, but not of the machine. For that,
//! every start bumps a **generation** in `.padlock/generation` and fsyncs
//! it before serving, and a fence is never below `generation << 40`. After
//! a power loss that rolled a counter file back, the new generation still
//! puts every new fence above every fence handed out before.

use crate::fds::{Descriptors, FdToken, Spare};
use crate::fs::{OpenError, Root};
use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags, flock};
use rustix::io::Errno;
use std::hash::BuildHasher;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Bits of a fence below the generation.
pub const GENERATION_SHIFT: u32 = 40;

/// Mode of the files in `.padlock/`.
const PRIVATE_FILE: Mode = Mode::from_raw_mode(0o600);

/// Non-blocking tries on a counter's flock before giving up for now.
const COUNTER_TRIES: u32 = 64;

/// How long startup waits for the generation file's flock.
const GENERATION_WAIT: Duration = Duration::from_secs(10);

/// Why no fence could be drawn.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// Another process keeps the counter locked: try again later.
    #[error("the fence counter is locked by another process")]
    Busy,
    #[error("{0}")]
    Open(#[from] OpenError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The largest block of fences one reservation takes: with one process on
/// a directory, one counter write per this many grants of a name.
pub const LEASE_MAX: u64 = 1024;

/// Slots of the lease table (a power of two).
pub const LEASE_SLOTS: usize = 1024;

/// A block of fences this process reserved for one name: the `left`
/// fences up to `end` are still to be handed out; `grow` is the size of
/// the block.
#[derive(Debug)]
struct Lease {
    kind: String,
    name: Box<str>,
    end: u64,
    left: u64,
    grow: u64,
}

/// The namespace of fence counters among the spare descriptors, kept as
/// their path beneath `.padlock/fences/`.
const SPARES: &str = "fences";

/// How long a look at the other instances is trusted.
const INSTANCES_FRESH: Duration = Duration::from_secs(1);

/// The fence counters of one lock directory.
pub struct Fences {
    root: Root,
    wanted: Root,
    generation: u64,
    /// `.padlock/instances/`, and this process's own flocked file in it.
    instances: Root,
    _instance: OwnedFd,
    /// Whether another padlockd was alive at the last look, and when that
    /// was (ms after `base`; 0: never).
    others: AtomicBool,
    looked: AtomicU64,
    base: Instant,
    /// Announcements are descriptors too.
    fds: Arc<Descriptors>,
    /// Blocks of fences reserved by this process, by a hash of the name;
    /// read and changed only under the name's counter flock.
    leases: Box<[std::sync::Mutex<Option<Lease>>]>,
    hasher: std::hash::RandomState,
}

/// This process's announcement of a blocked waiter; withdrawn on drop.
#[derive(Debug)]
pub struct Announcement {
    _fd: OwnedFd,
    _counted: FdToken,
}

impl Fences {
    /// Opens the state directory (`state`, padlockd's `.padlock/`) and
    /// starts a new generation, durably, before any fence is handed out.
    /// `fds` counts the announcements' descriptors.
    pub fn open(state: &Root, fds: Arc<Descriptors>) -> io::Result<Fences> {
        let fd = state.open_file("generation", OFlags::RDWR, PRIVATE_FILE)?;
        let started = Instant::now();
        let generation = loop {
            match update_locked(&fd, |g| g + 1, true) {
                Err(FenceError::Busy) if started.elapsed() < GENERATION_WAIT => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(FenceError::Busy) => {
                    return Err(io::Error::other(
                        "the generation file stays locked by another process",
                    ));
                }
                Err(FenceError::Io(err)) => return Err(err),
                Err(FenceError::Open(err)) => return Err(err.into()),
                Ok(generation) => break generation,
            }
        };
        // Make the file's directory entry durable too.
        rustix::fs::fsync(state.fd())?;
        let instances = state.private_subdir("instances")?;
        let instance =
            instances.open_file(&generation.to_string(), OFlags::RDONLY, PRIVATE_FILE)?;
        flock(&instance, FlockOperation::NonBlockingLockExclusive)?;
        Ok(Fences {
            root: state.private_subdir("fences")?,
            wanted: state.private_subdir("wanted")?,
            generation,
            instances,
            _instance: instance,
            others: AtomicBool::new(false),
            looked: AtomicU64::new(0),
            base: Instant::now(),
            fds,
            leases: (0..LEASE_SLOTS).map(|_| Default::default()).collect(),
            hasher: std::hash::RandomState::new(),
        })
    }

    /// Does another padlockd share this lock directory? Looked up at most
    /// once a second (a directory read and a flock try per instance);
    /// the files of instances that are gone are removed on the way.
    pub fn others_alive(&self) -> bool {
        let now = self.base.elapsed().as_millis() as u64 + 1;
        let last = self.looked.load(Ordering::Acquire);
        if last != 0 && now - last < INSTANCES_FRESH.as_millis() as u64 {
            return self.others.load(Ordering::Acquire);
        }
        self.looked.store(now, Ordering::Release);
        let alive = self.look_for_others().unwrap_or(false);
        self.others.store(alive, Ordering::Release);
        alive
    }

    fn look_for_others(&self) -> io::Result<bool> {
        let mine = self.generation.to_string();
        let mut alive = false;
        for entry in rustix::fs::Dir::read_from(self.instances.fd())? {
            let entry = entry?;
            let Ok(name) = entry.file_name().to_str() else {
                continue;
            };
            if name.starts_with('.') || name == mine {
                continue;
            }
            let Ok(fd) = self.instances.open_file(name, OFlags::RDONLY, PRIVATE_FILE) else {
                continue;
            };
            match flock(&fd, FlockOperation::NonBlockingLockShared) {
                Err(Errno::WOULDBLOCK) => alive = true,
                // Nobody holds it: that padlockd is gone.
                _ => {
                    let _ = rustix::fs::unlinkat(self.instances.fd(), name, AtFlags::empty());
                }
            }
        }
        Ok(alive)
    }

    /// Says to other padlockd processes on this directory that this one
    /// has waiters for `kind`/`name` blocked by a holder outside it: a
    /// shared flock on the name's `.want` file, held until the returned
    /// descriptor is closed. `None` when it cannot be taken (the note is a
    /// courtesy; nothing depends on it).
    pub fn announce(&self, kind: &str, name: &str) -> Option<Announcement> {
        let counted = self.fds.take().ok()?;
        let fd = self.want_file(kind, name)?;
        flock(&fd, FlockOperation::NonBlockingLockShared).ok()?;
        Some(Announcement {
            _fd: fd,
            _counted: counted,
        })
    }

    /// Does another process announce waiters for `kind`/`name`? (An
    /// exclusive flock on the `.want` file cannot be had while any holds
    /// it shared.) Never blocks.
    pub fn is_wanted(&self, kind: &str, name: &str) -> bool {
        let Some(fd) = self.want_file(kind, name) else {
            return false;
        };
        matches!(
            flock(&fd, FlockOperation::NonBlockingLockExclusive),
            Err(Errno::WOULDBLOCK)
        )
    }

    fn want_file(&self, kind: &str, name: &str) -> Option<OwnedFd> {
        let mut path = format!("{kind}/{}", counter_path(name));
        path.truncate(path.len() - ".fence".len());
        path.push_str(".want");
        self.wanted
            .open_file(&path, OFlags::RDONLY, PRIVATE_FILE)
            .ok()
    }

    /// This process's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The next fence for `kind`/`name`: strictly above every fence handed
    /// out for it before, by this or any other process on this directory.
    /// Never blocks.
    ///
    /// From this process's block when the counter file still ends it (see
    /// the module's docs), otherwise from a new block reserved above the
    /// file's number.
    pub fn next(&self, kind: &str, name: &str) -> Result<u64, FenceError> {
        // The counter's descriptor is kept open between draws as a spare
        // (see `crate::fds`): a draw from the block then costs a flock, a
        // read and an unlock. Counters are never renamed or removed, and
        // `.padlock/` is padlockd's own, so the path keeps its file.
        let path = format!("{kind}/{}", counter_path(name));
        let spare = match self.fds.reuse(SPARES, &path) {
            Some(spare) => spare,
            None => {
                let fd = self.root.open_file(&path, OFlags::RDWR, PRIVATE_FILE)?;
                Spare::new(SPARES, path, fd)
            }
        };
        let fence = self.draw(spare.fd(), kind, name)?;
        // Unlocked, it is kept for the next draw (closed on any error).
        if flock(spare.fd(), FlockOperation::Unlock).is_ok() {
            self.fds.keep(spare);
        }
        Ok(fence)
    }

    /// Draws the next fence of `kind`/`name` from its counter `fd`, under
    /// the counter's exclusive flock, which stays taken.
    fn draw(&self, fd: &OwnedFd, kind: &str, name: &str) -> Result<u64, FenceError> {
        lock_counter(fd)?;
        // Under the counter's flock: no other draw of this name, in this
        // process or another, runs until it is unlocked.
        let (last, len) = read_counter(fd)?;
        let slot = &self.leases[self.hasher.hash_one((kind, name)) as usize % LEASE_SLOTS];
        let mut lease = slot.lock().unwrap_or_else(|e| e.into_inner());
        let mine = lease
            .as_mut()
            .filter(|l| l.kind == kind && *l.name == *name && l.end == last);
        if let Some(l) = mine
            && l.left > 0
        {
            l.left -= 1;
            return Ok(l.end - l.left);
        }
        // A new block: one fence when another process drew last (or the
        // name is new here), twice the last block while this one draws
        // alone.
        let grow = match &*lease {
            Some(l) if l.kind == kind && *l.name == *name && l.end == last => {
                (l.grow * 2).min(LEASE_MAX)
            }
            _ => 1,
        };
        let floor = self.generation << GENERATION_SHIFT;
        let start = last.saturating_add(1).max(floor);
        let end = start.saturating_add(grow - 1);
        // Forget the old block before writing: if the write fails, the next
        // draw finds the file unchanged and no block to hand out from.
        *lease = None;
        write_counter(fd, end, len, false)?;
        *lease = Some(Lease {
            kind: kind.to_string(),
            name: name.into(),
            end,
            left: end - start,
            grow,
        });
        Ok(start)
    }
}

/// Where the counter of lock `name` lives: directories end in `.d`, the
/// file in `.fence`, so the counters of `a` (`a.fence`) and `a/b`
/// (`a.d/b.fence`) never collide, whatever the names.
pub fn counter_path(name: &str) -> String {
    let mut path = name.replace('/', ".d/");
    path.push_str(".fence");
    path
}

/// Under an exclusive flock on `fd` (tried without blocking), replaces the
/// decimal number in the file (0 when empty) with `f(number)` and returns
/// the new number. The flock ends when `fd` is closed.
fn update_locked(fd: &OwnedFd, f: impl FnOnce(u64) -> u64, sync: bool) -> Result<u64, FenceError> {
    lock_counter(fd)?;
    let (last, len) = read_counter(fd)?;
    let next = f(last);
    write_counter(fd, next, len, sync)?;
    Ok(next)
}

/// Takes the exclusive flock on a counter, tried without blocking (another
/// padlockd holds it for microseconds); `Busy` when it stays taken.
fn lock_counter(fd: &OwnedFd) -> Result<(), FenceError> {
    let mut tries = 0;
    loop {
        match flock(fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(Errno::WOULDBLOCK) if tries < COUNTER_TRIES => {
                tries += 1;
                std::thread::yield_now();
            }
            Err(Errno::WOULDBLOCK) => return Err(FenceError::Busy),
            Err(e) => return Err(FenceError::Io(e.into())),
        }
    }
}

/// The number in a counter file (0 when empty) and the file's length.
fn read_counter(fd: &OwnedFd) -> Result<(u64, usize), FenceError> {
    // A counter is at most 20 digits and a newline.
    let mut buf = [0u8; 32];
    let read = rustix::io::pread(fd, &mut buf, 0).map_err(io::Error::from)?;
    let text = std::str::from_utf8(&buf[..read]).unwrap_or("?");
    let last = match text.trim() {
        "" => 0,
        t => t.parse::<u64>().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("corrupt counter file ({t:?}): {e}"),
            )
        })?,
    };
    Ok((last, read))
}

/// Writes `value` as the counter's number, over `old_len` bytes of what
/// was there. Numbers only grow, so the file is cut only when it held more
/// than a number (an older format, or a hand edit).
fn write_counter(fd: &OwnedFd, value: u64, old_len: usize, sync: bool) -> Result<(), FenceError> {
    // Owned counters are 0600; older versions made them 0644.
    let stat = rustix::fs::fstat(fd).map_err(io::Error::from)?;
    if stat.st_mode & 0o077 != 0 {
        rustix::fs::fchmod(fd, PRIVATE_FILE).map_err(io::Error::from)?;
    }
    let bytes = format!("{value}\n");
    let written = rustix::io::pwrite(fd, bytes.as_bytes(), 0).map_err(io::Error::from)?;
    if written != bytes.len() {
        return Err(
            io::Error::new(io::ErrorKind::WriteZero, "short write to a counter file").into(),
        );
    }
    if old_len > bytes.len() || stat.st_size as u64 > bytes.len() as u64 {
        rustix::fs::ftruncate(fd, bytes.len() as u64).map_err(io::Error::from)?;
    }
    if sync {
        rustix::fs::fsync(fd).map_err(io::Error::from)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
