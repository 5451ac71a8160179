//! Bounded responses: the places for them (per connection, per client
//! address, in the server), which requests get one, and the body that
//! hands them out in pieces and keeps its request counted until it ends.
//! See the module above for the rules.

use super::OpenRequest;
use crate::refusal::{Refusal, is_grpc};
use axum::http::{Request, StatusCode};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;

/// Bounded (non-stream) responses in flight at once, in the whole server.
pub const BOUNDED_IN_FLIGHT: usize = 64;
/// Bounded responses in flight at once on one connection.
pub const BOUNDED_PER_CONNECTION: usize = 8;
/// Bounded responses in flight at once for one client address.
pub const BOUNDED_PER_PEER: usize = 16;
/// Largest piece of a bounded response handed to HTTP/2 at once, so that
/// the rest waits (counted) until the client opens its window.
pub const BOUNDED_CHUNK: usize = 16 * 1024;

/// The places for bounded responses, shared by every connection.
#[derive(Debug)]
pub struct Answers {
    server: Arc<Semaphore>,
    per_peer: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

impl Default for Answers {
    fn default() -> Self {
        Answers {
            server: Arc::new(Semaphore::new(BOUNDED_IN_FLIGHT)),
            per_peer: Default::default(),
        }
    }
}

impl Answers {
    /// A place for one more bounded response from `peer`, if there is one.
    pub(super) fn take(self: &Arc<Self>, peer: Option<std::net::IpAddr>) -> Option<AnswerPlace> {
        let permit = self.server.clone().try_acquire_owned().ok()?;
        if let Some(ip) = peer {
            let mut per_peer = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
            let count = per_peer.entry(ip).or_insert(0);
            if *count >= BOUNDED_PER_PEER {
                return None;
            }
            *count += 1;
        }
        Some(AnswerPlace {
            answers: self.clone(),
            peer,
            _permit: permit,
        })
    }
}

/// One bounded response's place, given back on drop.
pub(super) struct AnswerPlace {
    answers: Arc<Answers>,
    peer: Option<std::net::IpAddr>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for AnswerPlace {
    fn drop(&mut self) {
        if let Some(ip) = self.peer {
            let mut per_peer = self
                .answers
                .per_peer
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(count) = per_peer.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    per_peer.remove(&ip);
                }
            }
        }
    }
}

/// What kind of response a request gets.
pub(super) enum AnswerKind {
    /// A stream that lives as long as a lock is held or waited for (or
    /// events are followed).
    Stream,
    /// A health check: a few bytes.
    Tiny,
    /// Everything else: bounded in size, number and time.
    Bounded,
}

pub(super) fn answer_kind<B>(request: &Request<B>) -> AnswerKind {
    let path = request.uri().path();
    if is_grpc(request) {
        return match path {
            "/padlock.v1.Padlock/Hold"
            | "/padlock.v1.Padlock/Session"
            | "/grpc.health.v1.Health/Watch" => AnswerKind::Stream,
            "/grpc.health.v1.Health/Check" => AnswerKind::Tiny,
            p if p.starts_with("/grpc.reflection.") => AnswerKind::Stream,
            _ => AnswerKind::Bounded,
        };
    }
    match (request.method(), path) {
        (&axum::http::Method::POST, p) if p.starts_with("/v1/locks/") && p.ends_with("/hold") => {
            AnswerKind::Stream
        }
        (&axum::http::Method::GET, "/v1/events") => AnswerKind::Stream,
        (&axum::http::Method::GET, "/healthz" | "/readyz") => AnswerKind::Tiny,
        _ => AnswerKind::Bounded,
    }
}

/// The answer when no place is left for a bounded response.
pub(super) fn too_busy() -> Refusal {
    let message = format!(
        "too many answers are being sent (at most {BOUNDED_PER_CONNECTION} per connection, \
         {BOUNDED_PER_PEER} per client address, {BOUNDED_IN_FLIGHT} in all); try again"
    );
    Refusal::new(
        tonic::Code::ResourceExhausted,
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
        message,
    )
}

/// A bounded response's places (released when its body is sent or
/// dropped) and the watch on how long it takes to be read.
pub(super) struct Bound {
    _places: Option<(OwnedSemaphorePermit, AnswerPlace)>,
    /// Dropped once the body is sent (or dropped): ends the watch.
    _sent: tokio::sync::oneshot::Sender<()>,
}

impl Bound {
    /// Starts the clock: when the body is not sent within `limit`, the
    /// connection is told (through `unread`) to close.
    pub(super) fn start(
        places: Option<(OwnedSemaphorePermit, AnswerPlace)>,
        limit: Duration,
        unread: Arc<Notify>,
    ) -> Bound {
        let (sent, watch) = tokio::sync::oneshot::channel::<()>();
        let unread = Arc::downgrade(&unread);
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(limit) => {
                    if let Some(unread) = unread.upgrade() {
                        unread.notify_one();
                    }
                }
                _ = watch => {}
            }
        });
        Bound {
            _places: places,
            _sent: sent,
        }
    }
}

/// A response body that keeps its request counted as open until it ends
/// or is dropped (and, for a bounded response, its places).
pub(super) struct Counted {
    body: Body,
    _open: OpenRequest,
    bound: Option<Bound>,
    /// The rest of a large piece of a bounded response, not yet handed on.
    rest: axum::body::Bytes,
}

impl Counted {
    pub(super) fn new(body: Body, open: OpenRequest, bound: Option<Bound>) -> Counted {
        Counted {
            body,
            _open: open,
            bound,
            rest: axum::body::Bytes::new(),
        }
    }

    /// At most [`BOUNDED_CHUNK`] bytes of `data` (a bounded response), the
    /// rest kept for the next poll.
    fn piece(&mut self, mut data: axum::body::Bytes) -> http_body::Frame<axum::body::Bytes> {
        if data.len() > BOUNDED_CHUNK {
            self.rest = data.split_off(BOUNDED_CHUNK);
        }
        http_body::Frame::data(data)
    }
}

impl http_body::Body for Counted {
    type Data = axum::body::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if !self.rest.is_empty() {
            let rest = std::mem::take(&mut self.rest);
            return Poll::Ready(Some(Ok(self.piece(rest))));
        }
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        match frame {
            // Sent: its places are free for others.
            Poll::Ready(None) => self.bound = None,
            // A bounded response goes in pieces, so that what the client
            // has not made room for stays here, counted, not in HTTP/2's
            // send buffer.
            Poll::Ready(Some(Ok(frame))) if self.bound.is_some() => {
                return match frame.into_data() {
                    Ok(data) => Poll::Ready(Some(Ok(self.piece(data)))),
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                };
            }
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
