//! Accepting connections, with `--max-connections`.
//!
//! A connection within the limit carries a semaphore permit for its whole
//! life (it cannot leak: dropping the connection returns it). A connection
//! over the limit is not left hanging in the kernel's accept queue: it is
//! handed to a small second server that answers every request on it with
//! RESOURCE_EXHAUSTED (HTTP 503 for plain HTTP) and a message naming the
//! limit. Held locks on other connections are untouched.

use axum::response::IntoResponse;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// An accepted connection within the limit.
pub struct Conn {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Splits accepted connections: those within `max` for the main server,
/// the rest for [`overflow_routes`]'s server.
pub fn accept(
    listener: TcpListener,
    max: usize,
) -> (
    impl Stream<Item = io::Result<Conn>>,
    impl Stream<Item = io::Result<TcpStream>>,
) {
    let permits = Arc::new(Semaphore::new(max));
    let (over_tx, over_rx) = mpsc::channel::<TcpStream>(64);
    let within = futures_util::stream::unfold(
        (listener, permits, over_tx),
        |(listener, permits, over_tx)| async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        // Out of file descriptors and the like: back off, go on.
                        tracing::warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let conn = Conn {
                            io: stream,
                            _permit: permit,
                        };
                        return Some((Ok(conn), (listener, permits, over_tx)));
                    }
                    // Over the limit; if even the overflow queue is full, the
                    // connection is closed.
                    Err(_) => {
                        let _ = over_tx.try_send(stream);
                    }
                }
            }
        },
    );
    let over = tokio_stream::wrappers::ReceiverStream::new(over_rx);
    (within, tokio_stream::StreamExt::map(over, Ok))
}

/// Routes that refuse every request, for connections over the limit.
pub fn overflow_routes(max: usize) -> tonic::service::Routes {
    let message =
        format!("padlockd already serves {max} connections (--max-connections); try again later");
    let refuse = move |request: axum::extract::Request| {
        let message = message.clone();
        async move {
            let grpc = request
                .headers()
                .get(axum::http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            if grpc {
                tonic::Status::resource_exhausted(message).into_http::<axum::body::Body>()
            } else {
                let body = serde_json::json!({"error": {"code": "too_many_connections", "message": message}});
                (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(body),
                )
                    .into_response()
            }
        }
    };
    axum::Router::new().fallback(refuse).into()
}
