//! padlockd's settings: every flag has a `PADLOCK_*` environment twin and
//! a key in the TOML file given by `--config` (the flag's name with `_` for
//! `-`). Flags beat environment variables beat the file beat defaults.

use clap::{CommandFactory, FromArgMatches, Parser, parser::ValueSource};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// padlockd: named locks over gRPC, held for as long as a stream stays open.
#[derive(Debug, Clone, Parser)]
#[command(name = "padlockd", version, about, long_about = None)]
pub struct Config {
    /// TOML file with settings; keys are the flag names with `_` for `-`
    /// (e.g. `listen`, `lock_dir`, `redis_url`). Flags and environment
    /// variables override it.
    #[arg(long, env = "PADLOCK_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address for gRPC, HTTP and the dashboard: HOST:PORT, or a bare PORT
    /// on 127.0.0.1 (port 0 picks a free port; the chosen address is
    /// printed on stdout as `padlockd listening on ADDR ...`).
    #[arg(long, env = "PADLOCK_LISTEN", default_value = "127.0.0.1:7420", value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// Directory of file and semaphore locks [default: /var/lib/padlock/locks
    /// as root, else $XDG_STATE_HOME/padlock/locks or
    /// ~/.local/state/padlock/locks]. Fence counters live in its `.padlock/`.
    #[arg(long, env = "PADLOCK_LOCK_DIR")]
    pub lock_dir: Option<PathBuf>,

    /// Redis for the `redis` kind (`redis://[:PASSWORD@]HOST:PORT[/DB]`),
    /// a single standalone server shared by every padlockd and portalocker
    /// `RedisLock` user of one lock space. Without it, redis locks are
    /// refused with UNAVAILABLE.
    #[arg(long, env = "PADLOCK_REDIS_URL", value_parser = parse_redis_url)]
    pub redis_url: Option<String>,

    /// The kinds this server grants, comma-separated (file, semaphore,
    /// redis) [default: file and semaphore, plus redis with --redis-url].
    /// A scaled-out deployment on the redis kind should serve only `redis`:
    /// its replicas' lock directories are not shared, so their file locks
    /// would not exclude each other.
    #[arg(long, env = "PADLOCK_KINDS", value_enum, value_delimiter = ',')]
    pub kinds: Option<Vec<crate::locks::Kind>>,

    /// How often padlockd pings Redis. A Redis that stops answering is
    /// noticed, and every redis holder told Lost, within interval + timeout.
    #[arg(long, env = "PADLOCK_REDIS_HEALTH_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub redis_health_interval: Duration,

    /// How long a Redis ping may take before Redis counts as down.
    #[arg(long, env = "PADLOCK_REDIS_HEALTH_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub redis_health_timeout: Duration,

    /// HTTP/2 keepalive ping interval: how often an idle client is probed.
    #[arg(long, env = "PADLOCK_KEEPALIVE_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered before the connection,
    /// and every lock on it, is dropped. A vanished client is released
    /// within interval + timeout (10 s by default).
    #[arg(long, env = "PADLOCK_KEEPALIVE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub keepalive_timeout: Duration,

    /// How long a client has to send a whole request: a unary gRPC call or
    /// an HTTP request until its response starts, the first message
    /// (Acquire) of a Hold stream, and HTTP/1.1 request headers. Waiting
    /// for a lock and holding it are not limited by it.
    #[arg(long, env = "PADLOCK_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub request_timeout: Duration,

    /// A connection with no request or stream open for this long is closed
    /// (HTTP/2 clients get GOAWAY and reconnect on their next call); `0s`
    /// keeps idle connections forever. A connection holding or waiting for
    /// a lock is never idle.
    #[arg(long, env = "PADLOCK_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Largest accepted gRPC message (and frame of the lean transport), in
    /// bytes (at least 1024).
    #[arg(long, env = "PADLOCK_MAX_MESSAGE_BYTES", default_value = "65536", value_parser = parse_max_message_bytes)]
    pub max_message_bytes: usize,

    /// Serve the lean transport on the listening port: Session ops in small
    /// frames without HTTP/2 and gRPC, what the Rust SDK uses for locks on
    /// http:// URLs (about a fifth less CPU per lock cycle). With `false`, such
    /// connections are treated as HTTP (and refused as bad requests), and
    /// clients fall back to gRPC.
    #[arg(long, env = "PADLOCK_LEAN", default_value_t = true, action = clap::ArgAction::Set)]
    pub lean: bool,

    /// Most locks (names with holders or waiters) tracked at once.
    #[arg(long, env = "PADLOCK_MAX_LOCKS", default_value_t = 10_000)]
    pub max_locks: usize,

    /// Most lock requests open at once in the whole server, held or
    /// waiting (each costs memory, a held file lock a descriptor); over it,
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "PADLOCK_MAX_HOLDS", default_value_t = 20_000)]
    pub max_holds: usize,

    /// Most '/'-separated components in a lock name (each may be a
    /// directory in the lock directory).
    #[arg(long, env = "PADLOCK_MAX_NAME_COMPONENTS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_name_components: u16,

    /// Most waiters queued on one lock.
    #[arg(long, env = "PADLOCK_MAX_WAITERS_PER_LOCK", default_value_t = 10_000)]
    pub max_waiters_per_lock: usize,

    /// Largest semaphore limit a client may ask for.
    #[arg(long, env = "PADLOCK_MAX_SEMAPHORE_LIMIT", default_value_t = 1024)]
    pub max_semaphore_limit: u32,

    /// Most concurrent streams (held or awaited locks) per HTTP/2 connection.
    #[arg(
        long,
        env = "PADLOCK_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 1_000
    )]
    pub max_streams_per_connection: u32,

    /// After SIGTERM/SIGINT, how long to wait for streams to end before exiting.
    #[arg(long, env = "PADLOCK_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Log format on stderr: `text` for people, `json` (one object per
    /// line) for log collectors. `PADLOCK_LOG` sets the level filter.
    #[arg(long, env = "PADLOCK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Client tokens: one per line, optionally followed by the lock-name
    /// prefix it may use. With it, every lock request needs
    /// `authorization: Bearer <token>` (gRPC and HTTP).
    #[arg(long, env = "PADLOCK_CLIENT_TOKEN_FILE")]
    pub client_token_file: Option<PathBuf>,

    /// TLS certificate chain (PEM) for gRPC and HTTP; needs --tls-key.
    #[arg(long, env = "PADLOCK_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM); needs --tls-cert.
    #[arg(long, env = "PADLOCK_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA bundle (PEM) for client certificates: with it, every client must
    /// present a certificate signed by this CA (mutual TLS).
    #[arg(long, env = "PADLOCK_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Most client connections at once; a connection over the limit gets
    /// RESOURCE_EXHAUSTED (HTTP 503) on every request.
    #[arg(long, env = "PADLOCK_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// File holding the admin token (one line). Mutating HTTP endpoints
    /// (revoke) need `Authorization: Bearer <token>`; without this flag
    /// they are disabled (403).
    #[arg(long, env = "PADLOCK_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// While padlockd listens on a loopback address, the host names
    /// requests may carry besides loopback ones (`localhost`, `*.localhost`,
    /// `127.0.0.0/8`, `::1`): a web page cannot reach a loopback padlockd
    /// through a DNS name that rebinds to 127.0.0.1. Add the names a
    /// reverse proxy on this machine forwards, or `*` for any.
    #[arg(long, env = "PADLOCK_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Parses the command line, the environment and the `--config` file.
    /// `Err` is a message for the user naming the key and the problem.
    pub fn load() -> Result<Config, String> {
        Config::load_from(std::env::args_os().collect())
    }

    /// [`Config::load`] from the given argument list (first: program name).
    pub fn load_from(args: Vec<OsString>) -> Result<Config, String> {
        let command = || Config::command().args_override_self(true);
        let matches = command().try_get_matches_from(&args).map_err(clap_exit)?;
        let Some(file) = matches.get_one::<PathBuf>("config") else {
            return Config::from_arg_matches(&matches)
                .map_err(|e| e.to_string())?
                .checked();
        };
        let shown = file.display();
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read config file {shown}: {e}"))?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            format!("config file {shown}: invalid TOML: {}", e.message())
        })?;
        let program = args.first().cloned().unwrap_or_else(|| "padlockd".into());
        let mut merged = vec![program.clone()];
        for (key, value) in &table {
            let known = command()
                .get_arguments()
                .any(|a| a.get_id() == key.as_str() && key != "config");
            if !known {
                let mut keys: Vec<String> = command()
                    .get_arguments()
                    .map(|a| a.get_id().to_string())
                    .filter(|k| k != "config" && k != "help" && k != "version")
                    .collect();
                keys.sort();
                return Err(format!(
                    "config file {shown}: unknown key `{key}` (known keys: {})",
                    keys.join(", ")
                ));
            }
            // Flags and environment variables win over the file.
            if matches!(
                matches.value_source(key),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            ) {
                continue;
            }
            let text = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(format!(
                        "config file {shown}: key `{key}` must be a string or a number, not {}",
                        other.type_str()
                    ));
                }
            };
            let flag = format!("--{}", key.replace('_', "-"));
            // Check the value alone (ignoring the environment), so the
            // error names the key.
            command()
                .mut_args(|a| a.env(None::<&'static str>))
                .try_get_matches_from([program.clone(), flag.clone().into(), text.clone().into()])
                .map_err(|e| format!("config file {shown}: key `{key}`: {}", clap_message(&e)))?;
            merged.push(flag.into());
            merged.push(text.into());
        }
        merged.extend(args.into_iter().skip(1));
        let matches = command().try_get_matches_from(merged).map_err(clap_exit)?;
        Config::from_arg_matches(&matches)
            .map_err(|e| e.to_string())?
            .checked()
    }

    /// The checks that involve several settings, made when the config is
    /// loaded (one setting's own checks are its parser's).
    fn checked(self) -> Result<Config, String> {
        let redis_asked = self
            .kinds
            .as_ref()
            .is_some_and(|kinds| kinds.contains(&crate::locks::Kind::Redis));
        if redis_asked && self.redis_url.is_none() {
            return Err("--kinds includes redis, which needs --redis-url".into());
        }
        Ok(self)
    }

    /// Does this server serve `kind`? By default file and semaphore, and
    /// redis when there is a `--redis-url`.
    pub fn serves(&self, kind: crate::locks::Kind) -> bool {
        match &self.kinds {
            Some(kinds) => kinds.contains(&kind),
            None => kind != crate::locks::Kind::Redis || self.redis_url.is_some(),
        }
    }
    /// The lock directory, with the default filled in.
    pub fn lock_dir(&self) -> PathBuf {
        if let Some(dir) = &self.lock_dir {
            return dir.clone();
        }
        if rustix::process::geteuid().is_root() {
            return PathBuf::from("/var/lib/padlock/locks");
        }
        let env_dir = |var: &str| {
            std::env::var_os(var)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if let Some(state) = env_dir("XDG_STATE_HOME") {
            return state.join("padlock/locks");
        }
        if let Some(home) = env_dir("HOME") {
            return home.join(".local/state/padlock/locks");
        }
        PathBuf::from(format!(
            "/tmp/padlock-{}/locks",
            rustix::process::geteuid().as_raw()
        ))
    }
}

/// Parses `500ms`, `30s`, `1.5s`, `1m`, `1h` or a bare number of seconds
/// (the syntax of every padlock interface), at most a year.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    padlock_proto::duration::parse(text)
}

/// `HOST:PORT` (a name is resolved: `localhost:7420`), `[::1]:7420`, or a
/// bare `PORT` on 127.0.0.1.
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let text = text.trim();
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match text.to_socket_addrs() {
        // IPv4 first: `localhost` means 127.0.0.1 to most clients.
        Ok(addrs) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            addrs
                .iter()
                .find(|a| a.is_ipv4())
                .or(addrs.first())
                .copied()
                .ok_or_else(|| format!("'{text}' resolves to no address"))
        }
        Err(_) => Err(format!(
            "'{text}' is not an address to listen on (examples: 127.0.0.1:7420, localhost:7420, \
             0.0.0.0:7420, 7420)"
        )),
    }
}

/// A Redis URL; a bare `HOST:PORT` gets a hint to add `redis://`.
fn parse_redis_url(text: &str) -> Result<String, String> {
    let text = text.trim();
    if !text.contains("://") {
        return Err(format!(
            "'{text}' lacks the scheme: write redis://{text} (or redis://:PASSWORD@{text})"
        ));
    }
    if !text.starts_with("redis://") {
        return Err(format!(
            "'{text}': only redis:// URLs (plain TCP to one standalone Redis) are supported"
        ));
    }
    Ok(text.to_string())
}

/// A message limit small enough to refuse every lock request is a mistake.
fn parse_max_message_bytes(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(bytes) if bytes >= 1024 => Ok(bytes),
        Ok(_) => Err(format!(
            "'{text}' is too small: every lock request would be refused; it must be at least 1024"
        )),
        Err(_) => Err(format!("'{text}' is not a number of bytes")),
    }
}

/// A duration that must not be zero.
fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err(format!("'{text}' is zero; it must be longer")),
        d => Ok(d),
    }
}

/// `--help` and `--version` print and exit; other clap errors are returned.
fn clap_exit(e: clap::Error) -> String {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit();
    }
    clap_message(&e)
}

/// The first line of a clap error, without its `error: ` prefix.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str], toml: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("padlockd.toml");
        std::fs::write(&file, toml).unwrap();
        let mut argv: Vec<OsString> = vec!["padlockd".into(), "--config".into(), file.into()];
        argv.extend(args.iter().map(OsString::from));
        Config::load_from(argv)
    }

    #[test]
    fn a_message_limit_too_small_for_any_request_is_refused() {
        let err = load(&["--max-message-bytes", "0"], "").unwrap_err();
        assert!(err.contains("at least 1024"), "{err}");
        let err = load(&[], "max_message_bytes = 100").unwrap_err();
        assert!(err.contains("at least 1024"), "{err}");
        let config = load(&["--max-message-bytes", "1024"], "").unwrap();
        assert_eq!(config.max_message_bytes, 1024);
        assert_eq!(load(&[], "").unwrap().max_message_bytes, 65536);
    }

    #[test]
    fn settings_that_depend_on_each_other_are_checked_at_load() {
        use crate::locks::Kind;
        let err = load(&["--kinds", "file,redis"], "").unwrap_err();
        assert_eq!(err, "--kinds includes redis, which needs --redis-url");
        let config = load(
            &["--kinds", "redis", "--redis-url", "redis://127.0.0.1:1"],
            "",
        )
        .unwrap();
        assert!(config.serves(Kind::Redis) && !config.serves(Kind::File));
        let config = load(&[], "").unwrap();
        assert!(config.serves(Kind::File) && config.serves(Kind::Semaphore));
        assert!(!config.serves(Kind::Redis));
    }

    #[test]
    fn file_values_apply_and_flags_win() {
        let config = load(
            &["--max-locks", "7"],
            "listen = \"0.0.0.0:9000\"\nmax_locks = 5\nkeepalive_timeout = \"3s\"\nlock_dir = \"/srv/locks\"\n",
        )
        .unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(config.max_locks, 7, "the flag beats the file");
        assert_eq!(config.keepalive_timeout, Duration::from_secs(3));
        assert_eq!(config.lock_dir(), PathBuf::from("/srv/locks"));
    }

    #[test]
    fn bad_files_name_the_key() {
        let err = load(&[], "keepalive_timeout = \"soon\"").unwrap_err();
        assert!(
            err.contains("key `keepalive_timeout`") && err.contains("soon"),
            "{err}"
        );
        let err = load(&[], "no_such_key = 1").unwrap_err();
        assert!(
            err.contains("unknown key `no_such_key`") && err.contains("lock_dir"),
            "{err}"
        );
        let err = load(&[], "max_locks = [1]").unwrap_err();
        assert!(
            err.contains("key `max_locks` must be a string or a number"),
            "{err}"
        );
        let err = load(&[], "listen = ").unwrap_err();
        assert!(err.contains("invalid TOML"), "{err}");
        let err = Config::load_from(vec![
            "padlockd".into(),
            "--config".into(),
            "/nonexistent/x.toml".into(),
        ])
        .unwrap_err();
        assert!(
            err.contains("cannot read config file /nonexistent/x.toml"),
            "{err}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_duration("5h").unwrap(), Duration::from_secs(5 * 3600));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_positive_duration("0s").unwrap_err().contains("zero"));
        assert!(parse_duration("525600m").is_ok());
        assert!(
            parse_duration("525601m")
                .unwrap_err()
                .contains("longest allowed")
        );
        assert!(
            parse_duration("99999999999999999m")
                .unwrap_err()
                .contains("longest allowed")
        );
    }

    #[test]
    fn listen_addresses_and_redis_urls_as_people_write_them() {
        let addr = |t: &str| parse_listen(t).map(|a| a.to_string());
        assert_eq!(addr("7422").unwrap(), "127.0.0.1:7422");
        assert_eq!(addr("localhost:7422").unwrap(), "127.0.0.1:7422");
        assert_eq!(addr("0.0.0.0:7420").unwrap(), "0.0.0.0:7420");
        assert_eq!(addr("[::1]:7420").unwrap(), "[::1]:7420");
        assert!(addr("nowhere").unwrap_err().contains("examples"));
        let err = parse_redis_url("127.0.0.1:6379").unwrap_err();
        assert_eq!(
            err,
            "'127.0.0.1:6379' lacks the scheme: write redis://127.0.0.1:6379 (or \
             redis://:PASSWORD@127.0.0.1:6379)"
        );
        assert!(parse_redis_url("rediss://x:1").is_err());
        assert_eq!(parse_redis_url("redis://x:1").unwrap(), "redis://x:1");
        let config = load(&["--listen", "7423"], "").unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:7423");
    }

    #[test]
    fn timeouts_have_defaults_and_a_zero_request_timeout_is_refused() {
        let config = load(&[], "").unwrap();
        assert_eq!(config.request_timeout, Duration::from_secs(10));
        assert_eq!(config.idle_timeout, Duration::from_secs(300));
        let config = load(&["--idle-timeout", "0s"], "request_timeout = \"2s\"").unwrap();
        assert_eq!(config.request_timeout, Duration::from_secs(2));
        assert_eq!(config.idle_timeout, Duration::ZERO, "0s: never");
        let err = load(&[], "request_timeout = \"0s\"").unwrap_err();
        assert!(
            err.contains("key `request_timeout`") && err.contains("zero"),
            "{err}"
        );
    }
}
