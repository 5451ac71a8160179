//! The gRPC adapter: Hold streams and inspection calls <-> the lock table.
//!
//! Thin by design: decode and validate the wire messages, call the table,
//! encode what it says. Domain errors become `Status` in one place
//! ([`status`]).

use crate::auth::Scope;
use crate::locks::{
    AcquireRequest, Detail, Grant, HolderView, Kind, LockError, LockTable, LockView, LostReason,
    Mode, Released, Session, Step, WaiterView,
};
use crate::name::printable;
use padlock_proto::v1 as pb;
use pb::hold_request::Msg as In;
use pb::hold_response::Msg as Out;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

pub mod session;

/// The `padlock.v1.Padlock` service.
#[derive(Clone)]
pub struct PadlockService {
    table: LockTable,
    lock_dir: String,
    /// How long a Hold stream may wait for its Acquire (`--request-timeout`).
    first_message: Duration,
    /// Counts Hold streams cut for not sending it.
    timeouts: Arc<AtomicU64>,
    /// Most ops open at once on one Session stream.
    max_session_ops: usize,
    /// A Session stream with no op open for this long is ended.
    session_idle: Option<Duration>,
    /// The largest message read (`--max-message-bytes`; 0: not said).
    max_message: usize,
}

impl PadlockService {
    pub fn new(table: LockTable, lock_dir: String) -> PadlockService {
        PadlockService {
            table,
            lock_dir,
            first_message: Duration::from_secs(10),
            timeouts: Arc::default(),
            max_session_ops: 1000,
            max_message: 0,
            session_idle: None,
        }
    }

    /// Ends a Session stream that has had no op open for `idle` (the
    /// server's `--idle-timeout`; `None`: never), as an idle connection is.
    pub fn session_idle(mut self, idle: Option<Duration>) -> Self {
        self.session_idle = idle;
        self
    }

    /// The largest message the server reads, told to each Session stream
    /// (its requests over it would end the stream).
    pub fn max_message(mut self, max: usize) -> Self {
        self.max_message = max;
        self
    }

    /// Most ops open at once on one Session stream (the server's
    /// `--max-streams-per-connection`: one Session carries what that many
    /// Hold streams would).
    pub fn max_session_ops(mut self, max: usize) -> Self {
        self.max_session_ops = max.max(1);
        self
    }

    /// One Session: its ops, from `inbound`, go to the lock table.
    pub fn session_mux(
        &self,
        inbound: session::Inbound,
        peer: String,
        scope: Option<Scope>,
    ) -> session::Mux {
        session::Mux::new(
            self.table.clone(),
            inbound,
            peer,
            scope,
            (self.first_message, self.timeouts.clone()),
            (self.max_session_ops, self.session_idle),
        )
    }

    /// The lock table the service serves.
    pub fn table(&self) -> &LockTable {
        &self.table
    }

    /// How long a Hold stream may take to send its Acquire, and what counts
    /// the streams that did not.
    pub fn first_message_timeout(mut self, timeout: Duration, counter: Arc<AtomicU64>) -> Self {
        self.first_message = timeout;
        self.timeouts = counter;
        self
    }
}

/// Maps a domain error to the gRPC status a client sees.
pub fn status(err: LockError) -> Status {
    let msg = err.to_string();
    match err {
        LockError::InvalidName { .. } | LockError::InvalidArgument(_) => {
            Status::invalid_argument(msg)
        }
        LockError::LimitMismatch { .. } => Status::failed_precondition(msg),
        LockError::Unavailable(_) | LockError::Draining | LockError::Backend(_) => {
            Status::unavailable(msg)
        }
        LockError::TooManyWaiters { .. }
        | LockError::TooManyLocks { .. }
        | LockError::TooManyHolds { .. }
        | LockError::QuotaExceeded { .. }
        | LockError::NoDescriptors { .. } => Status::resource_exhausted(msg),
        LockError::NotAcquired { .. } => Status::deadline_exceeded(msg),
        LockError::PermissionDenied(_) => Status::permission_denied(msg),
    }
}

/// DEADLINE_EXCEEDED for a request cut by `--request-timeout`, marked so
/// that clients do not take it for a lock not acquired within its wait.
pub fn request_timeout(message: String) -> Status {
    let mut status = Status::deadline_exceeded(message);
    status.metadata_mut().insert(
        pb::ERROR_METADATA,
        tonic::metadata::MetadataValue::from_static(pb::REQUEST_TIMEOUT),
    );
    status
}

fn kind_from_wire(value: i32) -> Result<Kind, LockError> {
    Kind::from_wire(value).map_err(|_| {
        LockError::InvalidArgument(format!(
            "unknown kind {value}; expected KIND_FILE (1), KIND_SEMAPHORE (2) or KIND_REDIS (3)"
        ))
    })
}

fn mode_from_wire(value: i32) -> Result<Mode, LockError> {
    Mode::from_wire(value).ok_or_else(|| {
        LockError::InvalidArgument(format!(
            "unknown mode {value}; expected MODE_EXCLUSIVE (1) or MODE_SHARED (2)"
        ))
    })
}

fn decode_acquire(a: pb::Acquire, peer: String) -> Result<AcquireRequest, LockError> {
    Ok(AcquireRequest {
        kind: kind_from_wire(a.kind)?,
        mode: mode_from_wire(a.mode)?,
        name: a.name,
        limit: a.limit,
        owner: a.owner,
        peer,
        labels: a.labels.into_iter().collect(),
        wait: a.wait_ms.map(Duration::from_millis),
        quota: None,
    })
}

type Reply = Result<pb::HoldResponse, Status>;

fn reply(msg: Out) -> Reply {
    Ok(pb::HoldResponse { msg: Some(msg) })
}

fn granted(g: &Grant) -> Out {
    Out::Granted(granted_to_wire(g))
}

fn granted_to_wire(g: &Grant) -> pb::Granted {
    pb::Granted {
        fence: g.fence,
        slot: g.slot,
        holder_id: g.holder_id.to_string(),
        mode: pb::Mode::from(g.mode) as i32,
    }
}

fn lost_to_wire(reason: LostReason) -> pb::LostReason {
    match reason {
        LostReason::Shutdown => pb::LostReason::Shutdown,
        LostReason::Revoked => pb::LostReason::Revoked,
        LostReason::Backend => pb::LostReason::Backend,
    }
}

/// One Hold stream, advanced by polling its response stream: no task and
/// no channel per stream, so a held lock costs little memory. When the
/// client goes away, hyper drops the response stream, which drops the
/// ticket, which releases the lock or leaves the queue.
struct Hold {
    table: LockTable,
    inbound: Streaming<pb::HoldRequest>,
    peer: String,
    /// What the client's token allows (`None`: no token file configured).
    scope: Option<Scope>,
    /// How long the Acquire may take to arrive.
    first_message: Duration,
    timeouts: Arc<AtomicU64>,
    phase: Phase,
}

enum Phase {
    /// Waiting for the Acquire.
    Start,
    /// Queued, then held.
    Open(Session),
    Done,
}

/// The response stream of one Hold call.
fn hold_stream(
    table: LockTable,
    inbound: Streaming<pb::HoldRequest>,
    peer: String,
    scope: Option<Scope>,
    (first_message, timeouts): (Duration, Arc<AtomicU64>),
) -> HoldStream {
    let hold = Hold {
        table,
        inbound,
        peer,
        scope,
        first_message,
        timeouts,
        phase: Phase::Start,
    };
    // One span per stream, at debug level: with PADLOCK_LOG=debug every log
    // line of this lock carries its peer, name and holder id. (At info, a
    // span would cost every held lock about 370 bytes of the subscriber's
    // memory; the info lines about a lock name it themselves.)
    let span = tracing::debug_span!("hold", peer = %hold.peer, name = tracing::field::Empty, id = tracing::field::Empty);
    // (The Hold is boxed: `unfold` keeps a slot for its state next to the
    // future that has taken it, and a held lock should not pay for both.)
    Box::pin(futures_util::stream::unfold(
        (Box::new(hold), span),
        |(mut hold, span)| async move {
            let reply = hold.next().instrument(span.clone()).await?;
            Some((reply, (hold, span)))
        },
    ))
}

type HoldStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Reply> + Send>>;

fn invalid(message: &str) -> Option<Reply> {
    Some(Err(Status::invalid_argument(message)))
}

fn lost(reason: LostReason, detail: String) -> Reply {
    reply(Out::Lost(lost_message(reason, detail)))
}

fn lost_message(reason: LostReason, detail: String) -> pb::Lost {
    pb::Lost {
        reason: lost_to_wire(reason) as i32,
        detail,
    }
}

impl Hold {
    /// Runs until there is a message for the client; `None` ends the stream.
    async fn next(&mut self) -> Option<Reply> {
        loop {
            let (reply, next) = match std::mem::replace(&mut self.phase, Phase::Done) {
                Phase::Done => return None,
                Phase::Start => self.start().await,
                Phase::Open(session) => self.open(session).await,
            };
            self.phase = next;
            if reply.is_some() {
                return reply;
            }
        }
    }

    async fn start(&mut self) -> (Option<Reply>, Phase) {
        let first = tokio::time::timeout(self.first_message, self.inbound.message());
        let Ok(first) = first.await else {
            self.timeouts.fetch_add(1, Ordering::Relaxed);
            let msg = format!(
                "no Acquire within {:?} of opening the Hold stream (--request-timeout)",
                self.first_message
            );
            return (Some(Err(request_timeout(msg))), Phase::Done);
        };
        let acquire = match first {
            Ok(Some(pb::HoldRequest {
                msg: Some(In::Acquire(a)),
            })) => a,
            Ok(Some(pb::HoldRequest {
                msg: Some(In::Release(_)),
            })) => {
                let msg =
                    "Release before Acquire: the first message on a Hold stream must be Acquire";
                return (invalid(msg), Phase::Done);
            }
            Ok(Some(pb::HoldRequest { msg: None })) => {
                let msg = "empty HoldRequest: the first message must be Acquire";
                return (invalid(msg), Phase::Done);
            }
            Ok(None) => return (None, Phase::Done),
            Err(status) => return (Some(Err(status)), Phase::Done),
        };
        let peer = std::mem::take(&mut self.peer);
        let opened = decode_acquire(acquire, peer).and_then(|request| {
            let span = tracing::Span::current();
            span.record("name", printable(&request.name));
            self.table.open(request, self.scope.as_ref())
        });
        match opened {
            Ok(session) => {
                tracing::Span::current().record("id", session.id());
                (None, Phase::Open(session))
            }
            Err(err) => (Some(Err(status(err))), Phase::Done),
        }
    }

    /// Until the session ends, or the client releases, sends something
    /// else or goes away.
    async fn open(&mut self, mut session: Session) -> (Option<Reply>, Phase) {
        tokio::select! {
            step = session.next() => {
                match step {
                    Some(Step::Queued { position, holders }) => {
                        let waiter_id = session.id().to_string();
                        let queued = pb::Queued { position, holders, waiter_id };
                        (Some(reply(Out::Queued(queued))), Phase::Open(session))
                    }
                    Some(Step::Granted(grant)) => {
                        (Some(reply(granted(&grant))), Phase::Open(session))
                    }
                    Some(Step::Lost { reason, detail }) => (Some(lost(reason, detail)), Phase::Done),
                    Some(Step::Failed(err)) => (Some(Err(status(err))), Phase::Done),
                    None => (None, Phase::Done),
                }
            },
            // (`next`, not `message`: its future is a reference, where
            // `message`'s carries hundreds of bytes in every held lock.)
            msg = self.inbound.next() => match msg.transpose() {
                // Whatever came, the lock ends here; it is released before
                // the client is told so: once it reads Released, the next
                // holder may already have the lock.
                Ok(Some(pb::HoldRequest { msg: Some(In::Release(_)) })) => {
                    let reply = match Box::pin(session.release()).await {
                        Released::Released => Some(reply(Out::Released(pb::Released {}))),
                        Released::Lost { reason, detail } => Some(lost(reason, detail)),
                        Released::Over => None,
                    };
                    (reply, Phase::Done)
                }
                Ok(Some(_)) => {
                    let msg = if session.is_granted() {
                        "a second Acquire on one Hold stream: the lock was released; use one stream per lock"
                    } else {
                        "a second Acquire on one Hold stream: use one stream per lock"
                    };
                    drop(session);
                    (invalid(msg), Phase::Done)
                }
                Ok(None) => (None, Phase::Done),
                Err(status) => (Some(Err(status)), Phase::Done),
            },
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn holder_to_wire(h: HolderView) -> pb::HolderInfo {
    pb::HolderInfo {
        id: h.id.to_string(),
        owner: h.owner,
        peer: h.peer,
        since_unix_ms: unix_ms(h.since),
        fence: h.fence,
        slot: h.slot,
        mode: pb::Mode::from(h.mode) as i32,
        labels: h.labels.into_iter().collect(),
    }
}

fn waiter_to_wire(w: WaiterView) -> pb::WaiterInfo {
    pb::WaiterInfo {
        id: w.id.to_string(),
        owner: w.owner,
        peer: w.peer,
        position: w.position,
        since_unix_ms: unix_ms(w.since),
        deadline_unix_ms: w.deadline.map_or(0, unix_ms),
        mode: pb::Mode::from(w.mode) as i32,
        labels: w.labels.into_iter().collect(),
    }
}

fn lock_to_wire(v: LockView) -> pb::LockInfo {
    pb::LockInfo {
        name: v.name,
        kind: pb::Kind::from(v.kind) as i32,
        mode: v.mode.map_or(pb::Mode::Unspecified, pb::Mode::from) as i32,
        limit: v.limit,
        holders: v.holders.into_iter().map(holder_to_wire).collect(),
        waiters: v.waiters.into_iter().map(waiter_to_wire).collect(),
        holders_total: v.holders_total.try_into().unwrap_or(u32::MAX),
        waiters_total: v.waiters_total.try_into().unwrap_or(u32::MAX),
    }
}

/// Page sizes: the default and the most a request may ask for.
pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 1000;

/// `limit` of a list or a waiter page: 0 means the default.
fn page_size(limit: u32, what: &str) -> Result<usize, Status> {
    match limit {
        0 => Ok(DEFAULT_PAGE as usize),
        n if n <= MAX_PAGE => Ok(n as usize),
        n => Err(Status::invalid_argument(format!(
            "{what} {n} is out of range: 1 to {MAX_PAGE} (0: {DEFAULT_PAGE})"
        ))),
    }
}

/// A list cursor: `<kind>:<name>` of the last lock of the previous page.
pub fn parse_cursor(cursor: &str) -> Option<(Kind, &str)> {
    let (kind, name) = cursor.split_once(':')?;
    Some((kind.parse().ok()?, name))
}

/// The cursor that continues after `lock`.
pub fn cursor_after(lock: &LockView) -> String {
    format!("{}:{}", lock.kind.as_str(), lock.name)
}

/// Resident set size of this process, from /proc/self/statm.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * rustix::param::page_size() as u64
}

#[tonic::async_trait]
impl pb::padlock_server::Padlock for PadlockService {
    type HoldStream = HoldStream;
    type SessionStream = session::SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let scope = request.extensions().get::<Scope>().cloned();
        let inbound = Box::pin(request.into_inner());
        let mut response = Response::new(session::stream(self.session_mux(inbound, peer, scope)));
        if self.max_message != 0 {
            response
                .metadata_mut()
                .insert(pb::MAX_MESSAGE_METADATA, self.max_message.into());
        }
        Ok(response)
    }

    async fn hold(
        &self,
        request: Request<Streaming<pb::HoldRequest>>,
    ) -> Result<Response<Self::HoldStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let scope = request.extensions().get::<Scope>().cloned();
        Ok(Response::new(hold_stream(
            self.table.clone(),
            request.into_inner(),
            peer,
            scope,
            (self.first_message, self.timeouts.clone()),
        )))
    }

    async fn list_locks(
        &self,
        request: Request<pb::ListLocksRequest>,
    ) -> Result<Response<pb::ListLocksResponse>, Status> {
        let scope = request.extensions().get::<Scope>().cloned();
        let req = request.into_inner();
        let kind = match req.kind {
            0 => None,
            k => Some(kind_from_wire(k).map_err(status)?),
        };
        let limit = page_size(req.limit, "limit")?;
        let after = match req.cursor.as_str() {
            "" => None,
            cursor => Some(parse_cursor(cursor).ok_or_else(|| {
                Status::invalid_argument("bad cursor: pass the next_cursor of the previous page")
            })?),
        };
        // A token limited to a prefix sees only the locks under it.
        let prefix = match &scope {
            Some(scope) => scope.narrow(&req.prefix),
            None => Some(req.prefix),
        };
        let Some(prefix) = prefix else {
            return Ok(Response::new(pb::ListLocksResponse::default()));
        };
        let after = after.map(|(kind, name)| (name, kind));
        let page = self.table.list(kind, &prefix, after, limit, &Detail::LIST);
        let next_cursor = match page.locks.last() {
            Some(last) if page.more => cursor_after(last),
            _ => String::new(),
        };
        let locks = page.locks.into_iter().map(lock_to_wire).collect();
        Ok(Response::new(pb::ListLocksResponse { locks, next_cursor }))
    }

    async fn get_lock(
        &self,
        request: Request<pb::GetLockRequest>,
    ) -> Result<Response<pb::LockInfo>, Status> {
        let scope = request.extensions().get::<Scope>().cloned();
        let req = request.into_inner();
        let kind = kind_from_wire(req.kind).map_err(status)?;
        if let Some(scope) = scope.filter(|s| !s.allows(&req.name)) {
            return Err(Status::permission_denied(scope.denied(&req.name)));
        }
        let detail = Detail::show(
            req.waiter_offset as usize,
            page_size(req.waiter_limit, "waiter_limit")?,
        );
        match self.table.get(kind, &req.name, &detail) {
            Some(view) => Ok(Response::new(lock_to_wire(view))),
            None => Err(Status::not_found(format!(
                "no {} lock named '{}' is held or waited for",
                kind.as_str(),
                printable(&req.name)
            ))),
        }
    }

    async fn get_server_info(
        &self,
        request: Request<pb::GetServerInfoRequest>,
    ) -> Result<Response<pb::ServerInfo>, Status> {
        let scope = request.extensions().get::<Scope>().cloned();
        let version = env!("CARGO_PKG_VERSION").to_string();
        // A token limited to a prefix learns only about its own names.
        if let Some(prefix) = scope.as_ref().and_then(|s| s.prefix.as_deref()) {
            let totals = self.table.totals(prefix);
            return Ok(Response::new(pb::ServerInfo {
                version,
                rss_bytes: 0,
                locks: totals.locks as u64,
                holders: totals.holders as u64,
                waiters: totals.waiters as u64,
                lock_dir: String::new(),
            }));
        }
        let totals = self.table.totals("");
        Ok(Response::new(pb::ServerInfo {
            version,
            rss_bytes: rss_bytes(),
            locks: totals.locks as u64,
            holders: totals.holders as u64,
            waiters: totals.waiters as u64,
            lock_dir: self.lock_dir.clone(),
        }))
    }
}
