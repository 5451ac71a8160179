//! Locking semantics against the real padlockd: mutual exclusion under
//! contention, fences, shared/exclusive mixes, semaphores, FIFO order,
//! try-lock, wait timeouts, two servers on one lock directory, and the CLI.

use padlock::{Client, Error, Kind};
use padlock_e2e::{
    Server, assert_strictly_increasing, read_line_starting, until_waiters, wait_child,
};
use std::io::BufReader;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tokio::sync::Mutex;

/// A counter in a file, incremented by read-modify-write: lost updates
/// show up as a short count if two clients are ever inside at once.
fn bump(path: &std::path::Path) {
    let n: u64 = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    std::fs::write(path, format!("{}\n", n + 1)).unwrap();
}

fn read_count(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Runs `clients` x `rounds` exclusive critical sections on `name`, spread
/// over the given servers; returns the fences in grant order.
async fn hammer(
    urls: &[String],
    name: &str,
    clients: usize,
    rounds: usize,
    counter: &std::path::Path,
) -> Vec<u64> {
    let fences = Arc::new(Mutex::new(Vec::with_capacity(clients * rounds)));
    let mut tasks = Vec::new();
    for i in 0..clients {
        let client = Client::connect(urls[i % urls.len()].clone()).await.unwrap();
        let (fences, counter, name) = (fences.clone(), counter.to_path_buf(), name.to_string());
        tasks.push(tokio::spawn(async move {
            for _ in 0..rounds {
                let guard = client.lock(&name).acquire().await.unwrap();
                // Recorded inside the critical section: the order is the grant order.
                fences.lock().await.push(guard.fence());
                bump(&counter);
                guard.release().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    Arc::try_unwrap(fences).unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_counter_is_exact_and_fences_increase() {
    let server = Server::start();
    let work = tempfile::tempdir().unwrap();
    let counter = work.path().join("counter");
    let fences = hammer(
        std::slice::from_ref(&server.url),
        "counter",
        8,
        200,
        &counter,
    )
    .await;
    assert_eq!(read_count(&counter), 1600);
    assert_eq!(fences.len(), 1600);
    assert_strictly_increasing(&fences);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_lock_dir_exclude_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let a = Server::start_in(dir.path(), &[]);
    let b = Server::start_in(dir.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    let counter = work.path().join("counter");
    let fences = hammer(
        &[a.url.clone(), b.url.clone()],
        "shared/counter",
        8,
        100,
        &counter,
    )
    .await;
    assert_eq!(read_count(&counter), 800);
    assert_strictly_increasing(&fences);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_overlap_a_writer() {
    let server = Server::start();
    // >0: that many readers inside; -1: one writer inside.
    let inside = Arc::new(AtomicI64::new(0));
    let max_readers = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let client = server.client().await;
        let (inside, max_readers) = (inside.clone(), max_readers.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..100 {
                let writer = (i + round) % 4 == 0;
                let builder = client.lock("rw");
                let guard = if writer {
                    builder.acquire().await
                } else {
                    builder.shared().acquire().await
                }
                .unwrap();
                if writer {
                    let prev = inside.compare_exchange(0, -1, Ordering::SeqCst, Ordering::SeqCst);
                    assert_eq!(prev, Ok(0), "a writer entered while others were inside");
                    tokio::task::yield_now().await;
                    inside.store(0, Ordering::SeqCst);
                } else {
                    let now = inside.fetch_add(1, Ordering::SeqCst);
                    assert!(now >= 0, "a reader entered while a writer was inside");
                    max_readers.fetch_max(now + 1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                }
                guard.release().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(inside.load(Ordering::SeqCst), 0);
    // Shared holders really did share at some point.
    let max = max_readers.load(Ordering::SeqCst);
    eprintln!("most readers inside at once: {max}");
    assert!(
        max >= 2,
        "readers never shared: at most {max} inside at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_never_admits_more_than_its_limit() {
    let server = Server::start();
    let inside = Arc::new(AtomicI64::new(0));
    let max_inside = Arc::new(AtomicI64::new(0));
    let slots = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = server.client().await;
        let (inside, max_inside, slots) = (inside.clone(), max_inside.clone(), slots.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                let guard = client.lock("pool").semaphore(3).acquire().await.unwrap();
                let slot = guard.slot().expect("semaphore grants carry a slot");
                assert!(slot < 3);
                assert!(
                    slots.lock().unwrap().insert(slot),
                    "slot {slot} granted twice at once"
                );
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max_inside.fetch_max(now, Ordering::SeqCst);
                tokio::task::yield_now().await;
                inside.fetch_sub(1, Ordering::SeqCst);
                slots.lock().unwrap().remove(&slot);
                guard.release().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let max = max_inside.load(Ordering::SeqCst);
    assert!((1..=3).contains(&max), "max inside was {max}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_go_in_arrival_order() {
    let server = Server::start();
    let client = server.client().await;
    let holder = client.lock("fifo").acquire().await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let c = server.client().await;
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let guard = c.lock("fifo").acquire().await.unwrap();
            order.lock().await.push(i);
            guard.release().await.unwrap();
        }));
        until_waiters(&client, "fifo", Kind::File, i + 1).await;
    }
    let info = client.show("fifo", Kind::File).await.unwrap().unwrap();
    let positions: Vec<u32> = info.waiters.iter().map(|w| w.position).collect();
    assert_eq!(positions, vec![1, 2, 3, 4, 5, 6]);
    holder.release().await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(*order.lock().await, vec![0, 1, 2, 3, 4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_lock_and_wait_timeout() {
    let server = Server::start();
    let client = server.client().await;
    let other = server.client().await;
    let guard = client.lock("busy").acquire().await.unwrap();
    assert!(other.lock("busy").try_acquire().await.unwrap().is_none());
    match other
        .lock("busy")
        .wait(Duration::from_millis(200))
        .acquire()
        .await
    {
        Err(Error::NotAcquired(message)) => {
            assert!(message.contains("not acquired within 200ms"), "{message}")
        }
        other => panic!("expected NotAcquired, got {other:?}"),
    }
    // The timed-out waiter left the queue.
    let info = client.show("busy", Kind::File).await.unwrap().unwrap();
    assert!(info.waiters.is_empty(), "{info:?}");
    let fence = guard.fence();
    guard.release().await.unwrap();
    let next = other
        .lock("busy")
        .try_acquire()
        .await
        .unwrap()
        .expect("free after release");
    assert!(next.fence() > fence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspection_lists_holders_and_waiters() {
    let server = Server::start();
    let client = server.client().await;
    let _held = client
        .lock("jobs/a")
        .owner("alice")
        .label("team", "data")
        .acquire()
        .await
        .unwrap();
    let _sem = client
        .lock("jobs/pool")
        .semaphore(2)
        .acquire()
        .await
        .unwrap();
    let waiter_client = server.client().await;
    let waiter = tokio::spawn(async move {
        waiter_client
            .lock("jobs/a")
            .owner("bob")
            .acquire()
            .await
            .map(|g| g.fence())
    });
    until_waiters(&client, "jobs/a", Kind::File, 1).await;
    let locks = client.list("jobs/").await.unwrap();
    let names: Vec<&str> = locks.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, vec!["jobs/a", "jobs/pool"]);
    let a = &locks[0];
    assert_eq!(a.holders[0].owner, "alice");
    assert_eq!(
        a.holders[0].labels.get("team").map(String::as_str),
        Some("data")
    );
    assert!(a.holders[0].peer.starts_with("127.0.0.1:"));
    assert_eq!(a.waiters[0].owner, "bob");
    assert_eq!(locks[1].limit, 2);
    assert_eq!(locks[1].holders[0].slot, Some(0));
    assert!(client.list("nothing/").await.unwrap().is_empty());
    assert!(
        client
            .show("jobs/none", Kind::File)
            .await
            .unwrap()
            .is_none()
    );
    let info = client.server_info().await.unwrap();
    assert_eq!((info.holders, info.waiters), (2, 1));
    assert!(info.rss_bytes > 0);
    waiter.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_run_passes_fence_and_exit_status() {
    let server = Server::start();
    let out = server
        .cli()
        .args([
            "run",
            "jobs/cli",
            "--",
            "sh",
            "-c",
            "echo \"fence=$PADLOCK_FENCE name=$PADLOCK_NAME slot=${PADLOCK_SLOT-none}\"; exit 7",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("fence=") && stdout.contains("name=jobs/cli slot=none"),
        "{stdout}"
    );
    let fence: u64 = stdout["fence=".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(fence > 0);

    let out = server
        .cli()
        .args([
            "run",
            "--limit",
            "2",
            "pool",
            "--",
            "sh",
            "-c",
            "echo $PADLOCK_SLOT",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_run_exits_75_when_not_acquired() {
    let server = Server::start();
    let client = server.client().await;
    let _guard = client.lock("taken").acquire().await.unwrap();
    let out = server
        .cli()
        .args(["run", "--wait", "0.2", "taken", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not acquired"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_run_terminates_the_command_when_the_lock_is_lost() {
    let server = Server::start();
    let mut child = server
        .cli()
        .args([
            "run",
            "lost",
            "--",
            "sh",
            "-c",
            "trap 'echo got-term; exit 0' TERM; echo started; while :; do sleep 0.05; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    read_line_starting(&mut out, "started");
    // Shutting the server down makes every holder lose its lock.
    server.signal(rustix::process::Signal::TERM);
    read_line_starting(&mut out, "got-term");
    let status = wait_child(&mut child, Duration::from_secs(10)).expect("padlock run exits");
    assert_eq!(status.code(), Some(70));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("shutting down"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_list_and_show_print_tables() {
    let server = Server::start();
    let client = server.client().await;
    let guard = client
        .lock("jobs/table")
        .owner("nightly-report")
        .acquire()
        .await
        .unwrap();
    let out = server.cli().arg("list").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("NAME") && header.contains("HOLDERS") && header.contains("FENCE"),
        "{text}"
    );
    let row = lines.next().unwrap();
    assert!(
        row.starts_with("jobs/table")
            && row.contains(&guard.fence().to_string())
            && row.ends_with("nightly-report"),
        "{text}"
    );

    let out = server.cli().args(["show", "jobs/table"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("holders:")
            && text.contains(guard.holder_id())
            && text.contains("nightly-report"),
        "{text}"
    );
    let out = server.cli().args(["show", "jobs/none"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_answers_serving() {
    let server = Server::start();
    assert!(server.client().await.health_check().await.unwrap());
    let out = server.cli().arg("health").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "serving");
    let out = server
        .cli()
        .args(["--server", "http://127.0.0.1:1", "health"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let server = Server::start();
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().expect("a reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reply {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == "padlock.v1.Padlock"), "{names:?}");
    assert!(
        names.iter().any(|n| n == "grpc.health.v1.Health"),
        "{names:?}"
    );
}
