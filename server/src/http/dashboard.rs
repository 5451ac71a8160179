//! The dashboard: one page, its script and its style, compiled into the
//! binary (`include_str!`), so it works offline and matches the server it
//! came with. The page follows `/v1/events` and re-reads `/v1/locks` when
//! something changes; see `assets/app.js`.

use super::error::{ApiError, ErrorBody};
use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");
const ICON: &str = include_str!("assets/icon.svg");

/// Only this server's own files, no inline script, no framing: the page
/// handles an admin token.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn page(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        body,
    )
        .into_response()
}

/// The dashboard.
#[utoipa::path(
    get,
    path = "/",
    tag = "dashboard",
    responses((status = 200, description = "The dashboard page", content_type = "text/html"))
)]
pub async fn index() -> Response {
    page(INDEX, "text/html; charset=utf-8")
}

/// The dashboard's script, style and icon.
#[utoipa::path(
    get,
    path = "/assets/{file}",
    tag = "dashboard",
    params(("file" = String, Path, description = "app.js, app.css or icon.svg")),
    responses(
        (status = 200, description = "The file"),
        (status = 404, description = "No such file", body = ErrorBody),
    )
)]
pub async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    match file.as_str() {
        "app.js" => Ok(page(SCRIPT, "text/javascript; charset=utf-8")),
        "app.css" => Ok(page(STYLE, "text/css; charset=utf-8")),
        "icon.svg" => Ok(page(ICON, "image/svg+xml")),
        _ => Err(ApiError::not_found("no such dashboard asset")),
    }
}
