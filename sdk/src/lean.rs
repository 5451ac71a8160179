//! The client side of padlockd's lean transport: the client's Session
//! ops in length-prefixed frames on a TCP connection of their own, without
//! HTTP/2 and gRPC (see `LeanRequest` in the `.proto`).
//!
//! It carries exactly what a gRPC Session stream carries, so a [`Mux`]
//! does not know which of the two it rides: one task per connection writes
//! the ops' requests (those queued together in one write), reads the
//! server's frames and hands each to its op, and keeps the connection
//! alive with pings. A server that does not answer the hello with a
//! welcome (a padlockd older than the lean transport, a proxy that only
//! speaks HTTP) is remembered, and the client's Sessions go over gRPC from
//! then on; the ops already sent were never seen, and are asked again. So
//! is a server whose TLS handshake fails for the lean connection (a TLS
//! terminator that wants HTTP/2 by ALPN): gRPC's own attempt then works,
//! or says why not. A connection closed before the server said anything
//! (it was at its limit, or restarting) is only tried again. A lean connection refused for the server's
//! `--max-connections` fails the requests on it, and the next request
//! tries again, as a Hold stream's would.
//!
//! `https://` URLs get TLS first, with the client's CA and certificate.
//!
//! A client opens its lean connection when it connects (the hello is its
//! check that padlockd answers there), and opens its gRPC connection only
//! for the calls that need one: a client that only locks holds one
//! connection.
//!
//! [`Mux`]: crate::session::Mux

use crate::session::{Greeted, Muxes, Shared, end, over_limit, route};
use crate::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use padlock_proto::lean::{self as frame, MAGIC};
use padlock_proto::v1 as pb;
use pb::lean_request::Msg as In;
use pb::lean_response::Msg as Out;
use prost::Message;
use prost::bytes::{Buf, BytesMut};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Requests put into one write at most.
const COALESCE: usize = 64;

/// The largest frame the client reads from padlockd.
const MAX_FRAME: usize = 16 << 20;

/// Bytes waiting to be sent past which no more requests are taken (they
/// wait in the queue) until the server reads.
const OUT_LIMIT: usize = 1 << 20;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a client's lean connections go, and what they say first.
pub(crate) struct Target {
    /// `host:port` of the server's URL.
    pub(crate) addr: String,
    pub(crate) hello: pb::LeanHello,
    /// For `https://` URLs: the same CA and client certificate as the
    /// client's gRPC connection.
    tls: Option<Tls>,
}

struct Tls {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// The PEM of a CA, and of a client certificate and its key.
pub(crate) type TlsPem<'a> = (&'a [u8], Option<(&'a [u8], &'a [u8])>);

impl Target {
    /// The target of an `http://` URL, or of an `https://` one with the
    /// CA (and client certificate) to check it with; `Err` for PEM that
    /// does not parse.
    pub(crate) fn of(
        url: &str,
        authorization: Option<&str>,
        tls: Option<TlsPem<'_>>,
    ) -> Result<Option<Target>, String> {
        let Ok(uri) = url.parse::<tonic::codegen::http::Uri>() else {
            return Ok(None);
        };
        let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
            return Ok(None);
        };
        let (port, tls) = match (scheme, tls) {
            ("http", _) => (80, None),
            ("https", Some(pem)) => (443, Some(Tls::new(host, pem)?)),
            _ => return Ok(None),
        };
        Ok(Some(Target {
            addr: format!("{host}:{}", uri.port_u16().unwrap_or(port)),
            hello: pb::LeanHello {
                authorization: authorization.unwrap_or_default().to_string(),
            },
            tls,
        }))
    }

    /// A TCP connection to the server, with TLS when the URL says so;
    /// each step within [`CONNECT_TIMEOUT`].
    async fn open(&self) -> Result<Stream, Opening> {
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr)).await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(err)) => return Err(Opening::Unreachable(err)),
            Err(_) => {
                let why = format!("no connection within {CONNECT_TIMEOUT:?}");
                let err = std::io::Error::new(std::io::ErrorKind::TimedOut, why);
                return Err(Opening::Unreachable(err));
            }
        };
        let _ = tcp.set_nodelay(true);
        let user_timeout = (KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT).as_millis() as u32;
        let _ = rustix::net::sockopt::set_tcp_user_timeout(&tcp, user_timeout);
        let Some(tls) = &self.tls else {
            return Ok(Stream::Plain(tcp));
        };
        let handshake = tls.connector.connect(tls.name.clone(), tcp);
        use std::io::ErrorKind::*;
        match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
            Ok(Ok(tls)) => Ok(Stream::Tls(Box::new(tls))),
            // Closed without a word: perhaps a moment's refusal.
            Ok(Err(err))
                if matches!(
                    err.kind(),
                    UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
                ) =>
            {
                Err(Opening::Closed(format!("TLS handshake: {err}")))
            }
            Ok(Err(err)) => Err(Opening::Tls(format!("TLS handshake: {err}"))),
            Err(_) => Err(Opening::Closed(format!(
                "no TLS handshake within {CONNECT_TIMEOUT:?}"
            ))),
        }
    }
}

impl Tls {
    /// TLS as the gRPC connection has it: the server's certificate must
    /// chain to the CA and name `host`; no ALPN (padlockd tells the lean
    /// transport from HTTP by its first bytes, as without TLS).
    fn new(host: &str, (ca, identity): TlsPem<'_>) -> Result<Tls, String> {
        use tokio_rustls::rustls::{self, pki_types::pem::PemObject};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        let ders = CertificateDer::pem_slice_iter(ca)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the CA certificate: {e}"))?;
        // As gRPC's TLS does: a bundle's certificates that do not parse
        // are skipped.
        let (added, _) = roots.add_parsable_certificates(ders);
        if added == 0 {
            return Err("the CA certificate: no usable certificate in it".into());
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let certs = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("the client certificate: {e}"))?;
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| format!("the client key: {e}"))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| format!("the client certificate: {e}"))?
            }
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host} as a TLS server name: {e}"))?;
        Ok(Tls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            name,
        })
    }
}

/// Why no lean connection opened.
enum Opening {
    /// Nothing accepted the TCP connection.
    Unreachable(std::io::Error),
    /// The TLS handshake failed: something there takes TCP but not this
    /// TLS (a terminator that wants HTTP/2 by ALPN, a wrong CA); gRPC's
    /// own attempt tells which.
    Tls(String),
    /// The connection closed, or the handshake took too long, before the
    /// server said anything: perhaps only for a moment.
    Closed(String),
}

/// An open lean connection.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Runs one lean connection as a Session: sends `requests`, hands what
/// comes back to `shared`'s ops, and ends them all when the connection
/// ends. `greeted` hears how the server answered the hello.
pub(crate) async fn run(
    target: Arc<Target>,
    requests: mpsc::UnboundedReceiver<pb::SessionRequest>,
    shared: Arc<Shared>,
    muxes: Weak<Muxes>,
    mut greeted: Option<oneshot::Sender<Greeted>>,
) {
    let no_lean = |muxes: &Weak<Muxes>| {
        if let Some(muxes) = muxes.upgrade() {
            muxes.lean_unsupported();
        }
    };
    let why = match target.open().await {
        Ok(stream) => {
            let mut connection = Connection::new(&target, greeted.take(), muxes.clone());
            let ended = match stream {
                Stream::Plain(mut tcp) => {
                    let (rd, wr) = tcp.split();
                    connection.drive(rd, wr, requests, &shared).await
                }
                Stream::Tls(tls) => {
                    let (rd, wr) = tokio::io::split(*tls);
                    connection.drive(rd, wr, requests, &shared).await
                }
            };
            let mut greeted = connection.greeted.take();
            match ended {
                Ended::Why(why) => why,
                Ended::NotLean(why) => {
                    // Nothing was taken: the ops ask again, over gRPC.
                    no_lean(&muxes);
                    tell(&mut greeted, Greeted::NoLean);
                    why
                }
                // Nothing was taken: the ops ask again (on a new lean
                // connection: this may have been a moment's refusal).
                Ended::Closed(why) => {
                    tell(&mut greeted, Greeted::Closed);
                    why
                }
                // (Over --max-connections too: the next request tries
                // again, as a Hold stream's would.)
                Ended::Refused(status) => {
                    let why = status.message().to_string();
                    shared.ops().refused = Some(status);
                    tell(&mut greeted, Greeted::Refused);
                    why
                }
            }
        }
        Err(Opening::Unreachable(err)) => {
            let why = refused(&shared, format!("cannot connect to {}: {err}", target.addr));
            tell(&mut greeted, Greeted::Unreachable(err));
            why
        }
        Err(Opening::Closed(why)) => {
            tell(&mut greeted, Greeted::Closed);
            why
        }
        // Nothing was sent: the ops ask again, over gRPC.
        Err(Opening::Tls(why)) => {
            no_lean(&muxes);
            tell(&mut greeted, Greeted::NoLean);
            why
        }
    };
    end(&shared, why);
}

/// Says how the hello was answered, to whoever waits to know.
fn tell(greeted: &mut Option<oneshot::Sender<Greeted>>, greeting: Greeted) {
    if let Some(greeted) = greeted.take() {
        let _ = greeted.send(greeting);
    }
}

/// Every op on a connection that never opened fails with `why`.
fn refused(shared: &Shared, why: String) -> String {
    shared.ops().refused = Some(tonic::Status::unavailable(why.clone()));
    why
}

/// How a connection ended.
enum Ended {
    Why(String),
    /// The server answered the hello with something else than a welcome,
    /// or nothing within the welcome's time.
    NotLean(String),
    /// The connection closed or failed before the server said anything.
    Closed(String),
    /// The server said no to the hello.
    Refused(tonic::Status),
}

struct Connection {
    /// Frames read but not taken yet.
    buf: BytesMut,
    /// Frames to write.
    out: BytesMut,
    welcomed: bool,
    /// The server has sent something (a welcome or not).
    answered: bool,
    /// The requests' side is done: nothing more to send.
    closed: bool,
    heard: Instant,
    pinged: Option<Instant>,
    pings: u64,
    /// The latest ping of the server not answered yet (a burst gets one
    /// pong, so a server that pings and never reads pins nothing).
    pong: Option<u64>,
    /// Told of the welcome (taken then).
    greeted: Option<oneshot::Sender<Greeted>>,
    /// The largest frame the server reads (0: not known), from its welcome
    /// (or an earlier connection's).
    max_frame: usize,
    muxes: Weak<Muxes>,
}

impl Connection {
    fn new(
        target: &Target,
        greeted: Option<oneshot::Sender<Greeted>>,
        muxes: Weak<Muxes>,
    ) -> Connection {
        let max_frame = muxes.upgrade().map_or(0, |muxes| muxes.max_message());
        let mut out = BytesMut::with_capacity(256);
        out.extend_from_slice(MAGIC);
        let hello = pb::LeanRequest {
            msg: Some(In::Hello(target.hello.clone())),
        };
        frame::encode(&hello, &mut out);
        Connection {
            buf: BytesMut::new(),
            out,
            welcomed: false,
            answered: false,
            closed: false,
            heard: Instant::now(),
            pinged: None,
            pings: 0,
            pong: None,
            greeted,
            max_frame,
            muxes,
        }
    }

    async fn drive(
        &mut self,
        mut rd: impl AsyncRead + Unpin,
        mut wr: impl AsyncWrite + Unpin,
        mut requests: mpsc::UnboundedReceiver<pb::SessionRequest>,
        shared: &Shared,
    ) -> Ended {
        let started = Instant::now();
        // The first check is the welcome's deadline (the ping's is no
        // earlier).
        let check = tokio::time::sleep_until(started + KEEPALIVE_TIMEOUT);
        tokio::pin!(check);
        let mut shut = false;
        loop {
            if self.out.len() < OUT_LIMIT
                && !shut
                && let Some(n) = self.pong.take()
            {
                self.push(In::Pong(n));
            }
            if self.closed && self.out.is_empty() && !shut {
                // No guard or client is left and all is sent: closing our
                // side releases what is held; the server ends the rest.
                shut = true;
                if let Err(err) = wr.shutdown().await {
                    return self.broken(format!("closing: {err}"));
                }
            }
            tokio::select! {
                // Sending never stops reading: a server that answers
                // while a burst goes out is heard (and is not blocked).
                written = wr.write(&self.out), if !self.out.is_empty() => match written {
                    Ok(0) => return self.broken("padlockd stopped taking data".into()),
                    Ok(n) => self.out.advance(n),
                    Err(err) => return self.broken(format!("writing to padlockd: {err}")),
                },
                request = requests.recv(), if !self.closed && self.out.len() < OUT_LIMIT => match request {
                    Some(request) => {
                        self.add(request, shared);
                        // What else is queued goes out in the same write.
                        for _ in 1..COALESCE {
                            match requests.try_recv() {
                                Ok(request) => self.add(request, shared),
                                Err(_) => break,
                            }
                        }
                    }
                    None => self.closed = true,
                },
                read = rd.read_buf(&mut self.buf) => match read {
                    Ok(0) => {
                        return self.broken("padlockd closed the connection".into());
                    }
                    Ok(_) => {
                        self.heard = Instant::now();
                        self.answered = true;
                        if let Some(ended) = self.take_frames(shared) {
                            return ended;
                        }
                    }
                    Err(err) => return self.broken(format!("reading from padlockd: {err}")),
                },
                // (Checked when it could be due, not moved at each frame.)
                () = &mut check => {
                    let now = Instant::now();
                    if !self.welcomed {
                        // Something that neither welcomes nor refuses (a
                        // proxy that waits for HTTP): not a lean transport.
                        return Ended::NotLean(format!(
                            "no lean transport there (no welcome within {KEEPALIVE_TIMEOUT:?})"
                        ));
                    }
                    if let Some(at) = self.pinged {
                        if self.heard >= at {
                            self.pinged = None;
                        } else if now >= at + KEEPALIVE_TIMEOUT {
                            return Ended::Why(format!(
                                "padlockd did not answer a ping within {KEEPALIVE_TIMEOUT:?}"
                            ));
                        }
                    }
                    if self.pinged.is_none() && now >= self.heard + KEEPALIVE_INTERVAL {
                        self.pings += 1;
                        self.pinged = Some(now);
                        self.push(In::Ping(self.pings));
                    }
                    check.as_mut().reset(match self.pinged {
                        Some(at) => at + KEEPALIVE_TIMEOUT,
                        None => self.heard + KEEPALIVE_INTERVAL,
                    });
                }
            }
        }
    }

    /// Queues `request`, unless it is over the server's frame limit: the
    /// server would end the connection, and every lock on it, for it, so
    /// that request alone fails here.
    fn add(&mut self, request: pb::SessionRequest, shared: &Shared) {
        let framed = pb::LeanRequest {
            msg: Some(In::Session(request)),
        };
        if let Some(In::Session(request)) = &framed.msg
            && over_limit(shared, request, framed.encoded_len(), self.max_frame)
        {
            return;
        }
        frame::encode(&framed, &mut self.out);
    }

    fn push(&mut self, msg: In) {
        frame::encode(&pb::LeanRequest { msg: Some(msg) }, &mut self.out);
    }

    /// The connection failed. Before the welcome, a server that answered
    /// something else does not speak the lean transport; one that closed
    /// without a word (at its connection limit, restarting) may, later.
    fn broken(&self, why: String) -> Ended {
        if self.welcomed {
            Ended::Why(why)
        } else if self.answered {
            Ended::NotLean(format!("no lean transport there ({why})"))
        } else {
            Ended::Closed(why)
        }
    }

    /// Hands each whole frame read to its op; `Some` ends the connection.
    fn take_frames(&mut self, shared: &Shared) -> Option<Ended> {
        loop {
            let body = match frame::take(&mut self.buf, MAX_FRAME) {
                Ok(Some(body)) => body,
                Ok(None) => return None,
                Err(too) => return Some(self.broken(format!("from padlockd: {too}"))),
            };
            let msg = match pb::LeanResponse::decode(body) {
                Ok(pb::LeanResponse { msg: Some(msg) }) => msg,
                Ok(_) => continue,
                Err(err) => {
                    let why = format!("a frame from padlockd that does not decode: {err}");
                    return Some(self.broken(why));
                }
            };
            match (self.welcomed, msg) {
                (false, Out::Welcome(welcome)) => match welcome.refused {
                    None => {
                        self.welcomed = true;
                        if welcome.max_frame != 0 {
                            self.max_frame = welcome.max_frame as usize;
                            if let Some(muxes) = self.muxes.upgrade() {
                                muxes.set_max_message(self.max_frame);
                            }
                        }
                        if let Some(greeted) = self.greeted.take() {
                            let _ = greeted.send(Greeted::Welcome);
                        }
                    }
                    Some(refused) => {
                        let code = tonic::Code::from(refused.code);
                        return Some(Ended::Refused(tonic::Status::new(code, refused.message)));
                    }
                },
                (false, _) => {
                    return Some(self.broken("the first frame was not a welcome".into()));
                }
                (true, Out::Session(pb::SessionResponse { op, msg: Some(msg) })) => {
                    route(shared, op, msg);
                }
                (true, Out::Ping(n)) => self.pong = Some(n),
                (true, Out::Closing(failure)) => return Some(Ended::Why(failure.message)),
                (true, _) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_come_from_urls_with_what_they_need() {
        let addr = |url: &str| Target::of(url, None, None).unwrap().map(|t| t.addr);
        assert_eq!(
            addr("http://127.0.0.1:7420").as_deref(),
            Some("127.0.0.1:7420")
        );
        assert_eq!(
            addr("http://locks.internal").as_deref(),
            Some("locks.internal:80")
        );
        assert_eq!(addr("http://[::1]:7420").as_deref(), Some("[::1]:7420"));
        // https:// needs the CA to check the server with.
        assert_eq!(addr("https://locks.internal:7420"), None);
        assert_eq!(addr("ftp://locks.internal:7420"), None);
        let hello = Target::of("http://h:1", Some("Bearer t"), None)
            .unwrap()
            .unwrap()
            .hello;
        assert_eq!(hello.authorization, "Bearer t");
    }

    #[test]
    fn a_ca_that_does_not_parse_is_an_error() {
        let pem = b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n";
        let err = Target::of("https://h:1", None, Some((pem, None))).unwrap_err();
        assert!(err.contains("the CA certificate"), "{err}");
    }
}
