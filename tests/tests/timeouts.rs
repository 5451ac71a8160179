//! `--idle-timeout` and `--request-timeout`: idle connections are closed
//! (HTTP/2 ones with GOAWAY) and the SDK reconnects on its own; stalled
//! requests are answered DEADLINE_EXCEEDED or 408; connections and streams
//! that hold or wait for a lock are never cut by either.

use padlock::Kind;
use padlock::proto::{self as pb, hold_response};
use padlock_e2e::h2::{
    ACK, DATA, GOAWAY, PING, RST_STREAM, RawH2, guarded, open_hold, take_messages,
};
use padlock_e2e::http::parse_metrics;
use padlock_e2e::{Server, eventually_ok, until_waiters};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads `/metrics` on a connection of its own that the server closes
/// after answering (so it is never counted as idle).
async fn metrics(addr: SocketAddr) -> HashMap<String, f64> {
    let mut tcp = guarded("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    guarded("read /metrics", tcp.read_to_end(&mut response))
        .await
        .expect("read /metrics");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    parse_metrics(text.split_once("\r\n\r\n").map_or("", |(_, body)| body))
}

/// Polls `/metrics` until `done` holds (at most 20 s).
async fn until_metrics(addr: SocketAddr, what: &str, done: impl Fn(&HashMap<String, f64>) -> bool) {
    eventually_ok(what, Duration::from_secs(20), async || {
        let seen = metrics(addr).await;
        if done(&seen) {
            return Ok(());
        }
        let mut shown: Vec<_> = seen
            .iter()
            .filter(|(k, _)| k.contains("connections") || k.contains("timeouts"))
            .collect();
        shown.sort_by(|a, b| a.0.cmp(b.0));
        Err(format!("{shown:?}"))
    })
    .await;
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_until_closed(tcp: &mut TcpStream, what: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match guarded(what, tcp.read(&mut buf)).await {
            Ok(0) => return String::from_utf8_lossy(&got).into_owned(),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {
                return String::from_utf8_lossy(&got).into_owned();
            }
            Err(err) => panic!("{what}: {err}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_busy_ones_kept() {
    // A request timeout far above the idle timeout, so that HTTP/1.1's
    // header read timeout cannot be what closes the idle connection.
    let server = Server::start_with_args(&["--idle-timeout", "2s", "--request-timeout", "60s"]);
    // A holder: its connection has a stream open all along.
    let holder = server.client().await;
    let held = holder.lock("idle/held").acquire().await.unwrap();
    let lost = held.lost();
    // An SDK client that makes one call and then sits idle.
    let idler = server.client().await;
    assert!(idler.list("").await.unwrap().len() == 1);

    // HTTP/1.1 keep-alive, idle after one request: closed.
    let mut h1 = TcpStream::connect(server.addr).await.unwrap();
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr);
    h1.write_all(request.as_bytes()).await.unwrap();
    let started = Instant::now();
    let answer = read_until_closed(&mut h1, "the idle HTTP/1.1 connection").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    println!(
        "idle HTTP/1.1 connection closed after {:?}",
        started.elapsed()
    );

    // HTTP/2 with no request at all: GOAWAY (no error), then closed.
    let mut h2 = RawH2::connect(server.addr).await;
    h2.handshake().await;
    let started = Instant::now();
    let mut goaway = None;
    while let Some(frame) = h2.next_frame_or_eof().await {
        if frame.kind == GOAWAY {
            goaway = Some(frame.error_code());
        }
    }
    assert_eq!(goaway, Some(0), "GOAWAY NO_ERROR first:\n{}", h2.history());
    println!(
        "idle HTTP/2 connection sent GOAWAY and closed after {:?}",
        started.elapsed()
    );

    // The server counts the idle connections (the idler's, the two raw
    // ones; more if a slow machine let the idler's first connection go
    // idle before its call) as closed; the holder's stays. Open now: the
    // holder's, and the one reading /metrics.
    until_metrics(server.addr, "3 idle connections closed, 2 open", |m| {
        m.get("padlock_idle_connections_closed_total")
            .is_some_and(|n| *n >= 3.0)
            && m.get("padlock_connections") == Some(&2.0)
    })
    .await;

    // The lock outlived several idle periods, untouched.
    assert!(held.is_held());
    tokio::select! {
        biased;
        lost = lost => panic!("the holder was told {lost:?}"),
        () = std::future::ready(()) => {}
    }
    // The idler's next call reconnects on its own.
    let info = idler.show("idle/held", Kind::File).await.unwrap().unwrap();
    assert_eq!(info.holders.len(), 1);
    assert_eq!(info.holders[0].id, held.holder_id());
    assert_eq!(info.holders[0].fence, held.fence());
    // And the holder's connection still works for it.
    held.release().await.unwrap();
    assert!(idler.show("idle/held", Kind::File).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_requests_are_cut_by_the_request_timeout() {
    let server = Server::start_with_args(&["--request-timeout", "1s"]);
    let client = server.client().await;
    let held = client.lock("slow/held").acquire().await.unwrap();
    // A waiter whose wait is far longer than the request timeout.
    let waiting = server.client().await;
    let waiter = tokio::spawn(async move {
        let lock = waiting.lock("slow/held").wait(Duration::from_secs(60));
        lock.acquire().await
    });
    until_waiters(&client, "slow/held", Kind::File, 1).await;
    let queued = Instant::now();

    // A Hold stream that never sends its Acquire.
    let channel = tonic::transport::Channel::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = pb::padlock_client::PadlockClient::new(channel.clone());
    let started = Instant::now();
    let response = raw
        .hold(tokio_stream::pending::<pb::HoldRequest>())
        .await
        .expect("the stream opens");
    let status = guarded("the Hold stream's end", response.into_inner().message())
        .await
        .expect_err("no Acquire: the stream ends with a status");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("no Acquire") && status.message().contains("--request-timeout"),
        "{}",
        status.message()
    );
    println!("Hold without Acquire cut after {:?}", started.elapsed());
    // The SDK does not take it for a lock not acquired (try-lock's None).
    assert!(
        matches!(padlock::Error::from(status), padlock::Error::Status(_)),
        "a request timeout must not read as NotAcquired"
    );

    // A unary gRPC call whose request message never comes (sent as a
    // client stream that never yields: the server reads it as unary).
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let started = Instant::now();
    let call = grpc.client_streaming(
        tonic::Request::new(tokio_stream::pending::<pb::GetServerInfoRequest>()),
        tonic::codegen::http::uri::PathAndQuery::from_static("/padlock.v1.Padlock/GetServerInfo"),
        padlock_proto::codec::SmallCodec::<pb::GetServerInfoRequest, pb::ServerInfo>::default(),
    );
    let status = guarded("the stalled unary call", call)
        .await
        .expect_err("no request message: a status");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("--request-timeout"),
        "{}",
        status.message()
    );
    println!(
        "stalled unary gRPC call answered after {:?}",
        started.elapsed()
    );

    // An HTTP request whose body never comes: 408, and nothing was queued.
    let mut h1 = TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "POST /v1/locks/slow/other/hold HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n{{",
        server.addr
    );
    h1.write_all(request.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut h1, "the stalled HTTP request").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    assert!(
        client
            .show("slow/other", Kind::File)
            .await
            .unwrap()
            .is_none()
    );

    // HTTP/1.1 headers that never end: the connection is closed.
    let mut h1 = TcpStream::connect(server.addr).await.unwrap();
    let partial = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n", server.addr);
    h1.write_all(partial.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut h1, "the HTTP/1.1 request without end").await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );

    // A connection that sends nothing at all is closed too.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    let answer = read_until_closed(&mut silent, "the silent connection").await;
    assert!(answer.is_empty(), "{answer}");
    println!("silent connection closed after {:?}", started.elapsed());

    let m = metrics(server.addr).await;
    // Each of the five cuts above counts once: the Hold, the unary call,
    // the body, the headers (hyper's timer or the silent one, whichever
    // fires first) and the silent connection.
    assert_eq!(m.get("padlock_request_timeouts_total"), Some(&5.0), "{m:?}");

    // The holder and the waiter were never cut: the waiter has waited
    // longer than the request timeout and still gets the lock.
    assert!(queued.elapsed() > Duration::from_secs(1));
    assert!(held.is_held());
    let fence = held.fence();
    held.release().await.unwrap();
    let next = guarded("the waiter's grant", waiter)
        .await
        .unwrap()
        .expect("the waiter is granted");
    assert!(next.fence() > fence);
}

/// The next Hold message on any stream of `raw` (one per DATA frame: the
/// server sends each message in a frame of its own). No GOAWAY before it.
async fn next_message(
    raw: &mut RawH2,
    buffers: &mut HashMap<u32, Vec<u8>>,
) -> (u32, pb::HoldResponse) {
    loop {
        let frame = raw.next_frame().await;
        assert_ne!(frame.kind, GOAWAY, "GOAWAY:\n{}", raw.history());
        if frame.kind != DATA {
            continue;
        }
        let buf = buffers.entry(frame.stream).or_default();
        buf.extend_from_slice(frame.data());
        let mut messages = take_messages(buf);
        assert!(messages.len() <= 1, "{messages:?}");
        if let Some(message) = messages.pop() {
            return (frame.stream, message);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_holding_or_waiting_is_never_idle() {
    let server = Server::start_with_args(&["--idle-timeout", "1s"]);
    // One raw HTTP/2 connection: stream 1 holds idle/a, stream 3 waits
    // for it. Nothing is sent on it from here on.
    let mut raw = RawH2::connect(server.addr).await;
    raw.handshake().await;
    open_hold(&mut raw, 1, "idle/a").await;
    let mut buffers: HashMap<u32, Vec<u8>> = HashMap::new();
    let (stream, first) = next_message(&mut raw, &mut buffers).await;
    assert!(
        stream == 1 && matches!(first.msg, Some(hold_response::Msg::Granted(_))),
        "stream {stream}: {first:?}"
    );
    open_hold(&mut raw, 3, "idle/a").await;
    let (stream, first) = next_message(&mut raw, &mut buffers).await;
    assert!(
        stream == 3 && matches!(first.msg, Some(hold_response::Msg::Queued(_))),
        "stream {stream}: {first:?}"
    );

    // Two idle periods pass, shown by two idle connections opened one
    // after the other and each sent GOAWAY.
    for _ in 0..2 {
        let mut probe = RawH2::connect(server.addr).await;
        probe.handshake().await;
        let mut goaway = false;
        while let Some(frame) = probe.next_frame_or_eof().await {
            goaway |= frame.kind == GOAWAY;
        }
        assert!(
            goaway,
            "an idle connection is sent GOAWAY:\n{}",
            probe.history()
        );
    }

    // The busy connection was left alone: a PING round trip on it shows
    // no GOAWAY and nothing on its streams before the answer.
    raw.write_frame(PING, 0, 0, b"stillup!").await;
    loop {
        let frame = raw.next_frame().await;
        assert!(
            frame.kind != GOAWAY && frame.kind != RST_STREAM && frame.kind != DATA,
            "the busy connection was touched:\n{}",
            raw.history()
        );
        if frame.kind == PING && frame.flags & ACK != 0 {
            assert_eq!(frame.payload, b"stillup!");
            break;
        }
    }
    let client = server.client().await;
    let info = client.show("idle/a", Kind::File).await.unwrap().unwrap();
    assert_eq!((info.holders.len(), info.waiters.len()), (1, 1), "{info:?}");
}
