//! Serving accepted connections: HTTP/2 (gRPC) and HTTP/1.1 on each, with
//! the request timeout, the idle timeout and graceful shutdown.
//!
//! Each connection is served by hyper in a task of its own, which also
//! counts the requests open on it. A request is open from its arrival
//! until its response body ends or is dropped, so a Hold stream (and an
//! NDJSON hold, an SSE stream) keeps its connection busy for as long as
//! the lock is held or waited for. A connection with nothing open for
//! `--idle-timeout` is shut down gracefully: HTTP/2 clients get GOAWAY
//! (requests already on their way are still served) and open a new
//! connection for their next call; an idle HTTP/1.1 connection is closed.
//!
//! `--request-timeout` bounds how long a request may take until its
//! response starts. That covers a whole unary gRPC call and a REST request,
//! including reading the request body, so a client that sends headers and
//! then stalls is answered DEADLINE_EXCEEDED (HTTP 408) instead of holding
//! a stream forever. Streams start their response at once, so waiting for
//! and holding a lock are not limited by it (the Hold stream's first
//! message has its own deadline, in the gRPC adapter). It is also hyper's
//! HTTP/1.1 header read timeout, which runs while a kept-alive HTTP/1.1
//! connection waits for its next request: such a connection is closed
//! after the request timeout, before the idle timeout. A connection whose
//! first request has not arrived within the request timeout (it sent
//! nothing, or a part of the HTTP/2 preface, or only the preface) is shut
//! down: HTTP/2 clients that completed the preface get GOAWAY and reconnect
//! for their next call, the rest are closed.
//!
//! **Bounded responses.** Every response that is not a stream (everything
//! but Hold streams, NDJSON holds, event streams and the gRPC health watch
//! and reflection streams) is bounded in size by its handler (a page of
//! locks stays under about 1 MiB) and here in number and time: at most
//! [`bounded::BOUNDED_PER_CONNECTION`] in flight per connection,
//! [`bounded::BOUNDED_PER_PEER`] per client address and
//! [`bounded::BOUNDED_IN_FLIGHT`] in the server (past them, RESOURCE_EXHAUSTED or 503 at once), each sent in
//! pieces of at most [`bounded::BOUNDED_CHUNK`] bytes, and each must be read by the
//! client within the request timeout of its start. A client that does not
//! read its responses is disconnected (as Redis does with its output
//! buffer limit), so the memory one client can pin is bounded. (An answer
//! that fits in what HTTP/2 buffers per stream, 16 KiB, is handed over
//! whole once the client opens its window at all; such small answers are
//! bounded by `--max-streams-per-connection`.) Health
//! checks (`/healthz`, `/readyz`, gRPC `Health/Check`) are tiny and take
//! no place: no flood of unread answers can make a probe fail.
//!
//! **Browsers.** A request that changes state (any method but GET, HEAD
//! and OPTIONS) with an `Origin` of another site, or `Sec-Fetch-Site:
//! cross-site`, is refused (403): a web page cannot take or revoke locks.
//! While padlockd listens on a loopback address, a request whose `Host`
//! is not a loopback name (or one of `--allowed-hosts`) is refused too, so
//! a page whose DNS name rebinds to 127.0.0.1 cannot reach it.

mod bounded;

use crate::connections::Conn;
use crate::refusal::{Refusal, is_grpc};
use axum::http::{Request, Response, StatusCode};
pub use bounded::Answers;
use bounded::{
    AnswerKind, BOUNDED_CHUNK, BOUNDED_PER_CONNECTION, Bound, Counted, answer_kind, too_busy,
};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::transport::server::TcpConnectInfo;
use tower::ServiceExt;

/// What `/metrics` shows of the connections.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Connections being served.
    pub open: AtomicI64,
    /// Of those, connections of the lean transport.
    pub lean: AtomicI64,
    /// Connections closed for being idle (lean connections too, whose
    /// Session ends them).
    pub idle_closed: Arc<AtomicU64>,
    /// Requests, Hold streams without an Acquire and connections that sent
    /// nothing, cut by `--request-timeout`.
    pub request_timeouts: Arc<AtomicU64>,
}

/// How connections are served.
#[derive(Clone, Debug)]
pub struct Serving {
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub max_streams_per_connection: u32,
    pub request_timeout: Duration,
    /// `None`: idle connections are kept.
    pub idle_timeout: Option<Duration>,
    pub stats: Arc<ConnectionStats>,
    /// Places for bounded responses, shared by every connection.
    pub bounded: Arc<Answers>,
    /// Which `Host` names are accepted (`None`: any).
    pub hosts: Option<Arc<crate::origin::Hosts>>,
    /// What connections of the lean transport get (`None`: closed).
    pub lean: Option<crate::lean::Door>,
}

impl Serving {
    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.request_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.max_streams_per_connection)
            // What one stream may have waiting in HTTP/2's buffers for the
            // client's window (hyper's default is ~400 KB).
            .max_send_buf_size(BOUNDED_CHUNK)
            .keep_alive_interval(self.keepalive_interval)
            .keep_alive_timeout(self.keepalive_timeout);
        // hyper's defaults for the rest, including its limit on streams a
        // client makes the server reset (1024 per connection: "rapid
        // reset" floods), which tonic's server turned off.
        builder
    }
}

/// Serves every connection `incoming` yields with `routes` until `stop`
/// turns true; then stops taking connections, shuts the open ones down
/// gracefully and returns once they have all closed.
pub async fn serve(
    mut incoming: mpsc::Receiver<Conn>,
    routes: Routes,
    settings: Serving,
    mut stop: watch::Receiver<bool>,
) {
    let builder = Arc::new(settings.builder());
    let routes = routes.prepare();
    // Every connection task holds a clone; `recv` ends when all are gone.
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
    let connections_stop = stop.clone();
    loop {
        tokio::select! {
            conn = incoming.recv() => match conn {
                Some(conn) => {
                    let task = serve_connection(
                        conn,
                        builder.clone(),
                        routes.clone(),
                        settings.clone(),
                        connections_stop.clone(),
                        open_tx.clone(),
                    );
                    tokio::spawn(task);
                }
                None => break,
            },
            _ = stop.wait_for(|stop| *stop) => break,
        }
    }
    // No more connections: the accept loop sees the channel close and
    // closes the listening socket.
    drop(incoming);
    drop(open_tx);
    let _ = open_rx.recv().await;
}

async fn serve_connection(
    mut conn: Conn,
    builder: Arc<auto::Builder<TokioExecutor>>,
    routes: Routes,
    settings: Serving,
    mut stop: watch::Receiver<bool>,
    _open: mpsc::Sender<()>,
) {
    let _counted = OpenConnection::new(settings.stats.clone());
    // Its first request (or the lean transport's hello) is due by then.
    let deadline = after(Instant::now(), settings.request_timeout);
    // The first bytes tell the lean transport from HTTP.
    let sniffed = tokio::select! {
        sniffed = tokio::time::timeout_at(deadline, crate::lean::sniff(&mut conn)) => sniffed,
        _ = stop.wait_for(|stop| *stop) => return,
    };
    let head = match sniffed {
        Err(_) => {
            tracing::debug!(peer = ?conn.info().remote_addr, "closing a connection that sent too little to tell its protocol");
            settings.stats.request_timeouts.fetch_add(1, Relaxed);
            return;
        }
        Ok(None) => return,
        // (Without the lean transport, hyper answers it as bad HTTP.)
        Ok(Some((head, true))) if settings.lean.is_none() => head,
        Ok(Some((_, true))) => {
            let Some(door) = settings.lean.clone() else {
                return;
            };
            conn.set_user_timeout(
                settings
                    .keepalive_interval
                    .saturating_add(settings.keepalive_timeout),
            );
            let peer = conn
                .info()
                .remote_addr
                .map_or_else(|| "unknown".to_string(), |a| a.to_string());
            let timeouts = settings.stats.request_timeouts.clone();
            let _lean = Raised::new(&settings.stats.lean);
            crate::lean::serve(conn, peer, door, deadline, timeouts).await;
            return;
        }
        Ok(Some((head, false))) => head,
    };
    let activity = Arc::new(Activity::new());
    let unread = Arc::new(Notify::new());
    let service = ConnService {
        routes,
        info: conn.info().clone(),
        activity: activity.clone(),
        request_timeout: settings.request_timeout,
        timeouts: settings.stats.request_timeouts.clone(),
        bounded: settings.bounded.clone(),
        own_bounded: Arc::new(Semaphore::new(BOUNDED_PER_CONNECTION)),
        unread: unread.clone(),
        hosts: settings.hosts.clone(),
    };
    let peer = conn.info().remote_addr;
    // A client whose first request does not come (it sent nothing, or a
    // stalled preface) has no request for the request timeout to cut, and
    // would hold its place until the idle timeout, or forever.
    let silent = {
        let activity = activity.clone();
        async move {
            tokio::time::sleep_until(deadline).await;
            if activity.requests.load(Acquire) > 0 {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::pin!(silent);
    // After a shutdown for want of a first request, the connection gets
    // this long to close before it is dropped.
    let hard_close = tokio::time::sleep(Duration::MAX);
    tokio::pin!(hard_close);
    let mut abandoning = false;
    let mut silent_counted = false;
    let connection = builder.serve_connection(TokioIo::new(Rewind::new(head, conn)), service);
    tokio::pin!(connection);
    let idle = idle(activity.clone(), settings.idle_timeout);
    tokio::pin!(idle);
    let mut closing = false;
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(err) = served {
                    // hyper's header read timeout is the request timeout
                    // too: count it, unless the silent timer (due at the
                    // same moment) already did.
                    let timed_out = err
                        .downcast_ref::<hyper::Error>()
                        .is_some_and(hyper::Error::is_timeout);
                    if timed_out && !silent_counted {
                        settings.stats.request_timeouts.fetch_add(1, Relaxed);
                    }
                    tracing::debug!(?peer, %err, "connection ended with an error");
                }
                return;
            }
            () = &mut silent, if !closing => {
                tracing::debug!(?peer, "closing a connection whose first request did not come");
                settings.stats.request_timeouts.fetch_add(1, Relaxed);
                silent_counted = true;
                connection.as_mut().graceful_shutdown();
                closing = true;
                abandoning = true;
                hard_close.as_mut().reset(Instant::now() + Duration::from_secs(1));
            }
            () = &mut hard_close, if abandoning => {
                // A request that came in the meantime is served to its end.
                if activity.requests.load(Acquire) == 0 {
                    return;
                }
                abandoning = false;
            }
            () = unread.notified() => {
                tracing::debug!(?peer, "closing a connection that does not read its responses");
                settings.stats.request_timeouts.fetch_add(1, Relaxed);
                return;
            }
            () = &mut idle, if !closing => {
                tracing::debug!(?peer, "closing an idle connection");
                settings.stats.idle_closed.fetch_add(1, Relaxed);
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = stop.wait_for(|stop| *stop), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Resolves once no request has been open on the connection for
/// `timeout` (never if `None`). It checks when the timeout could have run
/// out, so requests coming and going cost two atomic operations and no
/// wake-up.
async fn idle(activity: Arc<Activity>, timeout: Option<Duration>) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let mut check = after(Instant::now(), timeout);
    loop {
        tokio::time::sleep_until(check).await;
        let now = Instant::now();
        if activity.open.load(Acquire) > 0 {
            check = after(now, timeout);
            continue;
        }
        let idle_since = activity.base + Duration::from_millis(activity.idle_since.load(Acquire));
        match after(idle_since, timeout) {
            due if due > now => check = due,
            _ => return,
        }
    }
}

/// `at + duration`, or about 30 years from `at` for a duration too large
/// to add (a huge `--idle-timeout` means never, not a panic).
fn after(at: Instant, duration: Duration) -> Instant {
    at.checked_add(duration)
        .unwrap_or_else(|| at + Duration::from_secs(86_400 * 365 * 30))
}

/// Requests open on one connection, and since when none has been.
struct Activity {
    /// Requests that arrived on the connection so far.
    requests: AtomicU64,
    open: AtomicUsize,
    /// When the last open request ended, in ms after `base`.
    idle_since: AtomicU64,
    /// When the connection started.
    base: Instant,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            requests: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            base: Instant::now(),
        }
    }
}

/// The service of one connection: the routes, plus the peer's address in
/// every request's extensions (as tonic's own server puts it), the open
/// request count and the request timeout.
struct ConnService {
    routes: Routes,
    info: TcpConnectInfo,
    activity: Arc<Activity>,
    request_timeout: Duration,
    timeouts: Arc<AtomicU64>,
    /// The server's places for bounded responses, and this connection's.
    bounded: Arc<Answers>,
    own_bounded: Arc<Semaphore>,
    /// Told when a bounded response was not read in time.
    unread: Arc<Notify>,
    hosts: Option<Arc<crate::origin::Hosts>>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<Counted>, Infallible>> + Send + 'static>>;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Counted>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, mut request: Request<Incoming>) -> ResponseFuture {
        self.activity.requests.fetch_add(1, AcqRel);
        request.extensions_mut().insert(self.info.clone());
        let open = OpenRequest::new(self.activity.clone());
        let grpc = is_grpc(&request);
        if let Err(refused) = crate::origin::check(&request, self.hosts.as_deref()) {
            let bound = Bound::start(None, self.request_timeout, self.unread.clone());
            let response = refused.answer(grpc);
            return Box::pin(async move {
                Ok(response.map(|body| Counted::new(body, open, Some(bound))))
            });
        }
        // A bounded response needs places: on this connection, for this
        // client address, in the server. None: refused at once.
        let kind = answer_kind(&request);
        let places = match kind {
            AnswerKind::Stream | AnswerKind::Tiny => None,
            AnswerKind::Bounded => {
                let own = self.own_bounded.clone().try_acquire_owned().ok();
                let peer = self.info.remote_addr.map(|a| a.ip());
                match own.zip(self.bounded.take(peer)) {
                    Some(places) => Some(places),
                    None => {
                        // Even a refusal must be read in time.
                        let bound = Bound::start(None, self.request_timeout, self.unread.clone());
                        let response = too_busy().answer(grpc);
                        return Box::pin(async move {
                            Ok(response.map(|body| Counted::new(body, open, Some(bound))))
                        });
                    }
                }
            }
        };
        let timeout = self.request_timeout;
        let timeouts = self.timeouts.clone();
        let unread = self.unread.clone();
        let response = self.routes.clone().oneshot(request.map(Body::new));
        Box::pin(async move {
            let response = match tokio::time::timeout(timeout, response).await {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(_) => {
                    timeouts.fetch_add(1, Relaxed);
                    timed_out(timeout).answer(grpc)
                }
            };
            // Every answer but a stream (and a health check, a few bytes)
            // must be read within the timeout.
            let bound = match kind {
                AnswerKind::Stream | AnswerKind::Tiny => None,
                AnswerKind::Bounded => Some(Bound::start(places, timeout, unread)),
            };
            Ok(response.map(|body| Counted::new(body, open, bound)))
        })
    }
}

/// The answer to a request that did not complete within the timeout.
fn timed_out(timeout: Duration) -> Refusal {
    let message = format!("the request was not complete within {timeout:?} (--request-timeout)");
    Refusal::new(
        tonic::Code::DeadlineExceeded,
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        message.clone(),
    )
    .with_status(crate::grpc::request_timeout(message))
}

/// Counts one open request on its connection until dropped.
pub(super) struct OpenRequest(Arc<Activity>);

impl OpenRequest {
    fn new(activity: Arc<Activity>) -> OpenRequest {
        activity.open.fetch_add(1, AcqRel);
        OpenRequest(activity)
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        // The time first, so that a count of 0 never goes with an older
        // time (the idle check would close too early).
        let activity = &self.0;
        let now = activity.base.elapsed().as_millis() as u64;
        activity.idle_since.fetch_max(now, AcqRel);
        activity.open.fetch_sub(1, AcqRel);
    }
}

/// A connection whose first bytes were read to tell its protocol: reads
/// give them again first.
struct Rewind {
    head: Vec<u8>,
    /// How much of `head` was read again.
    at: usize,
    io: Conn,
}

impl Rewind {
    fn new(head: Vec<u8>, io: Conn) -> Rewind {
        Rewind { head, at: 0, io }
    }
}

impl tokio::io::AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.at < this.head.len() {
            let n = (this.head.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.head[this.at..this.at + n]);
            this.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Adds one to a gauge until dropped.
struct Raised<'a>(&'a AtomicI64);

impl Raised<'_> {
    fn new(gauge: &AtomicI64) -> Raised<'_> {
        gauge.fetch_add(1, Relaxed);
        Raised(gauge)
    }
}

impl Drop for Raised<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Counts one open connection until dropped.
struct OpenConnection(Arc<ConnectionStats>);

impl OpenConnection {
    fn new(stats: Arc<ConnectionStats>) -> OpenConnection {
        stats.open.fetch_add(1, Relaxed);
        OpenConnection(stats)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_end_of_the_last_request() {
        let timeout = Duration::from_secs(10);
        let activity = Arc::new(Activity::new());
        let open = OpenRequest::new(activity.clone());
        let idle = tokio::spawn(idle(activity.clone(), Some(timeout)));
        // Busy for two and a half timeouts: not idle.
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(!idle.is_finished());
        let ended = Instant::now();
        drop(open);
        idle.await.unwrap();
        let waited = ended.elapsed();
        assert!(
            waited >= timeout && waited < timeout + Duration::from_millis(10),
            "{waited:?}"
        );
        // A timeout too large to add to an instant means never.
        let huge = tokio::spawn(super::idle(Arc::new(Activity::new()), Some(Duration::MAX)));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!huge.is_finished());
        // Never, with no timeout.
        let never = tokio::spawn(super::idle(Arc::new(Activity::new()), None));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!never.is_finished());
    }
}
