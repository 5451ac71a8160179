//! Startup, serving and graceful shutdown.

use crate::auth::{ClientTokens, GrpcAuth};
use crate::config::Config;
use crate::fds::Descriptors;
use crate::fs::Root;
use crate::grpc::PadlockService;
use crate::kinds::redis::{RedisConfig, RedisKind};
use crate::kinds::{Backends, file::FileKind, semaphore::SemaphoreKind};
use crate::locks::{Kind, Limits, LockTable, fence::Fences};
use crate::serve::Serving;
use padlock_proto::v1::{FILE_DESCRIPTOR_SET, padlock_server::PadlockServer};
use std::io::Write;
use std::sync::Arc;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;

/// Everything that can stop padlockd from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot use lock directory {dir}: {err}")]
    LockDir { dir: String, err: std::io::Error },
    #[error("cannot open fence state in {dir}: {err}")]
    State { dir: String, err: std::io::Error },
    #[error("{0}")]
    Redis(String),
    #[error("{0}")]
    Auth(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    AdminToken(#[from] crate::http::TokenError),
    #[error("cannot listen on {addr}: {err}")]
    Listen {
        addr: std::net::SocketAddr,
        err: std::io::Error,
    },
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// How long an over-limit connection may sit idle after being refused.
const OVERFLOW_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs padlockd until SIGTERM or SIGINT, then drains: holders are told
/// `Lost{shutdown}`, waiters get UNAVAILABLE, and the server exits.
pub async fn run(config: Config) -> Result<(), StartError> {
    let started = std::time::SystemTime::now();
    let fds = Descriptors::raise_and_plan(config.max_connections);
    warn_about_descriptors(&fds, &config);
    let (table, lock_dir) = build_table(&config, fds.clone()).await?;
    let metrics = crate::metrics::Metrics::install(&table, fds);
    let admin = match &config.admin_token_file {
        Some(path) => crate::http::Admin::from_file(path)?,
        None => crate::http::Admin::disabled(),
    };
    let tokens = match &config.client_token_file {
        Some(path) => Some(Arc::new(
            ClientTokens::from_file(path).map_err(StartError::Auth)?,
        )),
        None => None,
    };
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(
            crate::connections::tls_acceptor(cert, key, config.tls_client_ca.as_deref())
                .map_err(StartError::Tls)?,
        ),
        _ => None,
    };
    let (health, grpc, lean) =
        grpc_routes(&config, &table, &metrics, tokens.clone(), &lock_dir).await?;

    let tls_on = tls.is_some();
    let listen_error = |err| StartError::Listen {
        addr: config.listen,
        err,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(listen_error)?;
    let addr = listener.local_addr().map_err(listen_error)?;
    let (incoming, overflow) = crate::connections::accept(
        listener,
        crate::connections::Accept {
            max_connections: config.max_connections,
            keepalive: config.keepalive_interval,
            tls,
            tls_failures: metrics.tls_handshake_failures.clone(),
        },
    );
    let signal = shutdown_signal();
    // Tests and scripts wait for this line: the server accepts from now on.
    println!(
        "padlockd listening on {addr} (gRPC and HTTP; the dashboard is at {})",
        dashboard_url(addr, tls_on)
    );
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, lock_dir = %lock_dir, redis = config.redis_url.as_deref().unwrap_or("-"), "serving");

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(drain_on(
        signal,
        table.clone(),
        health,
        config.shutdown_grace,
        stop_tx,
    ));
    let http = crate::http::App {
        table,
        admin: Arc::new(admin),
        metrics: metrics.clone(),
        stop: stop_rx.clone(),
        clients: tokens,
        facts: Arc::new(crate::http::Facts {
            started,
            lock_dir,
            tls: tls_on,
        }),
    };
    let routes = crate::http::with_grpc(grpc, http);
    serve(
        &config,
        addr,
        &metrics,
        (routes, lean),
        (incoming, overflow),
        stop_rx,
    )
    .await;
    Ok(())
}

/// The lock directory, its state (fences), the kinds served, and the lock
/// table over them; with the directory as shown to people.
async fn build_table(
    config: &Config,
    fds: Arc<Descriptors>,
) -> Result<(LockTable, String), StartError> {
    let lock_dir = config.lock_dir();
    let shown = lock_dir.display().to_string();
    let root = Arc::new(Root::open(&lock_dir).map_err(|err| StartError::LockDir {
        dir: shown.clone(),
        err,
    })?);
    let state_dir = lock_dir.join(crate::name::RESERVED_DIR);
    let state_error = |err| StartError::State {
        dir: state_dir.display().to_string(),
        err,
    };
    let state = root
        .private_subdir(crate::name::RESERVED_DIR)
        .map_err(state_error)?;
    let fences = Fences::open(&state, fds.clone()).map_err(state_error)?;
    drop(state);

    let mut kinds = Backends::new();
    if config.serves(Kind::File) {
        kinds.serve(Kind::File, FileKind::new(root.clone(), fds.clone()));
    }
    if config.serves(Kind::Semaphore) {
        let max = config.max_semaphore_limit;
        kinds.serve(Kind::Semaphore, SemaphoreKind::new(root, fds.clone(), max));
    }
    if let Some(url) = config
        .redis_url
        .as_ref()
        .filter(|_| config.serves(Kind::Redis))
    {
        let redis_config = RedisConfig {
            health_interval: config.redis_health_interval,
            health_timeout: config.redis_health_timeout,
            ..RedisConfig::default()
        };
        let redis = RedisKind::connect(url, redis_config, fds)
            .await
            .map_err(StartError::Redis)?;
        if !redis.is_healthy() {
            tracing::warn!(%url, "redis is not answering yet; redis locks are refused until it does");
        }
        kinds.serve(Kind::Redis, redis);
    } else if config.redis_url.is_none() {
        kinds.explain(
            Kind::Redis,
            "the redis kind is not configured on this server: start padlockd with \
             --redis-url redis://HOST:PORT (or PADLOCK_REDIS_URL)",
        );
    }
    let limits = Limits {
        max_locks: config.max_locks,
        max_waiters_per_lock: config.max_waiters_per_lock,
        max_holds: config.max_holds,
        max_name_components: config.max_name_components.into(),
    };
    Ok((LockTable::new(kinds, fences, limits), shown))
}

/// The gRPC side: the Padlock service behind the client-token check, the
/// standard health service (following readiness) and reflection; and the
/// lean transport's Sessions, served by the same service.
async fn grpc_routes(
    config: &Config,
    table: &LockTable,
    metrics: &Arc<crate::metrics::Metrics>,
    tokens: Option<Arc<ClientTokens>>,
    lock_dir: &str,
) -> Result<
    (
        tonic_health::server::HealthReporter,
        tonic::service::Routes,
        crate::lean::Door,
    ),
    StartError,
> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<PadlockServer<PadlockService>>().await;
    tokio::spawn(follow_readiness(table.clone(), health.clone()));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let on_auth_failure = {
        let metrics = metrics.clone();
        move || {
            metrics
                .grpc_auth_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!("refused a gRPC request without a valid client token");
        }
    };
    let auth = GrpcAuth::new(tokens.clone(), on_auth_failure.clone());
    let padlock = PadlockService::new(table.clone(), lock_dir.to_string())
        .first_message_timeout(
            config.request_timeout,
            metrics.connections.request_timeouts.clone(),
        )
        .max_session_ops(config.max_streams_per_connection as usize)
        .session_idle(Some(config.idle_timeout).filter(|t| !t.is_zero()))
        .max_message(config.max_message_bytes);
    let lean = crate::lean::Door::Serve(Arc::new(crate::lean::Lean {
        service: padlock.clone(),
        tokens,
        on_auth_failure: Arc::new(on_auth_failure),
        max_frame: config.max_message_bytes,
        keepalive: (config.keepalive_interval, config.keepalive_timeout),
        idle_closed: metrics.connections.idle_closed.clone(),
    }));
    let service = InterceptedService::new(
        PadlockServer::new(padlock).max_decoding_message_size(config.max_message_bytes),
        auth,
    );
    let routes = tonic::service::Routes::new(service)
        .add_service(health_service)
        .add_service(reflection);
    Ok((health, routes, lean))
}

/// On the first SIGTERM/SIGINT: not ready (gRPC health too), holders told
/// `Lost{shutdown}` and waiters refused, then `stop` for the connections;
/// the watchdog ends the process if that takes past the grace.
async fn drain_on(
    signal: impl Future<Output = ()>,
    table: LockTable,
    health: tonic_health::server::HealthReporter,
    grace: std::time::Duration,
    stop: watch::Sender<bool>,
) {
    signal.await;
    watchdog(grace + WATCHDOG_SLACK);
    tracing::info!("shutting down: telling holders and waiters");
    // Not serving, for the lock service and the server as a whole
    // (service ""), before anything else: balancers stop sending.
    health
        .set_not_serving::<PadlockServer<PadlockService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    table.drain();
    let _ = stop.send(true);
}

/// Serves the accepted connections (gRPC and HTTP share them; HTTP/1.1 is
/// accepted for curl and browsers) and refuses the ones over the limit,
/// until `stop` and the connections close, or the shutdown grace ends.
async fn serve(
    config: &Config,
    addr: std::net::SocketAddr,
    metrics: &crate::metrics::Metrics,
    (routes, lean): (tonic::service::Routes, crate::lean::Door),
    (incoming, overflow): (
        tokio::sync::mpsc::Receiver<crate::connections::Conn>,
        tokio::sync::mpsc::Receiver<crate::connections::Conn>,
    ),
    mut stop: watch::Receiver<bool>,
) {
    let serving = Serving {
        keepalive_interval: config.keepalive_interval,
        keepalive_timeout: config.keepalive_timeout,
        max_streams_per_connection: config.max_streams_per_connection,
        request_timeout: config.request_timeout,
        idle_timeout: Some(config.idle_timeout).filter(|t| !t.is_zero()),
        stats: metrics.connections.clone(),
        bounded: Arc::default(),
        // On loopback, only loopback names (and --allowed-hosts): no DNS
        // rebinding from a web page.
        hosts: Some(Arc::new(crate::origin::Hosts {
            extra: config
                .allowed_hosts
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .collect(),
            check_host: addr.ip().is_loopback(),
        })),
        lean: config.lean.then_some(lean),
    };
    // Over-limit connections are told so and then let go soon, so that
    // they do not keep the places for refusing others.
    let refusing = Serving {
        idle_timeout: Some(OVERFLOW_IDLE.min(serving.idle_timeout.unwrap_or(OVERFLOW_IDLE))),
        // Counted apart: `padlock_connections` shows the served ones.
        stats: Arc::default(),
        lean: config.lean.then(|| {
            crate::lean::Door::Refuse(crate::connections::too_many_connections(
                config.max_connections,
            ))
        }),
        ..serving.clone()
    };
    tokio::spawn(crate::serve::serve(
        overflow,
        crate::connections::overflow_routes(config.max_connections),
        refusing,
        stop.clone(),
    ));
    let served = crate::serve::serve(incoming, routes, serving, stop.clone());
    let grace = async {
        let _ = stop.wait_for(|stop| *stop).await;
        tokio::time::sleep(config.shutdown_grace).await;
    };
    tokio::select! {
        () = served => {}
        () = grace => tracing::warn!(grace = ?config.shutdown_grace, "streams still open after the shutdown grace; exiting"),
    }
    tracing::info!("stopped");
}

/// The gRPC health service says what `/readyz` says: SERVING while
/// padlockd grants every kind it serves, NOT_SERVING while it shuts down
/// or a backend it serves (Redis) is down. (`/healthz` only says it is
/// alive.)
async fn follow_readiness(table: LockTable, health: tonic_health::server::HealthReporter) {
    let mut serving = true;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        if table.is_draining() {
            return; // the drain says NOT_SERVING for good
        }
        let ready = table.unavailable().is_empty();
        if ready != serving {
            serving = ready;
            let status = if ready {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
            let name = <PadlockServer<PadlockService> as tonic::server::NamedService>::NAME;
            health.set_service_status(name, status).await;
        }
    }
}

/// Where a browser finds the dashboard of a server listening on `addr`
/// (an unspecified address is reached at localhost).
fn dashboard_url(addr: std::net::SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    let host = match addr.ip() {
        ip if ip.is_unspecified() => "localhost".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    format!("{scheme}://{host}:{}/", addr.port())
}

/// How long after the shutdown grace the watchdog ends the process.
const WATCHDOG_SLACK: std::time::Duration = std::time::Duration::from_secs(1);

/// A thread of its own, outside the async runtime, that ends the process
/// `after` from now, whatever the runtime's tasks are stuck in: a shutdown
/// always ends.
fn watchdog(after: std::time::Duration) {
    let spawned = std::thread::Builder::new()
        .name("shutdown-watchdog".into())
        .spawn(move || {
            std::thread::sleep(after);
            eprintln!(
                "padlockd: still running {after:?} after SIGTERM/SIGINT (--shutdown-grace plus \
                 {WATCHDOG_SLACK:?}); exiting now"
            );
            std::process::exit(1);
        });
    if let Err(err) = spawned {
        tracing::error!(%err, "cannot start the shutdown watchdog");
    }
}

/// Installs the SIGTERM/SIGINT handlers at once (before padlockd says it
/// listens, so an early SIGTERM still drains) and returns a future that
/// resolves on the first of them.
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; stop padlockd with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

/// Says at start when the caps allow more locks than descriptors do.
fn warn_about_descriptors(fds: &Descriptors, config: &Config) {
    let locks = config.max_locks.min(config.max_holds);
    if locks > fds.budget {
        tracing::warn!(
            "--max-locks {} is more than the {} file descriptors locks may use (RLIMIT_NOFILE {} \
             less {} kept for connections): grants past them get RESOURCE_EXHAUSTED; raise the \
             hard limit (ulimit -Hn, LimitNOFILE) or lower --max-locks",
            config.max_locks,
            fds.budget,
            fds.limit,
            fds.reserve,
        );
    }
}
