//! Prometheus metrics, fed by the lock table's event observer.
//!
//! The table calls [`Metrics::record`] synchronously for every event (see
//! `LockTable::observe`), so counts are exact even under load, when a
//! broadcast subscriber would fall behind. Everything here is atomics,
//! except the set of queued waiter ids, which is what tells whether a grant
//! or an abandon ends a wait that was counted as one (a waiter granted at
//! once never queues). [`Metrics::render`] writes the text format.

use crate::locks::{Event, EventKind, Kind, LockTable, LostReason};
use std::collections::HashSet;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of the wait-time buckets, in seconds.
const WAIT_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Upper bounds of the hold-time buckets, in seconds.
const HOLD_BUCKETS: [f64; 11] = [
    0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 43200.0, 86400.0,
];

/// A histogram with fixed buckets; observations in microseconds.
struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bucket; the last one is +Inf.
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, kind: &str) {
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(
                out,
                "{name}_bucket{{kind=\"{kind}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{kind=\"{kind}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{kind=\"{kind}\"}} {cumulative}");
    }
}

/// Counters per kind (index: [`Kind::index`]).
#[derive(Default)]
struct PerKind([AtomicU64; 3]);

impl PerKind {
    fn add(&self, kind: Kind) {
        self.0[kind.index()].fetch_add(1, Relaxed);
    }
}

/// padlockd's metrics.
pub struct Metrics {
    queued: PerKind,
    grants: PerKind,
    releases: PerKind,
    abandoned: PerKind,
    /// [kind][reason]
    losses: [[AtomicU64; 3]; 3],
    holders: [AtomicI64; 3],
    waiters: [AtomicI64; 3],
    /// Ids of waiters that were queued (announced by a Queued event) and
    /// have not yet been granted or left.
    queued_ids: Mutex<HashSet<u64>>,
    wait_seconds: [Histogram; 3],
    hold_seconds: [Histogram; 3],
    /// SSE events a slow subscriber missed.
    pub sse_lagged: AtomicU64,
    /// HTTP lock requests refused for a missing or unknown client token.
    pub client_auth_failures: AtomicU64,
    /// gRPC requests refused for a missing or unknown client token.
    pub grpc_auth_failures: AtomicU64,
    /// TLS handshakes that failed (wrong CA, no client certificate,
    /// plaintext client) or timed out; counted by the accept loop.
    pub tls_handshake_failures: Arc<AtomicU64>,
    /// Open connections, idle ones closed, request timeouts; counted
    /// where connections are served.
    pub connections: Arc<crate::serve::ConnectionStats>,
    /// The descriptors locks may use, and use.
    descriptors: std::sync::OnceLock<Arc<crate::fds::Descriptors>>,
    /// Recent events and the last minutes, for the dashboard.
    pub history: crate::history::History,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            queued: PerKind::default(),
            grants: PerKind::default(),
            releases: PerKind::default(),
            abandoned: PerKind::default(),
            losses: Default::default(),
            holders: Default::default(),
            waiters: Default::default(),
            queued_ids: Mutex::new(HashSet::new()),
            wait_seconds: std::array::from_fn(|_| Histogram::new(&WAIT_BUCKETS)),
            hold_seconds: std::array::from_fn(|_| Histogram::new(&HOLD_BUCKETS)),
            sse_lagged: AtomicU64::new(0),
            client_auth_failures: AtomicU64::new(0),
            grpc_auth_failures: AtomicU64::new(0),
            tls_handshake_failures: Arc::default(),
            connections: Arc::default(),
            descriptors: std::sync::OnceLock::new(),
            history: crate::history::History::new(),
        }
    }

    /// Creates the metrics and makes `table` feed them. Only one observer
    /// can be installed per table; a second call returns metrics that stay
    /// at zero, and logs why.
    pub fn install(table: &LockTable, descriptors: Arc<crate::fds::Descriptors>) -> Arc<Metrics> {
        let metrics = Arc::new(Metrics::new());
        let _ = metrics.descriptors.set(descriptors);
        let observer = metrics.clone();
        if !table.observe(Arc::new(move |event: &Event| observer.record(event))) {
            tracing::error!("the lock table already has an observer; metrics will stay at zero");
        }
        metrics
    }

    /// Was waiter `id` counted as waiting? Forgets it.
    fn stop_waiting(&self, id: u64) -> bool {
        self.queued_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
    }

    pub fn record(&self, event: &Event) {
        let k = event.kind.index();
        // A grant that came after a wait in the queue.
        let mut queued = false;
        match &event.what {
            EventKind::Queued { .. } => {
                self.queued.add(event.kind);
                self.queued_ids
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(event.id);
                self.waiters[k].fetch_add(1, Relaxed);
            }
            EventKind::Granted { waited, .. } => {
                queued = self.stop_waiting(event.id);
                if queued {
                    self.waiters[k].fetch_sub(1, Relaxed);
                }
                self.grants.add(event.kind);
                self.holders[k].fetch_add(1, Relaxed);
                self.wait_seconds[k].observe(*waited);
            }
            EventKind::Released { held_for } => {
                self.releases.add(event.kind);
                self.holders[k].fetch_sub(1, Relaxed);
                self.hold_seconds[k].observe(*held_for);
            }
            EventKind::Lost { reason, held_for } => {
                self.losses[k][reason.index()].fetch_add(1, Relaxed);
                self.holders[k].fetch_sub(1, Relaxed);
                self.hold_seconds[k].observe(*held_for);
            }
            EventKind::Abandoned { .. } => {
                if self.stop_waiting(event.id) {
                    self.waiters[k].fetch_sub(1, Relaxed);
                }
                self.abandoned.add(event.kind);
            }
        }
        let (holders, waiters) = self.holders_and_waiters();
        self.history.record(event, holders, waiters, queued);
    }

    /// Current holders and waiters, all kinds.
    pub fn holders_and_waiters(&self) -> (u64, u64) {
        let total = |gauges: &[AtomicI64; 3]| -> u64 {
            gauges.iter().map(|g| g.load(Relaxed).max(0) as u64).sum()
        };
        (total(&self.holders), total(&self.waiters))
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, table: &LockTable, admin_failures: u64) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let counter = |out: &mut String, name: &str, help: &str, values: &PerKind| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for kind in Kind::ALL {
                let v = values.0[kind.index()].load(Relaxed);
                let _ = writeln!(out, "{name}{{kind=\"{}\"}} {v}", kind.as_str());
            }
        };
        counter(
            &mut out,
            "padlock_grants_total",
            "Locks granted.",
            &self.grants,
        );
        counter(
            &mut out,
            "padlock_releases_total",
            "Locks released by their holder (or its client going away).",
            &self.releases,
        );
        counter(
            &mut out,
            "padlock_queued_total",
            "Requests that had to wait in a queue.",
            &self.queued,
        );
        counter(
            &mut out,
            "padlock_abandoned_total",
            "Waits that ended without a grant (cancelled, timed out, disconnected, refused).",
            &self.abandoned,
        );

        let name = "padlock_losses_total";
        let _ = writeln!(
            out,
            "# HELP {name} Locks that ended without their holder asking, by reason.\n# TYPE {name} counter"
        );
        for kind in Kind::ALL {
            for reason in LostReason::ALL {
                let v = self.losses[kind.index()][reason.index()].load(Relaxed);
                let (kind, reason) = (kind.as_str(), reason.as_str());
                let _ = writeln!(out, "{name}{{kind=\"{kind}\",reason=\"{reason}\"}} {v}");
            }
        }

        let gauge = |out: &mut String, name: &str, help: &str, values: &[AtomicI64; 3]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for kind in Kind::ALL {
                let v = values[kind.index()].load(Relaxed).max(0);
                let _ = writeln!(out, "{name}{{kind=\"{}\"}} {v}", kind.as_str());
            }
        };
        gauge(
            &mut out,
            "padlock_holders",
            "Current holders.",
            &self.holders,
        );
        gauge(
            &mut out,
            "padlock_waiters",
            "Current waiters.",
            &self.waiters,
        );

        let histogram = |out: &mut String, name: &str, help: &str, values: &[Histogram; 3]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for kind in Kind::ALL {
                values[kind.index()].render(out, name, kind.as_str());
            }
        };
        histogram(
            &mut out,
            "padlock_wait_seconds",
            "Time from request to grant, for granted requests.",
            &self.wait_seconds,
        );
        histogram(
            &mut out,
            "padlock_hold_seconds",
            "Time from grant to release or loss.",
            &self.hold_seconds,
        );

        let totals = table.totals("");
        let draining = table.is_draining() as u8;
        let lagged = self.sse_lagged.load(Relaxed);
        let client_failures = self.client_auth_failures.load(Relaxed);
        let grpc_failures = self.grpc_auth_failures.load(Relaxed);
        let tls_failures = self.tls_handshake_failures.load(Relaxed);
        let connections = self.connections.open.load(Relaxed);
        let lean = self.connections.lean.load(Relaxed);
        let idle_closed = self.connections.idle_closed.load(Relaxed);
        let request_timeouts = self.connections.request_timeouts.load(Relaxed);
        if let Some(fds) = self.descriptors.get() {
            let _ = write!(
                out,
                "# HELP padlock_lock_descriptors File descriptors held locks use (files, Redis connections), with fence counters kept open between grants (closed when locks need the room).\n\
                 # TYPE padlock_lock_descriptors gauge\npadlock_lock_descriptors {}\n\
                 # HELP padlock_lock_descriptors_limit Descriptors locks may use: RLIMIT_NOFILE less a reserve for connections.\n\
                 # TYPE padlock_lock_descriptors_limit gauge\npadlock_lock_descriptors_limit {}\n",
                fds.used(),
                fds.budget
            );
        }
        let _ = write!(
            out,
            "# HELP padlock_holds Lock requests open, held or waiting (capped by --max-holds).\n\
             # TYPE padlock_holds gauge\npadlock_holds {}\n",
            totals.holds
        );
        let _ = write!(
            out,
            "# HELP padlock_locks Locks with holders or waiters.\n# TYPE padlock_locks gauge\n\
             padlock_locks {}\n\
             # HELP padlock_draining 1 while the server shuts down and grants nothing.\n\
             # TYPE padlock_draining gauge\npadlock_draining {draining}\n\
             # HELP padlock_admin_auth_failures_total Admin requests refused for a missing or wrong token.\n\
             # TYPE padlock_admin_auth_failures_total counter\n\
             padlock_admin_auth_failures_total {admin_failures}\n\
             # HELP padlock_http_client_auth_failures_total HTTP lock requests refused for a missing or unknown client token.\n\
             # TYPE padlock_http_client_auth_failures_total counter\n\
             padlock_http_client_auth_failures_total {client_failures}\n\
             # HELP padlock_grpc_client_auth_failures_total gRPC requests and lean connections refused for a missing or unknown client token.\n\
             # TYPE padlock_grpc_client_auth_failures_total counter\n\
             padlock_grpc_client_auth_failures_total {grpc_failures}\n\
             # HELP padlock_tls_handshake_failures_total TLS handshakes that failed or timed out.\n\
             # TYPE padlock_tls_handshake_failures_total counter\n\
             padlock_tls_handshake_failures_total {tls_failures}\n\
             # HELP padlock_connections Client connections being served (not counting over-limit ones being refused).\n\
             # TYPE padlock_connections gauge\n\
             padlock_connections {connections}\n\
             # HELP padlock_lean_connections Of those, connections of the lean transport (Session ops without HTTP/2).\n\
             # TYPE padlock_lean_connections gauge\n\
             padlock_lean_connections {lean}\n\
             # HELP padlock_idle_connections_closed_total Connections closed after --idle-timeout with nothing open on them.\n\
             # TYPE padlock_idle_connections_closed_total counter\n\
             padlock_idle_connections_closed_total {idle_closed}\n\
             # HELP padlock_request_timeouts_total Requests (or their headers), Hold streams without an Acquire and connections that sent nothing, cut by --request-timeout.\n\
             # TYPE padlock_request_timeouts_total counter\n\
             padlock_request_timeouts_total {request_timeouts}\n\
             # HELP padlock_sse_lagged_events_total Events that slow /v1/events subscribers missed.\n\
             # TYPE padlock_sse_lagged_events_total counter\n\
             padlock_sse_lagged_events_total {lagged}\n",
            totals.locks
        );
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn event(id: u64, what: EventKind) -> Event {
        Event {
            seq: id,
            at: SystemTime::now(),
            kind: Kind::File,
            name: Arc::from("a"),
            id,
            what,
        }
    }

    fn granted(waited_ms: u64) -> EventKind {
        EventKind::Granted {
            fence: 1,
            slot: None,
            mode: crate::locks::Mode::Exclusive,
            owner: String::new(),
            waited: Duration::from_millis(waited_ms),
        }
    }

    #[test]
    fn gauges_follow_lives() {
        let m = Metrics::new();
        // 1 granted at once; 2 queued, then granted; 3 queued, then gone.
        m.record(&event(1, granted(0)));
        let queued = || EventKind::Queued {
            position: 1,
            mode: crate::locks::Mode::Exclusive,
            owner: String::new(),
        };
        m.record(&event(2, queued()));
        m.record(&event(3, queued()));
        assert_eq!(m.waiters[0].load(Relaxed), 2);
        m.record(&event(
            1,
            EventKind::Released {
                held_for: Duration::from_secs(2),
            },
        ));
        m.record(&event(2, granted(1500)));
        assert_eq!(
            (m.holders[0].load(Relaxed), m.waiters[0].load(Relaxed)),
            (1, 1)
        );
        m.record(&event(
            3,
            EventKind::Abandoned {
                waited: Duration::from_secs(1),
            },
        ));
        // An abandon of a waiter never announced as queued (refused at once).
        m.record(&event(
            4,
            EventKind::Abandoned {
                waited: Duration::ZERO,
            },
        ));
        assert_eq!(m.waiters[0].load(Relaxed), 0);
        m.record(&event(
            2,
            EventKind::Lost {
                reason: LostReason::Revoked,
                held_for: Duration::from_secs(3),
            },
        ));
        assert_eq!(m.holders[0].load(Relaxed), 0);
        assert_eq!(m.grants.0[0].load(Relaxed), 2);
        assert_eq!(m.losses[0][1].load(Relaxed), 1);
        // Two waits observed: 0 ms (bucket 0.001) and 1.5 s (bucket 5).
        let h = &m.wait_seconds[0];
        assert_eq!(h.counts[0].load(Relaxed), 1);
        assert_eq!(h.counts[7].load(Relaxed), 1);
    }
}
