//! Fences: strict increase across processes, restarts and leases.

use super::*;
use std::os::unix::fs::PermissionsExt;

fn state(dir: &std::path::Path) -> Root {
    Root::open(dir).unwrap().private_subdir(".padlock").unwrap()
}

fn open(dir: &std::path::Path) -> Fences {
    Fences::open(&state(dir), Descriptors::unlimited()).unwrap()
}

#[test]
fn strictly_increasing_across_instances_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let b = open(dir.path());
    assert_eq!(b.generation(), a.generation() + 1);
    let mut last = 0;
    for fences in [&a, &b, &a, &a, &b] {
        let f = fences.next("file", "x/y").unwrap();
        assert!(f > last, "{f} after {last}");
        last = f;
    }
    drop((a, b));
    let c = open(dir.path());
    let f = c.next("file", "x/y").unwrap();
    assert!(f > last);
    // Counters are per kind and name.
    assert_eq!(
        c.next("semaphore", "x/y").unwrap(),
        c.generation() << GENERATION_SHIFT
    );
}

fn counter(dir: &std::path::Path, name: &str) -> u64 {
    let path = dir.join(".padlock/fences/file").join(counter_path(name));
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn one_process_draws_from_growing_blocks_without_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let first = a.next("file", "n").unwrap();
    assert_eq!(first, a.generation() << GENERATION_SHIFT);
    let mut last = first;
    let mut writes = 0;
    let mut file = counter(dir.path(), "n");
    for _ in 0..5000 {
        let f = a.next("file", "n").unwrap();
        assert_eq!(f, last + 1, "consecutive while alone");
        last = f;
        let now = counter(dir.path(), "n");
        assert!(
            now >= f,
            "the file ({now}) is at or above every fence handed out ({f})"
        );
        if now != file {
            writes += 1;
            file = now;
        }
    }
    // Blocks of 1, 2, 4 ... 1024: a handful of writes, not 5000.
    assert!(writes <= 16, "{writes} counter writes for 5000 fences");
}

#[test]
fn processes_taking_turns_stay_strictly_increasing() {
    let dir = tempfile::tempdir().unwrap();
    let ps = [open(dir.path()), open(dir.path()), open(dir.path())];
    let mut last = std::collections::HashMap::new();
    // A fixed pseudo-random order of draws: runs of one process, turns,
    // and several names, so blocks are reserved, grown and abandoned.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for _ in 0..6000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = &ps[(x % 3) as usize];
        let name = ["a", "b", "c/d"][(x >> 8) as usize % 3];
        let runs = 1 + (x >> 16) % 40;
        for _ in 0..runs {
            let f = p.next("file", name).unwrap();
            let before = last.insert(name, f).unwrap_or(0);
            assert!(f > before, "{name}: {f} after {before}");
        }
    }
}

#[test]
fn a_process_that_writes_each_grant_is_not_overtaken() {
    // An older padlockd on the same directory adds one per grant.
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let mut last = 0;
    for _ in 0..100 {
        last = a.next("file", "n").unwrap();
    }
    let path = dir.path().join(".padlock/fences/file/n.fence");
    let other = counter(dir.path(), "n") + 1;
    std::fs::write(&path, format!("{other}\n")).unwrap();
    let f = a.next("file", "n").unwrap();
    assert!(f > other && f > last, "{f} after {other} and {last}");
}

#[test]
fn more_names_than_lease_slots_stay_strictly_increasing() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let names: Vec<String> = (0..LEASE_SLOTS * 2 + 7).map(|i| format!("n{i}")).collect();
    let mut last = vec![0u64; names.len()];
    for round in 0..3 {
        for (i, name) in names.iter().enumerate() {
            let f = a.next("file", name).unwrap();
            assert!(f > last[i], "{name} round {round}: {f} after {}", last[i]);
            last[i] = f;
        }
    }
}

#[test]
fn nested_names_do_not_collide() {
    assert_eq!(counter_path("a/b"), "a.d/b.fence");
    let dir = tempfile::tempdir().unwrap();
    let f = open(dir.path());
    for name in ["a", "a/b", "a.d", "a.fence/x", "a.fence"] {
        f.next("semaphore", name).unwrap();
    }
}

#[test]
fn survives_a_rolled_back_counter() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let before = a.next("file", "n").unwrap();
    std::fs::write(dir.path().join(".padlock/fences/file/n.fence"), "0\n").unwrap();
    drop(a);
    let b = open(dir.path());
    assert!(b.next("file", "n").unwrap() > before);
}

#[test]
fn instances_see_each_other_while_they_run() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    assert!(!a.others_alive());
    let b = open(dir.path());
    assert!(b.others_alive());
    // a's last look is fresh for a second; a new table looks again.
    let c = open(dir.path());
    assert!(c.others_alive());
    drop((b, c));
    let d = open(dir.path());
    drop(a);
    assert!(!d.others_alive(), "gone instances do not count");
    let files = std::fs::read_dir(dir.path().join(".padlock/instances"))
        .unwrap()
        .count();
    assert_eq!(files, 1, "the files of gone instances are removed");
}

#[test]
fn announcements_are_seen_by_others_only_while_held() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let b = open(dir.path());
    assert!(!b.is_wanted("file", "x/y"));
    let note = a.announce("file", "x/y").unwrap();
    let again = a.announce("file", "x/y").unwrap();
    assert!(b.is_wanted("file", "x/y"));
    assert!(!b.is_wanted("file", "x/z"));
    assert!(!b.is_wanted("semaphore", "x/y"));
    drop(note);
    assert!(b.is_wanted("file", "x/y"), "one announcement is left");
    drop(again);
    assert!(!b.is_wanted("file", "x/y"));
}

#[test]
fn a_locked_counter_is_busy_not_a_wait_and_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let f = open(dir.path());
    let first = f.next("file", "n").unwrap();
    let path = dir.path().join(".padlock/fences/file/n.fence");
    let held = std::fs::File::open(&path).unwrap();
    flock(&held, FlockOperation::LockExclusive).unwrap();
    assert!(matches!(f.next("file", "n"), Err(FenceError::Busy)));
    // Other names are not affected.
    f.next("file", "other").unwrap();
    drop(held);
    assert!(f.next("file", "n").unwrap() > first);
    for p in [path.clone(), dir.path().join(".padlock/generation")] {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", p.display());
    }
    for d in [".padlock", ".padlock/fences", ".padlock/fences/file"] {
        let mode = std::fs::metadata(dir.path().join(d))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{d}");
    }
}

#[test]
fn counters_stay_open_as_spares_that_give_way_to_locks() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    // A budget of two descriptors.
    let fds = Arc::new(Descriptors::plan(258, 0));
    let a = Fences::open(&state(dir.path()), fds.clone()).unwrap();
    let mut last = a.next("file", "n").unwrap();
    assert_eq!(fds.used(), 1, "the counter is kept open");
    let path = format!("file/{}", counter_path("n"));
    let kept = || {
        let spare = fds.reuse(SPARES, &path).expect("the counter's spare");
        let raw = spare.fd().as_raw_fd();
        fds.keep(spare);
        raw
    };
    let before = kept();
    let f = a.next("file", "n").unwrap();
    assert!(f > last);
    last = f;
    assert_eq!(kept(), before, "the same descriptor, used again");
    assert_eq!(fds.used(), 1);
    // Locks get the room; draws go on with a counter opened for each.
    let held = (fds.take().unwrap(), fds.take().unwrap());
    assert_eq!(fds.used(), 2);
    let f = a.next("file", "n").unwrap();
    assert!(f > last, "{f} after {last}");
    assert_eq!(fds.used(), 2, "no spare without room");
    drop(held);
    // Another process drawing in between is seen through a kept counter.
    a.next("file", "n").unwrap();
    let b = open(dir.path());
    let theirs = b.next("file", "n").unwrap();
    let ours = a.next("file", "n").unwrap();
    assert!(ours > theirs, "{ours} after {theirs}");
}
