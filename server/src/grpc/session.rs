//! The Session stream: many locks on one gRPC stream.
//!
//! Each op (an Acquire with the client's op id) is a [`Session`] of the
//! lock table, driven by a small task of its own that forwards its steps,
//! tagged with the op id, into the stream's one bounded outbox. The
//! response stream reads the client's messages and that outbox. When the
//! stream ends (the client closed it, the connection broke, the response
//! was dropped), the ops' release handles are dropped, and each op task
//! drops its session: its lock is released or its wait withdrawn, exactly
//! as when a Hold stream goes away.
//!
//! A client that stops reading fills the outbox (bounded): the op tasks
//! then wait to send, holding only what they hold already. The number of
//! open ops is capped per stream (`--max-streams-per-connection`), and a
//! stream whose first message does not come within `--request-timeout` is
//! cut, as a Hold stream is. A stream with no op open for `--idle-timeout`
//! ends (OK), as an idle connection does: it holds nothing, and the client
//! opens a new one when it needs it.

use super::{Scope, decode_acquire, granted_to_wire, lost_message, request_timeout, status};
use crate::locks::{LockTable, Released, Session, Step};
use padlock_proto::v1 as pb;
use pb::session_request::Msg as In;
use pb::session_response::Msg as Out;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::Status;

/// Replies waiting for the client to read them, per stream.
const OUTBOX: usize = 64;

pub type SessionStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::SessionResponse, Status>> + Send>>;

/// What the client sends on a Session: a gRPC stream, or the frames of a
/// lean connection (`crate::lean`).
pub type Inbound =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::SessionRequest, Status>> + Send>>;

/// One Session stream: the client's messages, the outbox of the op tasks,
/// and the release handle of each open op.
pub struct Mux {
    table: LockTable,
    inbound: Inbound,
    peer: String,
    scope: Option<Scope>,
    /// When the first message must have come, and the limit that makes it
    /// (`None` once it came); and what counts the streams cut for it.
    first_message: Option<(Instant, Duration)>,
    timeouts: Arc<AtomicU64>,
    max_ops: usize,
    /// How long the stream may have no op open (`None`: forever).
    idle: Option<Duration>,
    /// Since when no op has been open (a message that opens none, such as
    /// a refused acquire or a stray release, does not move it).
    idle_since: Instant,
    /// Counts the idle ends of a stream that is its connection.
    idle_closed: Option<Arc<AtomicU64>>,
    outbox: mpsc::Receiver<pb::SessionResponse>,
    sender: mpsc::Sender<pb::SessionResponse>,
    /// Open ops: the handle that asks an op to release (`None` once asked).
    ops: HashMap<u64, Option<oneshot::Sender<()>>>,
    /// The client closed its side: the ops it asked to release are
    /// answered, the rest were let go; the stream ends once none is open.
    closing: bool,
    /// The stream failed or was cut: nothing more.
    done: bool,
}

impl Mux {
    pub fn new(
        table: LockTable,
        inbound: Inbound,
        peer: String,
        scope: Option<Scope>,
        (first_message, timeouts): (Duration, Arc<AtomicU64>),
        (max_ops, idle): (usize, Option<Duration>),
    ) -> Mux {
        let (sender, outbox) = mpsc::channel(OUTBOX);
        let now = Instant::now();
        Mux {
            table,
            inbound,
            peer,
            scope,
            first_message: Some((deadline(now, first_message), first_message)),
            timeouts,
            max_ops,
            idle,
            idle_since: now,
            idle_closed: None,
            outbox,
            sender,
            ops: HashMap::new(),
            closing: false,
            done: false,
        }
    }

    /// The stream is a connection whose first message came before it (a
    /// lean connection's hello): from the start, only the idle timeout
    /// applies, as to a connection with no stream open, and its idle end
    /// counts in `idle_closed`.
    pub fn opened(mut self, idle_closed: Arc<AtomicU64>) -> Mux {
        self.first_message = None;
        self.idle_closed = Some(idle_closed);
        self
    }

    /// The next message for the client; `None` ends the stream (and with
    /// it every op on it).
    async fn next(&mut self) -> Option<Result<pb::SessionResponse, Status>> {
        loop {
            // Ends when nothing is open on it and the client closed its
            // side, or padlockd drains (its ops were told Lost).
            let idle = self.ops.is_empty();
            if self.done || (idle && (self.closing || self.table.is_draining())) {
                return None;
            }
            if self.closing {
                // Only the answers to releases asked before the close.
                let reply = self.outbox.recv().await?;
                return Some(Ok(self.forward(reply)));
            }
            // While no op is open, the stream may stay silent only so long.
            let silence = self.idle.filter(|_| idle);
            let table = self.table.clone();
            let inbound = async {
                match (self.first_message, silence) {
                    (Some((due, limit)), _) => tokio::time::timeout_at(due, self.inbound.next())
                        .await
                        .map_err(|_| Some(limit)),
                    (None, Some(idle)) => tokio::time::timeout_at(
                        deadline(self.idle_since, idle),
                        self.inbound.next(),
                    )
                    .await
                    .map_err(|_| None),
                    (None, None) => Ok(self.inbound.next().await),
                }
            };
            tokio::select! {
                // Replies first: a client that sends fast still hears back.
                biased;
                Some(reply) = self.outbox.recv() => return Some(Ok(self.forward(reply))),
                () = table.drained(), if idle => return None,
                message = inbound => match message {
                    // Idle: nothing is held on it; the client opens another.
                    Err(None) => {
                        self.done = true;
                        if let Some(closed) = &self.idle_closed {
                            closed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(Some(limit)) => {
                        self.done = true;
                        self.timeouts.fetch_add(1, Ordering::Relaxed);
                        let msg = format!(
                            "no message within {limit:?} of opening the Session stream (--request-timeout)"
                        );
                        return Some(Err(request_timeout(msg)));
                    }
                    // Closing the stream lets go of every op, but a
                    // release already asked is still answered.
                    Ok(None) => {
                        self.closing = true;
                        self.ops.retain(|_, release| release.is_none());
                    }
                    Ok(Some(Err(status))) => {
                        self.done = true;
                        return Some(Err(status));
                    }
                    Ok(Some(Ok(request))) => {
                        self.first_message = None;
                        if let Some(reply) = self.take(request) {
                            return Some(Ok(reply));
                        }
                    }
                },
            }
        }
    }

    /// A reply of an op task on its way to the client: the last one of an
    /// op closes it.
    fn forward(&mut self, reply: pb::SessionResponse) -> pb::SessionResponse {
        if matches!(
            reply.msg,
            Some(Out::Released(_) | Out::Lost(_) | Out::Failed(_))
        ) && self.ops.remove(&reply.op).is_some()
            && self.ops.is_empty()
        {
            self.idle_since = Instant::now();
        }
        reply
    }

    /// Handles one client message; a reply when it is answered at once.
    fn take(&mut self, request: pb::SessionRequest) -> Option<pb::SessionResponse> {
        let op = request.op;
        let failed = |status: Status| {
            Some(pb::SessionResponse {
                op,
                msg: Some(Out::Failed(pb::Failure {
                    code: status.code() as i32,
                    message: status.message().to_string(),
                })),
            })
        };
        match request.msg {
            Some(In::Acquire(acquire)) => {
                if self.ops.contains_key(&op) {
                    return failed(Status::invalid_argument(format!(
                        "op {op} is already open on this Session stream: use another id"
                    )));
                }
                if self.ops.len() >= self.max_ops {
                    return failed(Status::resource_exhausted(format!(
                        "this Session stream already has {} ops open (the server's \
                         --max-streams-per-connection)",
                        self.max_ops
                    )));
                }
                let opened = decode_acquire(acquire, self.peer.clone())
                    .and_then(|request| self.table.open(request, self.scope.as_ref()));
                match opened {
                    Ok(session) => {
                        let (release, asked) = oneshot::channel();
                        tokio::spawn(run(op, session, asked, self.sender.clone()));
                        self.ops.insert(op, Some(release));
                        None
                    }
                    Err(err) => failed(status(err)),
                }
            }
            Some(In::Release(_)) => {
                // An op that is not open has had (or is about to have) its end.
                if let Some(release) = self.ops.get_mut(&op).and_then(Option::take) {
                    let _ = release.send(());
                }
                None
            }
            None => failed(Status::invalid_argument(
                "empty SessionRequest: it must carry an acquire or a release",
            )),
        }
    }
}

/// `at + limit`, or about 30 years from `at` when that does not fit.
fn deadline(at: Instant, limit: Duration) -> Instant {
    at.checked_add(limit)
        .unwrap_or_else(|| at + Duration::from_secs(86_400 * 365 * 30))
}

/// The response stream of one Session call.
pub fn stream(mux: Mux) -> SessionStream {
    Box::pin(futures_util::stream::unfold(
        Box::new(mux),
        |mut mux| async move {
            let reply = mux.next().await?;
            Some((reply, mux))
        },
    ))
}

/// Drives one op: forwards its steps until it ends, is released at the
/// client's request, or the stream goes away (then dropping the session
/// releases the lock or withdraws the wait).
async fn run(
    op: u64,
    mut session: Session,
    mut release: oneshot::Receiver<()>,
    out: mpsc::Sender<pb::SessionResponse>,
) {
    loop {
        let (msg, last) = tokio::select! {
            step = session.next() => match step {
                Some(Step::Queued { position, holders }) => {
                    let waiter_id = session.id().to_string();
                    (Out::Queued(pb::Queued { position, holders, waiter_id }), false)
                }
                Some(Step::Granted(grant)) => (Out::Granted(granted_to_wire(&grant)), false),
                Some(Step::Lost { reason, detail }) => (Out::Lost(lost_message(reason, detail)), true),
                Some(Step::Failed(err)) => {
                    let status = status(err);
                    let failure = pb::Failure {
                        code: status.code() as i32,
                        message: status.message().to_string(),
                    };
                    (Out::Failed(failure), true)
                }
                // (A session ends with one of the steps above.)
                None => (Out::Released(pb::Released {}), true),
            },
            asked = &mut release => {
                if asked.is_err() {
                    return; // the stream is gone
                }
                // Released before the client is told: once it reads
                // Released, the next holder may already have the lock.
                let msg = match Box::pin(session.release()).await {
                    Released::Lost { reason, detail } => Out::Lost(lost_message(reason, detail)),
                    Released::Released | Released::Over => Out::Released(pb::Released {}),
                };
                let _ = out.send(pb::SessionResponse { op, msg: Some(msg) }).await;
                return;
            }
        };
        let reply = pb::SessionResponse { op, msg: Some(msg) };
        if out.send(reply).await.is_err() || last {
            return;
        }
    }
}
