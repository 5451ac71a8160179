//! The lean transport: Session ops in length-prefixed frames, without
//! HTTP/2 and gRPC, on the same port (see `LeanRequest` in the `.proto`
//! for the contract).
//!
//! A connection whose first bytes are [`MAGIC`] is handed here by
//! `serve::serve_connection`, after TLS when TLS is on; every other one
//! goes to hyper. The connection is one Session: the same [`session::Mux`]
//! as a gRPC Session stream serves its ops (a task per op, a bounded
//! outbox, the op cap, the first-op and idle timeouts), so every guarantee
//! of that stream holds here too. What this module adds:
//!
//! - **The door.** The hello must come within `--request-timeout` of the
//!   connection's start and carry a valid client token when the server
//!   has a token file (as gRPC metadata would). A refusal is a welcome
//!   with `refused` set; then the server closes its side and reads what
//!   the client still sends for a moment, so that the refusal is not lost
//!   to a reset.
//! - **Frames.** A frame over `--max-message-bytes` is refused from its
//!   length prefix, before it is read; a large frame pins memory only as
//!   its bytes arrive. Replies that are ready together go out in one
//!   write.
//! - **Liveness.** A client not heard from for `--keepalive-interval` is
//!   pinged, and the connection (with every lock on it) is dropped when
//!   `--keepalive-timeout` passes without a frame from it: an open socket
//!   alone is no proof of life, as with HTTP/2 pings. A write that does
//!   not finish within their sum (the client does not read) drops the
//!   connection too, and `TCP_USER_TIMEOUT` bounds how long data may go
//!   unacknowledged, so a write to a peer that vanished does not hang
//!   either. A burst of pings gets one pong, for the latest.

use crate::auth::ClientTokens;
use crate::grpc::{PadlockService, session};
use padlock_proto::lean::{self as frame, MAGIC};
use padlock_proto::v1 as pb;
use pb::lean_request::Msg as In;
use pb::lean_response::Msg as Out;
use prost::Message;
use prost::bytes::BytesMut;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::{Code, Status};

/// Replies put into one write at most.
const COALESCE: usize = 64;

/// After a refusal, how long the client's further bytes are read (and
/// dropped) before the connection closes.
const LINGER: Duration = Duration::from_secs(1);

/// What serves lean connections.
pub struct Lean {
    pub service: PadlockService,
    /// `None`: no client token needed.
    pub tokens: Option<Arc<ClientTokens>>,
    /// Called for each hello refused for its token.
    pub on_auth_failure: Arc<dyn Fn() + Send + Sync>,
    /// Largest frame read (`--max-message-bytes`).
    pub max_frame: usize,
    /// `--keepalive-interval` and `--keepalive-timeout`.
    pub keepalive: (Duration, Duration),
    /// Counts the connections closed for having no op open for
    /// `--idle-timeout`.
    pub idle_closed: Arc<AtomicU64>,
}

/// What the lean connections of a listener get: served, or refused with a
/// message (for connections over `--max-connections`).
#[derive(Clone)]
pub enum Door {
    Serve(Arc<Lean>),
    Refuse(String),
}

impl std::fmt::Debug for Door {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Door::Serve(_) => f.write_str("Door::Serve"),
            Door::Refuse(why) => write!(f, "Door::Refuse({why:?})"),
        }
    }
}

/// Did the connection start with [`MAGIC`]? Reads at most its 8 bytes, and
/// stops at the first byte that differs: returns the bytes read (for hyper
/// to see again) and the answer. `None`: the connection closed or failed
/// first.
pub async fn sniff(io: &mut (impl AsyncRead + Unpin)) -> Option<(Vec<u8>, bool)> {
    let mut head = [0u8; MAGIC.len()];
    let mut len = 0;
    while len < MAGIC.len() {
        match io.read(&mut head[len..]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => len += n,
        }
        if head[..len] != MAGIC[..len] {
            return Some((head[..len].to_vec(), false));
        }
    }
    Some((head.to_vec(), true))
}

/// Serves one lean connection (its magic already read) until it ends.
/// `deadline`: when the hello must have come; `timeouts` counts the
/// connections cut for not sending it.
pub async fn serve<IO>(
    io: IO,
    peer: String,
    door: Door,
    deadline: Instant,
    timeouts: Arc<AtomicU64>,
) where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, mut write) = tokio::io::split(io);
    let lean = match door {
        Door::Serve(lean) => lean,
        Door::Refuse(why) => {
            let mut reader = Reader::new(read, 1024);
            refuse(&mut write, &mut reader, Code::ResourceExhausted, why).await;
            return;
        }
    };
    let mut reader = Reader::new(read, lean.max_frame);
    let hello = match tokio::time::timeout_at(deadline, reader.next()).await {
        Err(_) => {
            timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "closing a lean connection whose hello did not come");
            return;
        }
        Ok(Ok(Some(In::Hello(hello)))) => hello,
        Ok(Ok(None)) => return,
        Ok(Ok(Some(_))) => {
            let why = "the first frame of a lean connection must be a hello".to_string();
            refuse(&mut write, &mut reader, Code::InvalidArgument, why).await;
            return;
        }
        Ok(Err(status)) => {
            refuse(
                &mut write,
                &mut reader,
                status.code(),
                status.message().into(),
            )
            .await;
            return;
        }
    };
    let scope = match &lean.tokens {
        None => None,
        Some(tokens) => {
            let given = Some(hello.authorization.as_bytes()).filter(|a| !a.is_empty());
            match tokens.check(given) {
                Ok(scope) => Some(scope),
                Err(err) => {
                    (lean.on_auth_failure)();
                    let why = err.to_string();
                    refuse(&mut write, &mut reader, Code::Unauthenticated, why).await;
                    return;
                }
            }
        }
    };
    if lean.service.table().is_draining() {
        let why = "padlockd is shutting down".to_string();
        refuse(&mut write, &mut reader, Code::Unavailable, why).await;
        return;
    }
    let mut out = BytesMut::with_capacity(256);
    let welcome = pb::LeanWelcome {
        refused: None,
        max_frame: u32::try_from(lean.max_frame).unwrap_or(u32::MAX),
    };
    frame::encode(&response(Out::Welcome(welcome)), &mut out);
    if write.write_all(&out).await.is_err() {
        return;
    }
    let heard = reader.heard.clone();
    let base = reader.base;
    // The latest ping is what the next pong answers (a burst gets one).
    let (pong_tx, mut pongs) = watch::channel(0u64);
    let inbound =
        futures_util::stream::unfold((reader, pong_tx), |(mut reader, pongs)| async move {
            let request = reader.next_session(&pongs).await?;
            Some((request, (reader, pongs)))
        });
    let mux = lean
        .service
        .session_mux(Box::pin(inbound), peer.clone(), scope)
        .opened(lean.idle_closed.clone());
    let mut replies = session::stream(mux);
    let (interval, timeout) = lean.keepalive;
    let mut keepalive = Keepalive::new(interval, timeout);
    let check = tokio::time::sleep_until(keepalive.next_check(base));
    tokio::pin!(check);
    loop {
        out.clear();
        let mut end = false;
        let mut closing = false;
        tokio::select! {
            biased;
            reply = replies.next() => {
                closing = matches!(reply, Some(Err(_)));
                end = add_reply(reply, &mut out);
                // What else is ready goes out in the same write.
                for _ in 1..COALESCE {
                    if end {
                        break;
                    }
                    let ready =
                        std::future::poll_fn(|cx| std::task::Poll::Ready(replies.as_mut().poll_next(cx)))
                            .await;
                    match ready {
                        std::task::Poll::Ready(reply) => {
                            closing = matches!(reply, Some(Err(_)));
                            end = add_reply(reply, &mut out);
                        }
                        std::task::Poll::Pending => break,
                    }
                }
            }
            Ok(()) = pongs.changed() => {
                let n = *pongs.borrow_and_update();
                frame::encode(&response(Out::Pong(n)), &mut out);
            }
            () = &mut check => {
                let heard_at = base + Duration::from_nanos(heard.load(Ordering::Acquire));
                match keepalive.due(heard_at, Instant::now()) {
                    Due::Nothing => {}
                    Due::Ping(n) => frame::encode(&response(Out::Ping(n)), &mut out),
                    Due::Dead => {
                        tracing::debug!(%peer, ?timeout, "dropping a lean connection that did not answer a ping");
                        return;
                    }
                }
                check.as_mut().reset(keepalive.next_check(heard_at));
            }
        }
        if !out.is_empty()
            && !write_within(&mut write, &out, interval.saturating_add(timeout)).await
        {
            tracing::debug!(%peer, "dropping a lean connection that does not read");
            return;
        }
        if end {
            // The Session first: its locks go now, not after the linger.
            drop(replies);
            let _ = write.shutdown().await;
            if closing {
                // Time for the client to read why before a reset (of unread
                // bytes) could destroy it.
                tokio::time::sleep(LINGER).await;
            }
            return;
        }
    }
}

/// Writes all of `bytes`; `false` when that failed, or did not finish
/// within `limit` (the client does not read). Most writes finish at once
/// and need no timer.
async fn write_within<W: AsyncWrite>(
    write: &mut WriteHalf<W>,
    bytes: &[u8],
    limit: Duration,
) -> bool {
    let mut all = std::pin::pin!(write.write_all(bytes));
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(all.as_mut().poll(cx))).await;
    match first {
        std::task::Poll::Ready(written) => written.is_ok(),
        std::task::Poll::Pending => matches!(tokio::time::timeout(limit, all).await, Ok(Ok(()))),
    }
}

/// Adds one reply of the Session to `out`; `true` when it was the last.
fn add_reply(reply: Option<Result<pb::SessionResponse, Status>>, out: &mut BytesMut) -> bool {
    match reply {
        Some(Ok(reply)) => {
            frame::encode(&response(Out::Session(reply)), out);
            false
        }
        Some(Err(status)) => {
            frame::encode(&response(Out::Closing(failure(&status))), out);
            true
        }
        None => true,
    }
}

fn response(msg: Out) -> pb::LeanResponse {
    pb::LeanResponse { msg: Some(msg) }
}

fn failure(status: &Status) -> pb::Failure {
    pb::Failure {
        code: status.code() as i32,
        message: status.message().to_string(),
    }
}

/// Says no (a welcome with `refused`), closes our side, and reads what
/// the client still sends for [`LINGER`], so that the refusal is not lost
/// to a reset of a connection with unread bytes.
async fn refuse<R: AsyncRead, W: AsyncWrite>(
    write: &mut WriteHalf<W>,
    reader: &mut Reader<R>,
    code: Code,
    why: String,
) {
    let refused = failure(&Status::new(code, why));
    let welcome = pb::LeanWelcome {
        refused: Some(refused),
        max_frame: 0,
    };
    let mut out = BytesMut::new();
    frame::encode(&response(Out::Welcome(welcome)), &mut out);
    if write.write_all(&out).await.is_err() || write.shutdown().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 1024];
        while let Ok(1..) = reader.read.read(&mut sink).await {}
    })
    .await;
}

/// The client's frames.
struct Reader<R> {
    read: ReadHalf<R>,
    buf: BytesMut,
    max: usize,
    /// When the client was last heard from: ns after `base`.
    heard: Arc<AtomicU64>,
    base: Instant,
}

impl<R: AsyncRead> Reader<R> {
    fn new(read: ReadHalf<R>, max: usize) -> Reader<R> {
        Reader {
            read,
            buf: BytesMut::new(),
            max,
            heard: Arc::default(),
            base: Instant::now(),
        }
    }

    /// The next frame's message; `Ok(None)` at the end of the connection.
    async fn next(&mut self) -> Result<Option<In>, Status> {
        loop {
            let taken = frame::take(&mut self.buf, self.max).map_err(|too| {
                Status::out_of_range(format!("{too} (the server's --max-message-bytes)"))
            })?;
            if let Some(body) = taken {
                let nanos = self.base.elapsed().as_nanos() as u64;
                self.heard.store(nanos, Ordering::Release);
                let request = pb::LeanRequest::decode(body).map_err(|err| {
                    Status::invalid_argument(format!("a frame that does not decode: {err}"))
                })?;
                return match request.msg {
                    Some(msg) => Ok(Some(msg)),
                    None => Err(Status::invalid_argument(
                        "an empty LeanRequest: it must carry a hello, a session message, a \
                         ping or a pong",
                    )),
                };
            }
            match self.read.read_buf(&mut self.buf).await {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => {
                    return Err(Status::invalid_argument(
                        "the connection ended in the middle of a frame",
                    ));
                }
                Ok(_) => {}
                Err(err) => return Err(Status::unavailable(format!("reading: {err}"))),
            }
        }
    }

    /// The next Session message, for the [`session::Mux`]; answers pings
    /// on the way. `None` ends the Session's inbound side.
    async fn next_session(
        &mut self,
        pongs: &watch::Sender<u64>,
    ) -> Option<Result<pb::SessionRequest, Status>> {
        loop {
            match self.next().await {
                Ok(None) => return None,
                Ok(Some(In::Session(request))) => return Some(Ok(request)),
                Ok(Some(In::Ping(n))) => {
                    let _ = pongs.send(n);
                }
                Ok(Some(In::Pong(_))) => {}
                Ok(Some(In::Hello(_))) => {
                    return Some(Err(Status::invalid_argument(
                        "a second hello on a lean connection",
                    )));
                }
                Err(status) => return Some(Err(status)),
            }
        }
    }
}

/// When to ping, and when to give up on the client.
struct Keepalive {
    interval: Duration,
    timeout: Duration,
    /// The ping in flight: its number and when it went out.
    pinged: Option<(u64, Instant)>,
    sent: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum Due {
    Nothing,
    Ping(u64),
    Dead,
}

impl Keepalive {
    fn new(interval: Duration, timeout: Duration) -> Keepalive {
        Keepalive {
            interval,
            timeout,
            pinged: None,
            sent: 0,
        }
    }

    /// What to do at `now`, the client last heard from at `heard_at`.
    fn due(&mut self, heard_at: Instant, now: Instant) -> Due {
        if let Some((_, at)) = self.pinged {
            if heard_at >= at {
                self.pinged = None; // answered (or anything else came)
            } else if now >= after(at, self.timeout) {
                return Due::Dead;
            } else {
                return Due::Nothing;
            }
        }
        if self.interval.is_zero() || now < after(heard_at, self.interval) {
            return Due::Nothing;
        }
        self.sent += 1;
        self.pinged = Some((self.sent, now));
        Due::Ping(self.sent)
    }

    /// When [`Keepalive::due`] may next have something to do.
    fn next_check(&self, heard_at: Instant) -> Instant {
        match self.pinged {
            Some((_, at)) => after(at, self.timeout),
            None if self.interval.is_zero() => after(heard_at, Duration::MAX),
            None => after(heard_at, self.interval),
        }
    }
}

/// `at + duration`, or about 30 years from `at` when that does not fit.
fn after(at: Instant, duration: Duration) -> Instant {
    at.checked_add(duration)
        .unwrap_or_else(|| at + Duration::from_secs(86_400 * 365 * 30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sniff_stops_at_the_first_byte_that_differs() {
        // Byte by byte, as a slow client sends: no read past the first
        // byte that differs.
        let mut slow = tokio_test_reader(&[b"P", b"O", b"ST / HTTP/1.1"]);
        assert_eq!(sniff(&mut slow).await, Some((b"PO".to_vec(), false)));
        let mut slow = tokio_test_reader(&[b"PADLO", b"CK\x01", b"rest"]);
        assert_eq!(sniff(&mut slow).await, Some((MAGIC.to_vec(), true)));
        let sniffed = |bytes: &'static [u8]| async move {
            let mut io = bytes;
            sniff(&mut io).await
        };
        assert_eq!(
            sniffed(b"PADLOCK\x01rest").await,
            Some((MAGIC.to_vec(), true))
        );
        // What was read is handed on, at most the magic's length.
        assert_eq!(
            sniffed(b"PRI * HTTP/2.0").await,
            Some((b"PRI * HT".to_vec(), false))
        );
        assert_eq!(sniffed(b"GET").await, Some((b"GET".to_vec(), false)));
        // Another version of the lean transport is not this one.
        assert_eq!(
            sniffed(b"PADLOCK\x02").await,
            Some((b"PADLOCK\x02".to_vec(), false))
        );
        assert_eq!(sniffed(b"PADL").await, None);
    }

    /// A reader that gives `pieces` one read each.
    fn tokio_test_reader(pieces: &[&'static [u8]]) -> impl AsyncRead + Unpin {
        let (mut client, server) = tokio::io::duplex(64);
        let pieces: Vec<&'static [u8]> = pieces.to_vec();
        tokio::spawn(async move {
            for piece in pieces {
                client.write_all(piece).await.unwrap();
                client.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            // Held open: a read past the pieces would hang the test.
            std::future::pending::<()>().await;
        });
        server
    }

    #[test]
    fn keepalive_pings_the_silent_and_gives_up_on_the_dead() {
        let (interval, timeout) = (Duration::from_secs(5), Duration::from_secs(3));
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut k = Keepalive::new(interval, timeout);
        assert_eq!(k.next_check(t0), t0 + s(5));
        assert_eq!(k.due(t0, t0 + s(4)), Due::Nothing);
        // Silent for the interval: a ping, then its timeout is the check.
        assert_eq!(k.due(t0, t0 + s(5)), Due::Ping(1));
        assert_eq!(k.next_check(t0), t0 + s(8));
        assert_eq!(k.due(t0, t0 + s(7)), Due::Nothing);
        // Heard after the ping: alive, next ping an interval after that.
        assert_eq!(k.due(t0 + s(6), t0 + s(8)), Due::Nothing);
        assert_eq!(k.next_check(t0 + s(6)), t0 + s(11));
        assert_eq!(k.due(t0 + s(6), t0 + s(11)), Due::Ping(2));
        // Not heard within the timeout of the ping: dead.
        assert_eq!(k.due(t0 + s(6), t0 + s(13)), Due::Nothing);
        assert_eq!(k.due(t0 + s(6), t0 + s(14)), Due::Dead);
        // An interval of zero never pings.
        let mut never = Keepalive::new(Duration::ZERO, timeout);
        assert_eq!(never.due(t0, t0 + s(3600)), Due::Nothing);
        assert!(never.next_check(t0) > t0 + s(86_400 * 365));
    }
}
