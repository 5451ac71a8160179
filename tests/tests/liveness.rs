//! Liveness: a lock is held exactly as long as its holder is alive and
//! reachable. Holders that die (kill -9), vanish silently (no FIN), exit
//! normally, or lose their server (kill -9, SIGTERM) all end in a state the
//! waiting side can see at once, and fences never go backwards across a
//! server crash.

use padlock::{Client, Kind, LockGuard, LostReason};
use padlock_e2e::{Server, eventually_ok, read_line_starting, wait_child};
use std::io::BufReader;
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Failure guard for awaits that should finish promptly (never a
/// synchronization: every wait below ends on an event).
const GUARD: Duration = Duration::from_secs(10);

async fn guarded<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: did not happen within {limit:?}"))
}

/// A `padlock` CLI process with piped stdout; killed and reaped when dropped.
struct CliProcess {
    child: Child,
    stdout: Option<BufReader<ChildStdout>>,
    stdin: Option<ChildStdin>,
}

impl CliProcess {
    fn spawn(server: &Server, args: &[&str]) -> CliProcess {
        let mut child = server
            .cli()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn padlock");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let stdin = child.stdin.take();
        CliProcess {
            child,
            stdout: Some(stdout),
            stdin,
        }
    }

    /// Reads stdout until a line starting with `prefix` (on a blocking thread).
    async fn line(&mut self, prefix: &str) -> String {
        let mut stdout = self.stdout.take().expect("stdout in use");
        let want = prefix.to_string();
        let (stdout, line) = guarded(
            &format!("padlock prints {prefix:?}"),
            GUARD,
            tokio::task::spawn_blocking(move || {
                let line = read_line_starting(&mut stdout, &want);
                (stdout, line)
            }),
        )
        .await
        .expect("reader thread");
        self.stdout = Some(stdout);
        line
    }

    fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, sig).expect("signal padlock");
    }

    /// Waits (without blocking the runtime) for the process to exit.
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        tokio::task::block_in_place(|| wait_child(&mut self.child, limit))
            .unwrap_or_else(|| panic!("padlock did not exit within {limit:?}"))
    }
}

impl Drop for CliProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fence in `granted NAME fence=F holder=ID`.
fn fence_of(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("fence="))
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("no fence in {line:?}"))
}

/// Waits until the server reports `n` waiters (or more) on `name`.
async fn until_waiting(client: &Client, name: &str, kind: Kind, n: usize) {
    let what = format!("{n} waiter(s) on {name}");
    eventually_ok(&what, GUARD, async || {
        match client.show(name, kind).await.expect("show") {
            Some(l) if l.waiters.len() >= n => Ok(()),
            Some(l) => Err(format!("{} waiter(s)", l.waiters.len())),
            None => Err("no such lock".to_string()),
        }
    })
    .await;
}

/// An SDK acquire in its own task, timestamped when it completes.
fn spawn_waiter(
    builder: padlock::LockBuilder,
) -> tokio::task::JoinHandle<(Instant, Result<LockGuard, padlock::Error>)> {
    tokio::spawn(async move {
        let result = builder.acquire().await;
        (Instant::now(), result)
    })
}

async fn granted(
    what: &str,
    limit: Duration,
    waiter: tokio::task::JoinHandle<(Instant, Result<LockGuard, padlock::Error>)>,
) -> (Instant, LockGuard) {
    let (at, result) = guarded(what, limit, waiter).await.expect("waiter task");
    (at, result.unwrap_or_else(|e| panic!("{what}: {e}")))
}

/// kill -9 of a `padlock hold` process: the kernel closes its socket and the
/// queued SDK waiter is granted, with a larger fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_a_holder_process_frees_its_lock() {
    let server = Server::start();
    let mut holder = CliProcess::spawn(&server, &["hold", "k9/job"]);
    let line = holder.line("granted k9/job ").await;
    let held_fence = fence_of(&line);

    let client = server.client().await;
    assert!(
        client.lock("k9/job").try_acquire().await.unwrap().is_none(),
        "the CLI's lock must be held"
    );
    let waiter = spawn_waiter(client.lock("k9/job"));
    until_waiting(&client, "k9/job", Kind::File, 1).await;

    holder.child.kill().expect("kill -9 padlock hold");
    let killed = Instant::now();
    let status = holder.wait(GUARD);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );

    let (at, guard) = granted("waiter after kill -9", Duration::from_secs(5), waiter).await;
    eprintln!(
        "kill -9 of the holder -> waiter granted in {:?}",
        at.saturating_duration_since(killed)
    );
    assert!(
        guard.fence() > held_fence,
        "fence {} after {held_fence}",
        guard.fence()
    );
    guard.release().await.expect("release");
}

/// kill -9 of padlockd: every guard, on every connection, file and
/// semaphore, learns of it (Disconnected); after a restart on the same lock
/// directory the fences are strictly above every fence handed out before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_padlockd_is_noticed_and_fences_survive_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start_in(dir.path(), &[]);
    let a = server.client().await;
    let b = server.client().await;

    // Some history first, so the counters are not at their start.
    for _ in 0..3 {
        let g = a.lock("crash/file").acquire().await.unwrap();
        g.release().await.unwrap();
        let g = b.lock("crash/sem").semaphore(3).acquire().await.unwrap();
        g.release().await.unwrap();
    }

    let guards: Vec<(&str, LockGuard)> = vec![
        ("crash/file", a.lock("crash/file").acquire().await.unwrap()),
        (
            "crash/other",
            b.lock("crash/other").acquire().await.unwrap(),
        ),
        (
            "crash/shared",
            a.lock("crash/shared").shared().acquire().await.unwrap(),
        ),
        (
            "crash/shared",
            b.lock("crash/shared").shared().acquire().await.unwrap(),
        ),
        (
            "crash/sem",
            a.lock("crash/sem").semaphore(3).acquire().await.unwrap(),
        ),
        (
            "crash/sem",
            b.lock("crash/sem").semaphore(3).acquire().await.unwrap(),
        ),
    ];
    let max_fence = |name: &str| {
        guards
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, g)| g.fence())
            .max()
            .unwrap()
    };
    let before = [
        ("crash/file", false, max_fence("crash/file")),
        ("crash/other", false, max_fence("crash/other")),
        ("crash/shared", false, max_fence("crash/shared")),
        ("crash/sem", true, max_fence("crash/sem")),
    ];
    assert!(guards.iter().all(|(_, g)| g.is_held()));

    server.kill9();
    let killed = Instant::now();
    for (name, guard) in &guards {
        let lost = guarded(&format!("{name} lost()"), GUARD, guard.lost()).await;
        assert_eq!(lost.reason, LostReason::Disconnected, "{name}: {lost}");
        assert!(!guard.is_held());
    }
    eprintln!(
        "kill -9 of padlockd -> all {} guards lost within {:?}",
        guards.len(),
        killed.elapsed()
    );

    let restarted = Server::start_in(dir.path(), &[]);
    let c = restarted.client().await;
    for (name, semaphore, old) in before {
        let builder = if semaphore {
            c.lock(name).semaphore(3)
        } else {
            c.lock(name)
        };
        let guard = guarded(name, GUARD, builder.wait(Duration::from_secs(5)).acquire())
            .await
            .unwrap_or_else(|e| panic!("{name} after restart: {e}"));
        eprintln!(
            "{name}: fence {old} before the crash, {} after",
            guard.fence()
        );
        assert!(
            guard.fence() > old,
            "{name}: fence {} after the restart is not above {old}",
            guard.fence()
        );
        guard.release().await.unwrap();
    }
}

/// A TCP proxy that can go silent: after `freeze`, it forwards nothing in
/// either direction and closes nothing, like a pulled cable.
struct Proxy {
    addr: SocketAddr,
    frozen: watch::Sender<bool>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (frozen, rx) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                tokio::spawn(pump(in_read, out_write, rx.clone()));
                tokio::spawn(pump(out_read, in_write, rx.clone()));
            }
        });
        Proxy { addr, frozen }
    }

    fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut frozen: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    let is_frozen = frozen.clone();
    loop {
        tokio::select! {
            biased;
            () = async { let _ = frozen.wait_for(|f| *f).await; } => break,
            read = from.read(&mut buf) => match read {
                // A real close is passed on (dropping `to` sends FIN).
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if *is_frozen.borrow() {
                        break;
                    }
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
        }
    }
    // Frozen: keep both sockets open and say nothing, until the test ends.
    std::future::pending::<()>().await;
    drop((from, to));
}

/// A holder that goes silent without closing its connection is detected by
/// the server's HTTP/2 keepalive (1 s + 1 s here): the waiter is granted
/// within about two seconds, and the silent holder's own guard reports the
/// loss once its client keepalive gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_holder_is_dropped_by_keepalive() {
    let server =
        Server::start_with_args(&["--keepalive-interval", "1s", "--keepalive-timeout", "1s"]);
    let proxy = Proxy::start(server.addr).await;
    let a = Client::connect(format!("http://{}", proxy.addr))
        .await
        .expect("connect through the proxy");
    let held = guarded("A acquires", GUARD, a.lock("silent").acquire())
        .await
        .expect("A acquires through the proxy");

    let b = server.client().await;
    let waiter = spawn_waiter(b.lock("silent"));
    until_waiting(&b, "silent", Kind::File, 1).await;

    proxy.freeze();
    let frozen = Instant::now();
    let (at, guard) = granted("B after A went silent", GUARD, waiter).await;
    let release_time = at.saturating_duration_since(frozen);
    eprintln!(
        "silent holder released by the server after {release_time:?} \
         (--keepalive-interval 1s --keepalive-timeout 1s)"
    );
    assert!(guard.fence() > held.fence());

    // A cannot hear the server any more; its own keepalive (5 s + 5 s in
    // the SDK) must end the guard.
    let lost = guarded(
        "A's guard reports the loss",
        Duration::from_secs(15),
        held.lost(),
    )
    .await;
    eprintln!(
        "the silent holder's own guard reported {lost} after {:?}",
        frozen.elapsed()
    );
    assert_eq!(lost.reason, LostReason::Disconnected);
    assert!(!held.is_held());
    guard.release().await.expect("B releases");
}

/// SIGTERM: holders get Lost{Shutdown}, the waiter UNAVAILABLE, and
/// padlockd exits 0 promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_holders_and_waiters_and_exits_0() {
    let mut server = Server::start();
    let a = server.client().await;
    let b = server.client().await;
    let c = server.client().await;
    let file = a.lock("drain/file").acquire().await.unwrap();
    let sem = b.lock("drain/sem").semaphore(2).acquire().await.unwrap();
    let waiter = spawn_waiter(c.lock("drain/file"));
    until_waiting(&c, "drain/file", Kind::File, 1).await;

    server.signal(rustix::process::Signal::TERM);
    let signalled = Instant::now();
    for (what, guard) in [("file holder", &file), ("semaphore holder", &sem)] {
        let lost = guarded(what, GUARD, guard.lost()).await;
        assert_eq!(lost.reason, LostReason::Shutdown, "{what}: {lost}");
        assert!(lost.detail.contains("shutting down"), "{what}: {lost}");
    }
    let (_, result) = guarded("waiter", GUARD, waiter).await.expect("waiter task");
    match result {
        Err(padlock::Error::Status(status)) => {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(status.message().contains("shutting down"), "{status:?}");
        }
        other => panic!("expected UNAVAILABLE for the waiter, got {other:?}"),
    }
    // The guards are still alive (as a careless caller would keep them):
    // padlockd must not wait for them to be dropped.
    let status = tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(5)));
    eprintln!(
        "padlockd exited {status} {:?} after SIGTERM",
        signalled.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{status}");
    drop((file, sem));
}

/// Processes that end normally free their locks: `padlock run -- true`, a
/// `padlock run` whose command exits while a waiter is queued, and
/// `padlock hold` stopped by SIGTERM (prints `released`, exits 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_exits_normally_frees_its_lock() {
    let server = Server::start();
    let client = server.client().await;

    // padlock run -- true: exit 0, and the lock is free right after.
    let mut run = CliProcess::spawn(&server, &["run", "normal/run", "--", "true"]);
    let status = run.wait(GUARD);
    assert_eq!(status.code(), Some(0), "padlock run -- true: {status}");
    let guard = client
        .lock("normal/run")
        .try_acquire()
        .await
        .unwrap()
        .expect("free right after padlock run exited");
    let run_fence = guard.fence();
    guard.release().await.unwrap();

    // padlock run whose command ends while an SDK waiter is queued.
    let mut run = CliProcess::spawn(
        &server,
        &[
            "run",
            "normal/run",
            "--",
            "sh",
            "-c",
            "echo running fence=$PADLOCK_FENCE; cat >/dev/null",
        ],
    );
    let line = run.line("running ").await;
    let cmd_fence = fence_of(&line);
    assert!(cmd_fence > run_fence);
    let waiter = spawn_waiter(client.lock("normal/run"));
    until_waiting(&client, "normal/run", Kind::File, 1).await;
    let closed = Instant::now();
    drop(run.stdin.take()); // EOF: `cat` ends and sh exits 0.
    let status = run.wait(GUARD);
    assert_eq!(status.code(), Some(0), "padlock run -- sh: {status}");
    let (at, guard) = granted("waiter behind padlock run", GUARD, waiter).await;
    eprintln!(
        "command's stdin closed -> waiter granted in {:?}",
        at.saturating_duration_since(closed)
    );
    assert!(guard.fence() > cmd_fence);
    guard.release().await.unwrap();

    // padlock hold, then SIGTERM.
    let mut hold = CliProcess::spawn(&server, &["hold", "normal/hold"]);
    let line = hold.line("granted normal/hold ").await;
    let hold_fence = fence_of(&line);
    let waiter = spawn_waiter(client.lock("normal/hold"));
    until_waiting(&client, "normal/hold", Kind::File, 1).await;
    assert!(!waiter.is_finished());
    hold.signal(rustix::process::Signal::TERM);
    assert_eq!(hold.line("released").await, "released");
    let status = hold.wait(GUARD);
    assert_eq!(
        status.code(),
        Some(0),
        "padlock hold after SIGTERM: {status}"
    );
    let (_, guard) = granted("waiter behind padlock hold", GUARD, waiter).await;
    assert!(guard.fence() > hold_fence);
    guard.release().await.unwrap();
}
