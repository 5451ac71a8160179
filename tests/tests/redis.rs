//! The redis kind against a real redis-server (started by the test, so it
//! can be killed, restarted and paused) and the real portalocker 4.4.2.

use padlock::{Client, Error, Kind, LostReason};
use padlock_e2e::{
    RedisServer, Server, assert_strictly_increasing, eventually_ok, own_redis,
    own_redis_and_portalocker, read_line_starting, until_waiters,
};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// A Python process holding portalocker `RedisLock`s on command:
/// `acquire TAG exclusive|shared TIMEOUT` answers `locked TAG FENCE` or
/// `busy TAG`; `release TAG` answers `released TAG`.
struct PyRedisLocks {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const PY_LOCKS: &str = r#"
import sys, portalocker
port, channel = int(sys.argv[1]), sys.argv[2]
locks = {}
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == 'acquire':
        tag, mode, timeout = cmd[1], cmd[2], float(cmd[3])
        flags = portalocker.LockFlags.SHARED if mode == 'shared' else portalocker.LockFlags.EXCLUSIVE
        lock = portalocker.RedisLock(channel, redis_kwargs={'port': port}, flags=flags, fencing=True,
                                     interrupt_on_lost=False, timeout=timeout, fail_when_locked=(timeout == 0))
        try:
            lock.acquire()
            locks[tag] = lock
            print('locked', tag, lock.fence_token, flush=True)
        except portalocker.AlreadyLocked:
            print('busy', tag, flush=True)
    elif cmd[0] == 'release':
        locks.pop(cmd[1]).release()
        print('released', cmd[1], flush=True)
"#;

impl PyRedisLocks {
    fn start(python: &std::path::Path, redis: &RedisServer, channel: &str) -> PyRedisLocks {
        let mut child = Command::new(python)
            .args(["-c", PY_LOCKS, &redis.port.to_string(), channel])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        PyRedisLocks {
            child,
            stdin,
            stdout,
        }
    }

    /// Sends a command and returns the answer line.
    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "python exited on {command:?}");
        line.trim().to_string()
    }

    /// `acquire`; `Some(fence)` (0 for shared grants) or `None` if busy.
    fn acquire(&mut self, tag: &str, mode: &str, timeout: f64) -> Option<u64> {
        let answer = self.ask(&format!("acquire {tag} {mode} {timeout}"));
        let words: Vec<&str> = answer.split(' ').collect();
        match words[0] {
            "locked" => Some(words[2].parse().unwrap_or(0)),
            "busy" => None,
            _ => panic!("unexpected answer {answer:?}"),
        }
    }

    fn release(&mut self, tag: &str) {
        assert_eq!(
            self.ask(&format!("release {tag}")),
            format!("released {tag}")
        );
    }
}

impl Drop for PyRedisLocks {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const GUARD: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_url_the_kind_is_refused_with_a_hint() {
    let server = Server::start();
    let client = server.client().await;
    match client.lock("r").redis().acquire().await {
        Err(Error::Status(status)) => {
            assert_eq!(status.code(), tonic_code_unavailable());
            assert!(
                status.message().contains("--redis-url"),
                "{}",
                status.message()
            );
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    // File locks still work.
    client
        .lock("f")
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
}

fn tonic_code_unavailable() -> tonic::Code {
    tonic::Code::Unavailable
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portalocker_and_padlock_exclude_each_other_with_one_fence_sequence() {
    let Some((redis, python)) = own_redis_and_portalocker() else {
        return;
    };
    let server = Server::on_redis(&redis);
    let client = server.client().await;
    let mut py = PyRedisLocks::start(&python, &redis, "jobs/report");

    // Python holds: padlock cannot take it, and waits.
    let py_fence = py
        .acquire("a", "exclusive", 5.0)
        .expect("python gets a free lock");
    assert!(
        client
            .lock("jobs/report")
            .redis()
            .try_acquire()
            .await
            .unwrap()
            .is_none()
    );
    let waiter_client = server.client().await;
    let waiter =
        tokio::spawn(async move { waiter_client.lock("jobs/report").redis().acquire().await });
    until_waiters(&client, "jobs/report", Kind::Redis, 1).await;
    py.release("a");
    let guard = tokio::time::timeout(GUARD, waiter)
        .await
        .expect("granted after the python release")
        .unwrap()
        .unwrap();
    assert!(
        guard.fence() > py_fence,
        "padlock fence {} after python fence {py_fence}",
        guard.fence()
    );

    // padlock holds: Python is refused, then gets it after the release.
    assert_eq!(py.acquire("b", "exclusive", 0.0), None);
    let padlock_fence = guard.fence();
    guard.release().await.unwrap();
    let py_fence = py
        .acquire("c", "exclusive", 5.0)
        .expect("python after padlock release");
    assert!(
        py_fence > padlock_fence,
        "python fence {py_fence} after padlock fence {padlock_fence}"
    );
    py.release("c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_and_exclusive_mix_with_portalocker() {
    let Some((redis, python)) = own_redis_and_portalocker() else {
        return;
    };
    let server = Server::on_redis(&redis);
    let client = server.client().await;
    let mut py = PyRedisLocks::start(&python, &redis, "db/schema");

    let reader = client
        .lock("db/schema")
        .redis()
        .shared()
        .acquire()
        .await
        .unwrap();
    assert!(
        py.acquire("r", "shared", 5.0).is_some(),
        "python reader joins a padlock reader"
    );
    assert_eq!(
        py.acquire("w", "exclusive", 0.0),
        None,
        "python writer refused while readers hold"
    );
    assert!(
        client
            .lock("db/schema")
            .redis()
            .try_acquire()
            .await
            .unwrap()
            .is_none(),
        "padlock writer refused"
    );
    let reader2 = server
        .client()
        .await
        .lock("db/schema")
        .redis()
        .shared()
        .acquire()
        .await
        .unwrap();
    reader.release().await.unwrap();
    reader2.release().await.unwrap();
    // Only the python reader is left: a padlock writer waits for it.
    let writer_client = server.client().await;
    let writer =
        tokio::spawn(async move { writer_client.lock("db/schema").redis().acquire().await });
    until_waiters(&client, "db/schema", Kind::Redis, 1).await;
    py.release("r");
    let writer = tokio::time::timeout(GUARD, writer)
        .await
        .expect("writer granted")
        .unwrap()
        .unwrap();
    assert_eq!(
        py.acquire("r2", "shared", 0.0),
        None,
        "python reader refused while a padlock writer holds"
    );
    writer.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_padlockd_instances_share_one_lock_space() {
    let Some(redis) = own_redis() else {
        return;
    };
    // Three instances, so two of them can take the fast path (alone behind
    // a fresh subscription) at the same moment.
    let servers = [
        Server::on_redis(&redis),
        Server::on_redis(&redis),
        Server::on_redis(&redis),
    ];
    let work = tempfile::tempdir().unwrap();
    let counter = work.path().join("counter");
    let inside = work.path().join("inside");
    let fences = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..9 {
        let client = Client::connect(servers[i % 3].url.clone()).await.unwrap();
        let (fences, counter, inside) = (fences.clone(), counter.clone(), inside.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                let guard = client.lock("counter").redis().acquire().await.unwrap();
                // A second holder at the same time finds the marker taken.
                let marker = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&inside);
                assert!(
                    marker.is_ok(),
                    "two holders at once (fence {})",
                    guard.fence()
                );
                fences.lock().await.push(guard.fence());
                let n: u64 = std::fs::read_to_string(&counter)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                // Not a synchronization: room for a wrongly granted second
                // holder to arrive while this one is inside.
                tokio::time::sleep(Duration::from_millis(1)).await;
                std::fs::write(&counter, (n + 1).to_string()).unwrap();
                std::fs::remove_file(&inside).unwrap();
                guard.release().await.unwrap();
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("rounds finish")
            .unwrap();
    }
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "180");
    assert_strictly_increasing(&fences.lock().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_an_instance_hands_its_locks_to_the_other() {
    let Some(redis) = own_redis() else {
        return;
    };
    let mut a = Server::on_redis(&redis);
    let b = Server::on_redis(&redis);
    let held = a
        .client()
        .await
        .lock("handoff")
        .redis()
        .acquire()
        .await
        .unwrap();
    let b_client = b.client().await;
    let waiter_client = b.client().await;
    let waiter = tokio::spawn(async move { waiter_client.lock("handoff").redis().acquire().await });
    until_waiters(&b_client, "handoff", Kind::Redis, 1).await;
    let killed = Instant::now();
    a.kill9();
    let granted = tokio::time::timeout(GUARD, waiter)
        .await
        .expect("granted after kill -9")
        .unwrap()
        .unwrap();
    eprintln!(
        "waiter on the other instance granted {:?} after kill -9",
        killed.elapsed()
    );
    assert!(granted.fence() > held.fence());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_death_is_noticed_and_fences_survive_its_restart() {
    let Some(mut redis) = own_redis() else {
        return;
    };
    let server = Server::on_redis(&redis);
    let client = server.client().await;
    let holders = vec![
        client.lock("a").redis().acquire().await.unwrap(),
        client.lock("b").redis().shared().acquire().await.unwrap(),
        server
            .client()
            .await
            .lock("b")
            .redis()
            .shared()
            .acquire()
            .await
            .unwrap(),
    ];
    let last_fence = holders.iter().map(|g| g.fence()).max().unwrap();
    let a_fence = holders[0].fence();
    // A waiter queued behind "a" keeps waiting through the outage.
    let waiter_client = server.client().await;
    let waiter = tokio::spawn(async move { waiter_client.lock("a").redis().acquire().await });
    until_waiters(&client, "a", Kind::Redis, 1).await;

    let killed = Instant::now();
    redis.kill9();
    for guard in &holders {
        let lost = tokio::time::timeout(Duration::from_secs(5), guard.lost())
            .await
            .expect("lost within 5 s");
        assert_eq!(lost.reason, LostReason::Backend, "{lost}");
    }
    eprintln!(
        "every holder told within {:?} of kill -9 of redis",
        killed.elapsed()
    );

    // While Redis is down, new redis acquires are refused clearly...
    let refused = eventually_ok("redis acquires refused as UNAVAILABLE", GUARD, async || {
        match client
            .lock("c")
            .redis()
            .wait(Duration::from_secs(1))
            .acquire()
            .await
        {
            Err(Error::Status(status)) if status.code() == tonic_code_unavailable() => Ok(status),
            Ok(_) => panic!("granted a redis lock while redis is down"),
            Err(other) => Err(other), // not noticed yet
        }
    })
    .await;
    assert!(refused.message().contains("redis"), "{}", refused.message());
    // ...and the server says it is not ready.
    let readyz = reqwest::get(format!("{}/readyz", server.url))
        .await
        .unwrap();
    assert_eq!(readyz.status().as_u16(), 503);
    let body = readyz.text().await.unwrap();
    assert!(body.contains("redis"), "{body}");
    // ...and file locks keep working.
    client
        .lock("file")
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    assert!(!waiter.is_finished(), "the waiter keeps waiting");

    redis.restart();
    let granted = tokio::time::timeout(GUARD, waiter)
        .await
        .expect("waiter granted once redis is back")
        .unwrap()
        .unwrap();
    assert!(
        granted.fence() > a_fence,
        "fence {} after restart, {a_fence} before",
        granted.fence()
    );
    // New acquires are accepted again once the monitor has seen Redis
    // answer (at most one health interval after it is back).
    let b = eventually_ok("redis acquires accepted again", GUARD, async || {
        let acquired = client.lock("b").redis().acquire().await;
        match acquired {
            Ok(guard) => Ok(guard),
            Err(Error::Status(s)) if s.code() == tonic_code_unavailable() => Err(s),
            Err(e) => panic!("{e}"),
        }
    })
    .await;
    assert!(
        b.fence() > last_fence,
        "fence {} after restart, {last_fence} before",
        b.fence()
    );
    let readyz = reqwest::get(format!("{}/readyz", server.url))
        .await
        .unwrap();
    assert_eq!(
        readyz.status().as_u16(),
        200,
        "ready again once redis answers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_is_noticed_within_the_bound() {
    let Some(redis) = own_redis() else {
        return;
    };
    let server = Server::on_redis(&redis);
    let client = server.client().await;
    let guard = client.lock("hang").redis().acquire().await.unwrap();
    let other = server
        .client()
        .await
        .lock("hang2")
        .redis()
        .shared()
        .acquire()
        .await
        .unwrap();
    let paused = Instant::now();
    redis.pause(true);
    for g in [&guard, &other] {
        let lost = tokio::time::timeout(Duration::from_secs(5), g.lost())
            .await
            .expect("told within 5 s");
        assert_eq!(lost.reason, LostReason::Backend, "{lost}");
    }
    eprintln!("holders told {:?} after SIGSTOP of redis", paused.elapsed());
    redis.pause(false);
    // Back to normal once Redis answers: the lock can be taken again.
    let again = eventually_ok("the lock taken again", GUARD, async || {
        match client
            .lock("hang")
            .redis()
            .wait(Duration::from_secs(5))
            .acquire()
            .await
        {
            Ok(g) => Ok(g),
            Err(Error::Status(s)) if s.code() == tonic_code_unavailable() => Err(s),
            Err(e) => panic!("{e}"),
        }
    })
    .await;
    assert!(again.fence() > guard.fence());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_lock_on_a_free_redis_lock_is_granted() {
    let Some(redis) = own_redis() else {
        return;
    };
    let server = Server::on_redis(&redis);
    let client = server.client().await;
    let guard = client.lock("try/free").redis().try_acquire().await.unwrap();
    let guard = guard.expect("a free redis lock is granted to a try-lock");
    assert!(
        client
            .lock("try/free")
            .redis()
            .try_acquire()
            .await
            .unwrap()
            .is_none()
    );
    guard.release().await.unwrap();
    let shared = client
        .lock("try/free")
        .redis()
        .shared()
        .try_acquire()
        .await
        .unwrap();
    assert!(shared.is_some(), "free again after the release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_holds_a_redis_lock() {
    let Some(redis) = own_redis() else {
        return;
    };
    let server = Server::on_redis(&redis);
    let mut hold = server
        .cli()
        .args(["hold", "--kind", "redis", "cli/lock"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(hold.stdout.take().unwrap());
    let line = read_line_starting(&mut out, "granted cli/lock");
    assert!(line.contains("fence="), "{line}");
    let status = server
        .cli()
        .args([
            "run", "--kind", "redis", "--wait", "0", "cli/lock", "--", "true",
        ])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(75));
    hold.kill().unwrap();
    hold.wait().unwrap();
    let status = server
        .cli()
        .args([
            "run", "--kind", "redis", "--wait", "10", "cli/lock", "--", "true",
        ])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_only_server_refuses_node_local_kinds() {
    let Some(redis) = own_redis() else {
        return;
    };
    let server = Server::on_redis_with(&redis, &["--kinds", "redis"]);
    let client = server.client().await;
    for request in [
        client.lock("k").acquire(),
        client.lock("k").semaphore(2).acquire(),
    ] {
        match request.await {
            Err(Error::Status(s)) => {
                assert_eq!(s.code(), tonic_code_unavailable());
                assert!(s.message().contains("--kinds"), "{}", s.message());
            }
            other => panic!("expected UNAVAILABLE, got {other:?}"),
        }
    }
    client
        .lock("k")
        .redis()
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
}

/// A `--redis-url` that names a database keeps the fence counters there,
/// also when the fence is drawn on the subscription's own connection (an
/// uncontended grant), where portalocker on that database finds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_live_in_the_database_the_url_names() {
    let Some(redis) = own_redis() else {
        return;
    };
    let url = format!("{}/5", redis.url);
    let server = Server::start_with_args(&["--redis-url", &url]);
    let client = server.client().await;
    let guard = client.lock("db/report").redis().acquire().await.unwrap();
    let counter = |db: &str| {
        let out = Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "-n", db])
            .args(["GET", "db/report-fence"])
            .output()
            .expect("redis-cli runs (it comes with redis-server)");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(counter("5"), guard.fence().to_string());
    assert_eq!(counter("0"), "", "no fence counter in database 0");
    let first = guard.fence();
    guard.release().await.unwrap();
    let again = client.lock("db/report").redis().acquire().await.unwrap();
    assert!(again.fence() > first);
    assert_eq!(counter("5"), again.fence().to_string());
}

/// A released lock's connection goes back to the pool clean (no
/// subscription, no name) and serves later grants, instead of one new
/// Redis connection per grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_connections_are_reused_clean() {
    let Some(redis) = own_redis() else {
        return;
    };
    let server = Server::on_redis(&redis);
    let client = server.client().await;
    let accepted = || -> u64 {
        let info = redis.command(&["INFO", "stats"]);
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("INFO stats has total_connections_received")
    };
    let before = accepted();
    let mut fences = Vec::new();
    for i in 0..50 {
        let name = format!("reuse/{}", i % 2);
        let guard = client.lock(&name).redis().acquire().await.unwrap();
        fences.push(guard.fence());
        guard.release().await.unwrap();
    }
    let opened = accepted() - before;
    assert!(
        opened < 25,
        "{opened} Redis connections opened for 50 grants (one each without reuse)"
    );
    for name in ["reuse/0", "reuse/1"] {
        assert_eq!(
            redis.command(&["PUBSUB", "NUMSUB", name]).lines().nth(1),
            Some("0"),
            "a pooled connection is still subscribed to {name}"
        );
    }
    let clients = redis.command(&["CLIENT", "LIST"]);
    assert!(
        !clients.contains("name=reuse/"),
        "a released lock's connection kept its name:\n{clients}"
    );
    let (even, odd): (Vec<_>, Vec<_>) = fences.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    for side in [even, odd] {
        let side: Vec<u64> = side.into_iter().map(|(_, f)| *f).collect();
        assert_strictly_increasing(&side);
    }
}
