//! Nothing wedges padlockd (issue 9): a local user who can write the lock
//! directory, crafted names and requests, floods, and browsers. Each test
//! runs one attack against the real padlockd, checks that only the
//! attacked name (or the attacking client) is affected, and that a fresh
//! client is unharmed while it runs.

use padlock::proto as pb;
use padlock::{Error, Kind};
use padlock_e2e::h2::{RawH2, guarded};
use padlock_e2e::http::{self, error_code, json};
use padlock_e2e::{Server, assert_unharmed, bin, eventually, until_waiters};
use pb::padlock_client::PadlockClient;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::time::{Duration, Instant};
use tonic::Code;

const GUARD: Duration = Duration::from_secs(20);

fn raw_acquire(name: &str) -> pb::Acquire {
    pb::Acquire {
        name: name.to_string(),
        kind: pb::Kind::File as i32,
        owner: "hardening test".into(),
        ..pb::Acquire::default()
    }
}

/// Opens a Hold stream with `acquire` and returns the status it ends with
/// (or `Ok` with the first message).
async fn first_answer(
    server: &Server,
    acquire: pb::Acquire,
) -> Result<pb::hold_response::Msg, tonic::Status> {
    let mut client = PadlockClient::connect(server.url.clone()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(pb::HoldRequest {
        msg: Some(pb::hold_request::Msg::Acquire(acquire)),
    })
    .await
    .unwrap();
    let mut responses = guarded(
        "open Hold",
        client.hold(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await?
    .into_inner();
    let msg = guarded("first Hold answer", responses.message()).await?;
    drop(tx);
    Ok(msg.and_then(|m| m.msg).expect("a message"))
}

#[track_caller]
fn assert_refused(
    result: Result<pb::hold_response::Msg, tonic::Status>,
    code: Code,
    fragment: &str,
) {
    match result {
        Err(status) => {
            assert_eq!(status.code(), code, "{:?}", status.message());
            assert!(
                status.message().contains(fragment),
                "{:?} lacks {fragment:?}",
                status.message()
            );
        }
        Ok(msg) => panic!("expected {code:?}, got {msg:?}"),
    }
}

// --- A. One name never stalls another ------------------------------------

/// A local user holding the flock of one name's fence counter
/// (`flock -x .padlock/fences/file/NAME.fence sleep ...`) delays that name
/// only: other names are granted, listing answers, and the name is granted
/// as soon as the counter is let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_fence_counter_delays_only_its_name() {
    let server = Server::start();
    let client = server.client().await;
    client
        .lock("victim")
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let counter = server.lock_dir.join(".padlock/fences/file/victim.fence");
    let mut outside = std::process::Command::new("flock")
        .args([
            "-x",
            counter.to_str().unwrap(),
            "-c",
            "echo locked; read line",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("flock(1)");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(outside.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");

    let waiter = {
        let client = client.clone();
        tokio::spawn(async move { client.lock("victim").acquire().await })
    };
    until_waiters(&client, "victim", Kind::File, 1).await;
    for i in 0..20 {
        let guard = guarded("another name", client.lock(format!("other/{i}")).acquire())
            .await
            .unwrap();
        guard.release().await.unwrap();
    }
    let (status, body) = guarded(
        "list",
        json(http::client().get(format!("{}/v1/locks", server.url))),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_unharmed(&server).await;
    assert!(
        !waiter.is_finished(),
        "granted while the counter was locked"
    );

    drop(outside.stdin.take()); // flock(1) exits, the counter is free
    let guard = guarded("the name after the counter is free", waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(guard.fence() > 0);
    let _ = outside.wait();
}

/// A FIFO (with or without a reader) or a socket where a lock file would
/// be: that name gets a clear error at once; nothing else waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifos_and_sockets_in_the_lock_dir_fail_their_name_only() {
    let server = Server::start();
    let fifo = server.lock_dir.join("f");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let _socket = std::os::unix::net::UnixListener::bind(server.lock_dir.join("s")).unwrap();
    std::fs::create_dir(server.lock_dir.join("sem")).unwrap();
    let sem_fifo = server.lock_dir.join("sem/x.01.lock");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&sem_fifo)
            .status()
            .unwrap()
            .success()
    );

    let refused = first_answer(&server, raw_acquire("f")).await;
    assert_refused(refused, Code::InvalidArgument, "a FIFO");
    let refused = first_answer(&server, raw_acquire("s")).await;
    assert_refused(refused, Code::InvalidArgument, "not a regular file");
    // A reader on the FIFO makes its open succeed: still refused.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(0o4000) // O_NONBLOCK
        .open(&fifo)
        .unwrap();
    let refused = first_answer(&server, raw_acquire("f")).await;
    assert_refused(refused, Code::InvalidArgument, "a FIFO");
    // A semaphore whose second slot is a FIFO: the first slot is granted,
    // the second is refused, not waited on.
    let client = server.client().await;
    let first = client.lock("sem/x").semaphore(2).acquire().await.unwrap();
    assert_eq!(first.slot(), Some(0));
    match client.lock("sem/x").semaphore(2).acquire().await {
        Err(Error::Status(s)) => {
            assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
            assert!(s.message().contains("FIFO"), "{}", s.message());
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    assert_unharmed(&server).await;
}

/// `ln -s .padlock state-link`: no name reaches the fence state through
/// it, so locking `victim` is not blocked by a client "holding"
/// `state-link/fences/file/victim.fence`, and SIGTERM still ends padlockd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_name_reaches_the_state_dir_through_a_symlink() {
    let mut server = Server::start_with_args(&["--shutdown-grace", "2s"]);
    std::os::unix::fs::symlink(".padlock", server.lock_dir.join("state-link")).unwrap();
    std::fs::create_dir(server.lock_dir.join("real")).unwrap();
    std::os::unix::fs::symlink("real", server.lock_dir.join("inside")).unwrap();
    let client = server.client().await;
    client
        .lock("victim")
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    for name in [
        "state-link/fences/file/victim.fence",
        "state-link/generation",
        "inside/x",
    ] {
        let refused = first_answer(&server, raw_acquire(name)).await;
        assert_refused(refused, Code::InvalidArgument, "goes through a symlink");
    }
    let guard = guarded("victim", client.lock("victim").acquire())
        .await
        .unwrap();
    let before = std::fs::read_to_string(server.lock_dir.join(".padlock/generation")).unwrap();
    assert!(!before.is_empty());
    drop(guard);
    server.signal(rustix::process::Signal::TERM);
    let status = server.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
}

/// padlockd will not write its fence state through a symlinked `.padlock`.
#[test]
fn a_symlinked_state_dir_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), dir.path().join(".padlock")).unwrap();
    let mut child = std::process::Command::new(bin("padlockd"))
        .args(["--listen", "127.0.0.1:0", "--lock-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = padlock_e2e::wait_child(&mut child, Duration::from_secs(10));
    if status.is_none() {
        let _ = child.kill();
        panic!("padlockd started on a symlinked .padlock");
    }
    assert!(!status.unwrap().success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains(".padlock") && stderr.contains("symlink"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
}

/// `.padlock/` and what is in it belong to padlockd's user alone (an older
/// 0755 one is tightened at start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_dir_is_private() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(".padlock")).unwrap();
    std::fs::set_permissions(
        dir.path().join(".padlock"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let client = server.client().await;
    client
        .lock("a/b")
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let mode = |p: &str| {
        std::fs::metadata(dir.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(".padlock"), 0o700);
    assert_eq!(mode(".padlock/fences"), 0o700);
    assert_eq!(mode(".padlock/generation"), 0o600);
    assert_eq!(mode(".padlock/fences/file/a.d/b.fence"), 0o600);
    assert_eq!(mode(".padlock/fences/file/a.d") & 0o077, 0);
}

// --- C. Bounded resources ------------------------------------------------

/// Waits too long for any deadline are refused as the query form is, on
/// both transports; the server stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_waits_are_refused_not_a_panic() {
    let server = Server::start();
    let web = http::client();
    for body in [
        r#"{"wait": 1e19}"#,
        r#"{"wait": 1e300}"#,
        r#"{"wait": 31536001}"#,
    ] {
        let request = web
            .post(format!("{}/v1/locks/w/hold", server.url))
            .header("content-type", "application/json")
            .body(body);
        let (status, reply) = guarded("hold", json(request)).await;
        assert_eq!(status, 400, "{body}: {reply}");
        assert_eq!(error_code(&reply), "invalid_argument");
    }
    let (status, _) =
        json(web.post(format!("{}/v1/locks/w/hold?wait=99999999999m", server.url))).await;
    assert_eq!(status, 400);
    let refused = first_answer(
        &server,
        pb::Acquire {
            wait_ms: Some(u64::MAX),
            ..raw_acquire("w")
        },
    )
    .await;
    assert_refused(refused, Code::InvalidArgument, "longest allowed");
    assert_unharmed(&server).await;
}

/// One lock with 200 waiters carrying the largest labels: a list shows a
/// glimpse of each lock with totals, a show pages its waiters, and no
/// answer grows with the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_and_shows_are_bounded() {
    let server = Server::start();
    let client = server.client().await;
    let _holder = client.lock("big").acquire().await.unwrap();
    let mut waiters = Vec::new();
    for i in 0..200 {
        let mut lock = client.lock("big").owner("o".repeat(256));
        for l in 0..16 {
            lock = lock.label(format!("{l:02}{}", "k".repeat(254)), "v".repeat(256));
        }
        let id = i;
        waiters.push(tokio::spawn(async move {
            let _ = id;
            lock.acquire().await
        }));
    }
    until_waiters(&client, "big", Kind::File, 200).await;
    // HTTP list: 16 waiters with totals, far below the ~1.7 MB of the queue.
    let response = http::client()
        .get(format!("{}/v1/locks?limit=1", server.url))
        .send()
        .await
        .unwrap();
    let text = response.text().await.unwrap();
    assert!(text.len() < 200_000, "list answer is {} bytes", text.len());
    let list: serde_json::Value = serde_json::from_str(&text).unwrap();
    let lock = &list["locks"][0];
    assert_eq!(lock["waiters_total"], 200);
    assert_eq!(lock["waiters"].as_array().unwrap().len(), 16);
    // HTTP show: pages of waiters.
    let (status, page) = json(http::client().get(format!(
        "{}/v1/locks/big?waiter_offset=190&waiter_limit=50",
        server.url
    )))
    .await;
    assert_eq!(status, 200);
    let shown = page["waiters"].as_array().unwrap();
    assert_eq!(shown.len(), 10);
    assert_eq!(shown[0]["position"], 191);
    let (status, page) = json(http::client().get(format!("{}/v1/locks/big", server.url))).await;
    assert_eq!(status, 200);
    assert!(page["waiters"].as_array().unwrap().len() <= 100);
    let (status, _) =
        json(http::client().get(format!("{}/v1/locks/big?waiter_limit=5000", server.url))).await;
    assert_eq!(status, 400);
    // gRPC: the same bounds.
    let mut raw = PadlockClient::connect(server.url.clone()).await.unwrap();
    let info = raw
        .get_lock(pb::GetLockRequest {
            name: "big".into(),
            waiter_offset: 100,
            waiter_limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.waiters_total, 200);
    assert!(!info.waiters.is_empty() && info.waiters.len() <= 100);
    assert_eq!(info.waiters[0].position, 101);
    let page = raw
        .list_locks(pb::ListLocksRequest {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.locks.len(), 1);
    assert_eq!(page.locks[0].waiters.len(), 16);
    assert_eq!(page.locks[0].waiters_total, 200);
    assert_unharmed(&server).await;
    for w in &waiters {
        w.abort();
    }
}

/// An HTTP/2 client that never opens its flow-control window asks for
/// lists: it is disconnected after the request timeout instead of pinning
/// the answers, and others are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_disconnected() {
    let server = Server::start_with_args(&["--request-timeout", "1s", "--idle-timeout", "0s"]);
    let client = server.client().await;
    let _held: Vec<_> = {
        let mut held = Vec::new();
        for i in 0..50 {
            held.push(client.lock(format!("l/{i}")).acquire().await.unwrap());
        }
        held
    };
    let mut raw = RawH2::connect(server.addr).await;
    raw.handshake_with_window(0).await;
    for stream in (1..=39).step_by(2) {
        raw.open_get(stream, "/v1/locks?limit=1000").await;
    }
    let started = Instant::now();
    // Headers come, bodies cannot; then the server gives up on us.
    let closed = tokio::time::timeout(GUARD, async {
        while raw.next_frame_or_eof().await.is_some() {}
    })
    .await;
    assert!(closed.is_ok(), "still open after {GUARD:?}");
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(15), "closed after {waited:?}");
    assert_unharmed(&server).await;
}

/// `--max-holds`: lock requests beyond it are refused with
/// RESOURCE_EXHAUSTED; held locks are untouched and the place is free
/// again once one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_holds_caps_open_lock_requests() {
    let server = Server::start_with_args(&["--max-holds", "5"]);
    let client = server.client().await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(client.lock(format!("h/{i}")).acquire().await.unwrap());
    }
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.lock("h/0").acquire().await })
        })
        .collect();
    until_waiters(&client, "h/0", Kind::File, 2).await;
    match client.lock("h/new").acquire().await {
        Err(Error::Status(s)) => {
            assert_eq!(s.code(), Code::ResourceExhausted);
            assert!(s.message().contains("--max-holds"), "{}", s.message());
        }
        other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
    }
    let (status, body) =
        json(http::client().post(format!("{}/v1/locks/h/new/hold", server.url))).await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (429, "too_many_holds")
    );
    assert!(held.iter().all(|g| g.is_held()));
    let metrics = http::client()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metrics = http::parse_metrics(&metrics);
    assert_eq!(metrics.get("padlock_holds"), Some(&5.0));
    held.pop().unwrap().release().await.unwrap();
    client.lock("h/new").acquire().await.unwrap();
    for w in waiters {
        w.abort();
    }
}

/// With few descriptors, one client holding many file locks gets
/// RESOURCE_EXHAUSTED past the budget (and not before), while connections,
/// health and other clients go on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_descriptor_budget_keeps_a_reserve() {
    // 400 descriptors: 256 kept back, 144 for locks.
    let server = Server::start_with_nofile(400, &[]);
    let client = server.client().await;
    let mut held = Vec::new();
    let refused = loop {
        match client
            .lock(format!("fd/{}", held.len()))
            .wait(Duration::ZERO)
            .acquire()
            .await
        {
            Ok(guard) => held.push(guard),
            Err(err) => break err,
        }
        assert!(held.len() <= 400, "no budget at all");
    };
    match refused {
        Error::Status(s) => {
            assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
            assert!(s.message().contains("file descriptor"), "{}", s.message());
        }
        other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
    }
    // Every one of the 144: the fence counters kept open between grants
    // (spares) give way to locks.
    assert_eq!(held.len(), 144, "locks before the budget ran out");
    // New connections, health and listing still work.
    for _ in 0..20 {
        let other = server.client().await;
        other.list("").await.unwrap();
    }
    let (status, _) = json(http::client().get(format!("{}/healthz", server.url))).await;
    assert_eq!(status, 200);
    // Freeing one lets one more in.
    held.pop().unwrap().release().await.unwrap();
    let again = client.lock("fd/again").acquire().await.unwrap();
    assert!(held.iter().all(|g| g.is_held()));
    drop(again);
}

/// Names are limited in depth (each component may be a directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_limited_in_depth() {
    let server = Server::start();
    let deep = vec!["d"; 17].join("/");
    let refused = first_answer(&server, raw_acquire(&deep)).await;
    assert_refused(refused, Code::InvalidArgument, "--max-name-components");
    assert!(!server.lock_dir.join("d").exists(), "a directory was made");
    let deeper = Server::start_with_args(&["--max-name-components", "20"]);
    let client = deeper.client().await;
    client.lock(&deep).acquire().await.unwrap();
}

/// A connection that sends one byte of the preface, or only the preface,
/// is not kept until the idle timeout (here: never).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_prefaces_are_closed_after_the_request_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start_with_args(&["--request-timeout", "1s", "--idle-timeout", "0s"]);
    for sent in [
        &b"P"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1\r\n",
    ] {
        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(sent).await.unwrap();
        let started = Instant::now();
        let mut buf = vec![0u8; 4096];
        loop {
            match guarded("the server closes", tcp.read(&mut buf)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue, // SETTINGS, GOAWAY, a 408
            }
        }
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(10), "{sent:?}: {waited:?}");
    }
    assert_unharmed(&server).await;
}

// --- D. Isolation ----------------------------------------------------------

fn token_file(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("tokens");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

async fn with_token(server: &Server, token: &str) -> padlock::Client {
    padlock::Client::builder(server.url.clone())
        .token(token)
        .connect()
        .await
        .unwrap()
}

/// A token's quota bounds what it can hold and await; other tokens are
/// unaffected, and the global caps are not reachable by one quota'd token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_quotas_keep_tokens_apart() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(
        dir.path(),
        "tok-a team-a/ max_holds=3\ntok-b team-b/ max_holds=3\n",
    );
    let server = Server::start_with_args(&["--client-token-file", tokens.to_str().unwrap()]);
    let a = with_token(&server, "tok-a").await;
    let b = with_token(&server, "tok-b").await;
    let mut held = vec![
        a.lock("team-a/1").acquire().await.unwrap(),
        a.lock("team-a/2").acquire().await.unwrap(),
    ];
    let waiter = {
        let a = a.clone();
        tokio::spawn(async move { a.lock("team-a/1").acquire().await })
    };
    until_waiters(&a, "team-a/1", Kind::File, 1).await;
    match a.lock("team-a/3").acquire().await {
        Err(Error::Status(s)) => {
            assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
            assert!(s.message().contains("quota"), "{}", s.message());
        }
        other => panic!("expected the quota, got {other:?}"),
    }
    let (status, body) = json(
        http::client()
            .post(format!("{}/v1/locks/team-a/3/hold?wait=0", server.url))
            .bearer_auth("tok-a"),
    )
    .await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (429, "quota_exceeded")
    );
    // Team b is not affected.
    for i in 0..3 {
        held.push(b.lock(format!("team-b/{i}")).acquire().await.unwrap());
    }
    // Ending one of a's requests frees its place.
    waiter.abort();
    let _ = waiter.await;
    eventually("a's quota freed", GUARD, async || {
        a.lock("team-a/3").wait(Duration::ZERO).acquire().await.ok()
    })
    .await;
}

/// A prefixed token learns only about its own names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_info_is_limited_to_the_token_scope() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path(), "tok-a team-a/\ntok-all\n");
    let server = Server::start_with_args(&["--client-token-file", tokens.to_str().unwrap()]);
    let a = with_token(&server, "tok-a").await;
    let all = with_token(&server, "tok-all").await;
    let _mine = a.lock("team-a/x").acquire().await.unwrap();
    let _theirs = all.lock("team-b/x").acquire().await.unwrap();
    let _theirs2 = all.lock("team-b/y").acquire().await.unwrap();
    let info = a.server_info().await.unwrap();
    assert_eq!((info.locks, info.holders, info.waiters), (1, 1, 0));
    assert_eq!(info.lock_dir, "");
    assert_eq!(info.rss_bytes, 0);
    let info = all.server_info().await.unwrap();
    assert_eq!((info.locks, info.holders), (3, 3));
    assert!(!info.lock_dir.is_empty());
    // Lists are scoped too.
    let listed = a.list("").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "team-a/x");
}

/// A web page on another site cannot take or revoke a lock, and a page on
/// a DNS name rebound to 127.0.0.1 cannot reach padlockd at all; the
/// server's own origin, curl and the SDK can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_from_other_sites_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let admin = http::token_file(dir.path(), "s3cret");
    let server = Server::start_with_args(&[
        "--admin-token-file",
        admin.to_str().unwrap(),
        "--allowed-hosts",
        "locks.internal",
    ]);
    let web = http::client();
    let hold = format!("{}/v1/locks/csrf/hold?wait=0", server.url);
    let (status, body) = json(
        web.post(&hold)
            .header("origin", "http://evil.example")
            .header("content-type", "text/plain")
            .body("x"),
    )
    .await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (403, "forbidden_origin")
    );
    let (status, _) = json(web.post(&hold).header("sec-fetch-site", "cross-site")).await;
    assert_eq!(status, 403);
    // DNS rebinding: right address, foreign name.
    let (status, body) = json(
        web.get(format!("{}/v1/locks", server.url))
            .header("host", "evil.example:7420"),
    )
    .await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (403, "forbidden_origin")
    );
    let (status, _) = json(
        web.get(format!("{}/v1/locks", server.url))
            .header("host", "locks.internal"),
    )
    .await;
    assert_eq!(status, 200);
    // Nothing was taken.
    assert!(
        server
            .client()
            .await
            .show("csrf", Kind::File)
            .await
            .unwrap()
            .is_none()
    );
    // Same origin (the dashboard), and plain clients, still work.
    let origin = format!("http://{}", server.addr);
    let mut lines = http::hold(&web, &server.url, "csrf/hold").await;
    let granted = lines.expect("granted").await;
    let id = granted["id"].as_str().unwrap().to_string();
    let (status, body) = json(
        web.delete(format!("{}/v1/locks/csrf/holders/{id}", server.url))
            .header("origin", &origin)
            .bearer_auth("s3cret"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // gRPC clients that name another host are refused the same way.
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .origin("http://evil.example:7420".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let refused = PadlockClient::new(channel)
        .list_locks(pb::ListLocksRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Code::PermissionDenied,
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains("--allowed-hosts"),
        "{}",
        refused.message()
    );
    assert_unharmed(&server).await;
}

/// Sends messages as raw bytes, decodes replies as `pb::HoldResponse`.
#[derive(Clone, Default)]
struct RawBytes;

struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = pb::HoldResponse;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<pb::HoldResponse>, tonic::Status> {
        use prost::Message;
        pb::HoldResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = pb::HoldResponse;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// A protobuf string that is not UTF-8 is the client's fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_is_invalid_argument() {
    let server = Server::start();
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    // HoldRequest{acquire: Acquire{name: b"\xff\xfe"}}
    let acquire = [0x0a, 0x02, 0xff, 0xfe];
    let mut message = vec![0x0a, acquire.len() as u8];
    message.extend_from_slice(&acquire);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(message).await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/padlock.v1.Padlock/Hold");
    let answer = grpc
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            path,
            RawBytes,
        )
        .await;
    let status = match answer {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            guarded("status", stream.message()).await.unwrap_err()
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(
        status.message().contains("malformed"),
        "{}",
        status.message()
    );
    drop(tx);
    assert_unharmed(&server).await;
}

/// Names that would display as other names are refused; NFC and NFD
/// spellings are two locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofing_names_are_refused_and_names_compare_by_bytes() {
    let server = Server::start();
    for name in ["invoice\u{202E}fdp.exe", "a\u{2066}b", "x\u{200F}"] {
        let refused = first_answer(&server, raw_acquire(name)).await;
        assert_refused(refused, Code::InvalidArgument, "bidirectional control");
    }
    let refused = first_answer(
        &server,
        pb::Acquire {
            owner: "admin\u{202E}".into(),
            ..raw_acquire("ok")
        },
    )
    .await;
    assert_refused(refused, Code::InvalidArgument, "owner");
    let client = server.client().await;
    let nfc = client.lock("caf\u{e9}").acquire().await.unwrap();
    let nfd = client
        .lock("cafe\u{301}")
        .wait(Duration::ZERO)
        .acquire()
        .await
        .unwrap();
    assert_ne!(nfc.holder_id(), nfd.holder_id());
}

/// SIGTERM ends padlockd within the grace even with clients that never
/// read, stalled prefaces and a locked fence counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_padlockd_whatever_is_stuck() {
    use tokio::io::AsyncWriteExt;
    let mut server = Server::start_with_args(&["--shutdown-grace", "2s"]);
    let client = server.client().await;
    let _held = client.lock("held").acquire().await.unwrap();
    client
        .lock("stuck")
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let counter = server.lock_dir.join(".padlock/fences/file/stuck.fence");
    let counter = std::fs::File::open(counter).unwrap();
    rustix::fs::flock(&counter, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let stuck = {
        let client = client.clone();
        tokio::spawn(async move { client.lock("stuck").acquire().await })
    };
    until_waiters(&client, "stuck", Kind::File, 1).await;
    let mut stalled = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stalled.write_all(b"P").await.unwrap();
    let mut raw = RawH2::connect(server.addr).await;
    raw.handshake_with_window(0).await;
    raw.open_get(1, "/v1/locks").await;
    let sent = Instant::now();
    server.signal(rustix::process::Signal::TERM);
    let status = server.wait_exit(Duration::from_secs(10));
    let took = sent.elapsed();
    eprintln!("exited {status:?} {took:?} after SIGTERM");
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(stuck.await.unwrap().is_err());
    drop(counter);
}

// --- E. Fairness across processes -----------------------------------------

/// Two padlockd on one lock directory: when one hands a lock from its
/// holder to its next waiter, a waiter of the other (blocked, announced)
/// gets its turn first, and then the first one's waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn padlockd_processes_on_one_directory_take_turns() {
    let dir = tempfile::tempdir().unwrap();
    let a = Server::start_in(dir.path(), &[]);
    let b = Server::start_in(dir.path(), &[]);
    let a_client = a.client().await;
    let b_client = b.client().await;
    let first = a_client.lock("turns").acquire().await.unwrap();
    let a_next = {
        let client = a.client().await;
        tokio::spawn(async move { client.lock("turns").acquire().await })
    };
    until_waiters(&a_client, "turns", Kind::File, 1).await;
    let b_waiter = {
        let client = b.client().await;
        tokio::spawn(async move { client.lock("turns").acquire().await })
    };
    until_waiters(&b_client, "turns", Kind::File, 1).await;
    // A waiter is listed as soon as it queues; b announces it (a shared
    // flock on its .want file) once its first attempt finds the lock
    // taken. Released before that, the lock would go to a's waiter.
    let want = dir.path().join(".padlock/wanted/file/turns.want");
    eventually("b's announcement", GUARD, async || {
        let file = std::fs::File::open(&want).ok()?;
        let exclusive = rustix::fs::FlockOperation::NonBlockingLockExclusive;
        rustix::fs::flock(&file, exclusive).is_err().then_some(())
    })
    .await;
    drop(first);
    let b_granted = guarded("b's turn", b_waiter).await.unwrap().unwrap();
    assert!(!a_next.is_finished(), "a's own waiter went first");
    let a_granted = {
        drop(b_granted);
        guarded("then a's waiter", a_next).await.unwrap().unwrap()
    };
    assert!(a_granted.fence() > 0);
}

/// Clients that never read pin the places for bounded answers: the
/// answers beyond the places are refused at once, health checks still
/// answer, and the pinning connections are closed after the request
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_answers_cannot_starve_health_or_pin_memory() {
    let server = Server::start_with_args(&["--request-timeout", "2s", "--idle-timeout", "0s"]);
    let client = server.client().await;
    let _held: Vec<_> = {
        let mut held = Vec::new();
        for i in 0..300 {
            held.push(
                heavy(&client, &format!("pinned/{i}"))
                    .acquire()
                    .await
                    .unwrap(),
            );
        }
        held
    };
    // The first two connections get the 16 places of this client address
    // (a window of 1 byte takes a first byte of each answer); the others
    // are refused, and do not read their refusals either.
    let mut pinning = Vec::new();
    for window in [0, 1, 0, 0, 0] {
        let mut raw = RawH2::connect(server.addr).await;
        raw.handshake_with_window(window).await;
        for stream in (1..=15).step_by(2) {
            raw.open_get(stream, "/v1/locks?limit=1000").await;
        }
        pinning.push(raw);
    }
    // 5 connections x 8 answers from one address: past the 16 places of
    // one client address, answers are refused at once, not queued.
    let started = Instant::now();
    let (status, body) = json(http::client().get(format!("{}/v1/locks?limit=1", server.url))).await;
    assert!(status == 503 || status == 200, "{status}: {body}");
    if status == 503 {
        assert_eq!(error_code(&body), "busy");
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // Health and readiness take no place: they answer at once.
    for path in ["/healthz", "/readyz"] {
        let started = Instant::now();
        let (status, _) = json(http::client().get(format!("{}{path}", server.url))).await;
        assert_eq!(status, 200, "{path}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{path} {:?}",
            started.elapsed()
        );
    }
    assert!(guarded("gRPC health", client.health_check()).await.unwrap());
    // The connections that do not read are closed after the request timeout.
    for (i, mut raw) in pinning.into_iter().enumerate() {
        let closed = tokio::time::timeout(GUARD, async {
            while raw.next_frame_or_eof().await.is_some() {}
        })
        .await;
        assert!(
            closed.is_ok(),
            "pinning connection {i} is still open:\n{}",
            raw.history()
        );
    }
    assert_unharmed(&server).await;
}

fn heavy(client: &padlock::Client, name: &str) -> padlock::LockBuilder {
    let mut lock = client.lock(name).owner("o".repeat(256));
    for l in 0..16 {
        lock = lock.label(format!("{l:02}{}", "k".repeat(254)), "v".repeat(256));
    }
    lock
}

/// A `.padlock` made by another user (while padlockd was stopped, in a
/// lock directory others may write) is refused: it would be theirs to
/// rewrite. Needs root, to make a directory of another user's.
#[test]
fn a_state_dir_of_another_user_stops_startup() {
    if !rustix::process::geteuid().is_root() {
        panic!(
            "this test makes a directory owned by another user and needs root; \
             run the suite as tests/run.sh does (as root)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join(".padlock");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    let mut child = std::process::Command::new(bin("padlockd"))
        .args(["--listen", "127.0.0.1:0", "--lock-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = padlock_e2e::wait_child(&mut child, Duration::from_secs(10));
    if status.is_none() {
        let _ = child.kill();
        panic!("padlockd started on another user's .padlock");
    }
    assert!(!status.unwrap().success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("belongs to user 65534"), "{stderr}");
}
