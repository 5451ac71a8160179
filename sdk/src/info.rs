//! What `Client::list` and `Client::show` return: locks, their holders and
//! waiters, decoded from the wire (kinds and modes as enums, times as
//! `SystemTime`).

use crate::proto as pb;
use crate::{Kind, Mode};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One lock: its holders and (a page of) its waiters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    pub name: String,
    pub kind: Kind,
    /// The holders' mode; `None` when nobody holds it.
    pub mode: Option<Mode>,
    /// Semaphore slot count; 0 for other kinds.
    pub limit: u32,
    /// The first holders, in grant order.
    pub holders: Vec<Holder>,
    /// Waiters in queue order (the first ones).
    pub waiters: Vec<Waiter>,
    /// How many holders and waiters the lock has in all.
    pub holders_total: u32,
    pub waiters_total: u32,
}

/// A holder of a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Unique in its server (what revoke takes).
    pub id: String,
    pub owner: String,
    /// The client's network address.
    pub peer: String,
    /// When the lock was granted.
    pub since: SystemTime,
    pub fence: u64,
    /// The semaphore slot it holds.
    pub slot: Option<u32>,
    pub mode: Mode,
    pub labels: BTreeMap<String, String>,
}

/// A waiter for a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiter {
    pub id: String,
    pub owner: String,
    pub peer: String,
    /// 1-based place in the queue.
    pub position: u32,
    /// When it came.
    pub since: SystemTime,
    /// When it gives up; `None` when it waits as long as it takes.
    pub deadline: Option<SystemTime>,
    pub mode: Mode,
    pub labels: BTreeMap<String, String>,
}

fn time(unix_ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(unix_ms)
}

/// A mode from the wire; an unknown value (a newer server) reads as
/// exclusive, the stricter.
fn mode(value: i32) -> Mode {
    Mode::from_wire(value).unwrap_or(Mode::Exclusive)
}

impl From<pb::LockInfo> for LockInfo {
    fn from(l: pb::LockInfo) -> LockInfo {
        LockInfo {
            name: l.name,
            kind: Kind::from_wire(l.kind).unwrap_or(Kind::File),
            mode: (l.mode != pb::Mode::Unspecified as i32).then(|| mode(l.mode)),
            limit: l.limit,
            holders: l.holders.into_iter().map(Holder::from).collect(),
            waiters: l.waiters.into_iter().map(Waiter::from).collect(),
            holders_total: l.holders_total,
            waiters_total: l.waiters_total,
        }
    }
}

impl From<pb::HolderInfo> for Holder {
    fn from(h: pb::HolderInfo) -> Holder {
        Holder {
            id: h.id,
            owner: h.owner,
            peer: h.peer,
            since: time(h.since_unix_ms),
            fence: h.fence,
            slot: h.slot,
            mode: mode(h.mode),
            labels: h.labels.into_iter().collect(),
        }
    }
}

impl From<pb::WaiterInfo> for Waiter {
    fn from(w: pb::WaiterInfo) -> Waiter {
        Waiter {
            id: w.id,
            owner: w.owner,
            peer: w.peer,
            position: w.position,
            since: time(w.since_unix_ms),
            deadline: (w.deadline_unix_ms != 0).then(|| time(w.deadline_unix_ms)),
            mode: mode(w.mode),
            labels: w.labels.into_iter().collect(),
        }
    }
}
