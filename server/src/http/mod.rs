//! The HTTP side of padlockd: REST inspection and admin, live events
//! (SSE), holding a lock from a shell (NDJSON), health, metrics, the
//! OpenAPI document and the dashboard.
//!
//! It is served on the gRPC listener: tonic's router is an axum router, so
//! [`with_grpc`] merges these routes with the gRPC services, and the server
//! accepts HTTP/1.1 next to HTTP/2. Like the gRPC adapter it is thin: it
//! reads and acts on the [`LockTable`], and maps errors once
//! ([`error::ApiError`]).
//!
//! | route | what |
//! | --- | --- |
//! | `GET /` | the dashboard (assets embedded in the binary) |
//! | `GET /v1/locks` | locks with holders or waiters (`kind`, `prefix`, pages) |
//! | `GET /v1/locks/{name}` | one lock (`kind`; names may contain `/`) |
//! | `POST /v1/locks/{name}/hold` | hold a lock while the response is read (NDJSON) |
//! | `DELETE /v1/locks/{name}/holders/{id}` | revoke a holder (admin token) |
//! | `DELETE /v1/holders/{id}` | revoke a holder by its id alone (admin token) |
//! | `GET /v1/events` | live events (SSE; `replay` recent ones first) |
//! | `GET /v1/server` | version, uptime, kinds and their health, readiness |
//! | `GET /v1/stats` | the last 15 minutes: series, percentiles, contention |
//! | `GET /v1/openapi.json` | this API, generated from the code |
//! | `GET /healthz`, `/readyz`, `/metrics` | for operators |
//!
//! With `--client-token-file`, the lock endpoints (list, show, hold,
//! events, server, stats) need a client token, as the gRPC service does, and are limited to
//! its name prefix ([`App::access`]); revoke needs the admin token
//! ([`Admin`]). The operators' endpoints and the dashboard's files are open.

mod auth;
mod dashboard;
pub mod error;
mod events;
mod hold;
mod locks;
pub mod model;
mod openapi;
mod stats;

pub use crate::metrics::Metrics;
pub use auth::{Admin, TokenError};
pub use openapi::ApiDoc;
pub use stats::Facts;

use crate::auth::{ClientTokens, Scope};
use crate::locks::LockTable;
use crate::name::printable;
use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use error::{ApiError, ErrorBody};
use model::Health;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::watch;

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct App {
    pub table: LockTable,
    pub admin: Arc<Admin>,
    pub metrics: Arc<Metrics>,
    /// Becomes true when padlockd shuts down: event streams end.
    pub stop: watch::Receiver<bool>,
    /// `--client-token-file`: which lock names a token may see and take
    /// (`None`: anyone may use any name, as on the gRPC side).
    pub clients: Option<Arc<ClientTokens>>,
    /// Facts fixed at start-up, for `/v1/server`.
    pub facts: Arc<Facts>,
}

impl App {
    /// What the request may see and lock, for the lock endpoints (list,
    /// show, hold, events): everything when no client tokens are
    /// configured or it carries the admin token; else the names its client
    /// token allows. 401 without a valid token.
    fn access(&self, headers: &HeaderMap) -> Result<Option<Scope>, ApiError> {
        let Some(clients) = &self.clients else {
            return Ok(None);
        };
        if self.admin.is_admin(headers) {
            return Ok(None);
        }
        let header = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
        clients.check(header).map(Some).map_err(|err| {
            self.metrics
                .client_auth_failures
                .fetch_add(1, Ordering::Relaxed);
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                format!("{err}: this server needs a client token for lock endpoints"),
            )
        })
    }
}

/// 403 for a lock name outside the client token's prefix.
fn denied(scope: &Scope, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "permission_denied",
        scope.denied(name),
    )
}

/// The HTTP routes (no fallback: see [`with_grpc`]).
pub fn router(app: App) -> axum::Router {
    axum::Router::new()
        .route("/", get(dashboard::index))
        .route("/assets/{file}", get(dashboard::asset))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi::document))
        .route("/v1/events", get(events::events))
        .route("/v1/server", get(stats::server))
        .route("/v1/stats", get(stats::stats))
        .route("/v1/locks", get(locks::list_locks))
        .route(
            "/v1/locks/{*rest}",
            get(locks::get_lock).post(hold::hold).delete(locks::revoke),
        )
        .route(
            "/v1/holders/{id}",
            axum::routing::delete(locks::revoke_holder),
        )
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

/// The gRPC services and the HTTP routes, on one listener. Requests that
/// match neither get gRPC's UNIMPLEMENTED when they are gRPC, else a JSON
/// 404.
pub fn with_grpc(grpc: tonic::service::Routes, app: App) -> tonic::service::Routes {
    grpc.into_axum_router()
        .merge(router(app))
        .fallback(fallback)
        .into()
}

/// The client's address, as the gRPC side reports it.
fn peer(conn: Option<axum::Extension<tonic::transport::server::TcpConnectInfo>>) -> String {
    conn.and_then(|c| c.0.remote_addr)
        .map_or_else(|| "unknown".to_string(), |a| a.to_string())
}

/// Alive: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "Alive", body = Health))
)]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Ready to grant every kind it serves: not while shutting down, nor while
/// a backend it serves (Redis) is down.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Shutting down (`draining`), or a backend is down (`unavailable`, with the reason)", body = ErrorBody),
    )
)]
async fn readyz(State(app): State<App>) -> Result<Json<Health>, ApiError> {
    if app.table.is_draining() {
        return Err(crate::locks::LockError::Draining.into());
    }
    // Not ready while a configured backend (Redis) is down.
    if let Some((_, err)) = app.table.unavailable().into_iter().next() {
        return Err(err.into());
    }
    Ok(Json(Health { status: "ready" }))
}

/// Prometheus metrics (text format 0.0.4).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"))
)]
async fn metrics(State(app): State<App>) -> Response {
    let failures = app.admin.failures.load(Ordering::Relaxed);
    let text = app.metrics.render(&app.table, failures);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not allowed on {}; see /v1/openapi.json",
            request.method(),
            printable(request.uri().path())
        ),
    )
}

async fn fallback(request: Request) -> Response {
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        let status = tonic::Status::unimplemented(format!(
            "no gRPC method {}",
            printable(request.uri().path())
        ));
        return status.into_http::<axum::body::Body>();
    }
    ApiError::not_found(format!(
        "no endpoint {} {}; see /v1/openapi.json",
        request.method(),
        printable(request.uri().path())
    ))
    .into_response()
}
