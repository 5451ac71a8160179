//! The lock table's vocabulary: kinds, modes, requests, what the table
//! tells a ticket, events, errors and limits.

use crate::name;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

/// What is locked (one definition for the server, the SDK and the CLI).
pub use padlock_proto::Kind;

/// How a lock is held (one definition for the server, the SDK and the CLI).
pub use padlock_proto::Mode;

/// Why a holder lost its lock without asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    Shutdown,
    Revoked,
    Backend,
}

impl LostReason {
    pub const ALL: [LostReason; 3] = [
        LostReason::Shutdown,
        LostReason::Revoked,
        LostReason::Backend,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LostReason::Shutdown => "shutdown",
            LostReason::Revoked => "revoked",
            LostReason::Backend => "backend",
        }
    }

    /// Its place in [`LostReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Errors of the lock table (defined with the backends' vocabulary in
/// [`crate::error`]).
pub use crate::error::LockError;

/// Limits the table enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_locks: usize,
    pub max_waiters_per_lock: usize,
    /// Lock requests open at once, waiting or holding.
    pub max_holds: usize,
    /// Most `/`-separated components in a name.
    pub max_name_components: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_locks: 10_000,
            max_waiters_per_lock: 10_000,
            max_holds: 20_000,
            max_name_components: 16,
        }
    }
}

/// Longest owner string, and most labels and longest label key or value,
/// accepted: one request cannot make the table hold megabytes of metadata.
pub const MAX_OWNER_BYTES: usize = 256;
pub const MAX_LABELS: usize = 16;
pub const MAX_LABEL_BYTES: usize = 256;
/// Longest wait a request may ask for (absent: wait as long as it takes).
pub const MAX_WAIT: Duration = Duration::from_secs(365 * 86_400);

/// A request to hold a lock, already decoded from the wire.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    pub name: String,
    pub kind: Kind,
    pub mode: Mode,
    /// Slot count for semaphores; ignored (must be 0) for other kinds.
    pub limit: u32,
    /// Free text naming the client.
    pub owner: String,
    /// The client's network address.
    pub peer: String,
    pub labels: BTreeMap<String, String>,
    /// How long to wait: `None` as long as it takes, zero tries once
    /// (failing with [`LockError::NotAcquired`] instead of queueing).
    pub wait: Option<Duration>,
    /// The quota of the client token the request came with, if it has one.
    pub quota: Option<Arc<Quota>>,
}

impl AcquireRequest {
    /// Try once: do not queue behind anyone.
    pub fn try_once(&self) -> bool {
        self.wait == Some(Duration::ZERO)
    }

    /// When the wait ends (`None`: never, or a try-lock, which its one
    /// attempt answers).
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        let wait = self.wait.filter(|w| !w.is_zero())?;
        tokio::time::Instant::now().checked_add(wait)
    }

    /// Bounds on what a client may make the server keep: owner, labels and
    /// the wait.
    pub fn check_metadata(&self) -> Result<(), LockError> {
        if self.owner.len() > MAX_OWNER_BYTES {
            return Err(LockError::InvalidArgument(format!(
                "owner is {} bytes long; the limit is {MAX_OWNER_BYTES}",
                self.owner.len()
            )));
        }
        if self.labels.len() > MAX_LABELS
            || self
                .labels
                .iter()
                .any(|(k, v)| k.len() > MAX_LABEL_BYTES || v.len() > MAX_LABEL_BYTES)
        {
            return Err(LockError::InvalidArgument(format!(
                "at most {MAX_LABELS} labels, each key and value at most {MAX_LABEL_BYTES} bytes"
            )));
        }
        if self.wait.is_some_and(|w| w > MAX_WAIT) {
            return Err(LockError::InvalidArgument(format!(
                "the wait is longer than the longest allowed ({} days); leave it out to wait \
                 as long as it takes",
                MAX_WAIT.as_secs() / 86_400
            )));
        }
        name::check_text("owner", &self.owner)?;
        for (k, v) in &self.labels {
            name::check_text("a label", k)?;
            name::check_text("a label", v)?;
        }
        Ok(())
    }
}

/// How many lock requests (held or waiting) one client token may have
/// open at once.
#[derive(Debug)]
pub struct Quota {
    pub max: usize,
    used: AtomicUsize,
}

impl Quota {
    pub fn new(max: usize) -> Arc<Quota> {
        Arc::new(Quota {
            max,
            used: AtomicUsize::new(0),
        })
    }

    /// Requests open now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// One more request, or [`LockError::QuotaExceeded`].
    pub fn take(self: &Arc<Self>) -> Result<QuotaSlot, LockError> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .map(|_| QuotaSlot(self.clone()))
            .map_err(|_| LockError::QuotaExceeded { cap: self.max })
    }
}

/// One request counted in a [`Quota`] until dropped.
#[derive(Debug)]
pub struct QuotaSlot(Arc<Quota>);

impl Drop for QuotaSlot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the table tells a ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Still waiting, at this 1-based position.
    Queued {
        position: u32,
        holders: u32,
    },
    Granted(Grant),
    /// The lock ended without the holder asking.
    Lost {
        reason: LostReason,
        detail: String,
    },
    /// The waiter was removed from the queue without a grant.
    Failed(LockError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub holder_id: u64,
    pub fence: u64,
    pub slot: Option<u32>,
    pub mode: Mode,
}

/// Something that happened to a lock, for live inspection (SSE), metrics
/// and logs. Sent on a broadcast channel: slow subscribers miss events
/// (and are told so by the channel), the table never waits for them.
#[derive(Debug, Clone)]
pub struct Event {
    /// Numbers events in the order they happened (and were sent), from 1:
    /// a replay of recent events and the live stream meet without gaps or
    /// repeats.
    pub seq: u64,
    pub at: SystemTime,
    pub kind: Kind,
    pub name: Arc<str>,
    /// The holder or waiter the event is about.
    pub id: u64,
    pub what: EventKind,
}

#[derive(Debug, Clone)]
pub enum EventKind {
    /// A waiter joined the queue (it was not granted at once).
    Queued {
        position: u32,
        mode: Mode,
        owner: String,
    },
    /// A waiter became a holder after waiting `waited`.
    Granted {
        fence: u64,
        slot: Option<u32>,
        mode: Mode,
        owner: String,
        waited: Duration,
    },
    /// A holder released (or its client went away) after holding `held`.
    Released { held_for: Duration },
    /// A holder's lock ended without its asking.
    Lost {
        reason: LostReason,
        held_for: Duration,
    },
    /// A waiter left the queue without a grant (cancelled, timed out,
    /// disconnected, refused) after waiting `waited`.
    Abandoned { waited: Duration },
}

/// Sees every [`Event`] as it happens, under the event lock: it must be
/// quick and must not call back into the table. Metrics use it, because a
/// broadcast subscriber can fall behind and miss events.
pub type Observer = Arc<dyn Fn(&Event) + Send + Sync>;

/// Capacity of the event channel: how far a subscriber may fall behind.
pub const EVENT_BACKLOG: usize = 4096;

/// Counts, for server info and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub locks: usize,
    pub holders: usize,
    pub waiters: usize,
    /// Lock requests open (held or waiting), as `--max-holds` counts them.
    pub holds: usize,
}
