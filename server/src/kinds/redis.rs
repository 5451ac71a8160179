//! The `redis` kind: portalocker's `RedisLock` protocol (>= 4.2), spoken
//! by padlockd, so Python processes and every padlockd on one Redis share
//! one lock space.
//!
//! A holder is a subscription to the channel `<name>` on a connection of
//! its own named `<name>-lock-<holder id>` (32 lowercase hex digits). The
//! subscription *is* the lock: when the connection closes, Redis drops it
//! and the lock is free. Acquiring (one padlock waiter at a time per name,
//! the head of the table's queue):
//!
//! 1. subscribe; `PUBSUB NUMSUB <name>`: alone means free;
//! 2. otherwise publish a ping `{"message":"ping","response_channel":..}` on
//!    `<name>`; every subscriber answers with its holder record
//!    `{"holder_id","mode","protocol":1,"elected"}`; subscribers that do not
//!    answer within 1 s are reaped with `CLIENT KILL`;
//! 3. readers join readers; writers announce themselves as `pending` and
//!    the lowest pending holder id is elected; an elected writer with no
//!    readers promotes itself to `exclusive` and confirms with one more
//!    probe (a rival that promoted on a stale view demotes);
//! 4. the fence is `INCR <name>-fence` (portalocker's fencing key), lifted
//!    above an epoch floor after a Redis restart (see [`FENCE_BODY`]).
//!
//! Every subscriber answers pings from its reader task, publishing through
//! the one shared command connection. Nothing but well-formed pings is ever
//! published on a lock channel; releases are announced on the side channel
//! `<name>-padlock-released`, which portalocker does not listen to, so
//! padlockd waiters on other instances retry at once instead of at their
//! next poll.
//!
//! Faults: a holder whose subscription connection closes is told `Lost` at
//! once. A monitor pings Redis every [`RedisConfig::health_interval`]; when
//! a ping fails or takes longer than [`RedisConfig::health_timeout`] (a
//! hung Redis), every holder on it is told `Lost` and new acquires are
//! refused with UNAVAILABLE until Redis answers again. Subscriptions are
//! never re-established: a resurrected subscription would be a silent
//! re-acquisition.

use super::{Attempt, Backend, Confirmation, Contention, Held, OnLost, Request};
use crate::fds::{Descriptors, FdToken};
use crate::locks::{LockError, Mode};
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, sleep, timeout};

/// The holder record version portalocker checks.
const PROTOCOL_VERSION: u64 = 1;

/// Draws a fence: `INCR <name>-fence`, lifted to a floor when below it.
///
/// The floor is the larger of `ARGV[1]` (one above the highest fence this
/// padlockd has seen for the name) and an epoch floor from the Redis
/// server's own clock: its start time in seconds times 2^20. A Redis
/// without persistence forgets the counter when it restarts; its new start
/// time puts every later fence above every earlier one, as long as fewer
/// than 2^20 fences per second of the previous run's uptime were drawn.
/// Lua numbers are doubles: the floor stays below 2^53, so it is exact.
/// Leaves the fence in `v`.
pub const FENCE_BODY: &str = r#"
local v = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
local t = redis.call('TIME')
local info = redis.call('INFO', 'server')
local uptime = tonumber(string.match(info, 'uptime_in_seconds:(%d+)')) or 0
local epoch = (tonumber(t[1]) - uptime) * 1048576
if epoch > floor then floor = epoch end
if v < floor then
  redis.call('SET', KEYS[1], string.format('%d', floor))
  v = floor
end
"#;

/// Draws a fence (KEYS[1] = `<name>-fence`).
static FENCE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&format!("{FENCE_BODY}\nreturn v")));

/// `PUBSUB NUMSUB` of the lock channel (KEYS[2]) and, when the caller is
/// its only subscriber, a fence, in one round trip: `{subscribers, fence}`
/// (fence 0 when not alone). Being alone and drawing the fence happen
/// atomically, exactly when the lock is known to be ours.
static FENCE_IF_ALONE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "local n = redis.call('PUBSUB', 'NUMSUB', KEYS[2])[2]\n\
         if n > 1 then return {{n, 0}} end\n{FENCE_BODY}\nreturn {{n, v}}"
    ))
});

/// Settings of the redis kind.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// How long a probe waits for every subscriber to answer (portalocker
    /// reaps holders silent for its default of 1 s).
    pub probe_timeout: Duration,
    /// How often the monitor pings Redis.
    pub health_interval: Duration,
    /// A ping slower than this counts as Redis being down: every holder is
    /// told Lost. A holder learns of a hung Redis within
    /// `health_interval + health_timeout`.
    pub health_timeout: Duration,
    /// Fallback poll while another holder has the lock (jittered ±50 %);
    /// releases by other padlockd instances wake waiters at once.
    pub retry_interval: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            probe_timeout: Duration::from_secs(1),
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_secs(2),
            retry_interval: Duration::from_millis(100),
        }
    }
}

/// The redis kind. Cheap to clone.
#[derive(Clone)]
pub struct RedisKind {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    /// The shared command connection: replies to pings, NUMSUB, fences,
    /// CLIENT LIST/KILL, release notices. Reconnects by itself.
    commands: ConnectionManager,
    config: RedisConfig,
    /// The last health check succeeded.
    healthy: AtomicBool,
    /// Why Redis is considered down (for error messages).
    down_reason: Mutex<String>,
    /// Held subscriptions, so a dead Redis can tell every holder.
    held: Mutex<HashMap<u64, Arc<Participant>>>,
    next_key: AtomicU64,
    /// The highest fence this process has handed out per name.
    fences_seen: Mutex<HashMap<String, u64>>,
    url: String,
    /// Connected, authenticated connections waiting to become
    /// subscriptions.
    pool: Mutex<Vec<tokio::net::TcpStream>>,
    refilling: AtomicBool,
    me: std::sync::Weak<Inner>,
    /// Each held lock is a connection: counted against the descriptors
    /// locks may use.
    fds: Arc<Descriptors>,
}

/// Idle connections kept ready for new subscriptions.
const POOL_SIZE: usize = 4;

/// Most names whose last fence is remembered; past it the memory is
/// cleared (the Redis-clock epoch floor still applies).
const FENCES_SEEN_CAP: usize = 100_000;

impl RedisKind {
    /// Connects to Redis at `url` and starts the health monitor. Redis
    /// being down is not an error here: the kind refuses acquires until it
    /// answers.
    pub async fn connect(
        url: &str,
        config: RedisConfig,
        fds: Arc<Descriptors>,
    ) -> Result<RedisKind, String> {
        let client =
            redis::Client::open(url).map_err(|e| format!("invalid --redis-url '{url}': {e}"))?;
        if !matches!(
            client.get_connection_info().addr(),
            redis::ConnectionAddr::Tcp(..)
        ) {
            return Err(format!(
                "--redis-url '{url}': only redis://HOST:PORT (plain TCP) is supported"
            ));
        }
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.health_timeout))
            .set_response_timeout(Some(config.health_timeout))
            .set_number_of_retries(1);
        let commands = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(|e| format!("redis: {e}"))?;
        let inner = Arc::new_cyclic(|me| Inner {
            client,
            commands,
            config,
            healthy: AtomicBool::new(false),
            down_reason: Mutex::new("not checked yet".into()),
            held: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
            fences_seen: Mutex::new(HashMap::new()),
            url: url.to_string(),
            pool: Mutex::new(Vec::new()),
            refilling: AtomicBool::new(false),
            me: me.clone(),
            fds,
        });
        inner.check_health().await;
        tokio::spawn(monitor(Arc::downgrade(&inner)));
        Ok(RedisKind { inner })
    }

    /// Is Redis answering?
    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Acquire)
    }
}

impl Backend for RedisKind {
    fn try_acquire(&self, req: Request<'_>) -> Result<Attempt, LockError> {
        let contender = Contender {
            counted: Some(self.inner.fds.take()?),
            inner: self.inner.clone(),
            name: req.name.to_string(),
            mode: req.mode,
            try_once: req.try_once,
            holder_id: new_holder_id()?,
            participant: None,
            elected: false,
        };
        let contention: Contention = Box::pin(contender.run(req.on_lost));
        Ok(Attempt::Contend(contention))
    }

    fn check_available(&self) -> Result<(), LockError> {
        if self.is_healthy() {
            Ok(())
        } else {
            Err(self.inner.unavailable())
        }
    }

    fn check_name(&self, name: &str) -> Result<(), LockError> {
        check_name(name)
    }
}

/// Redis names each holder's connection `<name>-lock-<holder id>` (with
/// `CLIENT SETNAME`, as portalocker does), and refuses connection names
/// with anything but printable ASCII: no spaces, no other characters.
/// portalocker's `RedisLock` fails on such names too, so they are refused
/// before they can queue.
pub fn check_name(name: &str) -> Result<(), LockError> {
    if name.bytes().all(|b| (b'!'..=b'~').contains(&b)) {
        return Ok(());
    }
    Err(LockError::InvalidName {
        name: crate::locks::name::printable(name),
        why: "redis lock names are printable ASCII without spaces: Redis refuses other \
              characters in the connection name each holder gets (<name>-lock-<id>)"
            .into(),
    })
}

/// Pings Redis forever; on failure tells every holder it lost its lock.
async fn monitor(inner: std::sync::Weak<Inner>) {
    loop {
        let interval = match inner.upgrade() {
            Some(inner) => inner.config.health_interval,
            None => return,
        };
        sleep(interval).await;
        let Some(inner) = inner.upgrade() else { return };
        inner.check_health().await;
    }
}

impl Inner {
    async fn check_health(&self) {
        let mut commands = self.commands.clone();
        let ping = timeout(
            self.config.health_timeout,
            redis::cmd("PING").query_async::<String>(&mut commands),
        )
        .await;
        let failure = match ping {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("Redis at {} failed: {e}", self.url)),
            Err(_) => Some(format!(
                "Redis at {} did not answer a ping within {:?}",
                self.url, self.config.health_timeout
            )),
        };
        match failure {
            None => {
                if !self.healthy.swap(true, Ordering::AcqRel) {
                    tracing::info!(url = %self.url, "redis is answering");
                }
            }
            Some(reason) => {
                if self.healthy.swap(false, Ordering::AcqRel) {
                    tracing::warn!(%reason, "redis is down: every redis holder loses its lock");
                }
                *self.down_reason.lock().unwrap_or_else(|e| e.into_inner()) = reason.clone();
                self.pool.lock().unwrap_or_else(|e| e.into_inner()).clear();
                let held: Vec<Arc<Participant>> = {
                    let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                    held.drain().map(|(_, p)| p).collect()
                };
                for participant in held {
                    participant.lose(&reason);
                }
            }
        }
    }

    fn unavailable(&self) -> LockError {
        let reason = self
            .down_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        LockError::Unavailable(format!("the redis backend is unavailable: {reason}"))
    }

    fn commands(&self) -> ConnectionManager {
        self.commands.clone()
    }

    async fn numsub(&self, channel: &str) -> redis::RedisResult<u64> {
        let (_, count): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut self.commands())
            .await?;
        Ok(count)
    }

    /// Opens a connection, names it, and subscribes it to `channels`.
    /// The name is set before subscribing, as portalocker's reaper expects.
    async fn subscribe(
        &self,
        client_name: Option<&str>,
        channels: &[&str],
    ) -> redis::RedisResult<(PubSubSink, PubSubStream)> {
        let (stream, pooled) = match self.take_pooled() {
            Some(stream) => (stream, true),
            None => (self.connect().await?, false),
        };
        self.refill_pool();
        let handshake = |stream| {
            timeout(
                self.config.health_timeout,
                name_and_subscribe(stream, client_name, channels),
            )
        };
        let first = handshake(stream).await;
        // A pooled connection may have died while idle: once more on a
        // fresh one (not when Redis answered and refused).
        let dead = match &first {
            Ok(Err(e)) => e.is_io_error(),
            Err(_) => true,
            Ok(Ok(_)) => false,
        };
        let done = if pooled && dead {
            handshake(self.connect().await?).await
        } else {
            first
        };
        let stream = match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io_error("Redis did not confirm a subscription").into()),
        };
        // Authenticated, named and subscribed already; pub/sub ignores the
        // database: nothing left for the client library to set up.
        let settings = redis::RedisConnectionInfo::default().set_skip_set_lib_name();
        let pubsub = redis::aio::PubSub::new(&settings, stream).await?;
        Ok(pubsub.split())
    }

    /// A new authenticated connection to Redis.
    async fn connect(&self) -> redis::RedisResult<tokio::net::TcpStream> {
        let info = self.client.get_connection_info();
        let redis::ConnectionAddr::Tcp(host, port) = info.addr() else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "only plain TCP is supported",
            )));
        };
        let connect = tokio::net::TcpStream::connect((host.as_str(), *port));
        let mut stream = timeout(self.config.health_timeout, connect)
            .await
            .map_err(|_| io_error("timed out connecting to Redis"))??;
        stream.set_nodelay(true)?;
        let settings = info.redis_settings();
        if let Some(password) = settings.password() {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = settings.username() {
                auth.arg(user);
            }
            auth.arg(password);
            simple_command(&mut stream, &auth).await?;
        }
        Ok(stream)
    }

    fn take_pooled(&self) -> Option<tokio::net::TcpStream> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// Keeps [`POOL_SIZE`] connections open and ready, so an acquisition
    /// does not wait for a TCP handshake and authentication.
    fn refill_pool(&self) {
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(inner) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            while inner.pool.lock().unwrap_or_else(|e| e.into_inner()).len() < POOL_SIZE {
                match inner.connect().await {
                    Ok(stream) => inner
                        .pool
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(stream),
                    Err(_) => break,
                }
            }
            inner.refilling.store(false, Ordering::Release);
        });
    }

    /// Asks every subscriber of `name` for its holder record. `None` when
    /// the subscriber count moved meanwhile or someone did not answer (the
    /// silent ones are reaped, so the next probe can succeed).
    async fn collect(&self, name: &str, expected: u64) -> redis::RedisResult<Option<Vec<Record>>> {
        let response_channel = format!("{name}-{}", hex_id()?);
        let (_sink, mut replies) = self.subscribe(None, &[&response_channel]).await?;
        if self.numsub(name).await? != expected {
            return Ok(None);
        }
        let ping = serde_json::json!({"message": "ping", "response_channel": response_channel})
            .to_string();
        let _: u64 = redis::cmd("PUBLISH")
            .arg(name)
            .arg(ping)
            .query_async(&mut self.commands())
            .await?;
        let deadline = Instant::now() + self.config.probe_timeout;
        let mut records: HashMap<String, Record> = HashMap::new();
        let mut legacy = 0;
        while (records.len() as u64) < expected {
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            if wait.is_zero() {
                break;
            }
            match timeout(wait, replies.next()).await {
                Ok(Some(msg)) => {
                    let record = Record::parse(msg.get_payload_bytes(), legacy);
                    legacy += usize::from(record.legacy);
                    records.insert(record.holder_id.clone(), record);
                }
                Ok(None) => return Err(io_error("probe connection closed").into()),
                Err(_) => {
                    if self.numsub(name).await? != expected {
                        return Ok(None);
                    }
                }
            }
        }
        if self.numsub(name).await? != expected {
            return Ok(None);
        }
        if (records.len() as u64) < expected {
            self.reap(name, &records).await?;
            return Ok(None);
        }
        Ok(Some(records.into_values().collect()))
    }

    /// Kills the connections of holders of `name` that did not answer.
    async fn reap(&self, name: &str, answered: &HashMap<String, Record>) -> redis::RedisResult<()> {
        let legacy_name = format!("{name}-lock");
        let legacy_answered = answered.values().any(|r| r.legacy);
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut self.commands())
            .await?;
        for line in list.lines() {
            let field = |key: &str| {
                line.split(' ')
                    .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                    .unwrap_or("")
            };
            let client_name = field("name");
            let silent = match client_name.strip_prefix(&legacy_name) {
                Some("") => !legacy_answered,
                Some(rest) => rest
                    .strip_prefix('-')
                    .is_some_and(|id| is_holder_id(id) && !answered.contains_key(id)),
                None => false,
            };
            if silent {
                tracing::warn!(client = %client_name, "killing an unresponsive redis lock holder");
                let _: redis::RedisResult<redis::Value> = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("ID")
                    .arg(field("id"))
                    .query_async(&mut self.commands())
                    .await;
            }
        }
        Ok(())
    }

    async fn draw_fence(&self, name: &str) -> redis::RedisResult<u64> {
        let fence: u64 = FENCE
            .key(format!("{name}-fence"))
            .arg(self.fence_floor(name))
            .invoke_async(&mut self.commands())
            .await?;
        self.saw_fence(name, fence);
        Ok(fence)
    }

    /// The subscriber count of `name` and, when it is 1 (the caller), a
    /// fence drawn in the same round trip.
    async fn fence_if_alone(&self, name: &str) -> redis::RedisResult<(u64, Option<u64>)> {
        let (subscribers, fence): (u64, u64) = FENCE_IF_ALONE
            .key(format!("{name}-fence"))
            .key(name)
            .arg(self.fence_floor(name))
            .invoke_async(&mut self.commands())
            .await?;
        if subscribers > 1 {
            return Ok((subscribers, None));
        }
        self.saw_fence(name, fence);
        Ok((subscribers, Some(fence)))
    }

    /// One above the last fence this process saw for `name`.
    fn fence_floor(&self, name: &str) -> u64 {
        let seen = self.fences_seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(name).map_or(0, |f| f + 1)
    }

    fn saw_fence(&self, name: &str, fence: u64) {
        let mut seen = self.fences_seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= FENCES_SEEN_CAP && !seen.contains_key(name) {
            seen.clear();
        }
        seen.insert(name.to_string(), fence);
    }
}

/// Names the connection and subscribes it in one round trip (the commands
/// are pipelined), checking every reply, so the name is set before the
/// subscription exists, as portalocker's reaper expects.
async fn name_and_subscribe(
    mut stream: tokio::net::TcpStream,
    client_name: Option<&str>,
    channels: &[&str],
) -> redis::RedisResult<tokio::net::TcpStream> {
    let mut out = Vec::new();
    if let Some(name) = client_name {
        out.extend(
            redis::cmd("CLIENT")
                .arg("SETNAME")
                .arg(name)
                .get_packed_command(),
        );
    }
    for channel in channels {
        out.extend(redis::cmd("SUBSCRIBE").arg(*channel).get_packed_command());
    }
    stream.write_all(&out).await?;
    if client_name.is_some() {
        read_ok(&mut stream).await?;
    }
    for (n, channel) in channels.iter().enumerate() {
        let expected = format!(
            "*3\r\n$9\r\nsubscribe\r\n${}\r\n{channel}\r\n:{}\r\n",
            channel.len(),
            n + 1
        );
        let mut reply = vec![0u8; expected.len()];
        stream.read_exact(&mut reply).await?;
        if reply != expected.as_bytes() {
            let text = String::from_utf8_lossy(&reply).into_owned();
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "unexpected SUBSCRIBE reply",
                text,
            )));
        }
    }
    Ok(stream)
}

/// Sends one command on a raw connection and reads its one-line reply.
async fn simple_command(
    stream: &mut tokio::net::TcpStream,
    cmd: &redis::Cmd,
) -> redis::RedisResult<()> {
    stream.write_all(&cmd.get_packed_command()).await?;
    read_ok(stream).await
}

/// Reads the reply `+OK`; an error reply (`-...`) becomes an error.
async fn read_ok(stream: &mut tokio::net::TcpStream) -> redis::RedisResult<()> {
    let mut line = vec![0u8; 5];
    stream.read_exact(&mut line).await?;
    if line == b"+OK\r\n" {
        return Ok(());
    }
    // Not OK: read the rest of the line, to say what it was.
    while !line.ends_with(b"\r\n") && line.len() < 4096 {
        line.push(stream.read_u8().await?);
    }
    let text = String::from_utf8_lossy(&line).trim().to_string();
    Err(redis::RedisError::from((
        redis::ErrorKind::Client,
        "Redis refused",
        text,
    )))
}

fn io_error(message: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, message.to_string())
}

/// 32 lowercase hex digits from the OS's random source.
fn hex_id() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        filled +=
            rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty())?;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn new_holder_id() -> Result<String, LockError> {
    hex_id().map_err(|e| LockError::Backend(format!("no randomness for a holder id: {e}")))
}

fn is_holder_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What a participant says it is doing (portalocker's `RedisLockMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WireMode {
    Exclusive,
    Pending,
    Shared,
}

impl WireMode {
    fn as_str(self) -> &'static str {
        match self {
            WireMode::Exclusive => "exclusive",
            WireMode::Pending => "pending",
            WireMode::Shared => "shared",
        }
    }
}

/// One subscriber's answer to a ping.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder_id: String,
    mode: WireMode,
    /// The reply was not a protocol record (an old portalocker): treated as
    /// an exclusive holder.
    legacy: bool,
    /// `None`: the record had no `elected` field (portalocker < 4.2).
    elected: Option<bool>,
}

impl Record {
    fn parse(payload: &[u8], legacy_index: usize) -> Record {
        let parsed = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| {
                let holder_id = v.get("holder_id")?.as_str()?.to_string();
                let mode = match v.get("mode")?.as_str()? {
                    "exclusive" => WireMode::Exclusive,
                    "pending" => WireMode::Pending,
                    "shared" => WireMode::Shared,
                    _ => return None,
                };
                if v.get("protocol")?.as_u64()? != PROTOCOL_VERSION {
                    return None;
                }
                Some(Record {
                    holder_id,
                    mode,
                    legacy: false,
                    elected: v.get("elected").and_then(serde_json::Value::as_bool),
                })
            });
        parsed.unwrap_or_else(|| Record {
            holder_id: format!("legacy-{legacy_index}"),
            mode: WireMode::Exclusive,
            legacy: true,
            elected: None,
        })
    }
}

/// A live subscription on a lock channel: the reader task answers pings
/// with the participant's current record.
struct Participant {
    holder_id: String,
    /// (mode, elected) as advertised in ping replies.
    wire: Mutex<(WireMode, bool)>,
    /// Set when the subscription ended.
    dead: AtomicBool,
    /// Installed at grant: tells the table the lock was lost.
    on_lost: Mutex<Option<OnLost>>,
    /// The reader task; aborting it closes the connection.
    task: Mutex<Option<tokio::task::AbortHandle>>,
    /// Sends on the subscription connection itself (confirmation pings).
    sink: PubSubSink,
}

impl Participant {
    fn set(&self, mode: WireMode, elected: bool) {
        *self.wire.lock().unwrap_or_else(|e| e.into_inner()) = (mode, elected);
    }

    fn record(&self) -> String {
        let (mode, elected) = *self.wire.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::json!({
            "holder_id": self.holder_id,
            "mode": mode.as_str(),
            "protocol": PROTOCOL_VERSION,
            "elected": elected,
        })
        .to_string()
    }

    /// The lock ended on Redis's side: tell the table (once) and close.
    fn lose(&self, detail: &str) {
        self.dead.store(true, Ordering::Release);
        let on_lost = self
            .on_lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(on_lost) = on_lost {
            on_lost(detail.to_string());
        }
        self.close();
    }

    fn close(&self) {
        self.dead.store(true, Ordering::Release);
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }

    /// Proves the subscription is still alive: a PING on its own
    /// connection, answered by Redis within `limit`. A connection Redis
    /// closed (reaped by another instance while this one was paused) fails.
    fn confirm(self: &Arc<Self>, limit: Duration) -> Confirmation {
        let participant = self.clone();
        Box::pin(async move {
            let closed = || "the redis connection holding the lock was closed".to_string();
            if participant.dead.load(Ordering::Acquire) {
                return Err(closed());
            }
            let mut sink = participant.sink.clone();
            match timeout(limit, sink.ping::<redis::Value>()).await {
                Ok(Ok(_)) if !participant.dead.load(Ordering::Acquire) => Ok(()),
                Ok(Ok(_)) | Ok(Err(_)) => Err(closed()),
                Err(_) => Err(format!(
                    "Redis did not confirm within {limit:?} that the lock was still held"
                )),
            }
        })
    }
}

/// The one owner of a participant's subscription: dropping it closes the
/// subscription and its connection, on every path (released, failed,
/// cancelled, demoted), so no subscription outlives its waiter.
struct Membership(Arc<Participant>);

impl Drop for Membership {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl std::ops::Deref for Membership {
    type Target = Arc<Participant>;

    fn deref(&self) -> &Arc<Participant> {
        &self.0
    }
}

/// Answers every ping on the lock channel until the connection ends (or
/// the task is aborted, which closes the connection).
async fn answer_pings(
    inner: Arc<Inner>,
    participant: Arc<Participant>,
    mut messages: PubSubStream,
    _counted: Option<FdToken>,
) {
    while let Some(msg) = messages.next().await {
        let response_channel = serde_json::from_slice::<serde_json::Value>(msg.get_payload_bytes())
            .ok()
            .and_then(|v| v.get("response_channel")?.as_str().map(str::to_string))
            .filter(|c| !c.is_empty());
        if let Some(channel) = response_channel {
            let reply = participant.record();
            let sent: redis::RedisResult<u64> = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(reply)
                .query_async(&mut inner.commands())
                .await;
            if let Err(e) = sent {
                tracing::debug!(error = %e, "cannot answer a redis lock ping");
            }
        }
    }
    participant.lose("the redis subscription connection closed");
}

/// The lock as held: dropping it closes the subscription and announces the
/// release to waiting padlockd instances.
struct HeldSubscription {
    inner: Arc<Inner>,
    key: u64,
    membership: Membership,
    name: String,
}

impl Drop for HeldSubscription {
    fn drop(&mut self) {
        self.inner
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        // A release, not a loss: nobody is told.
        self.membership
            .on_lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let was_alive = !self.membership.dead.load(Ordering::Acquire);
        self.membership.close();
        if was_alive {
            let mut commands = self.inner.commands();
            let channel = release_channel(&self.name);
            tokio::spawn(async move {
                let _: redis::RedisResult<u64> = redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg("released")
                    .query_async(&mut commands)
                    .await;
            });
        }
    }
}

/// Side channel on which padlockd announces releases (portalocker does
/// not listen to it, and nothing is ever published on the lock channel
/// but pings).
fn release_channel(name: &str) -> String {
    format!("{name}-padlock-released")
}

/// Waits between failed attempts (Redis refusing or not answering) double
/// from the retry interval up to this, so a failing backend costs a
/// waiter at most a few connection attempts per second, then fewer.
const ERROR_BACKOFF_CAP: Duration = Duration::from_secs(5);

/// One padlock waiter contending for a Redis lock, following
/// portalocker's `RedisLock.acquire` step by step.
struct Contender {
    inner: Arc<Inner>,
    name: String,
    mode: Mode,
    try_once: bool,
    holder_id: String,
    participant: Option<Membership>,
    /// Won the writers' election (portalocker's `writer_elected`).
    elected: bool,
    /// The descriptor this waiter's subscription (then lock) counts as.
    counted: Option<FdToken>,
}

impl Contender {
    async fn run(mut self, on_lost: OnLost) -> Result<Held, LockError> {
        // Wakes this waiter when a padlockd elsewhere releases the lock.
        let mut wakeups = None;
        let mut failures: u32 = 0;
        loop {
            let mut wait = self.inner.config.retry_interval;
            match self.attempt().await {
                Ok(Some(fence)) => {
                    // Redis just answered a whole acquisition: it is up.
                    self.inner.healthy.store(true, Ordering::Release);
                    return Ok(self.hold(fence, on_lost));
                }
                Ok(None) if self.try_once => {
                    return Err(LockError::NotAcquired {
                        name: crate::locks::name::printable(&self.name),
                        holders: 0,
                        held_by: Vec::new(),
                        waited: Duration::ZERO,
                    });
                }
                Ok(None) => failures = 0,
                Err(e) => {
                    // Dropping the membership closes its subscription.
                    self.participant = None;
                    self.elected = false;
                    if self.try_once {
                        return Err(LockError::Unavailable(format!("redis: {e}")));
                    }
                    if failures == 0 {
                        tracing::warn!(name = %self.name, error = %e, "redis lock attempt failed; retrying");
                    }
                    failures = failures.saturating_add(1);
                    wait = wait
                        .saturating_mul(1 << failures.min(8))
                        .min(ERROR_BACKOFF_CAP);
                    wakeups = None;
                }
            }
            if wakeups.is_none() && failures == 0 {
                // One more connection: counted, or done without.
                if let Ok(counted) = self.inner.fds.take() {
                    wakeups = self
                        .inner
                        .subscribe(None, &[&release_channel(&self.name)])
                        .await
                        .ok()
                        .map(|subscribed| (subscribed, counted));
                }
            }
            let jitter = 0.5
                + f64::from(hex_id().map_or(0, |h| u8::from_str_radix(&h[..2], 16).unwrap_or(0)))
                    / 255.0;
            let poll = wait.mul_f64(jitter);
            match wakeups.as_mut() {
                Some(((_, released), _)) => {
                    // The connection ended: poll instead, and let the
                    // next turn open another.
                    if let Ok(None) = timeout(poll, released.next()).await {
                        wakeups = None;
                        sleep(poll).await;
                    }
                }
                None => sleep(poll).await,
            }
        }
    }

    /// The subscription becomes the held lock.
    fn hold(mut self, fence: u64, on_lost: OnLost) -> Held {
        let membership = self
            .participant
            .take()
            .expect("a granted attempt is subscribed");
        *membership.on_lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(on_lost);
        let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed);
        self.inner
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, Arc::clone(&membership));
        // `dead` is set before `on_lost` runs, and the table checks
        // liveness under its lock when it grants: a subscription that dies
        // before the grant is never granted, one that dies after is revoked.
        let alive = Arc::clone(&membership);
        let confirming = Arc::clone(&membership);
        let limit = self.inner.config.health_timeout;
        let held = HeldSubscription {
            inner: self.inner.clone(),
            key,
            membership,
            name: self.name.clone(),
        };
        Held::new(None, (held, self.counted.take()))
            .with_fence(fence)
            .with_liveness(move || !alive.dead.load(Ordering::Acquire))
            .with_confirmation(move || confirming.confirm(limit))
    }

    fn exclusive(&self) -> bool {
        self.mode == Mode::Exclusive
    }

    fn participant(&self) -> &Participant {
        self.participant.as_ref().expect("subscribed")
    }

    /// Subscribes as a fresh participant (pending writer or reader).
    async fn join(&mut self) -> redis::RedisResult<()> {
        let client_name = format!("{}-lock-{}", self.name, self.holder_id);
        let (sink, messages) = self
            .inner
            .subscribe(Some(&client_name), &[&self.name])
            .await?;
        let mode = if self.exclusive() {
            WireMode::Pending
        } else {
            WireMode::Shared
        };
        let participant = Arc::new(Participant {
            holder_id: self.holder_id.clone(),
            wire: Mutex::new((mode, false)),
            dead: AtomicBool::new(false),
            on_lost: Mutex::new(None),
            task: Mutex::new(None),
            sink,
        });
        let task = tokio::spawn(answer_pings(
            self.inner.clone(),
            participant.clone(),
            messages,
            None,
        ));
        *participant.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
        self.participant = Some(Membership(participant));
        self.elected = false;
        Ok(())
    }

    /// Unsubscribes to retry later (portalocker's `_unsubscribe`).
    fn leave(&mut self) {
        // Dropping the membership closes the subscription.
        self.participant = None;
        self.elected = false;
    }

    /// One acquisition attempt; `Some(fence)` when the lock is now held.
    async fn attempt(&mut self) -> redis::RedisResult<Option<u64>> {
        if self
            .participant
            .as_ref()
            .is_some_and(|p| p.dead.load(Ordering::Acquire))
        {
            self.leave();
        }
        if self.participant.is_none() {
            self.join().await?;
        }
        let mut fence = None;
        let subscribers = if self.exclusive() {
            self.inner.numsub(&self.name).await?
        } else {
            // A reader alone on the channel holds it: count and fence at once.
            let (subscribers, alone_fence) = self.inner.fence_if_alone(&self.name).await?;
            fence = alone_fence;
            subscribers
        };
        if subscribers <= 1 {
            if self.exclusive() {
                self.participant().set(WireMode::Exclusive, self.elected);
            }
        } else {
            let holders = self.inner.collect(&self.name, subscribers).await?;
            if !self.resolve(holders) {
                return Ok(None);
            }
        }
        if self.exclusive() {
            match self.confirm_promotion().await? {
                Confirm::Demoted => return Ok(None),
                Confirm::Confirmed(confirmed_fence) => fence = confirmed_fence,
            }
        }
        let fence = match fence {
            Some(fence) => fence,
            None => self.inner.draw_fence(&self.name).await?,
        };
        if self.participant().dead.load(Ordering::Acquire) {
            self.leave();
            return Ok(None);
        }
        Ok(Some(fence))
    }

    /// portalocker's `_resolve_lock_holders`: true when the lock is ours.
    fn resolve(&mut self, holders: Option<Vec<Record>>) -> bool {
        if let Some(holders) = &holders {
            if !self.exclusive() && holders.iter().all(|h| h.mode == WireMode::Shared) {
                return true;
            }
            if self.exclusive()
                && let Some(resolution) = self.resolve_writer(holders)
            {
                return resolution;
            }
        }
        if holders.is_none() && self.elected {
            return false; // keep the election won, ask again
        }
        self.leave();
        false
    }

    /// portalocker's `_resolve_exclusive_writer`. `None`: not elected here.
    fn resolve_writer(&mut self, holders: &[Record]) -> Option<bool> {
        let shared_present = holders.iter().any(|h| h.mode == WireMode::Shared);
        if self.elected {
            if self.must_forfeit(holders) {
                return None;
            }
            if shared_present {
                return Some(false);
            }
            let undecided_lower = holders.iter().any(|h| {
                h.holder_id != self.holder_id
                    && h.mode == WireMode::Pending
                    && h.elected == Some(false)
                    && h.holder_id < self.holder_id
            });
            if undecided_lower {
                return Some(false);
            }
            self.participant().set(WireMode::Exclusive, true);
            return Some(true);
        }
        if !self.writer_is_elected(holders) {
            return None;
        }
        self.elected = true;
        if !shared_present {
            self.participant().set(WireMode::Exclusive, true);
            return Some(true);
        }
        if self.try_once {
            return None;
        }
        // Elected: readers that came first finish; no new reader joins.
        self.participant().set(WireMode::Pending, true);
        Some(false)
    }

    /// portalocker's `_writer_is_elected`: lowest pending holder id wins.
    fn writer_is_elected(&self, holders: &[Record]) -> bool {
        if holders.iter().any(|h| h.mode == WireMode::Exclusive) {
            return false;
        }
        if holders
            .iter()
            .any(|h| h.elected == Some(true) && h.holder_id != self.holder_id)
        {
            return false;
        }
        holders
            .iter()
            .filter(|h| h.mode == WireMode::Pending)
            .map(|h| h.holder_id.as_str())
            .min()
            == Some(self.holder_id.as_str())
    }

    /// portalocker's `_must_forfeit`.
    fn must_forfeit(&self, holders: &[Record]) -> bool {
        holders
            .iter()
            .filter(|h| h.holder_id != self.holder_id)
            .any(|h| {
                let lower = h.holder_id < self.holder_id;
                h.mode == WireMode::Exclusive
                    || (h.elected == Some(true) && lower)
                    || (h.mode == WireMode::Pending && h.elected.is_none() && lower)
            })
    }

    /// portalocker's `_confirm_exclusive_promotion`: with the exclusive
    /// record visible, probe once more; a rival that promoted on an equally
    /// stale view is resolved by holder id and the loser demotes.
    async fn confirm_promotion(&mut self) -> redis::RedisResult<Confirm> {
        let deadline = Instant::now() + self.inner.config.probe_timeout;
        loop {
            // Alone: confirmed, and the fence is drawn in the same step.
            let (subscribers, fence) = self.inner.fence_if_alone(&self.name).await?;
            if subscribers <= 1 {
                return Ok(Confirm::Confirmed(fence));
            }
            if let Some(holders) = self.inner.collect(&self.name, subscribers).await? {
                match self.confirm_verdict(&holders) {
                    Verdict::Confirmed => return Ok(Confirm::Confirmed(None)),
                    Verdict::Demote => break,
                    Verdict::Retry => {}
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            sleep(self.inner.config.retry_interval / 2).await;
        }
        self.participant().set(WireMode::Pending, false);
        self.leave();
        Ok(Confirm::Demoted)
    }

    /// portalocker's `_confirm_probe_verdict`.
    fn confirm_verdict(&self, holders: &[Record]) -> Verdict {
        let mut verdict = Verdict::Confirmed;
        for h in holders.iter().filter(|h| h.holder_id != self.holder_id) {
            if h.mode == WireMode::Shared {
                return Verdict::Demote;
            }
            let lower = h.holder_id < self.holder_id;
            if h.mode == WireMode::Exclusive {
                if h.legacy || h.elected.is_none() || lower {
                    return Verdict::Demote;
                }
                continue;
            }
            if !lower {
                continue;
            }
            if h.elected.is_none() {
                return Verdict::Demote;
            }
            verdict = Verdict::Retry;
        }
        verdict
    }
}

/// How a writer's promotion ended.
enum Confirm {
    /// Demoted: unsubscribed, to retry.
    Demoted,
    /// The lock is ours; with the fence when it was drawn on the way.
    Confirmed(Option<u64>),
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Confirmed,
    Retry,
    Demote,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_holder_records_like_portalocker() {
        let r = Record::parse(
            br#"{"holder_id":"ab","mode":"pending","protocol":1,"elected":true}"#,
            0,
        );
        assert_eq!(
            (r.mode, r.elected, r.legacy),
            (WireMode::Pending, Some(true), false)
        );
        let old = Record::parse(br#"{"holder_id":"ab","mode":"shared","protocol":1}"#, 0);
        assert_eq!(old.elected, None);
        for junk in [
            &b"pong"[..],
            br#"{"holder_id":"ab","mode":"weird","protocol":1}"#,
            br#"{"holder_id":"ab","mode":"shared","protocol":2}"#,
        ] {
            let legacy = Record::parse(junk, 3);
            assert_eq!(
                (legacy.holder_id.as_str(), legacy.mode, legacy.legacy),
                ("legacy-3", WireMode::Exclusive, true)
            );
        }
    }

    #[test]
    fn holder_ids_are_32_lowercase_hex() {
        let id = hex_id().unwrap();
        assert!(is_holder_id(&id), "{id}");
        assert!(!is_holder_id("ABCDEF0123456789abcdef0123456789"));
        assert!(!is_holder_id("abc"));
    }
}
