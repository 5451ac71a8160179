//! The per-connection stream limit (`--max-streams-per-connection`, sent as
//! HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS): a client that ignores it gets
//! a clear REFUSED_STREAM for the stream over the limit while its held
//! locks and its connection stay untouched, and a conforming client (the
//! SDK) waits for a free stream instead of failing.
//!
//! The first test speaks HTTP/2 by hand on a plain TCP connection: every
//! HTTP/2 client library obeys the limit and queues the extra request
//! locally, so only hand-written frames can show what the server does.

use padlock::proto::{self as pb, hold_response};
use padlock::{Client, Kind};
use padlock_e2e::Server;
use padlock_e2e::h2::*;
use std::collections::HashMap;
use std::time::Duration;

/// Fails on any sign that the server touched a held stream: a message
/// (Lost, Released, ...), trailers, or a reset. WINDOW_UPDATE is fine.
fn assert_held_stream_untouched(raw: &RawH2, frame: &Frame, held: &[u32]) {
    if held.contains(&frame.stream) && frame.kind != WINDOW_UPDATE {
        let what = match frame.kind {
            DATA => {
                let mut buf = frame.data().to_vec();
                format!("a message: {:?}", take_messages(&mut buf))
            }
            HEADERS => "trailers (the call ended)".to_string(),
            RST_STREAM => format!("RST_STREAM with error code {}", frame.error_code()),
            _ => "an unexpected frame".to_string(),
        };
        panic!(
            "held stream {} got {what}; frames:\n{}",
            frame.stream,
            raw.history()
        );
    }
    if frame.kind == GOAWAY {
        panic!(
            "the server sent GOAWAY (error code {}), ending the connection that holds the locks; frames:\n{}",
            frame.error_code(),
            raw.history()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_the_limit_is_refused_and_held_locks_stay() {
    let server = Server::start_with_args(&["--max-streams-per-connection", "2"]);
    let mut raw = RawH2::connect(server.addr).await;

    // The server announces the limit.
    let settings = raw.handshake().await;
    let max_streams = settings
        .iter()
        .find(|(id, _)| *id == SETTINGS_MAX_CONCURRENT_STREAMS)
        .map(|(_, value)| *value);
    assert_eq!(
        max_streams,
        Some(2),
        "the server's SETTINGS must carry MAX_CONCURRENT_STREAMS = 2 \
         (--max-streams-per-connection 2); it sent {settings:?}"
    );

    // Two Hold calls, each granted its lock: the connection is at its limit.
    let names = HashMap::from([(1u32, "streams/a"), (3u32, "streams/b")]);
    open_hold(&mut raw, 1, names[&1]).await;
    open_hold(&mut raw, 3, names[&3]).await;
    let mut buffers: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut granted: HashMap<u32, pb::Granted> = HashMap::new();
    while granted.len() < 2 {
        let frame = raw.next_frame().await;
        if !names.contains_key(&frame.stream) {
            if frame.kind == GOAWAY {
                panic!(
                    "GOAWAY (error code {}) before both grants; frames:\n{}",
                    frame.error_code(),
                    raw.history()
                );
            }
            continue;
        }
        let stream = frame.stream;
        match frame.kind {
            DATA => {
                let buf = buffers.entry(stream).or_default();
                buf.extend_from_slice(frame.data());
                for message in take_messages(buf) {
                    match message.msg {
                        Some(hold_response::Msg::Granted(g)) => {
                            assert!(
                                granted.insert(stream, g).is_none(),
                                "two grants on stream {stream}; frames:\n{}",
                                raw.history()
                            );
                        }
                        Some(hold_response::Msg::Queued(q)) => panic!(
                            "stream {stream} ({}) was queued ({q:?}) although nobody else holds it",
                            names[&stream]
                        ),
                        other => panic!(
                            "stream {stream} ({}) got {other:?} instead of a grant; frames:\n{}",
                            names[&stream],
                            raw.history()
                        ),
                    }
                }
            }
            HEADERS if frame.flags & END_STREAM != 0 => panic!(
                "stream {stream} ({}) ended (trailers) before a grant; frames:\n{}",
                names[&stream],
                raw.history()
            ),
            RST_STREAM => panic!(
                "stream {stream} ({}) was reset (error code {}) before a grant; frames:\n{}",
                names[&stream],
                frame.error_code(),
                raw.history()
            ),
            _ => {}
        }
    }
    assert_ne!(
        granted[&1].holder_id, granted[&3].holder_id,
        "two grants with one holder id"
    );

    // A third stream, over the limit: refused, and only it.
    open_hold(&mut raw, 5, "streams/c").await;
    let refusal = loop {
        let frame = raw.next_frame().await;
        assert_held_stream_untouched(&raw, &frame, &[1, 3]);
        if frame.stream != 5 {
            continue;
        }
        match frame.kind {
            RST_STREAM => break frame.error_code(),
            _ => panic!(
                "the server answered stream 5 over the limit instead of resetting it \
                 with REFUSED_STREAM; frames:\n{}",
                raw.history()
            ),
        }
    };
    assert_eq!(
        refusal,
        REFUSED_STREAM,
        "stream 5 over the limit must be reset with REFUSED_STREAM (0x7), so the client \
         knows it may retry it; got error code 0x{refusal:x}; frames:\n{}",
        raw.history()
    );

    // The connection itself lives on: a PING round trip, and nothing on the
    // held streams or the connection meanwhile (the DATA we sent on the
    // refused stream may earn a second reset, STREAM_CLOSED, and only that).
    let opaque = *b"padlock!";
    raw.write_frame(PING, 0, 0, &opaque).await;
    loop {
        let frame = raw.next_frame().await;
        assert_held_stream_untouched(&raw, &frame, &[1, 3]);
        if frame.kind == PING && frame.flags & ACK != 0 && frame.payload == opaque {
            break;
        }
        if frame.stream == 5 {
            assert!(
                frame.kind == RST_STREAM && frame.error_code() == STREAM_CLOSED,
                "unexpected frame on the refused stream 5; frames:\n{}",
                raw.history()
            );
        }
    }

    // Another connection sees both locks held by the raw client, and nothing
    // of the refused request.
    let sdk = guarded("connect the SDK", server.client()).await;
    for stream in [1u32, 3] {
        let name = names[&stream];
        let info = guarded("show", sdk.show(name, Kind::File))
            .await
            .expect("show")
            .unwrap_or_else(|| panic!("{name} is no longer held after the refusal"));
        assert_eq!(
            info.holders.len(),
            1,
            "{name} must have exactly its one holder: {info:?}"
        );
        assert_eq!(
            info.holders[0].id, granted[&stream].holder_id,
            "{name} is held, but not by the raw client's grant: {info:?}"
        );
        assert_eq!(
            info.holders[0].fence, granted[&stream].fence,
            "{name}: fence differs from the grant: {info:?}"
        );
        assert!(info.waiters.is_empty(), "{name} has waiters: {info:?}");
        let attempt = guarded("try-lock", sdk.lock(name).try_acquire())
            .await
            .expect("try-lock");
        assert!(
            attempt.is_none(),
            "try-lock of {name} succeeded: the raw client's lock was lost"
        );
    }
    let refused = guarded("show", sdk.show("streams/c", Kind::File))
        .await
        .expect("show");
    assert!(
        refused.is_none(),
        "the refused stream reached the lock service: {refused:?}"
    );
    let info = guarded("server info", sdk.server_info())
        .await
        .expect("server info");
    assert_eq!(
        (info.holders, info.waiters),
        (2, 0),
        "the server should count exactly the two raw holders and no waiter: {info:?}"
    );

    // Closing the raw connection releases both locks: the SDK gets them.
    drop(raw);
    for name in ["streams/a", "streams/b"] {
        let guard = guarded(
            "acquire after the raw client left",
            sdk.lock(name).wait(GUARD).acquire(),
        )
        .await
        .unwrap_or_else(|e| panic!("{name} was not released when the raw connection closed: {e}"));
        assert!(guard.is_held(), "{name}: guard not held");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_at_the_stream_limit_waits_for_a_free_stream() {
    let server = Server::start_with_args(&["--max-streams-per-connection", "2"]);
    // A Hold stream per lock (a multiplexed client's ops share one stream;
    // their cap is in session.rs).
    let client: Client = guarded(
        "connect",
        Client::builder(server.url.clone())
            .multiplex(false)
            .connect(),
    )
    .await
    .expect("connect");
    let a = guarded("lock a", client.lock("limit/a").acquire())
        .await
        .expect("lock limit/a");
    let b = guarded("lock b", client.lock("limit/b").acquire())
        .await
        .expect("lock limit/b");

    // A third lock on the same connection: limit/c is free, so the only
    // thing it can wait for is a stream of its own.
    let mut third = std::pin::pin!(client.lock("limit/c").acquire());
    if let Ok(result) = tokio::time::timeout(Duration::from_millis(300), third.as_mut()).await {
        panic!(
            "a third acquire on a connection limited to 2 streams completed while both \
             were in use: {result:?}"
        );
    }

    // It waits in the client: the server has not seen it (no holder, no
    // waiter), and a new connection is not limited by the first one.
    let other = guarded("connect a second client", server.client()).await;
    let pending = guarded("show", other.show("limit/c", Kind::File))
        .await
        .expect("show");
    assert!(
        pending.is_none(),
        "the third request reached the server although the connection was at its limit: {pending:?}"
    );
    let info = guarded("server info", other.server_info())
        .await
        .expect("server info");
    assert_eq!(
        (info.holders, info.waiters),
        (2, 0),
        "the server should count only the two held locks: {info:?}"
    );
    let d = guarded("lock d", other.lock("limit/d").try_acquire())
        .await
        .expect("lock limit/d");
    assert!(
        d.is_some(),
        "a second connection could not lock a free name at once"
    );

    // With a wait, the SDK does not wait for a stream forever: it gives up
    // after the wait plus its grace, saying why, and not as "held by
    // someone" (try-lock's None).
    let bounded = client
        .lock("limit/e")
        .wait(Duration::from_millis(100))
        .acquire();
    match guarded("a bounded acquire at the limit", bounded).await {
        Err(padlock::Error::Status(status)) => {
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
            assert!(
                status.message().contains("--max-streams-per-connection"),
                "{}",
                status.message()
            );
        }
        other => panic!("expected DEADLINE_EXCEEDED from the SDK, got {other:?}"),
    }
    match guarded(
        "a try-lock at the limit",
        client.lock("limit/e").try_acquire(),
    )
    .await
    {
        Err(padlock::Error::Status(status)) => {
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}")
        }
        other => panic!("expected DEADLINE_EXCEEDED from the SDK, got {other:?}"),
    }

    // Releasing one lock frees a stream: the third acquire completes.
    guarded("release a", a.release())
        .await
        .expect("release limit/a");
    let c = guarded("the third acquire after a release", third)
        .await
        .expect("lock limit/c");
    assert!(c.is_held(), "limit/c guard not held");
    assert!(b.is_held(), "limit/b was lost meanwhile");
    let info = guarded("show", other.show("limit/c", Kind::File))
        .await
        .expect("show")
        .expect("limit/c is held");
    assert_eq!(
        info.holders.first().map(|h| h.id.as_str()),
        Some(c.holder_id()),
        "limit/c should be held by the third acquire: {info:?}"
    );
}
