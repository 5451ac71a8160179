//! Inspection and admin: list locks, show one, revoke a holder.
//!
//! Lock names may contain `/`, so everything under `/v1/locks/` is one
//! wildcard route, split here by method: `GET` takes the whole rest as the
//! name, `POST` wants `<name>/hold`, `DELETE` wants `<name>/holders/<id>`.
//! A lock named `a/hold` is still shown by `GET /v1/locks/a/hold`.

use super::error::{ApiError, ErrorBody, LockPath, Query};
use super::model::{HolderRef, KindQuery, ListQuery, Lock, LockList, Revoked, ShowQuery, unix_ms};
use super::{App, denied, peer};
use crate::grpc::{cursor_after, parse_cursor};
use crate::locks::{Detail, Kind, LostReason};
use crate::name::{self, printable};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use std::time::SystemTime;

/// Page size when none is asked for, and the largest one allowed.
pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 1000;

/// List locks that have holders or waiters.
#[utoipa::path(
    get,
    path = "/v1/locks",
    tag = "locks",
    params(ListQuery),
    security((), ("client_token" = [])),
    responses(
        (status = 200, description = "A page of locks, sorted by name then kind (with a client \
            token: only the names it may use)", body = LockList),
        (status = 400, description = "Bad parameter (unknown kind, page size, cursor)", body = ErrorBody),
        (status = 401, description = "Client tokens are required and none or an unknown one was sent", body = ErrorBody),
    )
)]
pub async fn list_locks(
    State(app): State<App>,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Result<Json<LockList>, ApiError> {
    let scope = app.access(&headers)?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit {limit} is out of range: pages hold 1 to {MAX_PAGE} locks"
        )));
    }
    let prefix = q.prefix.unwrap_or_default();
    if prefix.len() > name::MAX_NAME_BYTES {
        return Err(ApiError::bad_request(format!(
            "prefix is longer than the longest lock name ({} bytes)",
            name::MAX_NAME_BYTES
        )));
    }
    let after = match q.cursor.as_deref() {
        Some(cursor) => Some(parse_cursor(cursor).ok_or_else(|| {
            ApiError::bad_request("bad cursor: pass the next_cursor of the previous page")
        })?),
        None => None,
    };
    // A client token limited to a prefix sees only the locks under it.
    let prefix = match &scope {
        Some(scope) => scope.narrow(&prefix),
        None => Some(prefix),
    };
    let page = match &prefix {
        Some(prefix) => app.table.list(
            q.kind,
            prefix,
            after.map(|(kind, name)| (name, kind)),
            limit as usize,
            &Detail::LIST,
        ),
        None => Default::default(),
    };
    let next_cursor = match page.locks.last() {
        Some(last) if page.more => Some(cursor_after(last)),
        _ => None,
    };
    Ok(Json(LockList {
        locks: page.locks.into_iter().map(Lock::from).collect(),
        next_cursor,
        now_unix_ms: unix_ms(SystemTime::now()),
    }))
}

fn checked(name: &str) -> Result<&str, ApiError> {
    Ok(name::validate(name, usize::MAX)?)
}

/// One lock. Names may contain `/` (`GET /v1/locks/reports/nightly`).
#[utoipa::path(
    get,
    path = "/v1/locks/{name}",
    tag = "locks",
    params(
        ("name" = String, Path, description = "Lock name; may contain '/'"),
        ShowQuery,
    ),
    security((), ("client_token" = [])),
    responses(
        (status = 200, description = "The lock, with its first holders and a page of its waiters", body = Lock),
        (status = 400, description = "Bad name or kind", body = ErrorBody),
        (status = 401, description = "Client tokens are required and none or an unknown one was sent", body = ErrorBody),
        (status = 403, description = "The client token may not use this name", body = ErrorBody),
        (status = 300, description = "No kind given, and locks of several kinds have this name", body = ErrorBody),
        (status = 404, description = "Nobody holds or waits for this lock", body = ErrorBody),
        (status = 405, description = "GET of `{name}/hold` when no lock has that name: holding is a POST", body = ErrorBody),
    )
)]
pub async fn get_lock(
    State(app): State<App>,
    LockPath(name): LockPath,
    Query(q): Query<ShowQuery>,
    headers: HeaderMap,
) -> Result<Json<Lock>, ApiError> {
    let scope = app.access(&headers)?;
    let name = checked(&name)?;
    if let Some(scope) = scope.filter(|s| !s.allows(name)) {
        return Err(denied(&scope, name));
    }
    let waiter_limit = q.waiter_limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&waiter_limit) {
        return Err(ApiError::bad_request(format!(
            "waiter_limit {waiter_limit} is out of range: 1 to {MAX_PAGE}"
        )));
    }
    let detail = Detail::show(q.waiter_offset.unwrap_or(0) as usize, waiter_limit as usize);
    // Without a kind, every kind is looked in.
    let kinds = match q.kind {
        Some(kind) => vec![kind],
        None => Kind::ALL.to_vec(),
    };
    let mut found: Vec<_> = kinds
        .iter()
        .filter_map(|kind| app.table.get(*kind, name, &detail))
        .collect();
    match found.len() {
        1 => Ok(Json(found.remove(0).into())),
        0 if q.kind.is_none() && name.ends_with("/hold") => Err(hold_is_a_post(name)),
        0 => Err(ApiError::not_found(match q.kind {
            Some(kind) => format!(
                "no {} lock named '{}' is held or waited for",
                kind.as_str(),
                printable(name)
            ),
            None => format!(
                "no lock named '{}' is held or waited for (of any kind)",
                printable(name)
            ),
        })),
        _ => {
            let kinds: Vec<&str> = found.iter().map(|v| v.kind.as_str()).collect();
            Err(ApiError::new(
                StatusCode::MULTIPLE_CHOICES,
                "ambiguous_kind",
                format!(
                    "locks of several kinds are named '{}': {}; add ?kind={}",
                    printable(name),
                    kinds.join(", "),
                    kinds.join(" or ?kind=")
                ),
            ))
        }
    }
}

/// A GET of `/v1/locks/{name}/hold`: holding takes a POST.
fn hold_is_a_post(name: &str) -> ApiError {
    let lock = name.strip_suffix("/hold").unwrap_or(name);
    let mut err = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "holding a lock is a POST: curl -N -X POST .../v1/locks/{}/hold (and no lock is \
             named '{}')",
            printable(lock),
            printable(name)
        ),
    );
    err.allow = Some("POST");
    err
}

/// Revoke a holder: its lock is released, it is told `lost` (reason
/// `revoked`), and the next waiter is granted.
#[utoipa::path(
    delete,
    path = "/v1/locks/{name}/holders/{id}",
    tag = "admin",
    params(
        ("name" = String, Path, description = "Lock name; may contain '/'"),
        ("id" = String, Path, description = "Holder id (from the lock's holders)"),
        KindQuery,
    ),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Revoked", body = Revoked),
        (status = 400, description = "Bad name, id or kind", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 403, description = "No admin token configured: admin endpoints are disabled", body = ErrorBody),
        (status = 404, description = "No such holder", body = ErrorBody),
    )
)]
pub async fn revoke(
    State(app): State<App>,
    LockPath(rest): LockPath,
    Query(q): Query<KindQuery>,
    headers: HeaderMap,
    conn: Option<axum::Extension<tonic::transport::server::TcpConnectInfo>>,
) -> Result<Json<Revoked>, ApiError> {
    // Who may ask comes before what is asked: no probing without a token.
    app.admin.authorize(&headers)?;
    let Some((name, id)) = rest
        .rsplit_once('/')
        .and_then(|(left, id)| Some((left.strip_suffix("/holders")?, id)))
    else {
        return Err(ApiError::not_found(
            "DELETE takes /v1/locks/{name}/holders/{id}",
        ));
    };
    let id: u64 = id.parse().map_err(|_| {
        ApiError::bad_request(format!("holder id '{}' is not a number", printable(id)))
    })?;
    let name = checked(name)?;
    let detail = format!("revoked by an administrator over HTTP, from {}", peer(conn));
    // Holder ids are unique in a server: without a kind, any kind will do.
    let kinds = match q.kind {
        Some(kind) => vec![kind],
        None => Kind::ALL.to_vec(),
    };
    let Some(kind) = kinds.into_iter().find(|kind| {
        app.table
            .revoke(*kind, name, id, LostReason::Revoked, &detail)
    }) else {
        return Err(ApiError::not_found(format!(
            "lock '{}' has no holder with id {id}",
            printable(name)
        )));
    };
    tracing::info!(name = %printable(name), kind = kind.as_str(), id, "revoked over HTTP");
    Ok(Json(Revoked {
        revoked: HolderRef {
            name: name.to_string(),
            kind,
            id: id.to_string(),
        },
    }))
}

/// Revoke a holder by its id alone (ids are unique in a server).
#[utoipa::path(
    delete,
    path = "/v1/holders/{id}",
    tag = "admin",
    params(("id" = String, Path, description = "Holder id (from any lock's holders)")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Revoked", body = Revoked),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 403, description = "No admin token configured: admin endpoints are disabled", body = ErrorBody),
        (status = 404, description = "No such holder", body = ErrorBody),
    )
)]
pub async fn revoke_holder(
    State(app): State<App>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
    conn: Option<axum::Extension<tonic::transport::server::TcpConnectInfo>>,
) -> Result<Json<Revoked>, ApiError> {
    app.admin.authorize(&headers)?;
    let id: u64 = id.parse().map_err(|_| {
        ApiError::bad_request(format!("holder id '{}' is not a number", printable(&id)))
    })?;
    let detail = format!("revoked by an administrator over HTTP, from {}", peer(conn));
    let revoked = app.table.holder_lock(id).filter(|(name, kind)| {
        app.table
            .revoke(*kind, name, id, LostReason::Revoked, &detail)
    });
    let Some((name, kind)) = revoked else {
        return Err(ApiError::not_found(format!("no holder has id {id}")));
    };
    tracing::info!(name = %printable(&name), kind = kind.as_str(), id, "revoked over HTTP");
    Ok(Json(Revoked {
        revoked: HolderRef {
            name,
            kind,
            id: id.to_string(),
        },
    }))
}
