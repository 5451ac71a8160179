//! The lean transport (Session ops in frames, without HTTP/2, on the same
//! port): the SDK, which uses it by default for http:// URLs, next to gRPC
//! clients, and a raw client for what the SDK never sends.

use padlock::proto as pb;
use padlock::{Client, Error, Kind};
use padlock_e2e::http::metric;
use padlock_e2e::{Server, assert_strictly_increasing, assert_unharmed, until_waiters};
use padlock_proto::lean::{self as frame, MAGIC};
use pb::lean_request::Msg as In;
use pb::lean_response::Msg as Out;
use pb::session_request::Msg as SessionIn;
use pb::session_response::Msg as SessionOut;
use prost::Message;
use prost::bytes::BytesMut;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

/// Failure guard for every await on the server (never a synchronization).
const GUARD: Duration = Duration::from_secs(10);

async fn guarded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {GUARD:?}"))
}

/// A lean connection driven by hand.
struct Raw {
    tcp: TcpStream,
    buf: BytesMut,
}

impl Raw {
    /// Connects and sends the magic.
    async fn open(server: &Server) -> Raw {
        let mut tcp = TcpStream::connect(server.addr).await.expect("connect");
        tcp.write_all(MAGIC).await.expect("send the magic");
        Raw {
            tcp,
            buf: BytesMut::new(),
        }
    }

    /// Connects, says hello (with `authorization`), and returns the welcome.
    async fn hello(server: &Server, authorization: &str) -> (Raw, pb::LeanWelcome) {
        let mut raw = Raw::open(server).await;
        raw.send(In::Hello(pb::LeanHello {
            authorization: authorization.into(),
        }))
        .await;
        match raw.next().await {
            Some(Out::Welcome(welcome)) => (raw, welcome),
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    /// Connects and is welcomed.
    async fn welcomed(server: &Server) -> Raw {
        let (raw, welcome) = Raw::hello(server, "").await;
        assert_eq!(welcome.refused, None);
        raw
    }

    async fn send(&mut self, msg: In) {
        let mut out = BytesMut::new();
        frame::encode(&pb::LeanRequest { msg: Some(msg) }, &mut out);
        self.send_bytes(&out).await;
    }

    async fn send_bytes(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.expect("send");
    }

    async fn acquire(&mut self, op: u64, name: &str) {
        let acquire = pb::Acquire {
            name: name.into(),
            kind: pb::Kind::File as i32,
            owner: "raw lean".into(),
            ..pb::Acquire::default()
        };
        self.session(op, SessionIn::Acquire(acquire)).await;
    }

    async fn session(&mut self, op: u64, msg: SessionIn) {
        let request = pb::SessionRequest { op, msg: Some(msg) };
        self.send(In::Session(request)).await;
    }

    /// The next frame's message; `None` once the server closed.
    async fn next(&mut self) -> Option<Out> {
        guarded("a frame from padlockd", async {
            loop {
                if let Some(body) = frame::take(&mut self.buf, 1 << 20).expect("frame size") {
                    let response = pb::LeanResponse::decode(body).expect("a LeanResponse");
                    return Some(response.msg.expect("a message in the frame"));
                }
                match self.tcp.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
    }

    /// The next Session message, answering pings on the way.
    async fn reply(&mut self) -> (u64, SessionOut) {
        loop {
            match self.next().await {
                Some(Out::Session(pb::SessionResponse { op, msg: Some(msg) })) => return (op, msg),
                Some(Out::Ping(n)) => self.send(In::Pong(n)).await,
                other => panic!("expected a session message, got {other:?}"),
            }
        }
    }

    /// The `closing` the server ends with, then the end.
    async fn closing(&mut self) -> pb::Failure {
        let failure = loop {
            match self.next().await {
                Some(Out::Closing(failure)) => break failure,
                Some(Out::Ping(_)) => {}
                other => panic!("expected closing, got {other:?}"),
            }
        };
        assert_eq!(self.next().await, None, "the connection ends after closing");
        failure
    }
}

fn assert_failure(failure: &pb::Failure, code: Code, words: &str) {
    assert_eq!(Code::from(failure.code), code, "{failure:?}");
    assert!(failure.message.contains(words), "{failure:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_locks_over_the_lean_transport_beside_grpc_clients() {
    let server = Server::start();
    let lean = server.client().await;
    let grpc = Client::builder(server.url.clone())
        .lean(false)
        .connect()
        .await
        .unwrap();
    let hold = Client::builder(server.url.clone())
        .multiplex(false)
        .connect()
        .await
        .unwrap();
    let mut fences = Vec::new();
    let first = guarded("a lean acquire", lean.lock("mixed/a").acquire())
        .await
        .unwrap();
    fences.push(first.fence());
    // Only the default client rides the lean transport.
    assert_eq!(metric(&server.url, "padlock_lean_connections").await, 1.0);
    let waiter = tokio::spawn({
        let grpc = grpc.clone();
        async move { grpc.lock("mixed/a").acquire().await }
    });
    until_waiters(&lean, "mixed/a", Kind::File, 1).await;
    first.release().await.unwrap();
    let second = guarded("the gRPC waiter's grant", waiter)
        .await
        .unwrap()
        .unwrap();
    fences.push(second.fence());
    // The `.lean(false)` client got it over gRPC.
    assert_eq!(metric(&server.url, "padlock_lean_connections").await, 1.0);
    let held_by_lean = tokio::spawn({
        let lean = lean.clone();
        async move { lean.lock("mixed/a").acquire().await }
    });
    until_waiters(&hold, "mixed/a", Kind::File, 1).await;
    drop(second);
    let third = guarded("the lean waiter's grant", held_by_lean)
        .await
        .unwrap()
        .unwrap();
    fences.push(third.fence());
    assert!(
        hold.lock("mixed/a").try_acquire().await.unwrap().is_none(),
        "the lean holder excludes a Hold stream"
    );
    drop(third);
    let fourth = guarded("a Hold stream", hold.lock("mixed/a").acquire())
        .await
        .unwrap();
    fences.push(fourth.fence());
    assert_strictly_increasing(&fences);
    // Each kind rides it too.
    for kind in [lean.lock("mixed/s").semaphore(2), lean.lock("mixed/f")] {
        guarded("an acquire", kind.acquire())
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    assert_unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_only_locks_holds_one_connection() {
    // (A request timeout the reader's kept-alive connection outlives.)
    let server = Server::start_with_args(&["--request-timeout", "60s"]);
    // The gauges, read over one HTTP/1.1 connection of our own (an HTTP
    // client's pool may open another while it puts one back).
    let reader = tokio::sync::Mutex::new(TcpStream::connect(server.addr).await.unwrap());
    let gauge = |name: &'static str| {
        let reader = &reader;
        async move {
            let mut tcp = reader.lock().await;
            let request = format!("GET /metrics HTTP/1.1\r\nhost: {}\r\n\r\n", server.addr);
            tcp.write_all(request.as_bytes()).await.unwrap();
            let mut response = Vec::new();
            let text = loop {
                let mut chunk = [0u8; 4096];
                let n = tcp.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the metrics connection closed");
                response.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&response).into_owned();
                let Some((head, body)) = text.split_once("\r\n\r\n") else {
                    continue;
                };
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(str::to_string)
                    })
                    .expect("a content-length")
                    .trim()
                    .parse()
                    .unwrap();
                if body.len() >= length {
                    break body.to_string();
                }
            };
            *padlock_e2e::http::parse_metrics(&text)
                .get(name)
                .unwrap_or_else(|| panic!("no {name} in /metrics: {text}"))
        }
    };
    assert_eq!(gauge("padlock_connections").await, 1.0, "the reader's own");
    // Connecting opens the lean connection (its hello is the check that
    // padlockd answers), and no gRPC one.
    let client = server.client().await;
    assert_eq!(gauge("padlock_lean_connections").await, 1.0);
    assert_eq!(gauge("padlock_connections").await, 2.0);
    for _ in 0..2 {
        let guard = guarded("a lock", client.lock("one/a").acquire())
            .await
            .unwrap();
        guard.release().await.unwrap();
    }
    assert_eq!(gauge("padlock_connections").await, 2.0, "locks ride it");
    // The first call that needs gRPC opens its connection.
    assert!(client.list("one/").await.unwrap().is_empty());
    assert_eq!(gauge("padlock_connections").await, 3.0);
    assert_eq!(gauge("padlock_lean_connections").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_requests_from_one_client_is_answered_in_full() {
    let server = Server::start();
    let client = server.client().await;
    let held = client.lock("burst/held").acquire().await.unwrap();
    // 20,000 requests of 2 KiB at once on one connection: 40 MiB, far
    // more than the socket buffers and the client's 1 MiB of unsent
    // frames, so the client writes while the server answers, and holds
    // requests back while the server has not read.
    let label = "x".repeat(2048);
    let requests: Vec<_> = (0..20_000)
        .map(|i| {
            let request = client
                .lock(format!("../burst/{i}"))
                .label("padding", label.clone());
            // (No wait: each is refused at once, and none is cut by the
            // client's own grace while the burst is in flight.)
            tokio::spawn(request.acquire())
        })
        .collect();
    for request in requests {
        match guarded("every answer", request).await.unwrap() {
            Err(Error::Status(status)) if status.code() == Code::InvalidArgument => {}
            other => panic!("expected INVALID_ARGUMENT for a hostile name, got {other:?}"),
        }
    }
    assert!(held.is_held());
    held.release().await.unwrap();
    assert_eq!(metric(&server.url, "padlock_lean_connections").await, 1.0);
    assert_unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_frame_limit_fails_alone() {
    let server = Server::start_with_args(&["--max-message-bytes", "4096"]);
    over_the_limit_fails_alone(&server, server.client().await).await;
    // The same over a gRPC Session stream, whose headers say the limit.
    let grpc = Client::builder(server.url.clone())
        .lean(false)
        .connect()
        .await
        .unwrap();
    over_the_limit_fails_alone(&server, grpc).await;
}

async fn over_the_limit_fails_alone(server: &Server, client: Client) {
    let held = client.lock("big/held").acquire().await.unwrap();
    // Sent, it would end the stream and the lock held on it: the client
    // knows the limit from the welcome (or the stream's headers) and fails
    // that one request.
    let big = client.lock("big/x").label("padding", "x".repeat(5000));
    match guarded("the refusal", big.acquire()).await {
        Err(Error::Status(status)) if status.code() == Code::OutOfRange => {
            assert!(
                status.message().contains("--max-message-bytes"),
                "{status:?}"
            );
        }
        other => panic!("expected OUT_OF_RANGE, got {other:?}"),
    }
    assert!(held.is_held());
    let next = guarded("a lock beside it", client.lock("big/y").acquire())
        .await
        .unwrap();
    next.release().await.unwrap();
    held.release().await.unwrap();
    assert_unharmed(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_lean_transport_the_sdk_locks_over_grpc() {
    let server = Server::start_with_args(&["--lean", "false"]);
    let client = server.client().await;
    for _ in 0..2 {
        let guard = guarded("an acquire", client.lock("nolean/a").acquire())
            .await
            .unwrap();
        guard.release().await.unwrap();
    }
    // A lean hello gets what an older padlockd gives: bad HTTP.
    let mut raw = Raw::open(&server).await;
    raw.send(In::Hello(pb::LeanHello::default())).await;
    let mut answer = Vec::new();
    guarded("the answer", raw.tcp.read_to_end(&mut answer))
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_end_only_their_own_connection() {
    let server = Server::start_with_args(&["--max-message-bytes", "1024"]);
    let client = server.client().await;
    let held = client.lock("hostile/held").acquire().await.unwrap();

    // A first frame that is not a hello: refused at the door.
    let mut raw = Raw::open(&server).await;
    raw.acquire(1, "hostile/x").await;
    match raw.next().await {
        Some(Out::Welcome(pb::LeanWelcome {
            refused: Some(failure),
            ..
        })) => assert_failure(&failure, Code::InvalidArgument, "hello"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(raw.next().await, None);

    // Over --max-message-bytes, told by the length prefix alone (the
    // body never comes).
    for len in [1025u32, u32::MAX] {
        let mut raw = Raw::welcomed(&server).await;
        raw.send_bytes(&len.to_be_bytes()).await;
        let failure = raw.closing().await;
        assert_failure(&failure, Code::OutOfRange, "--max-message-bytes");
    }

    // Bytes that do not decode, an empty frame's message, a second hello.
    let garbage: &[u8] = &[0, 0, 0, 3, 0xff, 0xff, 0xff];
    let empty: &[u8] = &[0, 0, 0, 0];
    for (bytes, words) in [(garbage, "does not decode"), (empty, "empty LeanRequest")] {
        let mut raw = Raw::welcomed(&server).await;
        raw.send_bytes(bytes).await;
        assert_failure(&raw.closing().await, Code::InvalidArgument, words);
    }
    let mut raw = Raw::welcomed(&server).await;
    raw.send(In::Hello(pb::LeanHello::default())).await;
    assert_failure(&raw.closing().await, Code::InvalidArgument, "second hello");

    // A hostile name fails its op alone; the connection goes on.
    let mut raw = Raw::welcomed(&server).await;
    raw.acquire(1, "../../etc/passwd").await;
    let (op, msg) = raw.reply().await;
    assert_eq!(op, 1);
    match msg {
        SessionOut::Failed(failure) => assert_eq!(Code::from(failure.code), Code::InvalidArgument),
        other => panic!("expected failed, got {other:?}"),
    }
    raw.acquire(2, "hostile/ok").await;
    assert!(matches!(raw.reply().await, (2, SessionOut::Granted(_))));

    // The lock held all along is still held.
    let other = server.client().await;
    assert!(
        other
            .lock("hostile/held")
            .try_acquire()
            .await
            .unwrap()
            .is_none()
    );
    held.release().await.unwrap();
    assert_unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_may_follow_the_hello_without_waiting_for_the_welcome() {
    let server = Server::start();
    let mut raw = Raw::open(&server).await;
    let mut out = BytesMut::new();
    let hello = In::Hello(pb::LeanHello::default());
    frame::encode(&pb::LeanRequest { msg: Some(hello) }, &mut out);
    raw.send_bytes(&out).await;
    raw.acquire(7, "pipelined/a").await;
    assert!(matches!(raw.next().await, Some(Out::Welcome(w)) if w.refused.is_none()));
    assert!(matches!(raw.reply().await, (7, SessionOut::Granted(_))));
    raw.session(7, SessionIn::Release(pb::Release {})).await;
    assert!(matches!(raw.reply().await, (7, SessionOut::Released(_))));
    // Closing our side ends the connection once nothing is open.
    raw.tcp.shutdown().await.unwrap();
    assert_eq!(raw.next().await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_lean_connection_is_cut() {
    let server = Server::start_with_args(&["--request-timeout", "1s", "--idle-timeout", "2s"]);
    // The magic and no hello: cut at the request timeout.
    let opened = std::time::Instant::now();
    let mut raw = Raw::open(&server).await;
    assert_eq!(raw.next().await, None);
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // Part of the magic only: the protocol cannot be told.
    let mut part = TcpStream::connect(server.addr).await.unwrap();
    part.write_all(&MAGIC[..4]).await.unwrap();
    let mut rest = Vec::new();
    guarded("the cut", part.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    assert!(metric(&server.url, "padlock_request_timeouts_total").await >= 2.0);
    // A welcomed connection that opens no op is an idle connection: it
    // outlives the request timeout and is closed at the idle timeout.
    let idle_closed = metric(&server.url, "padlock_idle_connections_closed_total").await;
    let welcomed = std::time::Instant::now();
    let mut raw = Raw::welcomed(&server).await;
    assert_eq!(raw.next().await, None);
    let took = welcomed.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(
        metric(&server.url, "padlock_idle_connections_closed_total").await,
        idle_closed + 1.0
    );
    assert_unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tokens_guard_the_lean_transport() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "team-token-0123456789 team/\n").unwrap();
    let server = Server::start_with_args(&["--client-token-file", tokens.to_str().unwrap()]);
    for given in ["", "Bearer guess", "team-token-0123456789"] {
        let (mut raw, welcome) = Raw::hello(&server, given).await;
        let refused = welcome.refused.expect("refused");
        assert_eq!(
            Code::from(refused.code),
            Code::Unauthenticated,
            "{refused:?}"
        );
        assert_eq!(raw.next().await, None);
    }
    assert_eq!(
        metric(&server.url, "padlock_grpc_client_auth_failures_total").await,
        3.0
    );
    let wrong = Client::builder(server.url.clone())
        .token("guess")
        .connect()
        .await
        .unwrap();
    match wrong.lock("team/a").acquire().await {
        Err(Error::Status(s)) => assert_eq!(s.code(), Code::Unauthenticated, "{s:?}"),
        other => panic!("expected UNAUTHENTICATED, got {other:?}"),
    }
    let team = Client::builder(server.url.clone())
        .token("team-token-0123456789")
        .connect()
        .await
        .unwrap();
    let held = team.lock("team/a").acquire().await.unwrap();
    assert_eq!(metric(&server.url, "padlock_lean_connections").await, 1.0);
    match team.lock("other/a").acquire().await {
        Err(Error::Status(s)) => {
            assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
            assert!(s.message().contains("team/"), "{s:?}");
        }
        other => panic!("expected PERMISSION_DENIED, got {other:?}"),
    }
    held.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lean_client_that_stops_answering_pings_loses_its_locks() {
    let server =
        Server::start_with_args(&["--keepalive-interval", "1s", "--keepalive-timeout", "1s"]);
    // One answers its pings: still holding after three of them.
    let mut alive = Raw::welcomed(&server).await;
    alive.acquire(1, "ka/alive").await;
    assert!(matches!(alive.reply().await, (1, SessionOut::Granted(_))));
    let mut pings = 0;
    while pings < 3 {
        match alive.next().await {
            Some(Out::Ping(n)) => {
                alive.send(In::Pong(n)).await;
                pings += 1;
            }
            other => panic!("expected a ping, got {other:?}"),
        }
    }
    let client = server.client().await;
    assert!(
        client
            .lock("ka/alive")
            .try_acquire()
            .await
            .unwrap()
            .is_none()
    );

    // One goes silent: its lock goes to the waiter.
    let mut silent = Raw::welcomed(&server).await;
    silent.acquire(1, "ka/silent").await;
    assert!(matches!(silent.reply().await, (1, SessionOut::Granted(_))));
    let waiter = tokio::spawn({
        let client = client.clone();
        async move { client.lock("ka/silent").acquire().await }
    });
    assert!(matches!(silent.next().await, Some(Out::Ping(_))));
    let pinged = std::time::Instant::now();
    let guard = guarded("the waiter's grant", waiter)
        .await
        .unwrap()
        .unwrap();
    // Within the keepalive timeout (1 s) of the ping, and some slack.
    let took = pinged.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(
        silent.next().await,
        None,
        "the silent connection is dropped"
    );
    guard.release().await.unwrap();
    drop(alive);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_lean_connection_releases_its_locks() {
    let server = Server::start();
    let mut raw = Raw::welcomed(&server).await;
    raw.acquire(1, "close/a").await;
    assert!(matches!(raw.reply().await, (1, SessionOut::Granted(_))));
    let client = server.client().await;
    let waiter = tokio::spawn({
        let client = client.clone();
        async move { client.lock("close/a").acquire().await }
    });
    until_waiters(&client, "close/a", Kind::File, 1).await;
    drop(raw);
    let guard = guarded("the waiter's grant", waiter)
        .await
        .unwrap()
        .unwrap();
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_connection_limit_a_lean_client_is_told_why() {
    let server = Server::start_with_args(&["--max-connections", "1"]);
    let _first = Raw::welcomed(&server).await;
    let (mut second, welcome) = Raw::hello(&server, "").await;
    let refused = welcome.refused.expect("refused");
    assert_failure(&refused, Code::ResourceExhausted, "--max-connections");
    assert_eq!(second.next().await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lean_client_that_does_not_read_is_dropped_and_its_lock_freed() {
    let server =
        Server::start_with_args(&["--keepalive-interval", "1s", "--keepalive-timeout", "1s"]);
    let mut raw = Raw::welcomed(&server).await;
    raw.acquire(1, "noread/held").await;
    assert!(matches!(raw.reply().await, (1, SessionOut::Granted(_))));
    // Then floods requests whose answers it never reads (each a failure),
    // from a task of its own: its sends stall once the server's stall.
    let (_read, mut write) = raw.tcp.into_split();
    let flood = tokio::spawn(async move {
        let mut out = BytesMut::new();
        for op in 2..200_000u64 {
            let acquire = pb::Acquire {
                name: "../bad".into(),
                ..pb::Acquire::default()
            };
            let request = pb::SessionRequest {
                op,
                msg: Some(SessionIn::Acquire(acquire)),
            };
            let request = pb::LeanRequest {
                msg: Some(In::Session(request)),
            };
            frame::encode(&request, &mut out);
        }
        // Fails once the server drops the connection.
        let _ = write.write_all(&out).await;
    });
    // Its lock goes to a waiter once the server gives up on it.
    let client = server.client().await;
    let guard = guarded("the waiter's grant", client.lock("noread/held").acquire())
        .await
        .unwrap();
    guard.release().await.unwrap();
    guarded("the flood's end", flood).await.unwrap();
    assert_unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_messages_do_not_keep_an_idle_connection_open() {
    let server = Server::start_with_args(&["--idle-timeout", "2s"]);
    let mut raw = Raw::welcomed(&server).await;
    raw.acquire(1, "idle/a").await;
    assert!(matches!(raw.reply().await, (1, SessionOut::Granted(_))));
    raw.session(1, SessionIn::Release(pb::Release {})).await;
    assert!(matches!(raw.reply().await, (1, SessionOut::Released(_))));
    let idle_from = std::time::Instant::now();
    // A release of no open op every 300 ms, and pings: neither opens an
    // op, so neither may put off the idle end.
    let Raw { mut tcp, mut buf } = raw;
    let (mut rd, mut wr) = tcp.split();
    let mut stray = BytesMut::new();
    let release = pb::SessionRequest {
        op: 99,
        msg: Some(SessionIn::Release(pb::Release {})),
    };
    frame::encode(
        &pb::LeanRequest {
            msg: Some(In::Session(release)),
        },
        &mut stray,
    );
    frame::encode(
        &pb::LeanRequest {
            msg: Some(In::Ping(1)),
        },
        &mut stray,
    );
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    let ended = guarded("the idle end", async {
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if wr.write_all(&stray).await.is_err() {
                        break idle_from.elapsed();
                    }
                }
                read = rd.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => break idle_from.elapsed(),
                    Ok(_) => {
                        while let Some(body) = frame::take(&mut buf, 1 << 20).unwrap() {
                            let msg = pb::LeanResponse::decode(body).unwrap().msg;
                            assert!(matches!(msg, Some(Out::Pong(_))), "{msg:?}");
                        }
                    }
                },
            }
        }
    })
    .await;
    assert!(
        ended < Duration::from_secs(4),
        "ended {ended:?} after the last op"
    );
}

/// A proxy in front of padlockd that passes HTTP and swallows the lean
/// transport (as an L7 proxy would: it waits for a request that never
/// comes). Returns its URL.
async fn proxy_without_lean(server: &Server) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let upstream = server.addr;
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = [0u8; MAGIC.len()];
                if client.read_exact(&mut head).await.is_err() {
                    return;
                }
                if &head == MAGIC {
                    // Holds the connection and says nothing.
                    let mut sink = Vec::new();
                    let _ = client.read_to_end(&mut sink).await;
                    return;
                }
                let mut server = TcpStream::connect(upstream).await.unwrap();
                server.write_all(&head).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_that_swallows_the_lean_transport_the_sdk_locks_over_grpc() {
    let server = Server::start();
    let url = proxy_without_lean(&server).await;
    let client = Client::connect(url).await.unwrap();
    // The first request waits for a welcome that does not come, then goes
    // over gRPC; the next goes there at once.
    let first = guarded("the first acquire", client.lock("proxy/a").acquire())
        .await
        .unwrap();
    first.release().await.unwrap();
    let started = std::time::Instant::now();
    let second = guarded("the second acquire", client.lock("proxy/a").acquire())
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "{took:?}: the lean transport was tried again"
    );
    second.release().await.unwrap();
}

/// A proxy to `server` that closes the first `drops` lean connections
/// without a word, as a server over its connection limit does.
async fn proxy_dropping_lean(server: &Server, drops: usize) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let upstream = server.addr;
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let dropped = dropped.clone();
            tokio::spawn(async move {
                let mut head = [0u8; MAGIC.len()];
                if client.read_exact(&mut head).await.is_err() {
                    return;
                }
                if &head == MAGIC
                    && dropped.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < drops
                {
                    return;
                }
                let mut server = TcpStream::connect(upstream).await.unwrap();
                server.write_all(&head).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lean_connection_closed_without_a_word_is_tried_again() {
    let server = Server::start();
    let url = proxy_dropping_lean(&server, 1).await;
    // Connecting meets the close (and checks the server over gRPC); the
    // first lock opens a lean connection again, which is served.
    let client = Client::connect(url).await.unwrap();
    let guard = guarded("a lock", client.lock("closed/a").acquire())
        .await
        .unwrap();
    assert_eq!(metric(&server.url, "padlock_lean_connections").await, 1.0);
    guard.release().await.unwrap();
}
