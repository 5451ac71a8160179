//! Many locks on one stream (the Session call): the SDK (which multiplexes
//! by default) against the real padlockd, next to clients that open a Hold
//! stream per lock, and the raw generated client for what the SDK never
//! sends.

use padlock::proto as pb;
use padlock::{Client, Error, Kind, LostReason};
use padlock_e2e::h2::{DATA, END_STREAM, HEADERS, RST_STREAM, RawH2};
use padlock_e2e::http::{client as http_client, json, metric, token_file};
use padlock_e2e::{
    Server, assert_strictly_increasing, assert_unharmed, eventually, eventually_ok, until_waiters,
};
use pb::padlock_client::PadlockClient;
use pb::session_request::Msg as In;
use pb::session_response::Msg as Out;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

/// Failure guard for every await on the server (never a synchronization).
const GUARD: Duration = Duration::from_secs(10);

async fn guarded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {GUARD:?}"))
}

/// A client with a Hold stream per lock.
async fn hold_streams(server: &Server) -> Client {
    Client::builder(server.url.clone())
        .multiplex(false)
        .connect()
        .await
        .expect("connect with Hold streams")
}

async fn multiplexed(server: &Server) -> Client {
    Client::builder(server.url.clone())
        .multiplex(true)
        .connect()
        .await
        .expect("connect with multiplex")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_locks_ride_one_session_stream_up_to_the_cap() {
    // One Session stream carries at most --max-streams-per-connection ops.
    let server = Server::start_with_args(&["--max-streams-per-connection", "8"]);
    let mux = multiplexed(&server).await;
    let plain = hold_streams(&server).await;
    let mut guards = Vec::new();
    for i in 0..8 {
        let guard = guarded(
            "a multiplexed acquire",
            mux.lock(format!("s/{i}")).acquire(),
        )
        .await
        .expect("granted on the session stream");
        guards.push(guard);
    }
    // Eight locks on one connection whose stream limit is eight, with the
    // Session stream itself open: they share one stream.
    let err = guarded("the ninth op", mux.lock("s/8").acquire())
        .await
        .expect_err("the ninth op is over the cap");
    match err {
        Error::Status(status) => {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(
                status.message().contains("--max-streams-per-connection"),
                "{status:?}"
            );
        }
        other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
    }
    // The server shows every holder, and excludes other clients.
    let locks = plain.list("s/").await.unwrap();
    assert_eq!(locks.len(), 8, "{locks:?}");
    assert!(plain.lock("s/3").try_acquire().await.unwrap().is_none());
    // A released op frees its place and its lock.
    guards.pop().unwrap().release().await.unwrap();
    let again = guarded("an op after a release", mux.lock("s/8").acquire())
        .await
        .expect("room for one more op");
    let taken = plain.lock("s/7").try_acquire().await.unwrap();
    assert!(taken.is_some(), "s/7 was released");
    drop((again, taken, guards));
    assert_unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_and_hold_streams_share_one_fence_sequence_and_queue() {
    let server = Server::start();
    let mux = multiplexed(&server).await;
    let plain = hold_streams(&server).await;
    let mut fences = Vec::new();
    for round in 0..4 {
        // A Hold holder hands over to a waiting op, and back.
        let held = plain.lock("shared/name").acquire().await.unwrap();
        fences.push(held.fence());
        let waiter = tokio::spawn({
            let mux = mux.clone();
            async move { mux.lock("shared/name").acquire().await }
        });
        until_waiters(&plain, "shared/name", Kind::File, 1).await;
        held.release().await.unwrap();
        let op = guarded("the op's grant", waiter).await.unwrap().unwrap();
        fences.push(op.fence());
        assert!(op.is_held(), "round {round}");
        op.release().await.unwrap();
    }
    assert_strictly_increasing(&fences);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_is_told_when_its_lock_is_revoked_and_others_stay() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), "session-admin-token");
    let server = Server::start_with_args(&["--admin-token-file", token.to_str().unwrap()]);
    let mux = multiplexed(&server).await;
    let victim = mux.lock("rev/a").acquire().await.unwrap();
    let bystander = mux.lock("rev/b").acquire().await.unwrap();
    let url = format!("{}/v1/holders/{}", server.url, victim.holder_id());
    let (status, body) = json(
        http_client()
            .delete(&url)
            .bearer_auth("session-admin-token"),
    )
    .await;
    assert!(status.is_success(), "{status} {body}");
    let lost = guarded("the loss", victim.lost()).await;
    assert_eq!(lost.reason, LostReason::Revoked, "{lost:?}");
    assert!(!victim.is_held());
    // The other op on the same stream is untouched.
    assert!(bystander.is_held());
    let err = victim.release().await.expect_err("a lost lock's release");
    assert!(matches!(err, Error::Lost(_)), "{err:?}");
    bystander.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_lock_wait_and_a_dropped_request_behave_as_on_hold_streams() {
    let server = Server::start();
    let mux = multiplexed(&server).await;
    let plain = hold_streams(&server).await;
    let holder = plain.lock("tw/x").acquire().await.unwrap();
    assert!(mux.lock("tw/x").try_acquire().await.unwrap().is_none());
    let err = mux
        .lock("tw/x")
        .wait(Duration::from_millis(200))
        .acquire()
        .await
        .expect_err("held by another");
    match err {
        Error::NotAcquired(msg) => assert!(msg.contains("within 200ms"), "{msg}"),
        other => panic!("expected NotAcquired, got {other:?}"),
    }
    // A waiting op whose future is dropped leaves the queue.
    let waiting = tokio::spawn({
        let mux = mux.clone();
        async move { mux.lock("tw/x").acquire().await }
    });
    until_waiters(&plain, "tw/x", Kind::File, 1).await;
    waiting.abort();
    until_waiters(&plain, "tw/x", Kind::File, 0).await;
    holder.release().await.unwrap();
    let next = mux.lock("tw/x").try_acquire().await.unwrap();
    assert!(next.is_some(), "free after its holder and the withdrawn op");
}

/// The raw Session stream of a test: what the SDK never sends.
struct Raw {
    requests: mpsc::UnboundedSender<pb::SessionRequest>,
    responses: tonic::Streaming<pb::SessionResponse>,
}

impl Raw {
    async fn open(server: &Server) -> Raw {
        let channel = Channel::from_shared(server.url.clone())
            .unwrap()
            .connect()
            .await
            .expect("connect");
        let (requests, rx) = mpsc::unbounded_channel();
        let responses = PadlockClient::new(channel)
            .session(UnboundedReceiverStream::new(rx))
            .await
            .expect("open a Session stream")
            .into_inner();
        Raw {
            requests,
            responses,
        }
    }

    fn send(&self, op: u64, msg: Option<In>) {
        self.requests
            .send(pb::SessionRequest { op, msg })
            .expect("stream open");
    }

    fn acquire(&self, op: u64, name: &str) {
        let acquire = pb::Acquire {
            name: name.into(),
            owner: "raw".into(),
            ..Default::default()
        };
        self.send(op, Some(In::Acquire(acquire)));
    }

    async fn next(&mut self) -> (u64, Out) {
        let response = guarded("a session reply", self.responses.message())
            .await
            .expect("no stream error")
            .expect("the stream goes on");
        (
            response.op,
            response.msg.expect("a reply carries a message"),
        )
    }

    async fn failure(&mut self, op: u64) -> pb::Failure {
        match self.next().await {
            (got, Out::Failed(failure)) if got == op => failure,
            other => panic!("expected op {op} to fail, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ops_fail_alone_and_change_nothing() {
    let server = Server::start_with_args(&["--max-streams-per-connection", "3"]);
    let plain = hold_streams(&server).await;
    let mut raw = Raw::open(&server).await;
    raw.acquire(u64::MAX, "h/a");
    assert!(matches!(raw.next().await, (u64::MAX, Out::Granted(_))));
    // The same id again: refused, the open op keeps its lock.
    raw.acquire(u64::MAX, "h/b");
    let failure = raw.failure(u64::MAX).await;
    assert_eq!(
        Code::from(failure.code),
        Code::InvalidArgument,
        "{failure:?}"
    );
    assert!(failure.message.contains("already open"), "{failure:?}");
    // A hostile name, an empty message, a release of nothing.
    raw.acquire(7, "../../etc/passwd");
    let failure = raw.failure(7).await;
    assert_eq!(
        Code::from(failure.code),
        Code::InvalidArgument,
        "{failure:?}"
    );
    raw.send(8, None);
    let failure = raw.failure(8).await;
    assert_eq!(
        Code::from(failure.code),
        Code::InvalidArgument,
        "{failure:?}"
    );
    raw.send(9, Some(In::Release(pb::Release {})));
    // Over the cap (3 ops): two more fit, the third is refused.
    raw.acquire(1, "h/c");
    assert!(matches!(raw.next().await, (1, Out::Granted(_))));
    raw.acquire(2, "h/d");
    assert!(matches!(raw.next().await, (2, Out::Granted(_))));
    raw.acquire(3, "h/e");
    let failure = raw.failure(3).await;
    assert_eq!(
        Code::from(failure.code),
        Code::ResourceExhausted,
        "{failure:?}"
    );
    // What the server holds: exactly the three granted ops.
    let names: Vec<String> = plain
        .list("h/")
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, ["h/a", "h/c", "h/d"]);
    // A release is confirmed, then closing the stream releases the rest.
    raw.send(1, Some(In::Release(pb::Release {})));
    assert!(matches!(raw.next().await, (1, Out::Released(_))));
    drop(raw);
    eventually("every op of the closed stream released", GUARD, || {
        let plain = plain.clone();
        async move { plain.list("h/").await.unwrap().is_empty().then_some(()) }
    })
    .await;
    assert!(!std::path::Path::new("/etc/passwd.lock").exists());
    assert_unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_session_stream_is_cut() {
    let server = Server::start_with_args(&["--request-timeout", "1s"]);
    let mut raw = Raw::open(&server).await;
    let status = guarded("the cut", raw.responses.message())
        .await
        .expect_err("a stream that sends nothing is cut");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("--request-timeout"), "{status:?}");
    drop(raw.requests);
    assert_unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_stream_ends_and_the_next_request_opens_another() {
    let server = Server::start_with_args(&["--idle-timeout", "1s"]);
    let mux = multiplexed(&server).await;
    mux.lock("idle/a")
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    // The stream holds nothing: the server ends it, then closes the idle
    // connection.
    eventually("the idle connection closed", GUARD + GUARD, || {
        let server = &server;
        async move {
            (metric(&server.url, "padlock_idle_connections_closed_total").await >= 1.0)
                .then_some(())
        }
    })
    .await;
    let again = guarded(
        "an acquire after the idle end",
        mux.lock("idle/a").acquire(),
    )
    .await
    .expect("a new session stream");
    again.release().await.unwrap();
}

/// A guard keeps its op's stream open after its client is gone: its
/// release is confirmed, and a dropped guard's lock goes to the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_outlives_its_client() {
    let server = Server::start();
    let other = hold_streams(&server).await;
    let client = multiplexed(&server).await;
    let confirmed = client.lock("out/a").acquire().await.unwrap();
    let dropped = client.lock("out/b").acquire().await.unwrap();
    drop(client);
    assert!(confirmed.is_held());
    guarded("the release", confirmed.release())
        .await
        .expect("a release confirmed on the guard's stream");
    drop(dropped);
    let next = guarded("the next holder", other.lock("out/b").wait(GUARD).acquire())
        .await
        .expect("a dropped guard's lock goes to the next");
    next.release().await.unwrap();
}

/// The Session responses on `stream` until `want` have come (0: until the
/// server's END_STREAM, its trailers); whether the stream ended. A reset
/// fails the test, and so does a stream that neither ends nor answers
/// within the guard (the server's pings do not count).
async fn session_replies_until_the_end(
    raw: &mut RawH2,
    stream: u32,
    want: usize,
) -> (Vec<(u64, Out)>, bool) {
    use prost::Message;
    let read = async {
        let (mut buf, mut seen, mut ended) = (Vec::new(), Vec::new(), false);
        while !ended && (want == 0 || seen.len() < want) {
            let frame = raw.next_frame().await;
            if frame.stream != stream {
                continue;
            }
            match frame.kind {
                DATA => buf.extend_from_slice(frame.data()),
                HEADERS => {}
                RST_STREAM => panic!("the Session stream was reset: {}", frame.describe()),
                _ => continue,
            }
            ended = frame.flags & END_STREAM != 0;
            while buf.len() >= 5 {
                let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
                if buf.len() < 5 + len {
                    break;
                }
                let reply =
                    pb::SessionResponse::decode(&buf[5..5 + len]).expect("a SessionResponse");
                seen.push((reply.op, reply.msg.expect("a reply carries a message")));
                buf.drain(..5 + len);
            }
        }
        (seen, ended)
    };
    guarded("the Session stream's replies", read).await
}

fn session_message(op: u64, msg: In) -> Vec<u8> {
    use prost::Message;
    pb::SessionRequest { op, msg: Some(msg) }.encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_request_side_answers_asked_releases_and_lets_go_of_the_rest() {
    let server = Server::start();
    let plain = hold_streams(&server).await;
    let outside = plain.lock("close/held").acquire().await.unwrap();
    let mut raw = RawH2::connect(server.addr).await;
    raw.handshake().await;
    raw.open_grpc(1, "/padlock.v1.Padlock/Session", false).await;
    for (op, name) in [(1, "close/a"), (2, "close/b"), (3, "close/held")] {
        let acquire = pb::Acquire {
            name: name.into(),
            owner: "raw".into(),
            ..Default::default()
        };
        raw.send_grpc_message(1, &session_message(op, In::Acquire(acquire)), false)
            .await;
    }
    let (mut seen, ended) = session_replies_until_the_end(&mut raw, 1, 3).await;
    seen.sort_by_key(|(op, _)| *op);
    assert!(
        matches!(
            seen.as_slice(),
            [
                (1, Out::Granted(_)),
                (2, Out::Granted(_)),
                (3, Out::Queued(_))
            ]
        ) && !ended,
        "two grants and a waiter behind the other connection: {seen:?}"
    );
    // Op 1's release and the end of the request side in one frame: the
    // release is still answered, then the stream ends (OK), and op 2's lock
    // and op 3's wait go with it.
    let release = session_message(1, In::Release(pb::Release {}));
    raw.send_grpc_message(1, &release, true).await;
    let (seen, ended) = session_replies_until_the_end(&mut raw, 1, 0).await;
    assert!(ended, "the server ends the stream");
    assert!(
        matches!(seen.as_slice(), [(1, Out::Released(_))]),
        "only op 1's Released before the end: {seen:?}"
    );
    eventually("op 2 released and op 3 withdrawn", GUARD, || {
        let plain = plain.clone();
        async move {
            let locks = plain.list("close/").await.unwrap();
            let names: Vec<&str> = locks.iter().map(|l| l.name.as_str()).collect();
            let waiting: u32 = locks.iter().map(|l| l.waiters_total).sum();
            (names == ["close/held"] && waiting == 0).then_some(())
        }
    })
    .await;
    assert!(outside.is_held());
    let b = plain
        .lock("close/b")
        .try_acquire()
        .await
        .unwrap()
        .expect("close/b is free");
    b.release().await.unwrap();
    outside.release().await.unwrap();
    assert_unharmed(&server).await;
}

/// A wait ends on time even when the client reads none of its replies
/// (here its flow-control window is 0, so none can be sent, and HTTP/2
/// stops polling the response that drives the request): the waiter leaves
/// the queue at its deadline, the lock then goes to nobody on its behalf,
/// and its place under `--max-holds` comes back once the stream is gone.
/// `call` is the gRPC method, `request` its first message (an Acquire of
/// `unread/l`, waiting at most 3 s).
async fn a_wait_ends_on_time_unread(call: &str, request: Vec<u8>) {
    // No keepalive: the silent connection is not cut, so only the wait's
    // own deadline can end the wait. Two holds in all: the holder's and
    // the raw waiter's.
    let server = Server::start_with_args(&["--keepalive-interval", "1h", "--max-holds", "2"]);
    let plain = hold_streams(&server).await;
    let holder = plain.lock("unread/l").acquire().await.unwrap();
    let mut raw = RawH2::connect(server.addr).await;
    raw.handshake_with_window(0).await;
    raw.open_grpc(1, call, false).await;
    raw.send_grpc_message(1, &request, false).await;
    until_waiters(&plain, "unread/l", Kind::File, 1).await;
    // Past its deadline the wait is gone, though its answer was never sent.
    until_waiters(&plain, "unread/l", Kind::File, 0).await;
    holder.release().await.unwrap();
    let next = plain
        .lock("unread/l")
        .try_acquire()
        .await
        .unwrap()
        .expect("nobody holds unread/l for the expired wait");
    // Its place is given back once, when its stream goes: then exactly
    // two holds fit again.
    drop(raw);
    let second = eventually_ok("the expired waiter's place back", GUARD, async || {
        plain.lock("unread/other").try_acquire().await
    })
    .await
    .expect("unread/other is free");
    match plain.lock("unread/third").try_acquire().await {
        Err(Error::Status(status)) => assert_eq!(status.code(), Code::ResourceExhausted),
        other => panic!("a third hold over --max-holds 2: {other:?}"),
    }
    next.release().await.unwrap();
    second.release().await.unwrap();
    assert_unharmed(&server).await;
}

fn unread_acquire() -> pb::Acquire {
    pb::Acquire {
        name: "unread/l".into(),
        owner: "raw, reads nothing".into(),
        // Long enough to be seen waiting first, on a loaded machine too.
        wait_ms: Some(3000),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_ends_on_time_even_when_the_client_reads_nothing() {
    let request = session_message(1, In::Acquire(unread_acquire()));
    a_wait_ends_on_time_unread("/padlock.v1.Padlock/Session", request).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_streams_wait_ends_on_time_even_when_its_client_reads_nothing() {
    use prost::Message;
    let request = pb::HoldRequest {
        msg: Some(pb::hold_request::Msg::Acquire(unread_acquire())),
    };
    a_wait_ends_on_time_unread("/padlock.v1.Padlock/Hold", request.encode_to_vec()).await;
}
