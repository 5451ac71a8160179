//! Refusing a request before any route runs (over the connection limit,
//! no place for its answer, cut by the request timeout, from another
//! site): one answer in the client's own protocol, a gRPC status for gRPC
//! and the common JSON error body for HTTP.

use crate::http::error::ApiError;
use axum::http::{Request, Response, StatusCode, header};
use axum::response::IntoResponse;

/// Is this a gRPC request (`content-type: application/grpc...`)?
pub fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A refusal, ready to be answered in either protocol.
#[derive(Debug)]
pub struct Refusal {
    grpc: tonic::Status,
    http: ApiError,
}

impl Refusal {
    /// `message` with the gRPC `code`, or the HTTP `status` and error
    /// `code` (`busy`, `request_timeout`, ...).
    pub fn new(
        grpc: tonic::Code,
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> Refusal {
        let message = message.into();
        Refusal {
            grpc: tonic::Status::new(grpc, message.clone()),
            http: ApiError::new(status, code, message),
        }
    }

    /// The same, with a gRPC status of its own (one that carries metadata).
    pub fn with_status(mut self, status: tonic::Status) -> Refusal {
        self.grpc = status;
        self
    }

    /// The answer, as a gRPC status when `grpc`, else as HTTP.
    pub fn answer(self, grpc: bool) -> Response<tonic::body::Body> {
        if grpc {
            self.grpc.into_http()
        } else {
            self.http.into_response().map(tonic::body::Body::new)
        }
    }
}
