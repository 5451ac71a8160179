//! The JSON the HTTP side speaks: request parameters and response bodies.
//!
//! The words are DESIGN.md's (name, kind, mode, limit, holder, waiter,
//! fence, slot), as in the proto. Ids are strings, as on the gRPC side;
//! fences are numbers (they stay below 2^53 for the first 8191 restarts).
//! Times come twice: RFC 3339 for people, Unix milliseconds for programs.

use crate::locks::{self, HolderView, LockView, LostReason, WaiterView};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::SystemTime;
use utoipa::{IntoParams, ToSchema};

/// What is locked: the one [`locks::Kind`], in JSON as `file`,
/// `semaphore` or `redis`.
pub use locks::Kind;

/// How a lock is held: the one [`locks::Mode`], in JSON as `exclusive` or
/// `shared`.
pub use locks::Mode;

/// Why a holder lost its lock without asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    Shutdown,
    Revoked,
    Backend,
}

impl From<LostReason> for Reason {
    fn from(reason: LostReason) -> Reason {
        match reason {
            LostReason::Shutdown => Reason::Shutdown,
            LostReason::Revoked => Reason::Revoked,
            LostReason::Backend => Reason::Backend,
        }
    }
}

/// One lock with holders or waiters.
#[derive(Debug, Serialize, ToSchema)]
pub struct Lock {
    pub name: String,
    pub kind: Kind,
    /// The holders' mode; null while nobody holds it.
    pub mode: Option<Mode>,
    /// A semaphore's slot count; 0 for other kinds.
    pub limit: u32,
    /// The first holders, in grant order (at most 16 in a list, 1000 in a show).
    pub holders: Vec<Holder>,
    /// Waiters in queue order (at most 16 in a list; a page in a show).
    pub waiters: Vec<Waiter>,
    /// How many holders the lock has in all.
    pub holders_total: usize,
    /// How many waiters the lock has in all.
    pub waiters_total: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Holder {
    /// The server's id for this holder (for revoke).
    #[schema(example = "42")]
    pub id: String,
    pub owner: String,
    /// The client's network address.
    pub peer: String,
    /// When it was granted (RFC 3339, UTC).
    #[schema(example = "2026-01-31T12:00:00.000Z")]
    pub since: String,
    pub since_unix_ms: u64,
    pub fence: u64,
    /// The semaphore slot (0-based); null for other kinds.
    pub slot: Option<u32>,
    pub mode: Mode,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Waiter {
    pub id: String,
    pub owner: String,
    pub peer: String,
    /// 1-based place in the queue.
    pub position: u32,
    /// When it started waiting (RFC 3339, UTC).
    pub since: String,
    pub since_unix_ms: u64,
    /// When it gives up waiting (RFC 3339, UTC); null when it waits as
    /// long as it takes.
    pub deadline: Option<String>,
    pub deadline_unix_ms: Option<u64>,
    pub mode: Mode,
    pub labels: BTreeMap<String, String>,
}

/// A page of locks, sorted by name, then kind.
#[derive(Debug, Serialize, ToSchema)]
pub struct LockList {
    pub locks: Vec<Lock>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
    /// The server's clock, to compute ages without trusting the client's.
    pub now_unix_ms: u64,
}

/// The answer to a revoke.
#[derive(Debug, Serialize, ToSchema)]
pub struct Revoked {
    pub revoked: HolderRef,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HolderRef {
    pub name: String,
    pub kind: Kind,
    pub id: String,
}

/// `/healthz` and `/readyz` when all is well.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// One line of a hold stream (NDJSON): exactly one of the keys.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HoldLine {
    /// Still waiting (sent when queued and when the position changes).
    Queued { position: u32, holders: u32 },
    /// The lock is held from now until the client disconnects.
    Granted(Grant),
    /// The lock ended without the client asking; the stream ends.
    Lost { reason: Reason, detail: String },
    /// The wait failed (timed out, server draining); the stream ends.
    Error(super::error::ErrorDetail),
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Grant {
    pub name: String,
    pub kind: Kind,
    /// This holder's id (for revoke).
    pub id: String,
    pub fence: u64,
    pub slot: Option<u32>,
    pub mode: Mode,
}

/// What happened, in `/v1/events`: the SSE `event:` field carries `type`.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Queued,
    Granted,
    Released,
    Lost,
    /// A waiter left without a grant (cancelled, timed out, refused).
    Abandoned,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Queued => "queued",
            EventType::Granted => "granted",
            EventType::Released => "released",
            EventType::Lost => "lost",
            EventType::Abandoned => "abandoned",
        }
    }
}

/// The data of one `/v1/events` event. Fields that do not apply to the
/// event type are left out.
#[derive(Debug, Serialize, ToSchema)]
pub struct Event {
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// Numbers events in the order they happened, from 1 (per server run).
    pub seq: u64,
    pub at: String,
    pub at_unix_ms: u64,
    pub kind: Kind,
    pub name: String,
    /// The holder or waiter the event is about.
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Queue position (queued).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<u32>,
    /// Why (lost).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// Time waited (granted, abandoned).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
    /// Time held (released, lost).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_ms: Option<u64>,
}

impl From<&locks::Event> for Event {
    fn from(e: &locks::Event) -> Event {
        use locks::EventKind as K;
        let mut out = Event {
            event_type: EventType::Queued,
            seq: e.seq,
            at: rfc3339(e.at),
            at_unix_ms: unix_ms(e.at),
            kind: e.kind,
            name: e.name.to_string(),
            id: e.id.to_string(),
            fence: None,
            slot: None,
            mode: None,
            owner: None,
            position: None,
            reason: None,
            waited_ms: None,
            held_ms: None,
        };
        match &e.what {
            K::Queued {
                position,
                mode,
                owner,
            } => {
                out.position = Some(*position);
                out.mode = Some(*mode);
                out.owner = Some(owner.clone());
            }
            K::Granted {
                fence,
                slot,
                mode,
                owner,
                waited,
            } => {
                out.event_type = EventType::Granted;
                out.fence = Some(*fence);
                out.slot = *slot;
                out.mode = Some(*mode);
                out.owner = Some(owner.clone());
                out.waited_ms = Some(waited.as_millis() as u64);
            }
            K::Released { held_for } => {
                out.event_type = EventType::Released;
                out.held_ms = Some(held_for.as_millis() as u64);
            }
            K::Lost { reason, held_for } => {
                out.event_type = EventType::Lost;
                out.reason = Some((*reason).into());
                out.held_ms = Some(held_for.as_millis() as u64);
            }
            K::Abandoned { waited } => {
                out.event_type = EventType::Abandoned;
                out.waited_ms = Some(waited.as_millis() as u64);
            }
        }
        out
    }
}

impl From<HolderView> for Holder {
    fn from(h: HolderView) -> Holder {
        Holder {
            id: h.id.to_string(),
            owner: h.owner,
            peer: h.peer,
            since: rfc3339(h.since),
            since_unix_ms: unix_ms(h.since),
            fence: h.fence,
            slot: h.slot,
            mode: h.mode,
            labels: h.labels,
        }
    }
}

impl From<WaiterView> for Waiter {
    fn from(w: WaiterView) -> Waiter {
        Waiter {
            id: w.id.to_string(),
            owner: w.owner,
            peer: w.peer,
            position: w.position,
            since: rfc3339(w.since),
            since_unix_ms: unix_ms(w.since),
            deadline: w.deadline.map(rfc3339),
            deadline_unix_ms: w.deadline.map(unix_ms),
            mode: w.mode,
            labels: w.labels,
        }
    }
}

impl From<LockView> for Lock {
    fn from(v: LockView) -> Lock {
        Lock {
            name: v.name,
            kind: v.kind,
            mode: v.mode,
            limit: v.limit,
            holders: v.holders.into_iter().map(Holder::from).collect(),
            waiters: v.waiters.into_iter().map(Waiter::from).collect(),
            holders_total: v.holders_total,
            waiters_total: v.waiters_total,
        }
    }
}

/// `GET /v1/locks` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only locks of this kind.
    pub kind: Option<Kind>,
    /// Only locks whose name starts with this.
    pub prefix: Option<String>,
    /// Page size, 1 to 1000 (default 100). A page also ends early when its
    /// size nears 1 MiB, and shows at most 16 holders and 16 waiters per
    /// lock (`holders_total`, `waiters_total` say how many there are).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// The kind of the lock a path names (default `file`).
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct KindQuery {
    pub kind: Option<Kind>,
}

/// `GET /v1/locks/{name}` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ShowQuery {
    /// Only this kind (default: every kind; 300 when several have the name).
    pub kind: Option<Kind>,
    /// Waiters to skip from the head of the queue (default 0).
    pub waiter_offset: Option<u32>,
    /// Most waiters shown, 1 to 1000 (default 100).
    pub waiter_limit: Option<u32>,
}

/// `GET /v1/events` filters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only events of locks of this kind.
    pub kind: Option<Kind>,
    /// Only events of locks whose name starts with this.
    pub prefix: Option<String>,
    /// Send up to this many recent events (0-500, default 0) before
    /// `ready`, oldest first: a page that opens now shows what happened.
    /// No event is sent twice and none is missed between them and the live
    /// ones.
    pub replay: Option<u32>,
}

/// `POST /v1/locks/{name}/hold` parameters, in the query string. The same
/// may come in a JSON body instead ([`HoldBody`]); not both for one field.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HoldQuery {
    /// Default `file`.
    pub kind: Option<Kind>,
    /// Default `exclusive`.
    pub mode: Option<Mode>,
    /// Slot count; semaphores only.
    pub limit: Option<u32>,
    /// How long to wait: `0` tries once (409 at once when busy), `250ms`,
    /// `5s`, `1.5`, `2m`. Absent: wait until granted or the client leaves.
    pub wait: Option<String>,
    /// Free text naming the client (default: its User-Agent).
    pub owner: Option<String>,
}

/// `POST /v1/locks/{name}/hold` parameters as a JSON body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldBody {
    pub kind: Option<Kind>,
    pub mode: Option<Mode>,
    pub limit: Option<u32>,
    /// Seconds (a number) or a duration text such as `"250ms"`.
    #[schema(value_type = Option<String>, example = "5s")]
    pub wait: Option<WaitValue>,
    pub owner: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum WaitValue {
    Seconds(f64),
    Text(String),
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `2026-01-31T12:00:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let ms = unix_ms(t);
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_dates() {
        let at = |ms: u64| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(1_767_225_599_999), "2025-12-31T23:59:59.999Z");
        assert_eq!(at(4_107_542_400_001), "2100-03-01T00:00:00.001Z");
    }
}
