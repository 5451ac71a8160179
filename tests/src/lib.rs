//! Harness for the end-to-end tests: start the real `padlockd` on a free
//! port, run the real `padlock` CLI, and find the real portalocker.
//!
//! Everything here synchronizes on events (a line printed, a process
//! exiting, a message received), never on sleeps.

pub mod h2;
pub mod http;
pub mod webdriver;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The directory holding the workspace's binaries (`target/<profile>`),
/// found from the running executable (a test in `target/<profile>/deps/`,
/// or a binary of this crate in `target/<profile>/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("the executable is in a directory");
    match dir.file_name() {
        Some(name) if name == "deps" => dir.parent().unwrap_or(dir).to_path_buf(),
        _ => dir.to_path_buf(),
    }
}

/// Path of a workspace binary; fails with instructions when it is missing.
/// `PADLOCK_TEST_PADLOCKD` points the tests at another padlockd (an older
/// build, to see which tests it fails).
pub fn bin(name: &str) -> PathBuf {
    let other = std::env::var_os("PADLOCK_TEST_PADLOCKD").filter(|_| name == "padlockd");
    let path = other.map_or_else(|| bin_dir().join(name), PathBuf::from);
    assert!(
        path.is_file(),
        "{} is missing: build it first with `cargo build --workspace --bins` \
         (`cargo test --workspace` builds it as well)",
        path.display()
    );
    path
}

/// A running padlockd, killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub url: String,
    pub lock_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Server {
    /// padlockd on a free port with a fresh temporary lock directory.
    pub fn start() -> Server {
        Server::start_with_args(&[])
    }

    /// padlockd with a fresh temporary lock directory and extra flags.
    pub fn start_with_args(args: &[&str]) -> Server {
        let temp = tempfile::tempdir().expect("tempdir");
        let mut server = Server::start_in(temp.path(), args);
        server._temp = Some(temp);
        server
    }

    /// padlockd on a free port serving `lock_dir` (kept after the server
    /// stops, so a test can restart on it or share it).
    pub fn start_in(lock_dir: &Path, args: &[&str]) -> Server {
        Server::spawn(Command::new(bin("padlockd")), lock_dir, args)
    }

    /// padlockd with a fresh temporary lock directory, extra flags, and at
    /// most `nofile` open files (soft and hard `RLIMIT_NOFILE`).
    pub fn start_with_nofile(nofile: u32, args: &[&str]) -> Server {
        let temp = tempfile::tempdir().expect("tempdir");
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(bin("padlockd"));
        let mut server = Server::spawn(sh, temp.path(), args);
        server._temp = Some(temp);
        server
    }

    fn spawn(mut command: Command, lock_dir: &Path, args: &[&str]) -> Server {
        let mut child = command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--lock-dir")
            .arg(lock_dir)
            .args(args)
            .env(
                "PADLOCK_LOG",
                std::env::var("PADLOCK_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn padlockd");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(rest) = line.strip_prefix("padlockd listening on ") {
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        break addr.parse::<SocketAddr>().expect("address");
                    }
                }
                _ => panic!("padlockd exited before listening: {:?}", child.wait()),
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Server {
            child,
            addr,
            url: format!("http://{addr}"),
            lock_dir: lock_dir.to_path_buf(),
            _temp: None,
        }
    }

    /// padlockd serving the redis kind on `redis` (besides files and
    /// semaphores), with a fresh temporary lock directory.
    pub fn on_redis(redis: &RedisServer) -> Server {
        Server::on_redis_with(redis, &[])
    }

    /// [`Server::on_redis`] with extra flags.
    pub fn on_redis_with(redis: &RedisServer, args: &[&str]) -> Server {
        let mut all = vec!["--redis-url", &redis.url];
        all.extend_from_slice(args);
        Server::start_with_args(&all)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// padlockd has not exited (it is our child, so a dead one stays a
    /// zombie until it is reaped: check its state, not just its pid).
    pub fn assert_alive(&self) {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("padlockd's /proc entry is gone");
        // "PID (COMM) STATE ...": the state follows the last ')'.
        let state = stat
            .rsplit(") ")
            .next()
            .and_then(|rest| rest.chars().next())
            .expect("state field");
        assert!(
            !matches!(state, 'Z' | 'X'),
            "padlockd has exited (state {state})"
        );
    }

    /// A new SDK client (own connection).
    pub async fn client(&self) -> padlock::Client {
        padlock::Client::connect(self.url.clone())
            .await
            .expect("connect to padlockd")
    }

    /// The `padlock` CLI, pointed at this server.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(bin("padlock"));
        cmd.env("PADLOCK_SERVER", &self.url);
        cmd
    }

    /// SIGSTOP, returning once every thread of padlockd has stopped: a
    /// multi-threaded process stops thread by thread, and until its last
    /// thread does, padlockd still serves (under load, for milliseconds).
    pub fn pause(&self) {
        stop_process(self.pid());
    }

    /// Sends a signal to padlockd.
    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid()).expect("pid");
        rustix::process::kill_process(pid, sig).expect("kill");
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9 padlockd");
        self.child.wait().expect("reap padlockd");
    }

    /// Waits for padlockd to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        wait_child(&mut self.child, limit).expect("padlockd did not exit in time")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server still serves everyone else: it runs, health answers, and a
/// fresh client on its own connection takes and releases a lock of its own.
pub async fn assert_unharmed(server: &Server) {
    server.assert_alive();
    let check = async {
        let (status, _) = http::json(http::client().get(format!("{}/healthz", server.url))).await;
        assert_eq!(status, 200, "/healthz");
        let client = server.client().await;
        let name = format!("unharmed-{}", std::process::id());
        let guard = client
            .lock(name)
            .wait(Duration::from_secs(10))
            .acquire()
            .await
            .expect("a fresh client acquires a lock of its own");
        guard.release().await.expect("and releases it");
    };
    tokio::time::timeout(Duration::from_secs(20), check)
        .await
        .expect("the server answers other clients within 20 s");
}

/// How often [`poll_until`] (and so [`eventually`]) looks again.
const POLL: Duration = Duration::from_millis(10);

/// Polls `check` every 10 ms until it returns `Ok`, for at most `limit`
/// (a check already begun is let finish); past it, returns the last `Err`:
/// what was last seen. For states that have no event to wait on (a count
/// in Redis, a file's mode, a waiter in a queue). Tests call
/// [`eventually`] or [`eventually_ok`], which panic instead; this is for a
/// caller with more to do on failure (a screenshot).
///
/// `check` is an `FnMut` returning a future (an `async ||` closure that
/// only borrows is one), not an `AsyncFnMut`: a future awaiting an
/// `AsyncFnMut` cannot be proven `Send`, and some waits run in spawned
/// tasks.
pub async fn poll_until<T, E, F>(limit: Duration, mut check: impl FnMut() -> F) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(last) if start.elapsed() >= limit => return Err(last),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// Polls `check` until it returns `Some`, at most `limit`; panics with
/// `what` otherwise. See [`poll_until`].
pub async fn eventually<T, F>(what: &str, limit: Duration, mut check: impl FnMut() -> F) -> T
where
    F: Future<Output = Option<T>>,
{
    let found = poll_until(limit, || {
        let seen = check();
        async move { seen.await.ok_or(()) }
    })
    .await;
    found.unwrap_or_else(|()| panic!("{what}: not within {limit:?}"))
}

/// Polls `check` until it returns `Ok`, at most `limit`; panics with
/// `what` and the last `Err` (what was seen instead) otherwise. See
/// [`poll_until`].
pub async fn eventually_ok<T, E, F>(what: &str, limit: Duration, check: impl FnMut() -> F) -> T
where
    E: std::fmt::Display,
    F: Future<Output = Result<T, E>>,
{
    let found = poll_until(limit, check).await;
    found.unwrap_or_else(|last| panic!("{what}: not within {limit:?}; last seen: {last}"))
}

/// Fences recorded in grant order must strictly increase.
pub fn assert_strictly_increasing(fences: &[u64]) {
    for pair in fences.windows(2) {
        assert!(
            pair[0] < pair[1],
            "fence went from {} to {}",
            pair[0],
            pair[1]
        );
    }
}

/// Waits until the server shows exactly `n` waiters on lock `name` of
/// `kind` (a request reached the queue). Panics after 20 s.
pub async fn until_waiters(client: &padlock::Client, name: &str, kind: padlock::Kind, n: usize) {
    let what = format!("{n} waiter(s) on {name}");
    eventually_ok(&what, Duration::from_secs(20), async || {
        let info = client.show(name, kind).await.expect("show");
        // (An older padlockd does not send the total: count the list.)
        let waiters = info
            .as_ref()
            .map(|l| (l.waiters_total as usize).max(l.waiters.len()));
        match waiters {
            Some(waiters) if waiters == n => Ok(()),
            Some(waiters) => Err(format!("{waiters} waiter(s)")),
            None => Err("no such lock".to_string()),
        }
    })
    .await
}

/// Waits for a child process to exit, at most `limit`.
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads lines from a child's stdout until one starts with `prefix`;
/// returns that line. Panics with everything read when the stream ends.
pub fn read_line_starting(reader: &mut impl BufRead, prefix: &str) -> String {
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => {
                panic!("stream ended before a line starting with {prefix:?}; got:\n{seen}")
            }
            Ok(_) if line.starts_with(prefix) => return line.trim_end().to_string(),
            Ok(_) => seen.push_str(&line),
        }
    }
}

/// The Python interpreter that has portalocker 4.4.2 installed, or `None`
/// when the interop tests were explicitly opted out with
/// `PADLOCK_SKIP_PORTALOCKER=1`. Panics with install instructions otherwise.
pub fn portalocker_python() -> Option<PathBuf> {
    if opted_out("PADLOCK_SKIP_PORTALOCKER") {
        return None;
    }
    let candidates = [
        std::env::var_os("PADLOCK_PYTHON").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")),
    ];
    for python in candidates.into_iter().flatten() {
        let ok = Command::new(&python)
            .args(["-c", "import portalocker, redis; assert portalocker.__version__ == '4.4.2', portalocker.__version__"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(python);
        }
    }
    panic!(
        "portalocker 4.4.2 is not installed. Run the test suite with `bash tests/run.sh` \
         (it makes .venv with portalocker), or install it yourself: \
         `python3 -m venv .venv && .venv/bin/pip install 'portalocker[redis]==4.4.2'` \
         (or point PADLOCK_PYTHON at an interpreter that has it). \
         To skip the interop tests on purpose, set PADLOCK_SKIP_PORTALOCKER=1."
    );
}

/// A `redis-server` of the test's own on a free port, so a test can kill,
/// restart, pause and resume it. Killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub url: String,
    /// Extra arguments to redis-server.
    extra: Vec<String>,
}

/// Reads one RESP reply as text.
fn resp_text(reader: &mut impl BufRead) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).expect("read a redis reply");
    let line = line.trim_end();
    let (kind, rest) = line.split_at(1);
    match kind {
        "+" | ":" => rest.to_string(),
        "-" => format!("ERR {rest}"),
        "$" => {
            let len: i64 = rest.parse().expect("bulk length");
            if len < 0 {
                return String::new();
            }
            let mut buf = vec![0u8; len as usize + 2];
            std::io::Read::read_exact(reader, &mut buf).expect("bulk body");
            String::from_utf8_lossy(&buf[..len as usize]).into_owned()
        }
        "*" => {
            let n: i64 = rest.parse().expect("array length");
            (0..n.max(0))
                .map(|_| resp_text(reader))
                .collect::<Vec<_>>()
                .join("\n")
        }
        other => panic!("unexpected redis reply {other}{rest}"),
    }
}

impl RedisServer {
    /// Starts redis-server (no persistence) on a free port and waits until
    /// it answers PING. Fails with install instructions when it is missing.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Starts redis-server with extra arguments (an ACL, say).
    pub fn start_with(args: &[&str]) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut server = RedisServer {
            child: None,
            port,
            url: format!("redis://127.0.0.1:{port}"),
            extra: args.iter().map(|a| a.to_string()).collect(),
        };
        server.restart();
        server
    }

    /// Sends one command (as the default user) and returns its reply as
    /// text: integers and strings as they are, arrays one element a line.
    pub fn command(&self, args: &[&str]) -> String {
        use std::io::Write;
        let mut conn =
            std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        conn.write_all(out.as_bytes()).expect("send to redis");
        let mut reader = BufReader::new(conn);
        resp_text(&mut reader)
    }

    /// Starts (again) on the same port, with nothing remembered.
    pub fn restart(&mut self) {
        if let Some(mut old) = self.child.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--loglevel", "warning", "--daemonize", "no"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): install it with `apt-get install redis-server` \
                     (tests/run.sh does), or skip the redis tests on purpose with PADLOCK_SKIP_REDIS=1"
                )
            });
        self.child = Some(child);
        let start = Instant::now();
        while !self.answers_ping() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not come up on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Does Redis answer PING right now (within 1 s)?
    pub fn answers_ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 7];
        conn.write_all(b"PING\r\n").is_ok()
            && conn.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9 redis-server");
            child.wait().expect("reap redis-server");
        }
    }

    /// SIGSTOP (`pause = true`) or SIGCONT: a Redis that hangs without
    /// closing its sockets, and its recovery.
    pub fn pause(&self, pause: bool) {
        let child = self.child.as_ref().expect("redis-server runs");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
        if pause {
            stop_process(pid.as_raw_nonzero().get());
        } else {
            let sig = rustix::process::Signal::CONT;
            rustix::process::kill_process(pid, sig).expect("signal redis-server");
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A paused server cannot exit on SIGKILL until it is resumed.
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::CONT);
            }
        }
        self.kill9();
    }
}

/// True when the redis tests were explicitly opted out
/// (`PADLOCK_SKIP_REDIS=1`); see [`opted_out`].
pub fn redis_opted_out() -> bool {
    opted_out("PADLOCK_SKIP_REDIS")
}

/// A [`RedisServer`] of the test's own, or `None` when the redis tests are
/// opted out (`PADLOCK_SKIP_REDIS=1`: the skip is logged, and refused
/// under CI; see [`opted_out`]). A test starts with
/// `let Some(redis) = own_redis() else { return; };`.
pub fn own_redis() -> Option<RedisServer> {
    own_redis_with(&[])
}

/// [`own_redis`] with extra arguments to redis-server (an ACL, say).
pub fn own_redis_with(args: &[&str]) -> Option<RedisServer> {
    if redis_opted_out() {
        return None;
    }
    Some(RedisServer::start_with(args))
}

/// For the interop tests of the redis kind: a Redis of the test's own and
/// the Python that has portalocker, or `None` when either is opted out
/// (the Redis opt-out is asked first, and a skip is logged once).
pub fn own_redis_and_portalocker() -> Option<(RedisServer, PathBuf)> {
    if redis_opted_out() {
        return None;
    }
    let python = portalocker_python()?;
    Some((RedisServer::start(), python))
}

/// The file where opted-out tests write their names, for `tests/run.sh`
/// to show in its summary (`target/<profile>/padlock-skipped.log`).
pub fn skipped_log() -> PathBuf {
    bin_dir().join("padlock-skipped.log")
}

/// True when the calling test is opted out by `var=1` (a machine without
/// Redis, portalocker or a browser). A skip is never silent: it is said
/// on stderr and written to [`skipped_log`], which `tests/run.sh` prints
/// as SKIPPED at the end. Under `CI=true` an opt-out is refused: the test
/// fails, since CI runs everything.
pub fn opted_out(var: &str) -> bool {
    if !std::env::var(var).is_ok_and(|v| v == "1") {
        return false;
    }
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    assert!(
        !std::env::var("CI").is_ok_and(|v| v == "true" || v == "1"),
        "{test}: {var}=1 is refused under CI=true: CI runs every test; unset {var}"
    );
    let line = format!("SKIPPED {test} (opted out by {var}=1)");
    eprintln!("{line}");
    use std::io::Write;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(skipped_log());
    if let Ok(mut log) = log {
        let _ = writeln!(log, "{line}");
    }
    true
}

/// Sends SIGSTOP to `pid` and waits until each of its threads is stopped
/// (state `T` in `/proc/PID/task/*/stat`).
pub fn stop_process(pid: i32) {
    let raw = rustix::process::Pid::from_raw(pid).expect("pid");
    rustix::process::kill_process(raw, rustix::process::Signal::STOP).expect("SIGSTOP");
    let stopped = || -> bool {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().all(|task| {
            std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                // "TID (COMM) STATE ...": the state follows the last ')'.
                let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
                state.is_some_and(|s| s.starts_with('T') || s.starts_with('t'))
            })
        })
    };
    let start = Instant::now();
    while !stopped() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "process {pid} did not stop"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
