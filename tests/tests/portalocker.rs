//! Interop with the real Python portalocker 4.4.2 and with flock(1), in both
//! directions: padlockd's `file` locks are flock(2) on `<lock-dir>/<name>`
//! and its `semaphore` slots are portalocker's `BoundedSemaphore` files
//! `<lock-dir>/<name>.<NN>.lock`, so a padlock client and a local process
//! exclude each other.
//!
//! Every step synchronizes on an event: a line the Python process prints
//! after it took or released a lock, a process exiting, the server
//! reporting a queued waiter, or the kernel listing a blocked flock in
//! `/proc/locks`. Timeouts only turn a hang into a failure.

use padlock::{Client, Kind, LockGuard};
use padlock_e2e::{Server, eventually_ok, portalocker_python, read_line_starting, wait_child};
use std::io::BufReader;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// How long any single step may take before the test fails. Only a guard
/// against hangs, never a way to synchronize.
const GUARD: Duration = Duration::from_secs(10);

/// The exit code flock(1) is told to use when `-n` finds the lock taken,
/// so a conflict cannot be confused with any other failure.
const FLOCK_CONFLICT: i32 = 75;

/// A long-lived Python process that takes and releases portalocker locks
/// on command, one tab-separated command per line on stdin, answering each
/// with one line `<status> <key> [detail]` once the lock call has returned:
///
/// - `lock KEY PATH ex|sh`: one non-blocking `portalocker.Lock` attempt
///   (`fail_when_locked=True`); answers `locked` or `busy`.
/// - `block KEY PATH`: a blocking `LOCK_EX` `portalocker.Lock` (waits in
///   the kernel); answers `locked` once it has the lock.
/// - `sem KEY DIR NAME MAX`: one sweep of `BoundedSemaphore(MAX, NAME,
///   directory=DIR, timeout=0)`; answers `slot <slot file name>` or `busy`.
/// - `release KEY`: releases what KEY holds; answers `released`.
const AGENT: &str = r#"
import os, sys
import portalocker
from portalocker import LockFlags

held = {}

def out(*words):
    print(*words, flush=True)

out('ready', portalocker.__version__)
for line in sys.stdin:
    cmd, key, *args = line.rstrip('\n').split('\t')
    try:
        if cmd == 'lock':
            path, mode = args
            flags = LockFlags.EXCLUSIVE if mode == 'ex' else LockFlags.SHARED
            lock = portalocker.Lock(
                path, mode='a', timeout=0, fail_when_locked=True,
                flags=flags | LockFlags.NON_BLOCKING,
            )
            try:
                lock.acquire()
            except portalocker.AlreadyLocked:
                out('busy', key)
                continue
            held[key] = lock
            out('locked', key)
        elif cmd == 'block':
            (path,) = args
            lock = portalocker.Lock(path, mode='a', flags=LockFlags.EXCLUSIVE)
            lock.acquire()
            held[key] = lock
            out('locked', key)
        elif cmd == 'sem':
            directory, name, maximum = args
            sem = portalocker.BoundedSemaphore(
                int(maximum), name=name, directory=directory, timeout=0,
            )
            try:
                sem.acquire()
            except portalocker.AlreadyLocked:
                out('busy', key)
                continue
            held[key] = sem
            out('slot', key, os.path.basename(sem.lock.filename))
        elif cmd == 'release':
            held.pop(key).release()
            out('released', key)
        else:
            out('error', key, 'unknown command', repr(cmd))
    except Exception as exc:
        out('error', key, repr(exc))
"#;

struct Py {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Py {
    async fn spawn(python: &Path) -> Py {
        let mut child = tokio::process::Command::new(python)
            .args(["-c", AGENT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn python");
        let stdin = child.stdin.take();
        let stdout = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut py = Py {
            child,
            stdin,
            stdout,
        };
        let ready = py.line().await;
        assert_eq!(ready, "ready 4.4.2", "the Python agent did not start");
        py
    }

    fn pid(&self) -> i32 {
        self.child.id().expect("python is running") as i32
    }

    async fn line(&mut self) -> String {
        match tokio::time::timeout(GUARD, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(other) => panic!("the Python agent ended its output: {other:?}"),
            Err(_) => panic!("the Python agent did not answer within {GUARD:?}"),
        }
    }

    /// Sends a command without waiting for its answer.
    async fn send(&mut self, args: &[&str]) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin
            .write_all(format!("{}\n", args.join("\t")).as_bytes())
            .await
            .expect("write to python");
        stdin.flush().await.expect("flush to python");
    }

    /// Waits for the answer about `key`; returns it without the key
    /// (`locked`, `busy`, `slot x.00.lock`, ...).
    async fn reply(&mut self, key: &str) -> String {
        let line = self.line().await;
        let mut words = line.splitn(3, ' ');
        let status = words.next().unwrap_or_default();
        let got_key = words.next().unwrap_or_default();
        let detail = words.next();
        assert!(status != "error", "the Python agent failed: {line}");
        assert_eq!(got_key, key, "answer for another key: {line}");
        match detail {
            Some(detail) => format!("{status} {detail}"),
            None => status.to_string(),
        }
    }

    async fn ask(&mut self, args: &[&str]) -> String {
        self.send(args).await;
        self.reply(args[1]).await
    }

    /// One non-blocking attempt at `portalocker.Lock(path)`, exclusive
    /// (`"ex"`) or shared (`"sh"`): `"locked"` or `"busy"`.
    async fn lock(&mut self, key: &str, path: &Path, mode: &str) -> String {
        self.ask(&["lock", key, path_str(path), mode]).await
    }

    /// One sweep of `BoundedSemaphore(max, name, directory=dir)`:
    /// `"slot <file>"` or `"busy"`.
    async fn sem(&mut self, key: &str, dir: &Path, name: &str, max: u32) -> String {
        self.ask(&["sem", key, path_str(dir), name, &max.to_string()])
            .await
    }

    async fn release(&mut self, key: &str) {
        assert_eq!(self.ask(&["release", key]).await, "released");
    }

    /// Closes stdin and checks that the agent exits cleanly.
    async fn finish(mut self) {
        self.stdin.take();
        let status = tokio::time::timeout(GUARD, self.child.wait())
            .await
            .expect("python did not exit")
            .expect("wait for python");
        assert!(status.success(), "python exited with {status}");
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// One flock(2) entry of `/proc/locks`.
#[derive(Debug, PartialEq, Eq)]
struct Flock {
    /// A request waiting for the lock (`->` in /proc/locks).
    blocked: bool,
    /// `WRITE` (exclusive) or `READ` (shared).
    access: String,
    pid: i32,
}

/// The flock(2) locks and blocked flock requests the kernel lists for the
/// file at `path`.
fn flocks_on(path: &Path) -> Vec<Flock> {
    let meta = std::fs::metadata(path).expect("lock file exists");
    let file_id = format!(
        "{:02x}:{:02x}:{}",
        rustix::fs::major(meta.dev()),
        rustix::fs::minor(meta.dev()),
        meta.ino()
    );
    let table = std::fs::read_to_string("/proc/locks").expect("read /proc/locks");
    table
        .lines()
        .filter_map(|line| {
            // "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF", blocked
            // requests as "1: -> FLOCK ...".
            let mut fields: Vec<&str> = line.split_whitespace().skip(1).collect();
            let blocked = fields.first() == Some(&"->");
            if blocked {
                fields.remove(0);
            }
            if fields.len() < 5 || fields[0] != "FLOCK" || fields[4] != file_id {
                return None;
            }
            Some(Flock {
                blocked,
                access: fields[2].to_string(),
                pid: fields[3].parse().ok()?,
            })
        })
        .collect()
}

fn holds(pid: i32, access: &str) -> Flock {
    Flock {
        blocked: false,
        access: access.into(),
        pid,
    }
}

/// Waits until the kernel lists a blocked exclusive flock request by `pid`
/// on `path` (the process sleeps in flock(2) behind another holder).
async fn wait_blocked_in_flock(path: &Path, pid: i32) {
    let want = Flock {
        blocked: true,
        access: "WRITE".into(),
        pid,
    };
    let what = format!("pid {pid} blocked in flock on {}", path.display());
    eventually_ok(&what, GUARD, async || {
        let flocks = flocks_on(path);
        if flocks.contains(&want) {
            Ok(())
        } else {
            Err(format!("{flocks:?}"))
        }
    })
    .await;
}

/// Waits until padlockd reports `waiters` waiters (and no holder) on the
/// lock: the request has reached the queue and is blocked by an outside
/// holder.
async fn wait_queued(client: &Client, name: &str, kind: Kind, holders: usize) {
    let what = format!("a waiter on {name}");
    let info = eventually_ok(&what, GUARD, async || {
        let info = client.show(name, kind).await.expect("show");
        match info {
            Some(info) if info.waiters.len() == 1 => Ok(info),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(info.holders.len(), holders, "{info:?}");
}

/// Awaits a spawned acquire, which must be granted within [`GUARD`].
async fn granted(task: tokio::task::JoinHandle<Result<LockGuard, padlock::Error>>) -> LockGuard {
    tokio::time::timeout(GUARD, task)
        .await
        .expect("the waiting padlock acquire was not granted")
        .expect("acquire task")
        .expect("acquire")
}

/// `flock -n [-s|-x] <path> true`: the exit status.
fn flock_now(path: &Path, mode: &str) -> ExitStatus {
    Command::new("flock")
        .args(["-n", mode, "-E", &FLOCK_CONFLICT.to_string()])
        .arg(path)
        .arg("true")
        .status()
        .expect("run flock(1) (install util-linux; tests/run.sh does)")
}

/// Python holds `portalocker.Lock` exclusively: padlock's try-lock is
/// refused, a waiting padlock acquire queues behind it and is granted once
/// Python releases, and from then on Python is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_lock_holds_off_padlock_until_released() {
    let Some(python) = portalocker_python() else {
        return;
    };
    let server = Server::start();
    let client = server.client().await;
    let name = "reports/daily";
    let path = server.lock_dir.join(name);
    // portalocker does not create directories.
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();

    let mut py = Py::spawn(&python).await;
    assert_eq!(py.lock("held", &path, "ex").await, "locked");
    assert_eq!(flocks_on(&path), [holds(py.pid(), "WRITE")]);

    assert!(
        client.lock(name).try_acquire().await.unwrap().is_none(),
        "padlock granted a lock that Python holds"
    );
    assert!(
        client
            .lock(name)
            .shared()
            .try_acquire()
            .await
            .unwrap()
            .is_none(),
        "padlock granted a shared lock beside Python's exclusive one"
    );

    let waiter = tokio::spawn({
        let client = client.clone();
        async move { client.lock(name).acquire().await }
    });
    wait_queued(&client, name, Kind::File, 0).await;
    assert!(!waiter.is_finished(), "granted while Python holds");

    py.release("held").await;
    let guard = granted(waiter).await;
    assert_eq!(flocks_on(&path), [holds(server.pid(), "WRITE")]);
    assert_eq!(py.lock("again", &path, "ex").await, "busy");
    assert_eq!(py.lock("again", &path, "sh").await, "busy");

    guard.release().await.unwrap();
    assert_eq!(py.lock("again", &path, "ex").await, "locked");
    py.release("again").await;
    py.finish().await;
}

/// padlock holds the file lock (on a name in a subdirectory, which padlockd
/// creates): portalocker's fail-fast lock is refused, a blocking portalocker
/// lock sleeps in flock(2) until the padlock guard is released, and then
/// padlock is refused until Python lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn padlock_lock_holds_off_python_until_released() {
    let Some(python) = portalocker_python() else {
        return;
    };
    let server = Server::start();
    let client = server.client().await;
    let name = "jobs/nightly";
    let path = server.lock_dir.join(name);

    let guard = client.lock(name).try_acquire().await.unwrap().unwrap();
    assert!(path.is_file(), "padlockd did not create {}", path.display());
    assert_eq!(flocks_on(&path), [holds(server.pid(), "WRITE")]);

    let mut py = Py::spawn(&python).await;
    assert_eq!(py.lock("ex", &path, "ex").await, "busy");
    assert_eq!(py.lock("sh", &path, "sh").await, "busy");

    // A blocking portalocker lock waits in the kernel behind padlockd...
    py.send(&["block", "blocking", path_str(&path)]).await;
    wait_blocked_in_flock(&path, py.pid()).await;
    // ...and gets the lock as soon as the guard is released.
    guard.release().await.unwrap();
    assert_eq!(py.reply("blocking").await, "locked");
    assert_eq!(flocks_on(&path), [holds(py.pid(), "WRITE")]);

    assert!(client.lock(name).try_acquire().await.unwrap().is_none());
    py.release("blocking").await;
    let guard = client.lock(name).try_acquire().await.unwrap();
    assert!(guard.is_some(), "padlock refused after Python released");
    drop(guard);
    py.finish().await;
}

/// Shared mode: padlock's shared holders and portalocker's `LockFlags.SHARED`
/// coexist, and each side's shared holders keep the other side's exclusive
/// requests out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_locks_coexist_with_python_and_exclude_writers() {
    let Some(python) = portalocker_python() else {
        return;
    };
    let server = Server::start();
    let client = server.client().await;
    let name = "catalog";
    let path = server.lock_dir.join(name);
    let mut py = Py::spawn(&python).await;

    // padlock reads first; Python joins as a reader, not as a writer.
    let reader = client.lock(name).shared().try_acquire().await.unwrap();
    let reader = reader.expect("free lock refused");
    assert_eq!(py.lock("reader", &path, "sh").await, "locked");
    assert_eq!(py.lock("writer", &path, "ex").await, "busy");
    let second = client.lock(name).shared().try_acquire().await.unwrap();
    let second = second.expect("second padlock reader refused beside Python's reader");
    assert!(client.lock(name).try_acquire().await.unwrap().is_none());
    let mut flocks = flocks_on(&path);
    flocks.sort_by_key(|f| f.pid);
    let mut want = vec![
        holds(server.pid(), "READ"),
        holds(server.pid(), "READ"),
        holds(py.pid(), "READ"),
    ];
    want.sort_by_key(|f| f.pid);
    assert_eq!(flocks, want);

    // Python's reader alone still keeps the padlock writer out.
    reader.release().await.unwrap();
    second.release().await.unwrap();
    assert!(client.lock(name).try_acquire().await.unwrap().is_none());
    py.release("reader").await;

    // A Python writer keeps padlock readers out.
    assert_eq!(py.lock("writer", &path, "ex").await, "locked");
    assert!(
        client
            .lock(name)
            .shared()
            .try_acquire()
            .await
            .unwrap()
            .is_none()
    );
    py.release("writer").await;

    // Python reads first; padlock joins as a reader, not as a writer.
    assert_eq!(py.lock("reader", &path, "sh").await, "locked");
    let reader = client.lock(name).shared().try_acquire().await.unwrap();
    assert!(reader.is_some(), "padlock reader refused beside Python's");
    assert!(client.lock(name).try_acquire().await.unwrap().is_none());
    drop(reader);
    py.release("reader").await;
    py.finish().await;
}

/// Semaphores: padlock `semaphore(2)` and portalocker
/// `BoundedSemaphore(2, name, directory=lock_dir)` share the slot files
/// `<name>.00.lock` and `<name>.01.lock`: padlock takes exactly the slots
/// Python left free, and Python gets no slot while padlock holds both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_semaphore_slots_are_shared_with_python() {
    let Some(python) = portalocker_python() else {
        return;
    };
    let server = Server::start();
    let client = server.client().await;
    let dir = server.lock_dir.clone();
    let name = "gpu";
    let slot0 = dir.join("gpu.00.lock");
    let slot1 = dir.join("gpu.01.lock");
    let mut py = Py::spawn(&python).await;
    let sem = || client.lock(name).semaphore(2);

    // Python fills both slots.
    assert_eq!(py.sem("a", &dir, name, 2).await, "slot gpu.00.lock");
    assert_eq!(py.sem("b", &dir, name, 2).await, "slot gpu.01.lock");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.starts_with("gpu"))
        .collect();
    files.sort();
    assert_eq!(files, ["gpu.00.lock", "gpu.01.lock"]);
    assert!(sem().try_acquire().await.unwrap().is_none());

    // With slot 01 free, padlock takes slot 1, not the lowest slot.
    py.release("b").await;
    let p1 = sem()
        .try_acquire()
        .await
        .unwrap()
        .expect("free slot refused");
    assert_eq!(p1.slot(), Some(1));
    assert_eq!(flocks_on(&slot1), [holds(server.pid(), "WRITE")]);
    assert!(sem().try_acquire().await.unwrap().is_none());

    // With slot 00 free as well, padlock holds both.
    py.release("a").await;
    let p0 = sem()
        .try_acquire()
        .await
        .unwrap()
        .expect("free slot refused");
    assert_eq!(p0.slot(), Some(0));
    assert_eq!(flocks_on(&slot0), [holds(server.pid(), "WRITE")]);
    assert_eq!(py.sem("c", &dir, name, 2).await, "busy");
    assert_eq!(py.lock("slot0", &slot0, "ex").await, "busy");
    assert_eq!(py.lock("slot1", &slot1, "ex").await, "busy");

    // Python gets exactly the slot padlock gives back.
    p1.release().await.unwrap();
    assert_eq!(py.sem("c", &dir, name, 2).await, "slot gpu.01.lock");

    // A waiting padlock acquire is granted the slot Python gives back.
    let waiter = tokio::spawn({
        let client = client.clone();
        async move { client.lock(name).semaphore(2).acquire().await }
    });
    wait_queued(&client, name, Kind::Semaphore, 1).await;
    assert!(!waiter.is_finished(), "granted a third slot of two");
    py.release("c").await;
    let w = granted(waiter).await;
    assert_eq!(w.slot(), Some(1));
    assert_eq!(py.sem("d", &dir, name, 2).await, "busy");

    p0.release().await.unwrap();
    assert_eq!(py.sem("d", &dir, name, 2).await, "slot gpu.00.lock");
    w.release().await.unwrap();
    py.release("d").await;
    py.finish().await;
}

/// flock(1): `flock -n` is refused while padlock holds (exclusive, or
/// shared for `flock -x`) and succeeds after release; a lock held by
/// `flock <file> <command>` refuses padlock's try-lock and holds a waiting
/// padlock acquire until the command ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flock_cli_and_padlock_exclude_each_other() {
    let server = Server::start();
    let client = server.client().await;
    let name = "ci/deploy";
    let path = server.lock_dir.join(name);

    // padlock holds: flock(1) is refused, in either mode.
    let guard = client.lock(name).try_acquire().await.unwrap().unwrap();
    assert_eq!(flock_now(&path, "-x").code(), Some(FLOCK_CONFLICT));
    assert_eq!(flock_now(&path, "-s").code(), Some(FLOCK_CONFLICT));
    guard.release().await.unwrap();
    assert!(flock_now(&path, "-x").success());

    // padlock reads: flock(1) may read, not write.
    let reader = client.lock(name).shared().try_acquire().await.unwrap();
    let reader = reader.expect("free lock refused");
    assert!(flock_now(&path, "-s").success());
    assert_eq!(flock_now(&path, "-x").code(), Some(FLOCK_CONFLICT));
    reader.release().await.unwrap();

    // flock(1) holds while its command waits for its stdin to close.
    let mut holder = Command::new("flock")
        .arg(&path)
        .args(["-c", "echo locked; read -r line || :"])
        .env("SHELL", "/bin/sh")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run flock(1) (install util-linux; tests/run.sh does)");
    let mut out = BufReader::new(holder.stdout.take().unwrap());
    read_line_starting(&mut out, "locked");
    assert!(client.lock(name).try_acquire().await.unwrap().is_none());
    assert!(
        client
            .lock(name)
            .shared()
            .try_acquire()
            .await
            .unwrap()
            .is_none()
    );

    let waiter = tokio::spawn({
        let client = client.clone();
        async move { client.lock(name).acquire().await }
    });
    wait_queued(&client, name, Kind::File, 0).await;
    assert!(!waiter.is_finished(), "granted while flock(1) holds");
    drop(holder.stdin.take());
    let status = wait_child(&mut holder, GUARD).expect("flock(1) did not exit");
    assert!(status.success(), "flock(1) exited with {status}");
    let guard = granted(waiter).await;
    assert_eq!(flock_now(&path, "-x").code(), Some(FLOCK_CONFLICT));
    guard.release().await.unwrap();
    assert!(flock_now(&path, "-x").success());
}
