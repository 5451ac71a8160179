//! `GET /v1/server` (what this padlockd is and whether it is well) and
//! `GET /v1/stats` (the last 15 minutes, from [`crate::history`]): what an
//! operator opening the dashboard during an incident asks first.
//!
//! A client token limited to a prefix sees only its own names: its
//! `/v1/server` has no lock directory or connection count and counts only
//! its locks; its `/v1/stats` has no server-wide series or times.

use super::App;
use super::error::{ApiError, ErrorBody, Query};
use super::model::{Kind, rfc3339, unix_ms};
use crate::history::{Contention, Times, WINDOW_SECS};
use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};
use utoipa::{IntoParams, ToSchema};

/// Facts fixed at start-up.
#[derive(Debug, Clone)]
pub struct Facts {
    pub started: SystemTime,
    pub lock_dir: String,
    pub tls: bool,
}

/// This padlockd: version, uptime, the kinds it serves and their health.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServerState {
    pub version: String,
    /// When it started (RFC 3339, UTC).
    pub started: String,
    pub started_unix_ms: u64,
    pub uptime_seconds: u64,
    pub now_unix_ms: u64,
    /// What `/readyz` says: it grants every kind it serves.
    pub ready: bool,
    /// Shutting down: it grants nothing.
    pub draining: bool,
    pub kinds: Vec<KindState>,
    /// Null for a client token limited to a prefix.
    pub lock_dir: Option<String>,
    /// Client connections being served; null for a limited client token.
    pub connections: Option<u64>,
    /// Locks with holders or waiters (a limited token's own).
    pub locks: u64,
    pub holders: u64,
    pub waiters: u64,
    /// An admin token is configured: holders can be revoked.
    pub revoke_enabled: bool,
    /// Lock endpoints need a client token (`--client-token-file`).
    pub client_tokens: bool,
    pub tls: bool,
}

/// One kind of lock and whether it is granted now.
#[derive(Debug, Serialize, ToSchema)]
pub struct KindState {
    pub kind: Kind,
    pub serving: bool,
    /// Why not, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The server, its kinds and their health.
#[utoipa::path(
    get,
    path = "/v1/server",
    tag = "operations",
    responses(
        (status = 200, description = "The server", body = ServerState),
        (status = 401, description = "Client tokens are required and none or an unknown one was sent", body = ErrorBody),
    ),
    security((), ("client_token" = [])),
)]
pub async fn server(
    State(app): State<App>,
    headers: HeaderMap,
) -> Result<Json<ServerState>, ApiError> {
    let scope = app.access(&headers)?;
    let prefix = scope.as_ref().and_then(|s| s.prefix.as_deref());
    let now = SystemTime::now();
    let down = app.table.unavailable();
    let draining = app.table.is_draining();
    let kinds = app
        .table
        .kinds()
        .into_iter()
        .map(|kind| {
            let why = down.iter().find(|(k, _)| *k == kind).map(|(_, e)| e);
            KindState {
                kind,
                serving: why.is_none() && !draining,
                detail: why
                    .map(ToString::to_string)
                    .or_else(|| draining.then(|| "shutting down".to_string())),
            }
        })
        .collect();
    let totals = app.table.totals(prefix.unwrap_or(""));
    // A client token for every name sees the whole server.
    let whole = prefix.is_none();
    Ok(Json(ServerState {
        version: env!("CARGO_PKG_VERSION").to_string(),
        started: rfc3339(app.facts.started),
        started_unix_ms: unix_ms(app.facts.started),
        uptime_seconds: now
            .duration_since(app.facts.started)
            .unwrap_or_default()
            .as_secs(),
        now_unix_ms: unix_ms(now),
        ready: !draining && down.is_empty(),
        draining,
        kinds,
        lock_dir: whole.then(|| app.facts.lock_dir.clone()),
        connections: whole.then(|| app.metrics.connections.open.load(Ordering::Relaxed) as u64),
        locks: totals.locks as u64,
        holders: totals.holders as u64,
        waiters: totals.waiters as u64,
        revoke_enabled: app.admin.is_enabled(),
        client_tokens: app.clients.is_some(),
        tls: app.facts.tls,
    }))
}

/// `GET /v1/stats` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StatsQuery {
    /// How many of the most contended locks (1-100, default 10).
    pub top: Option<u32>,
}

/// The last 15 minutes.
#[derive(Debug, Serialize, ToSchema)]
pub struct Stats {
    pub now_unix_ms: u64,
    pub window_seconds: u64,
    /// One value per second, oldest first, ending now (all kinds). Null
    /// for a client token limited to a prefix.
    pub per_second: Option<PerSecond>,
    /// Minutes with activity, oldest first. Null for a limited token.
    pub per_minute: Option<Vec<MinuteStats>>,
    /// Time from request to grant, over the window. Null for a limited
    /// token.
    pub wait: Option<Percentiles>,
    /// Time from grant to release or loss, over the window.
    pub hold: Option<Percentiles>,
    /// The locks waited for longest over the window (waits that ended in
    /// a grant or gave up), longest first.
    pub contended: Vec<Contended>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PerSecond {
    /// The first second's start.
    pub start_unix_ms: u64,
    pub grants: Vec<u32>,
    /// The most holders at once in each second.
    pub holders: Vec<u64>,
    /// The most waiters at once in each second.
    pub waiters: Vec<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MinuteStats {
    pub start_unix_ms: u64,
    pub grants: u64,
    pub wait: Percentiles,
    pub hold: Percentiles,
}

/// Percentiles in milliseconds (within about 9%; `max_ms` is exact); null
/// when `count` is 0.
#[derive(Debug, Serialize, ToSchema)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl From<&Times> for Percentiles {
    fn from(t: &Times) -> Percentiles {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        Percentiles {
            count: t.count(),
            p50_ms: t.quantile(0.5).map(ms),
            p90_ms: t.quantile(0.9).map(ms),
            p99_ms: t.quantile(0.99).map(ms),
            max_ms: (t.count() > 0).then(|| ms(t.max())),
        }
    }
}

/// How much one lock was waited for over the window.
#[derive(Debug, Serialize, ToSchema)]
pub struct Contended {
    pub name: String,
    pub kind: Kind,
    /// Requests that had to queue.
    pub queued: u64,
    /// Grants that came after a wait.
    pub granted_after_wait: u64,
    /// Waits that ended without a grant.
    pub gave_up: u64,
    pub wait_total_ms: u64,
    pub max_wait_ms: u64,
    /// The longest queue seen.
    pub peak_waiters: u32,
}

/// The last 15 minutes: grants per second, holders and waiters, wait and
/// hold percentiles, the most contended locks.
#[utoipa::path(
    get,
    path = "/v1/stats",
    tag = "operations",
    params(StatsQuery),
    responses(
        (status = 200, description = "The last 15 minutes", body = Stats),
        (status = 400, description = "Bad `top`", body = ErrorBody),
        (status = 401, description = "Client tokens are required and none or an unknown one was sent", body = ErrorBody),
    ),
    security((), ("client_token" = [])),
)]
pub async fn stats(
    State(app): State<App>,
    Query(q): Query<StatsQuery>,
    headers: HeaderMap,
) -> Result<Json<Stats>, ApiError> {
    let scope = app.access(&headers)?;
    let top = q.top.unwrap_or(10);
    if !(1..=100).contains(&top) {
        return Err(ApiError::bad_request("top must be 1 to 100"));
    }
    let now = SystemTime::now();
    let stats = app.metrics.history.stats(now, top as usize, |name| {
        scope.as_ref().is_none_or(|s| s.allows(name))
    });
    let whole = scope.as_ref().is_none_or(|s| s.prefix.is_none());
    let per_second = whole.then(|| PerSecond {
        start_unix_ms: stats.seconds.first().map_or(0, |s| s.at * 1000),
        grants: stats.seconds.iter().map(|s| s.grants).collect(),
        holders: stats.seconds.iter().map(|s| s.holders).collect(),
        waiters: stats.seconds.iter().map(|s| s.waiters).collect(),
    });
    let per_minute = whole.then(|| {
        stats
            .minutes
            .iter()
            .map(|m| MinuteStats {
                start_unix_ms: m.at * 60_000,
                grants: m.grants,
                wait: (&m.wait).into(),
                hold: (&m.hold).into(),
            })
            .collect()
    });
    Ok(Json(Stats {
        now_unix_ms: unix_ms(now),
        window_seconds: WINDOW_SECS,
        per_second,
        per_minute,
        wait: whole.then(|| (&stats.wait).into()),
        hold: whole.then(|| (&stats.hold).into()),
        contended: stats
            .contended
            .iter()
            .map(|(name, kind, c)| contended(name, *kind, c))
            .collect(),
    }))
}

fn contended(name: &str, kind: crate::locks::Kind, c: &Contention) -> Contended {
    Contended {
        name: name.to_string(),
        kind,
        queued: c.queued,
        granted_after_wait: c.granted_after_wait,
        gave_up: c.gave_up,
        wait_total_ms: c.wait_total.as_millis() as u64,
        max_wait_ms: c.max_wait.as_millis() as u64,
        peak_waiters: c.peak_waiters,
    }
}
