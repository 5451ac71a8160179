//! The gRPC adapter: Hold streams and inspection calls <-> the lock table.
//!
//! Thin by design: decode and validate the wire messages, call the table,
//! encode what it says. Domain errors become `Status` in one place
//! ([`status`]).

use crate::locks::{
    AcquireRequest, Grant, HolderView, Kind, LockError, LockTable, LockView, LostReason, Mode,
    Notice, WaiterView,
};
use padlock_proto::v1 as pb;
use pb::hold_request::Msg as In;
use pb::hold_response::Msg as Out;
use std::pin::pin;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// The `padlock.v1.Padlock` service.
pub struct PadlockService {
    table: LockTable,
    lock_dir: String,
}

impl PadlockService {
    pub fn new(table: LockTable, lock_dir: String) -> PadlockService {
        PadlockService { table, lock_dir }
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
        LockError::TooManyWaiters { .. } | LockError::TooManyLocks { .. } => {
            Status::resource_exhausted(msg)
        }
        LockError::NotAcquired { .. } => Status::deadline_exceeded(msg),
    }
}

fn kind_from_wire(value: i32) -> Result<Kind, LockError> {
    match pb::Kind::try_from(value) {
        Ok(pb::Kind::Unspecified | pb::Kind::File) => Ok(Kind::File),
        Ok(pb::Kind::Semaphore) => Ok(Kind::Semaphore),
        Ok(pb::Kind::Redis) => Ok(Kind::Redis),
        Err(_) => Err(LockError::InvalidArgument(format!(
            "unknown kind {value}; expected KIND_FILE (1), KIND_SEMAPHORE (2) or KIND_REDIS (3)"
        ))),
    }
}

fn mode_from_wire(value: i32) -> Result<Mode, LockError> {
    match pb::Mode::try_from(value) {
        Ok(pb::Mode::Unspecified | pb::Mode::Exclusive) => Ok(Mode::Exclusive),
        Ok(pb::Mode::Shared) => Ok(Mode::Shared),
        Err(_) => Err(LockError::InvalidArgument(format!(
            "unknown mode {value}; expected MODE_EXCLUSIVE (1) or MODE_SHARED (2)"
        ))),
    }
}

fn kind_to_wire(kind: Kind) -> pb::Kind {
    match kind {
        Kind::File => pb::Kind::File,
        Kind::Semaphore => pb::Kind::Semaphore,
        Kind::Redis => pb::Kind::Redis,
    }
}

fn mode_to_wire(mode: Mode) -> pb::Mode {
    match mode {
        Mode::Exclusive => pb::Mode::Exclusive,
        Mode::Shared => pb::Mode::Shared,
    }
}

/// Longest owner string and label count/size accepted, so that one request
/// cannot make the table hold megabytes of metadata.
const MAX_OWNER_BYTES: usize = 256;
const MAX_LABELS: usize = 16;
const MAX_LABEL_BYTES: usize = 256;

fn decode_acquire(
    a: pb::Acquire,
    peer: String,
) -> Result<(AcquireRequest, Option<Duration>), LockError> {
    let kind = kind_from_wire(a.kind)?;
    let mode = mode_from_wire(a.mode)?;
    if a.owner.len() > MAX_OWNER_BYTES {
        return Err(LockError::InvalidArgument(format!(
            "owner is {} bytes long; the limit is {MAX_OWNER_BYTES}",
            a.owner.len()
        )));
    }
    if a.labels.len() > MAX_LABELS
        || a.labels
            .iter()
            .any(|(k, v)| k.len() > MAX_LABEL_BYTES || v.len() > MAX_LABEL_BYTES)
    {
        return Err(LockError::InvalidArgument(format!(
            "at most {MAX_LABELS} labels, each key and value at most {MAX_LABEL_BYTES} bytes"
        )));
    }
    let wait = a.wait_ms.map(Duration::from_millis);
    Ok((
        AcquireRequest {
            name: a.name,
            kind,
            mode,
            limit: a.limit,
            owner: a.owner,
            peer,
            labels: a.labels.into_iter().collect(),
            try_only: wait == Some(Duration::ZERO),
        },
        wait,
    ))
}

type Reply = Result<pb::HoldResponse, Status>;

fn reply(msg: Out) -> Reply {
    Ok(pb::HoldResponse { msg: Some(msg) })
}

fn granted(g: &Grant) -> Out {
    Out::Granted(pb::Granted {
        fence: g.fence,
        slot: g.slot,
        holder_id: g.holder_id.to_string(),
        mode: mode_to_wire(g.mode) as i32,
    })
}

fn lost_to_wire(reason: LostReason) -> pb::LostReason {
    match reason {
        LostReason::Shutdown => pb::LostReason::Shutdown,
        LostReason::Revoked => pb::LostReason::Revoked,
        LostReason::Backend => pb::LostReason::Backend,
    }
}

/// Serves one Hold stream from the first message to the end.
async fn serve_hold(
    table: LockTable,
    mut inbound: Streaming<pb::HoldRequest>,
    tx: mpsc::Sender<Reply>,
    peer: String,
) {
    let acquire = match inbound.message().await {
        Ok(Some(pb::HoldRequest {
            msg: Some(In::Acquire(a)),
        })) => a,
        Ok(Some(pb::HoldRequest {
            msg: Some(In::Release(_)),
        })) => {
            let _ = tx
                .send(Err(Status::invalid_argument(
                    "Release before Acquire: the first message on a Hold stream must be Acquire",
                )))
                .await;
            return;
        }
        Ok(Some(pb::HoldRequest { msg: None })) => {
            let _ = tx
                .send(Err(Status::invalid_argument(
                    "empty HoldRequest: the first message must be Acquire",
                )))
                .await;
            return;
        }
        Ok(None) => return,
        Err(status) => {
            let _ = tx.send(Err(status)).await;
            return;
        }
    };
    let (request, wait) = match decode_acquire(acquire, peer) {
        Ok(decoded) => decoded,
        Err(err) => {
            let _ = tx.send(Err(status(err))).await;
            return;
        }
    };
    let name = request.name.clone();
    let mut ticket = match table.acquire(request) {
        Ok(ticket) => ticket,
        Err(err) => {
            let _ = tx.send(Err(status(err))).await;
            return;
        }
    };
    tracing::debug!(name = %crate::locks::name::printable(&name), id = ticket.id(), "acquire");

    // Waiting: until granted, failed, timed out, cancelled or disconnected.
    let mut deadline = pin!(async {
        match wait {
            Some(wait) => tokio::time::sleep(wait).await,
            None => std::future::pending().await,
        }
    });
    loop {
        tokio::select! {
            notice = ticket.notices.recv() => match notice {
                Some(Notice::Queued { position, holders }) => {
                    if tx.send(reply(Out::Queued(pb::Queued { position, holders }))).await.is_err() {
                        return;
                    }
                }
                Some(Notice::Granted(grant)) => {
                    if tx.send(reply(granted(&grant))).await.is_err() {
                        return;
                    }
                    break;
                }
                Some(Notice::Failed(err)) => {
                    let _ = tx.send(Err(status(err))).await;
                    return;
                }
                Some(Notice::Lost { .. }) | None => return,
            },
            msg = inbound.message() => match msg {
                Ok(Some(pb::HoldRequest { msg: Some(In::Release(_)) })) => {
                    // Cancel the wait.
                    drop(ticket);
                    let _ = tx.send(reply(Out::Released(pb::Released {}))).await;
                    return;
                }
                Ok(Some(_)) => {
                    let _ = tx.send(Err(Status::invalid_argument("a second Acquire on one Hold stream: use one stream per lock"))).await;
                    return;
                }
                Ok(None) => return,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            },
            () = &mut deadline => {
                let holders = table.get(ticket.kind(), &name).map_or(0, |l| l.holders.len());
                drop(ticket);
                let err = LockError::NotAcquired {
                    name: crate::locks::name::printable(&name),
                    holders,
                    waited: wait.unwrap_or_default(),
                };
                let _ = tx.send(Err(status(err))).await;
                return;
            }
            () = tx.closed() => return,
        }
    }

    // Holding: until released, lost or disconnected.
    loop {
        tokio::select! {
            notice = ticket.notices.recv() => {
                if let Some(Notice::Lost { reason, detail }) = notice {
                    let lost = pb::Lost { reason: lost_to_wire(reason) as i32, detail };
                    let _ = tx.send(reply(Out::Lost(lost))).await;
                }
                return;
            }
            msg = inbound.message() => match msg {
                Ok(Some(pb::HoldRequest { msg: Some(In::Release(_)) })) => {
                    // Release before saying so: once the client reads
                    // Released, the next holder may already have the lock.
                    drop(ticket);
                    let _ = tx.send(reply(Out::Released(pb::Released {}))).await;
                    return;
                }
                Ok(Some(_)) => {
                    drop(ticket);
                    let _ = tx.send(Err(Status::invalid_argument("a second Acquire on one Hold stream: the lock was released; use one stream per lock"))).await;
                    return;
                }
                Ok(None) => return,
                Err(status) => {
                    drop(ticket);
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            },
            () = tx.closed() => return,
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
        mode: mode_to_wire(h.mode) as i32,
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
        mode: mode_to_wire(w.mode) as i32,
        labels: w.labels.into_iter().collect(),
    }
}

fn lock_to_wire(v: LockView) -> pb::LockInfo {
    pb::LockInfo {
        name: v.name,
        kind: kind_to_wire(v.kind) as i32,
        mode: v.mode.map_or(pb::Mode::Unspecified, mode_to_wire) as i32,
        limit: v.limit,
        holders: v.holders.into_iter().map(holder_to_wire).collect(),
        waiters: v.waiters.into_iter().map(waiter_to_wire).collect(),
    }
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
    type HoldStream = ReceiverStream<Reply>;

    async fn hold(
        &self,
        request: Request<Streaming<pb::HoldRequest>>,
    ) -> Result<Response<Self::HoldStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(serve_hold(
            self.table.clone(),
            request.into_inner(),
            tx,
            peer,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_locks(
        &self,
        request: Request<pb::ListLocksRequest>,
    ) -> Result<Response<pb::ListLocksResponse>, Status> {
        let req = request.into_inner();
        let kind = match req.kind {
            0 => None,
            k => Some(kind_from_wire(k).map_err(status)?),
        };
        let locks = self
            .table
            .list(kind, &req.prefix)
            .into_iter()
            .map(lock_to_wire)
            .collect();
        Ok(Response::new(pb::ListLocksResponse { locks }))
    }

    async fn get_lock(
        &self,
        request: Request<pb::GetLockRequest>,
    ) -> Result<Response<pb::LockInfo>, Status> {
        let req = request.into_inner();
        let kind = kind_from_wire(req.kind).map_err(status)?;
        match self.table.get(kind, &req.name) {
            Some(view) => Ok(Response::new(lock_to_wire(view))),
            None => Err(Status::not_found(format!(
                "no {} lock named '{}' is held or waited for",
                kind.as_str(),
                crate::locks::name::printable(&req.name)
            ))),
        }
    }

    async fn get_server_info(
        &self,
        _: Request<pb::GetServerInfoRequest>,
    ) -> Result<Response<pb::ServerInfo>, Status> {
        let totals = self.table.totals();
        Ok(Response::new(pb::ServerInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            rss_bytes: rss_bytes(),
            locks: totals.locks as u64,
            holders: totals.holders as u64,
            waiters: totals.waiters as u64,
            lock_dir: self.lock_dir.clone(),
        }))
    }
}
