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
    keepalive: Duration,
) -> (
    impl Stream<Item = io::Result<Conn>>,
    impl Stream<Item = io::Result<TcpStream>>,
) {
    let permits = Arc::new(Semaphore::new(max));
    let (over_tx, over_rx) = mpsc::channel::<TcpStream>(64);
    let within = futures_util::stream::unfold(
        (listener, permits, over_tx),
        move |(listener, permits, over_tx)| async move {
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
                tcp_keepalive(&stream, keepalive);
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

/// TCP keepalive, for the clients HTTP/2 pings do not reach (HTTP/1.1): a
/// peer that vanished is dropped after `every` of silence plus three
/// unanswered probes `every` apart.
fn tcp_keepalive(stream: &TcpStream, every: Duration) {
    use rustix::net::sockopt;
    let every = every.max(Duration::from_secs(1));
    let set = sockopt::set_socket_keepalive(stream, true)
        .and_then(|()| sockopt::set_tcp_keepidle(stream, every))
        .and_then(|()| sockopt::set_tcp_keepintvl(stream, every))
        .and_then(|()| sockopt::set_tcp_keepcnt(stream, 3));
    if let Err(err) = set {
        tracing::debug!(%err, "cannot set TCP keepalive");
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn connections_carry_tcp_keepalive_and_respect_the_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (within, over) = accept(listener, 1, Duration::from_secs(4));
        tokio::pin!(within);
        tokio::pin!(over);
        let _a = TcpStream::connect(addr).await.unwrap();
        let conn = within.next().await.unwrap().unwrap();
        assert!(rustix::net::sockopt::socket_keepalive(&conn.io).unwrap());
        assert_eq!(
            rustix::net::sockopt::tcp_keepidle(&conn.io).unwrap(),
            Duration::from_secs(4)
        );
        assert_eq!(rustix::net::sockopt::tcp_keepcnt(&conn.io).unwrap(), 3);
        // The second connection is over the limit of 1.
        let _b = TcpStream::connect(addr).await.unwrap();
        let next = tokio::select! {
            c = within.next() => panic!("accepted over the limit: {:?}", c.map(|c| c.is_ok())),
            o = over.next() => o,
        };
        assert!(next.unwrap().is_ok());
        // Dropping the first frees its place.
        drop(conn);
        let _c = TcpStream::connect(addr).await.unwrap();
        assert!(within.next().await.unwrap().is_ok());
    }
}
