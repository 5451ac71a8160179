//! Fencing tokens that never go backwards.
//!
//! Each (kind, name) has a counter file under `<state-dir>/fences/<kind>/`
//! holding the last fence in decimal (see [`counter_path`] for its name). A grant takes an exclusive flock on
//! that file, reads it, writes the next value and unlocks, so two padlockd
//! processes sharing one lock directory draw from one sequence.
//!
//! Writing without `fsync` keeps a grant at a few microseconds; the page
//! cache survives a crash of padlockd, but not of the machine. For that,
//! every start bumps a **generation** in `<state-dir>/generation` and fsyncs
//! it before serving, and a fence is never below `generation << 40`. After
//! a power loss that rolled a counter file back, the new generation still
//! puts every new fence above every fence handed out before.

use crate::kinds::fs::Root;
use rustix::fs::{FlockOperation, Mode, OFlags, flock};
use std::io::{self, Read, Seek, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

/// Bits of a fence below the generation.
pub const GENERATION_SHIFT: u32 = 40;

/// The fence counters of one state directory.
pub struct Fences {
    root: Root,
    generation: u64,
}

impl Fences {
    /// Opens the state directory `dir` (creating it) and starts a new
    /// generation, durably, before any fence is handed out.
    pub fn open(dir: &Path) -> io::Result<Fences> {
        let state = Root::open(dir)?;
        let fd = state.open_file("generation", OFlags::RDWR, Mode::from_raw_mode(0o644))?;
        let generation = update_locked(fd, |g| g + 1, true)?;
        // Make the file's directory entry durable too.
        let dirfd = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        rustix::fs::fsync(&dirfd)?;
        Ok(Fences {
            root: state.subdir("fences")?,
            generation,
        })
    }

    /// This process's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The next fence for `kind`/`name`: strictly above every fence handed
    /// out for it before, by this or any other process on this state dir.
    pub fn next(&self, kind: &str, name: &str) -> io::Result<u64> {
        let fd = self.root.open_file(
            &format!("{kind}/{}", counter_path(name)),
            OFlags::RDWR,
            Mode::from_raw_mode(0o644),
        )?;
        let floor = self.generation << GENERATION_SHIFT;
        update_locked(fd, |last| last.saturating_add(1).max(floor), false)
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

/// Under an exclusive flock on `fd`, replaces the decimal number in the file
/// (0 when empty) with `f(number)` and returns the new number.
fn update_locked(fd: OwnedFd, f: impl FnOnce(u64) -> u64, sync: bool) -> io::Result<u64> {
    flock(&fd, FlockOperation::LockExclusive)?;
    let mut file = std::fs::File::from(fd);
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let last = match text.trim() {
        "" => 0,
        t => t.parse::<u64>().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("corrupt counter file ({t:?}): {e}"),
            )
        })?,
    };
    let next = f(last);
    let bytes = format!("{next}\n");
    file.rewind()?;
    file.write_all(bytes.as_bytes())?;
    file.set_len(bytes.len() as u64)?;
    if sync {
        file.sync_all()?;
    }
    // Closing the file releases the flock.
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictly_increasing_across_instances_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let a = Fences::open(dir.path()).unwrap();
        let b = Fences::open(dir.path()).unwrap();
        assert_eq!(b.generation(), a.generation() + 1);
        let mut last = 0;
        for fences in [&a, &b, &a, &a, &b] {
            let f = fences.next("file", "x/y").unwrap();
            assert!(f > last, "{f} after {last}");
            last = f;
        }
        drop((a, b));
        let c = Fences::open(dir.path()).unwrap();
        let f = c.next("file", "x/y").unwrap();
        assert!(f > last);
        // Counters are per kind and name.
        assert_eq!(
            c.next("semaphore", "x/y").unwrap(),
            c.generation() << GENERATION_SHIFT
        );
    }

    #[test]
    fn nested_names_do_not_collide() {
        assert_eq!(counter_path("a/b"), "a.d/b.fence");
        let dir = tempfile::tempdir().unwrap();
        let f = Fences::open(dir.path()).unwrap();
        for name in ["a", "a/b", "a.d", "a.fence/x", "a.fence"] {
            f.next("semaphore", name).unwrap();
        }
    }

    #[test]
    fn survives_a_rolled_back_counter() {
        let dir = tempfile::tempdir().unwrap();
        let a = Fences::open(dir.path()).unwrap();
        let before = a.next("file", "n").unwrap();
        std::fs::write(dir.path().join("fences/file/n.fence"), "0\n").unwrap();
        drop(a);
        let b = Fences::open(dir.path()).unwrap();
        assert!(b.next("file", "n").unwrap() > before);
    }
}
