//! Accepting connections: TLS, `--max-connections`, TCP keepalive.
//!
//! One task accepts. Each accepted connection gets its TLS handshake (when
//! TLS is on) in a task of its own, so a slow or hostile client cannot stall
//! the others; failed handshakes are counted for `/metrics`. A connection
//! within the limit carries a semaphore permit for its whole life (it
//! cannot leak: dropping the connection returns it). A connection over the
//! limit is not left hanging in the kernel's accept queue: it is handed to a
//! small second server that answers every request on it with
//! RESOURCE_EXHAUSTED (HTTP 503 for plain HTTP) and a message naming the
//! limit. Held locks on other connections are untouched.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tonic::transport::server::{Connected as _, TcpConnectInfo};

/// Over-limit connections answered with RESOURCE_EXHAUSTED at once.
const OVERFLOW_CONNECTIONS: usize = 64;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An accepted connection, plain or TLS.
pub struct Conn {
    io: Io,
    info: TcpConnectInfo,
    /// Its place (within the limit, or among the over-limit connections
    /// being refused), held for the connection's life.
    _permit: OwnedSemaphorePermit,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Conn {
    /// The peer's address (and ours).
    pub fn info(&self) -> &TcpConnectInfo {
        &self.info
    }

    /// Bounds how long data sent on the connection may go unacknowledged
    /// before the kernel drops it (`TCP_USER_TIMEOUT`), so that a write to
    /// a peer that vanished fails instead of waiting for minutes.
    pub fn set_user_timeout(&self, timeout: Duration) {
        let tcp = match &self.io {
            Io::Plain(tcp) => tcp,
            Io::Tls(tls) => tls.get_ref().0,
        };
        let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        if let Err(err) = rustix::net::sockopt::set_tcp_user_timeout(tcp, ms) {
            tracing::debug!(%err, "cannot set TCP_USER_TIMEOUT");
        }
    }
}

macro_rules! delegate {
    ($self:ident, $io:ident => $call:expr) => {
        match &mut $self.io {
            Io::Plain($io) => {
                let $io = Pin::new($io);
                $call
            }
            Io::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $call
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }
}

/// Settings of the accept loop.
pub struct Accept {
    pub max_connections: usize,
    pub keepalive: Duration,
    pub tls: Option<TlsAcceptor>,
    /// Counts failed TLS handshakes.
    pub tls_failures: Arc<AtomicU64>,
}

/// Starts accepting on `listener`: connections within the limit come out of
/// the first receiver, those over it out of the second (for
/// [`overflow_routes`]). Dropping the first stops accepting and closes the
/// listening socket.
pub fn accept(
    listener: TcpListener,
    settings: Accept,
) -> (mpsc::Receiver<Conn>, mpsc::Receiver<Conn>) {
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    // Connections over the limit are answered, but only so many at once:
    // beyond these, an over-limit connection is closed at once.
    let overflow_permits = Arc::new(Semaphore::new(OVERFLOW_CONNECTIONS));
    let (within_tx, within_rx) = mpsc::channel::<Conn>(64);
    let (over_tx, over_rx) = mpsc::channel::<Conn>(64);
    let settings = Arc::new(settings);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        // Out of file descriptors and the like: back off, go on.
                        tracing::warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                // The server stopped reading: stop accepting.
                () = within_tx.closed() => return,
            };
            let _ = stream.set_nodelay(true);
            tcp_keepalive(&stream, settings.keepalive);
            let (permit, tx) = match permits.clone().try_acquire_owned() {
                Ok(permit) => (permit, within_tx.clone()),
                Err(_) => match overflow_permits.clone().try_acquire_owned() {
                    Ok(permit) => (permit, over_tx.clone()),
                    Err(_) => continue, // dropping the stream closes it
                },
            };
            let settings = settings.clone();
            tokio::spawn(async move {
                if let Some(conn) = establish(stream, permit, &settings).await {
                    // A full queue (the server is overwhelmed) closes it.
                    let _ = tx.send(conn).await;
                }
            });
        }
    });
    (within_rx, over_rx)
}

/// Finishes a connection's TLS handshake, if any.
async fn establish(
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    settings: &Accept,
) -> Option<Conn> {
    let info = stream.connect_info();
    let io = match &settings.tls {
        None => Io::Plain(stream),
        Some(acceptor) => {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => Io::Tls(Box::new(tls)),
                Ok(Err(err)) => {
                    settings.tls_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = ?info.remote_addr, %err, "TLS handshake failed");
                    return None;
                }
                Err(_) => {
                    settings.tls_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = ?info.remote_addr, "TLS handshake timed out");
                    return None;
                }
            }
        }
    };
    Some(Conn {
        io,
        info,
        _permit: permit,
    })
}

/// The TLS acceptor for `--tls-cert`, `--tls-key` and (mutual TLS)
/// `--tls-client-ca`. Offers HTTP/2 and HTTP/1.1 (ALPN), so gRPC clients,
/// curl and browsers all work.
pub fn tls_acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--tls-cert {}: no certificate in it",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for der in CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?
            {
                let der = der.map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
                roots
                    .add(der)
                    .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
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

/// Why a connection over the limit is refused.
pub fn too_many_connections(max: usize) -> String {
    format!("padlockd already serves {max} connections (--max-connections); try again later")
}

/// Routes that refuse every request, for connections over the limit.
pub fn overflow_routes(max: usize) -> tonic::service::Routes {
    let message = too_many_connections(max);
    let refuse = move |request: axum::extract::Request| {
        let refusal = crate::refusal::Refusal::new(
            tonic::Code::ResourceExhausted,
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            message.clone(),
        );
        let grpc = crate::refusal::is_grpc(&request);
        async move { refusal.answer(grpc) }
    };
    axum::Router::new().fallback(refuse).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_carry_tcp_keepalive_and_respect_the_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let settings = Accept {
            max_connections: 1,
            keepalive: Duration::from_secs(4),
            tls: None,
            tls_failures: Arc::default(),
        };
        let (mut within, mut over) = accept(listener, settings);
        let _a = TcpStream::connect(addr).await.unwrap();
        let conn = within.recv().await.unwrap();
        let Io::Plain(tcp) = &conn.io else {
            panic!("plain")
        };
        assert!(rustix::net::sockopt::socket_keepalive(tcp).unwrap());
        assert_eq!(
            rustix::net::sockopt::tcp_keepidle(tcp).unwrap(),
            Duration::from_secs(4)
        );
        assert_eq!(rustix::net::sockopt::tcp_keepcnt(tcp).unwrap(), 3);
        // The second connection is over the limit of 1.
        let _b = TcpStream::connect(addr).await.unwrap();
        let next = tokio::select! {
            c = within.recv() => panic!("accepted over the limit: {:?}", c.map(|c| c.info.remote_addr)),
            o = over.recv() => o,
        };
        let _over = next.expect("an over-limit connection");
        // Over-limit connections are answered only so many at once; past
        // that they are closed (the client reads end-of-file).
        let mut waiting = Vec::new();
        for _ in 1..OVERFLOW_CONNECTIONS {
            waiting.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read(&mut extra, &mut byte),
        )
        .await
        .expect("the extra connection is closed, not left open");
        assert!(matches!(read, Ok(0)), "{read:?}");
        // Dropping the first frees its place.
        drop(conn);
        let _c = TcpStream::connect(addr).await.unwrap();
        assert!(within.recv().await.is_some());
    }
}
