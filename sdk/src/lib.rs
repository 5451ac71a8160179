//! Rust client for padlockd.
//!
//! A lock is held for exactly as long as its [`LockGuard`] lives: the guard
//! owns the gRPC Hold stream, and dropping it (or the process exiting, or the
//! network going away) releases the lock on the server.
//!
//! ```no_run
//! # async fn demo() -> Result<(), padlock::Error> {
//! use std::time::Duration;
//!
//! let client = padlock::Client::connect("http://127.0.0.1:7420").await?;
//! let guard = client
//!     .lock("reports/nightly")
//!     .wait(Duration::from_secs(10))
//!     .owner("report-builder")
//!     .acquire()
//!     .await?;
//! // Pass the fence to the resource you protect, so it can refuse a stale holder.
//! println!("holding with fence {}", guard.fence());
//! tokio::select! {
//!     lost = guard.lost() => eprintln!("lock lost: {lost}"),
//!     _ = tokio::time::sleep(Duration::from_secs(1)) => guard.release().await?,
//! }
//! # Ok(()) }
//! ```
//!
//! Try-lock and semaphores use the same builder:
//!
//! ```no_run
//! # async fn demo(client: padlock::Client) -> Result<(), padlock::Error> {
//! match client.lock("gpu").semaphore(4).try_acquire().await? {
//!     Some(guard) => println!("got slot {:?}", guard.slot()),
//!     None => println!("all 4 slots are busy"),
//! }
//! # Ok(()) }
//! ```

use padlock_proto::v1 as pb;
use pb::hold_request::Msg as Req;
use pb::hold_response::Msg as Resp;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tonic::transport::{Channel, Endpoint};

/// How much longer than its wait an acquire may take before the SDK gives
/// up on the server answering (see [`LockBuilder::acquire`]).
pub const STREAM_GRACE: Duration = Duration::from_secs(2);

/// The generated wire types, for callers that need the raw messages.
pub use padlock_proto::v1 as proto;

/// The duration syntax of every padlock interface: `500ms`, `30s`,
/// `1.5s`, `1m`, `1h` or bare seconds.
pub use padlock_proto::duration;

mod info;
mod lean;
mod session;
pub use info::{Holder, LockInfo, Waiter};

/// The default server address.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7420";

/// How often the client pings an idle connection, and how long it waits for
/// the answer: a server that vanishes without closing the connection is
/// noticed (and every guard's [`LockGuard::lost`] fires) within their sum.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid server URL '{url}': {detail}")]
    InvalidUrl { url: String, detail: String },
    /// Nothing accepts connections there.
    #[error("connection refused: is padlockd running at {url}?")]
    Refused { url: String },
    /// Something answers there, but not padlockd (not gRPC over HTTP/2).
    #[error("{url} is not a padlockd: it does not speak gRPC over HTTP/2")]
    NotPadlockd { url: String, detail: String },
    /// Something accepted the connection and closed it without an answer.
    #[error(
        "{url} closed the connection without answering: it is not a padlockd, it serves \
         https://, or it is at its connection limit"
    )]
    NoAnswer { url: String, detail: String },
    /// The connection was not even accepted within the connect timeout
    /// (nothing answers at that address).
    #[error("cannot connect to padlockd at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("cannot connect to padlockd at {url}: {}", chain(.source))]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The lock was not granted within the wait (or at once, for try-lock).
    #[error("{0}")]
    NotAcquired(String),
    /// The server refused or failed the request.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    /// The lock ended before it was released.
    #[error("{0}")]
    Lost(Lost),
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// An error and its causes, as one line.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// What a failed connection attempt means for the person who made it.
fn connect_error(url: String, source: tonic::transport::Error) -> Error {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&source);
    while let Some(err) = cause {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return Error::Refused { url };
        }
        cause = err.source();
    }
    let text = chain(&source);
    if text.contains("http2 error") || text.contains("protocol error") || text.contains("frame") {
        return Error::NotPadlockd { url, detail: text };
    }
    Error::Connect { url, source }
}

/// Did the first health check fail for want of a gRPC server (rather than
/// being refused by one: a token, a limit)? padlockd itself never answers
/// it with these codes.
fn first_answer_failed(status: &tonic::Status) -> bool {
    use tonic::Code::*;
    matches!(
        status.code(),
        Unimplemented | Internal | Unknown | Unavailable | Cancelled
    )
}

/// After a first call that got no gRPC answer: does the server at `url`
/// (plain `http://` only) answer an HTTP/2 preface with something that is
/// not HTTP/2 (an HTTP/1 server's `400`, another protocol's greeting)?
/// Which error the HTTP/2 client reports for such a server depends on
/// timing, so one look settles it; a server that closes at once, or says
/// nothing within a second, did not answer.
async fn answers_in_another_protocol(url: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const SETTINGS: u8 = 0x4;
    let Ok(uri) = url.parse::<tonic::codegen::http::Uri>() else {
        return false;
    };
    let (Some("http"), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let look = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        stream.write_all(PREFACE).await.ok()?;
        let mut head = [0u8; 9];
        let n = stream.read(&mut head).await.ok()?;
        // An HTTP/2 server's first frame is its SETTINGS (type at byte 3).
        Some(n > 0 && !(n >= 4 && head[3] == SETTINGS))
    };
    tokio::time::timeout(Duration::from_secs(1), look)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// `host:port` means `http://host:port`.
fn with_scheme(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        InvalidArgument => "invalid argument",
        FailedPrecondition => "failed precondition",
        Unavailable => "unavailable",
        ResourceExhausted => "resource exhausted",
        DeadlineExceeded => "deadline exceeded",
        NotFound => "not found",
        Unauthenticated => "unauthenticated",
        PermissionDenied => "permission denied",
        OutOfRange => "out of range",
        Cancelled => "cancelled",
        _ => "error",
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        // The server's --request-timeout is marked: it is not "not acquired".
        let cut = status
            .metadata()
            .get(pb::ERROR_METADATA)
            .is_some_and(|v| v == pb::REQUEST_TIMEOUT);
        if status.code() == tonic::Code::DeadlineExceeded && !cut {
            Error::NotAcquired(status.message().to_string())
        } else {
            Error::Status(status)
        }
    }
}

/// Why a lock was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    /// The server is shutting down.
    Shutdown,
    /// An administrator revoked the lock.
    Revoked,
    /// The server's backend (file system, Redis) failed.
    Backend,
    /// The stream or the connection to the server broke.
    Disconnected,
    /// The server gave a reason this client does not know.
    Other,
}

/// A lost lock: why, and what the server or transport said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub reason: LostReason,
    pub detail: String,
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = match self.reason {
            LostReason::Shutdown => "the server is shutting down",
            LostReason::Revoked => "revoked by an administrator",
            LostReason::Backend => "the lock backend failed",
            LostReason::Disconnected => "the connection to the server broke",
            LostReason::Other => "lost",
        };
        // The server's details are whole sentences that say the reason;
        // the client's own (a broken connection) need the reason first.
        match (self.reason, self.detail.as_str()) {
            (_, "") => write!(f, "lock lost: {reason}"),
            (LostReason::Disconnected | LostReason::Other, detail) => {
                write!(f, "lock lost: {reason} ({detail})")
            }
            (_, detail) => write!(f, "lock lost: {detail}"),
        }
    }
}

/// What kind of lock to take (`file`, `semaphore`, `redis`; the same
/// type the server uses).
pub use padlock_proto::{Kind, Mode};

/// A connection to padlockd. Cheap to clone; clones share one HTTP/2
/// connection, and their locks ride one Session stream on it (see
/// [`ClientBuilder::multiplex`]).
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
    owner: String,
    /// `Bearer <token>` sent with every lock request, if any.
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// With [`ClientBuilder::multiplex`]: the one Session stream that
    /// carries this client's lock requests.
    muxes: Option<std::sync::Arc<session::Muxes>>,
    /// With [`ClientBuilder::lean`]: where that Session goes without gRPC.
    lean: Option<std::sync::Arc<lean::Target>>,
}

/// How to connect: TLS and a client token. Made by [`Client::builder`].
///
/// ```no_run
/// # async fn demo() -> Result<(), padlock::Error> {
/// let client = padlock::Client::builder("https://locks.internal:7420")
///     .ca_certificate(std::fs::read("ca.pem").unwrap())
///     .token("3f9c2b7e6a1d4c8e9b0a5f7d2c1e8b4a")
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
pub struct ClientBuilder {
    url: String,
    ca_pem: Option<Vec<u8>>,
    identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    token: Option<String>,
    /// `None`: the default (multiplexed).
    multiplex: Option<bool>,
    /// `None`: the default (lean where it can).
    lean: Option<bool>,
}

impl ClientBuilder {
    /// Trust servers whose certificate chains to this CA (PEM). Needed for
    /// `https://` URLs.
    pub fn ca_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Present this client certificate and key (PEM) to a server that
    /// requires client certificates (mutual TLS).
    pub fn identity(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.identity_pem = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Send `authorization: Bearer <token>` with every lock request.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Whether every lock request of this client (and its clones) rides
    /// one Session stream, each as an op of its own (the default), or
    /// opens a Hold stream of its own (`false`). Ops are cheaper per lock,
    /// for the server and the client; guards behave the same. When the
    /// one stream breaks, every lock on it is lost (as when the connection
    /// breaks: the server releases them all), and the next request opens a
    /// new stream. A padlockd without the Session call gets Hold streams.
    /// One stream carries at most the server's
    /// `--max-streams-per-connection` locks at once, as one connection of
    /// Hold streams does.
    pub fn multiplex(mut self, multiplex: bool) -> Self {
        self.multiplex = Some(multiplex);
        self
    }

    /// Whether the Session stream of a multiplexed client rides padlockd's
    /// lean transport (the default): the same ops in
    /// small frames on a TCP connection of their own, on the same port,
    /// without HTTP/2 and gRPC. A lock cycle then costs the server and the
    /// client about a fifth less CPU. Everything else (listing, server info,
    /// Hold streams) stays on gRPC. With `https://` URLs the lean
    /// connection has TLS too, with the same CA and client certificate.
    /// [`connect`](Self::connect) opens the lean connection (its hello is
    /// the check that padlockd answers), and the gRPC connection opens only
    /// for the first call that needs it: a client that only locks holds one
    /// connection to the server. A padlockd without the lean transport is
    /// noticed there and served over gRPC from then on (as is a server
    /// whose TLS handshake fails for it). Guards behave the same either
    /// way.
    pub fn lean(mut self, lean: bool) -> Self {
        self.lean = Some(lean);
        self
    }

    /// Connects (TLS when the URL is `https://`; `host:port` means
    /// `http://host:port`).
    pub async fn connect(self) -> Result<Client, Error> {
        let url = with_scheme(&self.url);
        let invalid = |detail: String| Error::InvalidUrl {
            url: url.clone(),
            detail,
        };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| invalid(e.to_string()))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        if url.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            match &self.ca_pem {
                Some(ca) => tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
                None => {
                    return Err(invalid(
                        "an https:// URL needs a CA certificate (--ca-cert, PADLOCK_CA_CERT)"
                            .into(),
                    ));
                }
            }
            if let Some((cert, key)) = &self.identity_pem {
                tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| invalid(e.to_string()))?;
        } else if self.ca_pem.is_some() || self.identity_pem.is_some() {
            return Err(invalid(
                "TLS settings were given for a plain http:// URL; use https://".into(),
            ));
        }
        let bearer = self.token.map(|token| format!("Bearer {}", token.trim()));
        let authorization = match &bearer {
            Some(bearer) => Some(bearer.parse().map_err(|_| {
                invalid("the client token has characters that cannot be sent in a header".into())
            })?),
            None => None,
        };
        let multiplex = self.multiplex.unwrap_or(true);
        let lean = match multiplex && self.lean.unwrap_or(true) {
            true => {
                let identity = self.identity_pem.as_ref();
                let tls = self
                    .ca_pem
                    .as_deref()
                    .map(|ca| (ca, identity.map(|(cert, key)| (&cert[..], &key[..]))));
                lean::Target::of(&url, bearer.as_deref(), tls)
                    .map_err(invalid)?
                    .map(std::sync::Arc::new)
            }
            false => None,
        };
        // With the lean transport, its hello is the check that padlockd
        // answers there, and the gRPC connection opens at its first call.
        let mut client = Client {
            channel: endpoint.connect_lazy(),
            owner: default_owner(),
            authorization,
            muxes: multiplex.then(Default::default),
            lean,
        };
        let greeting = match &client.muxes {
            Some(muxes) => muxes.greet(&client).await,
            None => None,
        };
        if let Some(greeting) = greeting {
            match greeting.await {
                // A refusal (a token it does not take) is for the first
                // lock to say, as it is over gRPC.
                Ok(session::Greeted::Welcome | session::Greeted::Refused) => return Ok(client),
                Ok(session::Greeted::Unreachable(err)) => match err.kind() {
                    std::io::ErrorKind::ConnectionRefused => return Err(Error::Refused { url }),
                    // (gRPC would wait as long again.)
                    std::io::ErrorKind::TimedOut => {
                        let detail = err.to_string();
                        return Err(Error::Unreachable { url, detail });
                    }
                    // Others (no route, a name that does not resolve) are
                    // reported by gRPC's attempt, as before.
                    _ => {}
                },
                // No lean transport there: gRPC, checked as below.
                _ => {}
            }
        }
        client.channel = endpoint
            .connect()
            .await
            .map_err(|source| connect_error(url.clone(), source))?;
        // A first request at once: padlockd closes a connection whose
        // first request does not come within its --request-timeout. A
        // refusal (too many connections, a token needed) is for the calls
        // that follow to say; a server that does not speak gRPC is not a
        // padlockd.
        match client.health_check().await {
            Err(Error::Status(status)) if first_answer_failed(&status) => {
                let detail = chain(&status);
                return Err(
                    if status.code() == tonic::Code::Unimplemented
                        || detail.contains("protocol error")
                        || detail.contains("http2 error")
                        || answers_in_another_protocol(&url).await
                    {
                        Error::NotPadlockd { url, detail }
                    } else {
                        Error::NoAnswer { url, detail }
                    },
                );
            }
            _ => {}
        }
        Ok(client)
    }
}

impl Client {
    /// Connects to padlockd at `url` (e.g. `http://127.0.0.1:7420`).
    pub async fn connect(url: impl Into<String>) -> Result<Client, Error> {
        Client::builder(url).connect().await
    }

    /// Connection settings beyond the URL: TLS, client certificate, token.
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            ..ClientBuilder::default()
        }
    }

    /// Starts a request for the lock `name` (exclusive file lock unless the
    /// builder says otherwise).
    pub fn lock(&self, name: impl Into<String>) -> LockBuilder {
        LockBuilder {
            client: self.clone(),
            acquire: pb::Acquire {
                name: name.into(),
                kind: pb::Kind::File as i32,
                mode: pb::Mode::Exclusive as i32,
                owner: self.owner.clone(),
                ..pb::Acquire::default()
            },
            on_queued: None,
        }
    }

    fn grpc(
        &self,
    ) -> pb::padlock_client::PadlockClient<
        tonic::service::interceptor::InterceptedService<Channel, Authorize>,
    > {
        pb::padlock_client::PadlockClient::with_interceptor(
            self.channel.clone(),
            Authorize(self.authorization.clone()),
        )
    }

    /// Every lock the server knows (with holders or waiters), optionally
    /// only those whose name starts with `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<LockInfo>, Error> {
        let mut locks = Vec::new();
        let mut cursor = String::new();
        loop {
            let request = pb::ListLocksRequest {
                prefix: prefix.to_string(),
                kind: pb::Kind::Unspecified as i32,
                limit: 1000,
                cursor,
            };
            let page = self.grpc().list_locks(request).await?.into_inner();
            locks.extend(page.locks.into_iter().map(LockInfo::from));
            if page.next_cursor.is_empty() {
                return Ok(locks);
            }
            cursor = page.next_cursor;
        }
    }

    /// One lock, or `None` when nobody holds or waits for it.
    pub async fn show(&self, name: &str, kind: Kind) -> Result<Option<LockInfo>, Error> {
        let request = pb::GetLockRequest {
            name: name.to_string(),
            kind: pb::Kind::from(kind) as i32,
            ..pb::GetLockRequest::default()
        };
        match self.grpc().get_lock(request).await {
            Ok(info) => Ok(Some(info.into_inner().into())),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(status.into()),
        }
    }

    /// The server's version, memory use and counts.
    pub async fn server_info(&self) -> Result<pb::ServerInfo, Error> {
        Ok(self
            .grpc()
            .get_server_info(pb::GetServerInfoRequest {})
            .await?
            .into_inner())
    }

    /// One standard gRPC health check round trip (`grpc.health.v1`).
    pub async fn health_check(&self) -> Result<bool, Error> {
        use tonic_health::pb::{
            HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
        };
        let response = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        Ok(response.into_inner().status == ServingStatus::Serving as i32)
    }
}

/// Adds the client token to every request.
#[derive(Clone)]
pub struct Authorize(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Authorize {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

fn default_owner() -> String {
    let uname = rustix::system::uname();
    let host = uname.nodename().to_string_lossy();
    let exe = std::env::args()
        .next()
        .and_then(|a| a.rsplit('/').next().map(str::to_string))
        .unwrap_or_default();
    format!("{exe}[{}]@{host}", std::process::id())
}

/// How to take a lock; made by [`Client::lock`].
#[derive(Clone)]
pub struct LockBuilder {
    client: Client,
    acquire: pb::Acquire,
    on_queued: Option<std::sync::Arc<dyn Fn(Queued) + Send + Sync>>,
}

impl fmt::Debug for LockBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockBuilder")
            .field("acquire", &self.acquire)
            .finish_non_exhaustive()
    }
}

/// The server's word that a lock request waits in its queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// 1-based place in the queue when queued.
    pub position: u32,
    /// Holders the lock had then (on that server).
    pub holders: u32,
    /// This waiter's id, as [`Client::show`] lists it.
    pub waiter_id: String,
}

impl LockBuilder {
    /// Shared (read) mode: many shared holders at once, none beside an
    /// exclusive one.
    pub fn shared(mut self) -> Self {
        self.acquire.mode = pb::Mode::Shared as i32;
        self
    }

    /// A semaphore with `limit` slots instead of a file lock.
    pub fn semaphore(mut self, limit: u32) -> Self {
        self.acquire.kind = pb::Kind::Semaphore as i32;
        self.acquire.limit = limit;
        self
    }

    /// A Redis lock (the server needs `--redis-url`).
    pub fn redis(mut self) -> Self {
        self.acquire.kind = pb::Kind::Redis as i32;
        self
    }

    /// Waits at most `wait` for the grant ([`Duration::ZERO`]: try once).
    /// Without it, [`acquire`](Self::acquire) waits as long as it takes.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.acquire.wait_ms = Some(wait.as_millis().min(u64::MAX as u128) as u64);
        self
    }

    /// Who holds the lock, as shown by `padlock list` (default: program,
    /// pid and host).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.acquire.owner = owner.into();
        self
    }

    /// Called when the server queues the request (the lock is held by
    /// someone else): to show a person what they wait for.
    pub fn on_queued(mut self, report: impl Fn(Queued) + Send + Sync + 'static) -> Self {
        self.on_queued = Some(std::sync::Arc::new(report));
        self
    }

    /// A free-form label shown by inspection calls.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.acquire.labels.insert(key.into(), value.into());
        self
    }

    /// Waits for the lock. Fails with [`Error::NotAcquired`] when a
    /// [`wait`](Self::wait) was set and passed.
    ///
    /// With a wait, the call does not wait forever for its stream to open:
    /// if the request cannot even reach the server within the wait plus
    /// [`STREAM_GRACE`] (this connection is at the server's
    /// `--max-streams-per-connection`, or the server does not answer), it
    /// fails with `DEADLINE_EXCEEDED` as [`Error::Status`], not
    /// [`Error::NotAcquired`]: nobody was seen holding the lock.
    pub async fn acquire(self) -> Result<LockGuard, Error> {
        let name = self.acquire.name.clone();
        let open_limit = self
            .acquire
            .wait_ms
            .map(|ms| Duration::from_millis(ms).saturating_add(STREAM_GRACE));
        if let Some(muxes) = &self.client.muxes {
            // A request that crosses the server's end of an idle stream
            // was never seen: it is asked again, once, on a new stream
            // (and once more when the first stream found no lean
            // transport, over gRPC).
            for _ in 0..3 {
                let Some(mux) = muxes.get(&self.client).await? else {
                    break; // no Session call: a Hold stream below
                };
                let attempt =
                    mux.clone()
                        .acquire(self.acquire.clone(), self.on_queued.clone(), open_limit);
                let (granted, op, state) = match attempt.await {
                    Ok(granted) => granted,
                    Err(session::Failure::Error(err)) => return Err(err),
                    Err(session::Failure::Unanswered) => continue,
                };
                return Ok(LockGuard {
                    name,
                    fence: granted.fence,
                    slot: granted.slot,
                    holder_id: granted.holder_id,
                    requests: Some(Releaser::Op { mux, op }),
                    state,
                });
            }
            if muxes.is_supported() {
                return Err(Error::Status(tonic::Status::unavailable(
                    "the session stream to padlockd ended before the request was answered, on every try",
                )));
            }
        }
        let (requests, release) = oneshot::channel();
        let outbound = HoldRequests {
            acquire: Some(pb::HoldRequest {
                msg: Some(Req::Acquire(self.acquire)),
            }),
            release: Some(release),
        };
        let mut grpc = self.client.grpc();
        // The server answers with headers as soon as the stream reaches it.
        let open = grpc.hold(outbound);
        let opened = match open_limit {
            None => open.await?,
            Some(limit) => match tokio::time::timeout(limit, open).await {
                Ok(opened) => opened?,
                Err(_) => {
                    return Err(Error::Status(tonic::Status::deadline_exceeded(format!(
                        "the lock request did not reach padlockd within {limit:?} (the wait plus \
                         {STREAM_GRACE:?}): this connection may be at the server's \
                         --max-streams-per-connection (use another Client), or the server \
                         does not answer"
                    ))));
                }
            },
        };
        let mut responses = opened.into_inner();
        let granted = loop {
            match responses.message().await? {
                Some(pb::HoldResponse {
                    msg: Some(Resp::Queued(q)),
                }) => {
                    if let Some(report) = &self.on_queued {
                        report(Queued {
                            position: q.position,
                            holders: q.holders,
                            waiter_id: q.waiter_id,
                        });
                    }
                    continue;
                }
                Some(pb::HoldResponse {
                    msg: Some(Resp::Granted(g)),
                }) => break g,
                Some(other) => {
                    return Err(Error::Protocol(format!("expected Granted, got {other:?}")));
                }
                None => {
                    return Err(Error::Protocol(
                        "the server ended the stream before a grant".into(),
                    ));
                }
            }
        };
        let (state_tx, state) = watch::channel(GuardState::Held);
        tokio::spawn(watch_stream(responses, state_tx));
        Ok(LockGuard {
            name,
            fence: granted.fence,
            slot: granted.slot,
            holder_id: granted.holder_id,
            requests: Some(Releaser::Stream(Some(requests))),
            state,
        })
    }

    /// Tries once: `Ok(None)` when the lock is held by someone else.
    pub async fn try_acquire(self) -> Result<Option<LockGuard>, Error> {
        match self.wait(Duration::ZERO).acquire().await {
            Ok(guard) => Ok(Some(guard)),
            Err(Error::NotAcquired(_)) => Ok(None),
            Err(err) => Err(err),
        }
    }
}

/// How a guard lets go of its lock.
enum Releaser {
    /// Its own Hold stream: ask for the Release (once); dropped, the
    /// stream ends.
    Stream(Option<oneshot::Sender<()>>),
    /// An op on the client's Session stream.
    Op {
        mux: std::sync::Arc<session::Mux>,
        op: u64,
    },
}

impl Releaser {
    fn release(&mut self) {
        match self {
            Releaser::Stream(requests) => {
                if let Some(requests) = requests.take() {
                    let _ = requests.send(());
                }
            }
            Releaser::Op { mux, op } => mux.release(*op),
        }
    }
}

impl fmt::Debug for Releaser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Releaser::Stream(_) => f.write_str("Stream"),
            Releaser::Op { op, .. } => write!(f, "Op({op})"),
        }
    }
}

#[derive(Debug, Clone)]
enum GuardState {
    Held,
    Released,
    Lost(Lost),
}

/// Reads the rest of a Hold stream after the grant, and says how it ended.
async fn watch_stream(
    mut responses: tonic::Streaming<pb::HoldResponse>,
    state: watch::Sender<GuardState>,
) {
    let end = match responses.message().await {
        Ok(Some(pb::HoldResponse {
            msg: Some(Resp::Released(_)),
        })) => GuardState::Released,
        Ok(Some(pb::HoldResponse {
            msg: Some(Resp::Lost(lost)),
        })) => GuardState::Lost(lost_from_wire(lost)),
        Ok(Some(other)) => GuardState::Lost(Lost {
            reason: LostReason::Other,
            detail: format!("unexpected message from the server: {other:?}"),
        }),
        // The server ends a stream without a message only after the client
        // closed its side (dropping the guard): that is a release.
        Ok(None) if state.is_closed() => GuardState::Released,
        Ok(None) => GuardState::Lost(Lost {
            reason: LostReason::Disconnected,
            detail: "the server ended the stream".into(),
        }),
        Err(status) => GuardState::Lost(Lost {
            reason: LostReason::Disconnected,
            detail: status.message().to_string(),
        }),
    };
    let _ = state.send(end);
}

/// A loss as the server reported it.
fn lost_from_wire(lost: pb::Lost) -> Lost {
    Lost {
        reason: match pb::LostReason::try_from(lost.reason) {
            Ok(pb::LostReason::Shutdown) => LostReason::Shutdown,
            Ok(pb::LostReason::Revoked) => LostReason::Revoked,
            Ok(pb::LostReason::Backend) => LostReason::Backend,
            _ => LostReason::Other,
        },
        detail: lost.detail,
    }
}

/// The client's side of a Hold stream: the Acquire, then a Release when
/// the guard asks for one. It ends when the guard is dropped (the server
/// then releases the lock) or after the Release. (A stream of its own
/// rather than a channel: a tokio channel allocates a block of 32 slots
/// for the two messages a lock ever sends.)
struct HoldRequests {
    acquire: Option<pb::HoldRequest>,
    release: Option<oneshot::Receiver<()>>,
}

impl tokio_stream::Stream for HoldRequests {
    type Item = pb::HoldRequest;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(acquire) = self.acquire.take() {
            return Poll::Ready(Some(acquire));
        }
        let Some(release) = self.release.as_mut() else {
            return Poll::Ready(None);
        };
        let asked = std::task::ready!(Pin::new(release).poll(cx));
        self.release = None;
        Poll::Ready(asked.ok().map(|()| pb::HoldRequest {
            msg: Some(Req::Release(pb::Release {})),
        }))
    }
}

/// A held lock. Dropping it releases the lock without blocking; use
/// [`release`](Self::release) to wait until the server confirms.
#[derive(Debug)]
pub struct LockGuard {
    name: String,
    fence: u64,
    slot: Option<u32>,
    holder_id: String,
    /// Asks for the Release (on the Hold stream, or for the op on the
    /// Session stream).
    requests: Option<Releaser>,
    state: watch::Receiver<GuardState>,
}

impl LockGuard {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing token of this grant: strictly larger than that of every
    /// earlier exclusive grant of this lock.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// The semaphore slot (0-based), for semaphores.
    pub fn slot(&self) -> Option<u32> {
        self.slot
    }

    /// The server's id for this holder (as shown by `padlock show`).
    pub fn holder_id(&self) -> &str {
        &self.holder_id
    }

    /// Resolves when the lock is lost: the server said so (shutdown,
    /// revoke, backend failure), or the stream or connection broke. Never
    /// resolves for a lock that is held or was released normally.
    pub fn lost(&self) -> impl Future<Output = Lost> + Send + 'static {
        let mut state = self.state.clone();
        async move {
            let outcome = state
                .wait_for(|s| !matches!(s, GuardState::Held))
                .await
                .map(|s| s.clone());
            match outcome {
                Ok(GuardState::Lost(lost)) => lost,
                _ => std::future::pending().await,
            }
        }
    }

    /// Is the lock still held, as far as this client knows?
    pub fn is_held(&self) -> bool {
        matches!(*self.state.borrow(), GuardState::Held)
    }

    /// Releases the lock and waits until the server confirms. Fails with
    /// [`Error::Lost`] if the lock had already been lost.
    pub async fn release(mut self) -> Result<(), Error> {
        // (The releaser is kept until the answer: an op's stream must stay
        // open for it.)
        if let Some(mut requests) = self.requests.take() {
            requests.release();
            let outcome = self
                .state
                .wait_for(|s| !matches!(s, GuardState::Held))
                .await
                .map(|s| s.clone());
            if let Ok(GuardState::Lost(lost)) = outcome {
                return Err(Error::Lost(lost));
            }
        }
        Ok(())
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // A Hold stream: dropping the request sender closes our side of the
        // stream; the server releases the lock and ends the stream. An op
        // on a Session stream is released by a message.
        if let Some(Releaser::Op { mux, op }) = self.requests.take() {
            mux.release(op);
        }
    }
}
