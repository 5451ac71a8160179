//! One error shape for every HTTP endpoint, and the extractors that keep
//! it so.
//!
//! Every failure answers `{"error": {"code", "message"}}` with a status
//! that says what went wrong. Domain errors ([`LockError`]) are mapped here,
//! once, as `grpc::status` maps them for gRPC. axum's own extractor
//! rejections (a malformed query, an undecodable path) are wrapped by
//! [`Query`] and [`LockPath`] so that they answer in the same shape.

use crate::locks::LockError;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// An HTTP error: a status, a stable machine-readable `code` and a message
/// a person can act on.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_name`, `invalid_argument`,
    /// `unauthenticated`, `admin_disabled`, `not_found`, `not_acquired`,
    /// `limit_mismatch`, `too_many_waiters`, `too_many_locks`,
    /// `too_many_holds`, `quota_exceeded`, `too_many_files`,
    /// `unavailable`, `draining`, `backend`, `method_not_allowed`.
    #[schema(example = "invalid_name")]
    pub code: String,
    /// For a person: what went wrong and what to do about it.
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            allow: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
            },
        }
    }
}

impl From<LockError> for ApiError {
    fn from(err: LockError) -> ApiError {
        let message = err.to_string();
        let (status, code) = match err {
            LockError::InvalidName { .. } => (StatusCode::BAD_REQUEST, "invalid_name"),
            LockError::InvalidArgument(_) => (StatusCode::BAD_REQUEST, "invalid_argument"),
            // The lock is busy: a conflict with its current state, as is a
            // semaphore limit that disagrees with the current holders'.
            LockError::NotAcquired { .. } => (StatusCode::CONFLICT, "not_acquired"),
            LockError::LimitMismatch { .. } => (StatusCode::CONFLICT, "limit_mismatch"),
            LockError::TooManyWaiters { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_waiters"),
            LockError::TooManyLocks { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_locks"),
            LockError::TooManyHolds { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_holds"),
            LockError::QuotaExceeded { .. } => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
            LockError::NoDescriptors { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_files"),
            LockError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            LockError::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
            LockError::Backend(_) => (StatusCode::SERVICE_UNAVAILABLE, "backend"),
            LockError::PermissionDenied(_) => (StatusCode::FORBIDDEN, "permission_denied"),
        };
        ApiError::new(status, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(allow) = self.allow {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"padlock admin\""),
            );
        }
        response
    }
}

/// `axum::extract::Query`, answering a malformed query string (unknown
/// parameter, bad value) with the common error shape.
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => Err(ApiError::bad_request(format!(
                "bad query parameters: {}",
                rejection
                    .body_text()
                    .trim_start_matches("Failed to deserialize query string: ")
            ))),
        }
    }
}

/// The rest of the path after `/v1/locks/`, percent-decoded: a lock name,
/// possibly with `/` in it, possibly followed by a sub-resource.
pub struct LockPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for LockPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(rest)) => Ok(LockPath(rest)),
            Err(rejection) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_name",
                format!("bad lock path: {}", rejection.body_text()),
            )),
        }
    }
}
