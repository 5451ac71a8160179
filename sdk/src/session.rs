//! Many locks on one stream: the client side of padlockd's Session call.
//!
//! With [`ClientBuilder::multiplex`](crate::ClientBuilder::multiplex), a
//! [`Client`](crate::Client) (and its clones) opens one Session stream and
//! carries every lock request on it as an op with an id of its own,
//! instead of one Hold stream per lock. The [`LockGuard`](crate::LockGuard)
//! API does not change: dropping a guard releases its op, and the guard is
//! told when its lock is lost. When the stream breaks, every lock on it is
//! lost at once (as with a Hold stream, the server releases them), and the
//! next request opens a new stream. A padlockd without the Session call
//! (older than this client) is served with Hold streams. The stream is a
//! gRPC call, or a connection of padlockd's lean
//! transport (`crate::lean`), which carries the same messages.

use crate::{Error, GuardState, Lost, LostReason, Queued};
use padlock_proto::v1 as pb;
use pb::session_request::Msg as In;
use pb::session_response::Msg as Out;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::StreamExt;

/// The Session stream of a client and its clones, opened when needed.
#[derive(Default)]
pub(crate) struct Muxes {
    current: tokio::sync::Mutex<Option<Arc<Mux>>>,
    /// The server has no Session call: use Hold streams.
    unsupported: AtomicBool,
    /// The server has no lean transport: Sessions go over gRPC.
    no_lean: AtomicBool,
    /// The largest request the server reads (its `--max-message-bytes`),
    /// as its lean welcome or its last Session stream said (0: not known).
    max_message: AtomicUsize,
}

impl std::fmt::Debug for Muxes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Muxes")
    }
}

/// One open Session stream. Held by the client and by each guard on it;
/// when the last is gone, the request side closes and the server ends the
/// stream.
pub(crate) struct Mux {
    requests: mpsc::UnboundedSender<pb::SessionRequest>,
    shared: Arc<Shared>,
    next_op: AtomicU64,
}

/// What the stream's reader and the requests share.
pub(crate) struct Shared {
    ops: Mutex<Ops>,
}

#[derive(Default)]
pub(crate) struct Ops {
    open: HashMap<u64, Slot>,
    /// Why the stream ended, once it has.
    ended: Option<String>,
    /// The server refused to open the stream (a token it does not take,
    /// too many connections): what each op on it fails with.
    pub(crate) refused: Option<tonic::Status>,
}

enum Slot {
    /// Before the grant: the acquire reads what comes.
    Waiting(mpsc::UnboundedSender<Out>),
    /// Granted: the guard's state.
    Held(watch::Sender<GuardState>),
}

impl Shared {
    pub(crate) fn ops(&self) -> std::sync::MutexGuard<'_, Ops> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Muxes {
    /// The server does not speak the lean transport: use gRPC.
    pub(crate) fn lean_unsupported(&self) {
        self.no_lean.store(true, Ordering::Release);
    }

    /// The largest request the server reads (0: not known yet).
    pub(crate) fn max_message(&self) -> usize {
        self.max_message.load(Ordering::Relaxed)
    }

    pub(crate) fn set_max_message(&self, max: usize) {
        self.max_message.store(max, Ordering::Relaxed);
    }

    /// Does the server have the Session call (as far as known)?
    pub(crate) fn is_supported(&self) -> bool {
        !self.unsupported.load(Ordering::Acquire)
    }

    /// The open stream, opened now if there is none (or it ended); `None`
    /// when the server has no Session call. The stream opens in the
    /// background, so the first request goes out with its headers, in one
    /// round trip.
    pub(crate) async fn get(
        self: &Arc<Self>,
        client: &crate::Client,
    ) -> Result<Option<Arc<Mux>>, Error> {
        if self.unsupported.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut current = self.current.lock().await;
        if let Some(mux) = current.as_ref()
            && mux.is_open()
        {
            return Ok(Some(mux.clone()));
        }
        let mux = self.open(client, None);
        *current = Some(mux.clone());
        Ok(Some(mux))
    }

    /// Opens the client's lean Session now, for
    /// [`crate::ClientBuilder::connect`]: the answer tells how the server
    /// greeted it. `None` when the client does not use the lean transport.
    pub(crate) async fn greet(
        self: &Arc<Self>,
        client: &crate::Client,
    ) -> Option<oneshot::Receiver<Greeted>> {
        client.lean.as_ref()?;
        let (greeted, greeting) = oneshot::channel();
        let mux = self.open(client, Some(greeted));
        *self.current.lock().await = Some(mux);
        Some(greeting)
    }

    /// A new stream, opening in the background.
    fn open(
        self: &Arc<Self>,
        client: &crate::Client,
        greeted: Option<oneshot::Sender<Greeted>>,
    ) -> Arc<Mux> {
        let (requests, outbound) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            ops: Mutex::default(),
        });
        match &client.lean {
            Some(target) if !self.no_lean.load(Ordering::Acquire) => {
                let run = crate::lean::run(
                    target.clone(),
                    outbound,
                    shared.clone(),
                    Arc::downgrade(self),
                    greeted,
                );
                tokio::spawn(run);
            }
            _ => {
                // Requests over the server's limit fail here, alone.
                let (muxes, checked) = (Arc::downgrade(self), shared.clone());
                let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(outbound)
                    .filter_map(move |request: pb::SessionRequest| {
                        let max = muxes.upgrade().map_or(0, |muxes| muxes.max_message());
                        (!over_limit(
                            &checked,
                            &request,
                            prost::Message::encoded_len(&request),
                            max,
                        ))
                        .then_some(request)
                    });
                let mut grpc = client.grpc();
                let open = async move { grpc.session(stream).await };
                tokio::spawn(open_and_read(open, shared.clone(), Arc::downgrade(self)));
            }
        }
        Arc::new(Mux {
            requests,
            shared,
            next_op: AtomicU64::new(1),
        })
    }
}

/// How the server answered a lean connection's hello.
pub(crate) enum Greeted {
    Welcome,
    /// No lean transport there (or its TLS handshake failed); the
    /// client's Sessions go over gRPC.
    NoLean,
    /// Refused, for a reason the client's first lock will be told too.
    Refused,
    /// Closed before the server said anything (at its connection limit,
    /// restarting): not known to speak it or not.
    Closed,
    /// Nothing accepted the connection.
    Unreachable(std::io::Error),
}

/// Opens the stream, then reads it; see [`read`]. A server without the
/// Session call is remembered, and the ops already sent are told to try
/// again (with a Hold stream).
async fn open_and_read(
    open: impl Future<
        Output = Result<tonic::Response<tonic::Streaming<pb::SessionResponse>>, tonic::Status>,
    >,
    shared: Arc<Shared>,
    muxes: std::sync::Weak<Muxes>,
) {
    match open.await {
        Ok(opened) => {
            let max = opened
                .metadata()
                .get(pb::MAX_MESSAGE_METADATA)
                .and_then(|max| max.to_str().ok()?.parse().ok());
            if let (Some(max), Some(muxes)) = (max, muxes.upgrade()) {
                muxes.set_max_message(max);
            }
            read(&shared, opened.into_inner()).await
        }
        Err(status) => {
            if status.code() == tonic::Code::Unimplemented
                && let Some(muxes) = muxes.upgrade()
            {
                muxes.unsupported.store(true, Ordering::Release);
            } else {
                shared.ops().refused = Some(status.clone());
            }
            end(&shared, status.message().to_string());
        }
    }
}

/// Reads the stream and hands each message to its op; when the stream
/// ends, every op still open hears of it.
async fn read(shared: &Shared, mut responses: tonic::Streaming<pb::SessionResponse>) {
    let why = loop {
        match responses.message().await {
            Ok(Some(pb::SessionResponse { op, msg: Some(msg) })) => route(shared, op, msg),
            Ok(Some(_)) => {}
            Ok(None) => break "the server ended the session stream".to_string(),
            Err(status) => break status.message().to_string(),
        }
    };
    end(shared, why);
}

/// The stream has ended: every op still open hears of it.
pub(crate) fn end(shared: &Shared, why: String) {
    let mut ops = shared.ops();
    ops.ended = Some(why.clone());
    for (_, slot) in ops.open.drain() {
        // A waiting acquire sees its channel close; a guard, its loss.
        if let Slot::Held(state) = slot {
            let _ = state.send(GuardState::Lost(Lost {
                reason: LostReason::Disconnected,
                detail: why.clone(),
            }));
        }
    }
}

/// Fails an acquire here when its request, `len` bytes encoded, is over
/// the server's limit `max` (0: not known): sent, it would end the stream
/// and every lock on it. (Nothing else the client sends comes near it.)
pub(crate) fn over_limit(
    shared: &Shared,
    request: &pb::SessionRequest,
    len: usize,
    max: usize,
) -> bool {
    if max == 0 || len <= max || !matches!(request.msg, Some(In::Acquire(_))) {
        return false;
    }
    let op = request.op;
    let failure = pb::Failure {
        code: tonic::Code::OutOfRange as i32,
        message: format!(
            "the request is {len} bytes; padlockd takes at most {max} (its --max-message-bytes)"
        ),
    };
    route(shared, op, Out::Failed(failure));
    true
}

pub(crate) fn route(shared: &Shared, op: u64, msg: Out) {
    let mut ops = shared.ops();
    let last = matches!(msg, Out::Released(_) | Out::Lost(_) | Out::Failed(_));
    match ops.open.get(&op) {
        Some(Slot::Waiting(to)) => {
            let _ = to.send(msg);
        }
        Some(Slot::Held(state)) => {
            let end = match msg {
                Out::Released(_) => GuardState::Released,
                Out::Lost(lost) => GuardState::Lost(crate::lost_from_wire(lost)),
                Out::Failed(failure) => GuardState::Lost(Lost {
                    reason: LostReason::Other,
                    detail: failure.message,
                }),
                Out::Queued(_) | Out::Granted(_) => return,
            };
            let _ = state.send(end);
        }
        None => return,
    }
    if last {
        ops.open.remove(&op);
    }
}

impl Mux {
    fn is_open(&self) -> bool {
        !self.requests.is_closed() && self.shared.ops().ended.is_none()
    }

    fn send(&self, op: u64, msg: In) -> bool {
        let request = pb::SessionRequest { op, msg: Some(msg) };
        self.requests.send(request).is_ok()
    }

    /// Asks the server to release op `op` (or withdraw its wait); the
    /// answer reaches the guard's state.
    pub(crate) fn release(&self, op: u64) {
        self.send(op, In::Release(pb::Release {}));
    }

    /// Takes a lock as an op on this stream: what [`crate::LockBuilder::acquire`]
    /// does with a Hold stream. `Err(Unanswered)` when the stream ended
    /// before the server said anything about the op: nothing was taken
    /// (the server ends an idle stream; a request may cross that), so the
    /// caller may ask again on a new stream.
    pub(crate) async fn acquire(
        self: Arc<Self>,
        acquire: pb::Acquire,
        on_queued: Option<Arc<dyn Fn(Queued) + Send + Sync>>,
        limit: Option<std::time::Duration>,
    ) -> Result<(pb::Granted, u64, watch::Receiver<GuardState>), Failure> {
        let op = self.next_op.fetch_add(1, Ordering::Relaxed);
        let (to, mut from) = mpsc::unbounded_channel();
        {
            let mut ops = self.shared.ops();
            if ops.ended.is_some() {
                return Err(match ops.refused.clone() {
                    Some(status) => Failure::Error(status.into()),
                    None => Failure::Unanswered,
                });
            }
            ops.open.insert(op, Slot::Waiting(to));
        }
        // Until the grant is in hand, leaving (an error, a dropped future)
        // withdraws the op.
        let mut pending = Pending {
            mux: &self,
            op,
            armed: true,
        };
        if !self.send(op, In::Acquire(acquire)) {
            return Err(Failure::Unanswered);
        }
        let mut answered_once = false;
        let answer = async {
            loop {
                match from.recv().await {
                    Some(Out::Queued(q)) => {
                        answered_once = true;
                        if let Some(report) = &on_queued {
                            report(Queued {
                                position: q.position,
                                holders: q.holders,
                                waiter_id: q.waiter_id,
                            });
                        }
                    }
                    Some(Out::Granted(granted)) => return Ok(granted),
                    Some(Out::Failed(failure)) => {
                        let code = tonic::Code::from(failure.code);
                        let status = tonic::Status::new(code, failure.message);
                        return Err(Failure::Error(Error::from(status)));
                    }
                    Some(other) => {
                        return Err(Failure::Error(Error::Protocol(format!(
                            "expected Granted, got {other:?}"
                        ))));
                    }
                    None if !answered_once => {
                        // Refused at the door: that is the answer.
                        if let Some(status) = self.shared.ops().refused.clone() {
                            return Err(Failure::Error(status.into()));
                        }
                        return Err(Failure::Unanswered);
                    }
                    None => {
                        let ops = self.shared.ops();
                        let why = ops.ended.as_deref().unwrap_or("the session stream ended");
                        return Err(Failure::Error(disconnected(why)));
                    }
                }
            }
        };
        let answered = match limit {
            None => answer.await,
            Some(limit) => tokio::time::timeout(limit, answer)
                .await
                .unwrap_or_else(|_| {
                    Err(Failure::Error(Error::Status(
                        tonic::Status::deadline_exceeded(format!(
                            "padlockd did not answer the lock request within {limit:?} (the wait \
                         plus {:?})",
                            crate::STREAM_GRACE
                        )),
                    )))
                }),
        };
        // (On an error the op is withdrawn; one that failed on the server
        // is over already, and the server ignores the release.)
        let granted = answered?;
        // From now on the guard's state takes what comes; anything that came
        // after the grant is already in `from`.
        let (state_tx, state) = watch::channel(GuardState::Held);
        {
            let mut ops = self.shared.ops();
            let mut end = None;
            while let Ok(msg) = from.try_recv() {
                end = match msg {
                    Out::Released(_) => Some(GuardState::Released),
                    Out::Lost(lost) => Some(GuardState::Lost(crate::lost_from_wire(lost))),
                    _ => end,
                };
            }
            match end {
                Some(end) => {
                    let _ = state_tx.send(end);
                }
                None if ops.ended.is_some() => {
                    let why = ops.ended.clone().unwrap_or_default();
                    let _ = state_tx.send(GuardState::Lost(Lost {
                        reason: LostReason::Disconnected,
                        detail: why,
                    }));
                }
                None => {
                    ops.open.insert(op, Slot::Held(state_tx));
                }
            }
        }
        pending.armed = false;
        Ok((granted, op, state))
    }
}

/// Why an op was not granted.
pub(crate) enum Failure {
    /// What the caller gets.
    Error(Error),
    /// The stream ended before the server answered: ask again.
    Unanswered,
}

fn disconnected(why: &str) -> Error {
    Error::Status(tonic::Status::unavailable(format!(
        "the session stream to padlockd ended: {why}"
    )))
}

/// An op not yet granted: dropped armed, it is withdrawn.
struct Pending<'a> {
    mux: &'a Mux,
    op: u64,
    armed: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.mux.shared.ops().open.remove(&self.op);
            self.mux.release(self.op);
        }
    }
}
