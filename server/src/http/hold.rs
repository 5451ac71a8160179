//! Holding a lock over plain HTTP: `POST /v1/locks/{name}/hold`.
//!
//! The response is a stream of JSON lines (NDJSON), one per [`HoldLine`]:
//! `queued` while waiting, then `granted` with the fence, then nothing
//! until the lock ends. The lock is held for as long as the response is
//! being read: when the client goes away, hyper drops the body, which drops
//! the [`Session`], which releases the lock, exactly as a gRPC Hold stream
//! does. The same queue and fences serve both.
//!
//! Errors known before the stream starts (bad name, try-lock on a busy
//! lock, draining) answer with their status and the common error body.
//! Once the stream has started (the status is 200), a failure is a final
//! `{"error": ...}` line, and a lost lock a final `{"lost": ...}` line.

use super::error::{ApiError, ErrorBody, LockPath, Query};
use super::model::{self, Grant, HoldBody, HoldLine, HoldQuery, WaitValue};
use super::{App, peer};
use crate::locks::{
    AcquireRequest, Kind, LockError, MAX_OWNER_BYTES, MAX_WAIT, Mode, Session, Step,
};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

/// Largest JSON body accepted.
const MAX_BODY_BYTES: usize = 16 * 1024;

/// Hold a lock for as long as this response is read.
///
/// `curl -N -X POST 'http://127.0.0.1:7420/v1/locks/reports/nightly/hold?wait=30s'`
#[utoipa::path(
    post,
    path = "/v1/locks/{name}/hold",
    tag = "locks",
    params(
        ("name" = String, Path, description = "Lock name; may contain '/'"),
        HoldQuery,
    ),
    security((), ("client_token" = [])),
    request_body(content = Option<HoldBody>, description = "The same parameters (and labels) as JSON, instead of the query", content_type = "application/json"),
    responses(
        (status = 200, description = "NDJSON: `queued` lines while waiting, a `granted` line, then held until the client disconnects; a final `lost` or `error` line if it ends otherwise", body = HoldLine, content_type = "application/x-ndjson"),
        (status = 400, description = "Bad name or parameter", body = ErrorBody),
        (status = 401, description = "Client tokens are required and none or an unknown one was sent", body = ErrorBody),
        (status = 403, description = "The client token may not use this name", body = ErrorBody),
        (status = 409, description = "Not acquired at once (`wait=0`), or a semaphore limit that disagrees with the current holders'", body = ErrorBody),
        (status = 429, description = "Too many waiters or locks", body = ErrorBody),
        (status = 503, description = "Kind not available, backend down, or the server is shutting down", body = ErrorBody),
    )
)]
pub async fn hold(
    State(app): State<App>,
    LockPath(rest): LockPath,
    Query(query): Query<HoldQuery>,
    headers: HeaderMap,
    conn: Option<axum::Extension<tonic::transport::server::TcpConnectInfo>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(name) = rest.strip_suffix("/hold") else {
        return Err(ApiError::not_found("POST takes /v1/locks/{name}/hold"));
    };
    let scope = app.access(&headers)?;
    let body = parse_body(&body)?;
    let params = Params::merge(query, body)?;
    let wait = params.wait.map(parse_wait).transpose()?;
    let kind = params.kind.unwrap_or(Kind::File);
    let request = AcquireRequest {
        name: name.to_string(),
        kind,
        mode: params.mode.unwrap_or(Mode::Exclusive),
        limit: params.limit.unwrap_or(0),
        owner: params.owner.unwrap_or_else(|| default_owner(&headers)),
        peer: peer(conn),
        labels: params.labels.unwrap_or_default(),
        wait,
        quota: None,
    };
    let mut session = app.table.open(request, scope.as_ref())?;
    if wait == Some(Duration::ZERO) {
        // A try-lock answers with a status: granted (200) or not (409).
        session.decided().await?;
    }
    let held = Holding {
        name: name.to_string(),
        kind,
        session: Some(session),
    };
    let lines = futures_util::stream::unfold(held, |mut held| async move {
        let line = held.next().await?;
        let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
        bytes.push(b'\n');
        Some((Ok::<_, Infallible>(Bytes::from(bytes)), held))
    });
    let mut response = Body::from_stream(lines).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Ask reverse proxies not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The lock between the first line and the last.
struct Holding {
    name: String,
    kind: Kind,
    /// Dropping it releases the lock or leaves the queue.
    session: Option<Session>,
}

impl Holding {
    /// The next line; `None` ends the stream.
    async fn next(&mut self) -> Option<HoldLine> {
        let step = self.session.as_mut()?.next().await;
        let line = match step {
            Some(Step::Queued { position, holders }) => {
                return Some(HoldLine::Queued { position, holders });
            }
            Some(Step::Granted(g)) => {
                return Some(HoldLine::Granted(Grant {
                    name: self.name.clone(),
                    kind: self.kind,
                    id: g.holder_id.to_string(),
                    fence: g.fence,
                    slot: g.slot,
                    mode: g.mode,
                }));
            }
            Some(Step::Lost { reason, detail }) => Some(HoldLine::Lost {
                reason: reason.into(),
                detail,
            }),
            Some(Step::Failed(err)) => Some(error_line(err)),
            None => None,
        };
        self.session = None;
        line
    }
}

fn error_line(err: LockError) -> HoldLine {
    HoldLine::Error(ApiError::from(err).body().error)
}

/// The hold parameters from the query and the body, each given once.
#[derive(Default)]
struct Params {
    kind: Option<model::Kind>,
    mode: Option<model::Mode>,
    limit: Option<u32>,
    wait: Option<WaitValue>,
    owner: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

impl Params {
    fn merge(query: HoldQuery, body: HoldBody) -> Result<Params, ApiError> {
        fn one<T>(field: &str, q: Option<T>, b: Option<T>) -> Result<Option<T>, ApiError> {
            match (q, b) {
                (Some(_), Some(_)) => Err(ApiError::bad_request(format!(
                    "'{field}' is given both in the query and in the body; give it once"
                ))),
                (q, b) => Ok(q.or(b)),
            }
        }
        Ok(Params {
            kind: one("kind", query.kind, body.kind)?,
            mode: one("mode", query.mode, body.mode)?,
            limit: one("limit", query.limit, body.limit)?,
            wait: one("wait", query.wait.map(WaitValue::Text), body.wait)?,
            owner: one("owner", query.owner, body.owner)?,
            labels: body.labels,
        })
    }
}

fn parse_body(body: &[u8]) -> Result<HoldBody, ApiError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::bad_request(format!(
            "the body is {} bytes; the limit is {MAX_BODY_BYTES}",
            body.len()
        )));
    }
    if body.trim_ascii().is_empty() {
        return Ok(HoldBody::default());
    }
    serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request(format!("bad JSON body: {err}")))
}

/// A wait in seconds (a JSON number) or as a duration text, at most
/// [`MAX_WAIT`]; the same rules as the query form.
fn parse_wait(wait: WaitValue) -> Result<Duration, ApiError> {
    let bad = |why: String| ApiError::bad_request(format!("bad wait: {why}"));
    let wait = match wait {
        WaitValue::Seconds(secs) => {
            Duration::try_from_secs_f64(secs).map_err(|e| bad(format!("{secs}: {e}")))?
        }
        WaitValue::Text(text) => crate::config::parse_duration(&text).map_err(bad)?,
    };
    if wait > MAX_WAIT {
        return Err(bad(format!(
            "{wait:?} is longer than the longest allowed ({} days); leave it out to wait as \
             long as it takes",
            MAX_WAIT.as_secs() / 86_400
        )));
    }
    Ok(wait)
}

/// The client's User-Agent, bounded and printable, for the dashboard to
/// show who holds.
fn default_owner(headers: &HeaderMap) -> String {
    let agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("http");
    let mut owner = String::new();
    for c in agent.chars().filter(|c| !c.is_control()) {
        if owner.len() + c.len_utf8() > MAX_OWNER_BYTES {
            break;
        }
        owner.push(c);
    }
    owner
}
