//! The Python client (sdk/python) against the Rust SDK, in one queue and
//! one fence sequence: a Python holder blocks a Rust waiter and the
//! reverse. (The Python client's own suite is sdk/python/tests.)

use padlock::Kind;
use padlock_e2e::{Server, until_waiters};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

const GUARD: Duration = Duration::from_secs(20);

/// The venv's Python with the padlock client installed; panics with what
/// to do when it is missing.
fn padlock_python() -> PathBuf {
    let python = std::env::var_os("PADLOCK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    let ok = Command::new(&python)
        .args(["-c", "import padlock, padlock.v1.padlock_pb2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the Python client is not installed in {}: run the suite with `bash tests/run.sh` \
         (it installs it), or `.venv/bin/pip install ./sdk/python`",
        python.display()
    );
    python
}

/// A Python process holding one lock on command: `acquire TIMEOUT`
/// answers `held FENCE` or `busy`; `release` answers `released`.
struct PyLock {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const SCRIPT: &str = r#"
import sys, padlock
client = padlock.Client(sys.argv[1])
lock = None
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == 'acquire':
        try:
            lock = client.lock(sys.argv[2], timeout=float(cmd[1])).acquire()
            print('held', lock.fence, flush=True)
        except padlock.AlreadyLocked:
            print('busy', flush=True)
    elif cmd[0] == 'release':
        lock.release()
        print('released', flush=True)
"#;

impl PyLock {
    fn start(server: &Server, name: &str) -> PyLock {
        let mut child = Command::new(padlock_python())
            .args(["-c", SCRIPT, &server.url, name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        PyLock {
            child,
            stdin,
            stdout,
        }
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
    }

    fn answer(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the Python client exited");
        line.trim().to_string()
    }
}

impl Drop for PyLock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fence_of(answer: &str) -> u64 {
    answer
        .strip_prefix("held ")
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("expected `held FENCE`, got {answer:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_holder_blocks_a_rust_waiter() {
    let server = Server::start();
    let mut python = PyLock::start(&server, "py-rust");
    python.send("acquire 10");
    let py_fence = fence_of(&python.answer());
    let client = server.client().await;
    assert!(
        client
            .lock("py-rust")
            .try_acquire()
            .await
            .unwrap()
            .is_none(),
        "Rust got the lock Python holds"
    );
    let waiter = {
        let client = client.clone();
        tokio::spawn(async move { client.lock("py-rust").wait(GUARD).acquire().await })
    };
    until_waiters(&client, "py-rust", Kind::File, 1).await;
    python.send("release");
    assert_eq!(python.answer(), "released");
    let rust = tokio::time::timeout(GUARD, waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(rust.fence() > py_fence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_holder_blocks_a_python_waiter() {
    let server = Server::start();
    let client = server.client().await;
    let rust = client.lock("rust-py").acquire().await.unwrap();
    let mut python = PyLock::start(&server, "rust-py");
    python.send("acquire 0");
    assert_eq!(python.answer(), "busy");
    python.send("acquire 20");
    until_waiters(&client, "rust-py", Kind::File, 1).await;
    let rust_fence = rust.fence();
    rust.release().await.unwrap();
    let answer = tokio::task::spawn_blocking(move || {
        let answer = python.answer();
        (answer, python)
    });
    let (answer, _python) = tokio::time::timeout(GUARD, answer).await.unwrap().unwrap();
    assert!(fence_of(&answer) > rust_fence);
}
