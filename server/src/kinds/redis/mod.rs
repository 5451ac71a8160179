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
//! 1. subscribe; `PUBSUB NUMSUB <name>`: alone means free (both in one
//!    round trip on a RESP3 connection, and the fence with them: see
//!    [`contender`]);
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
//! next poll. A subscription connection is driven by padlockd itself
//! ([`link`]); a released lock's connection, unsubscribed and unnamed,
//! goes back to the pool.
//!
//! Faults: a holder whose subscription connection closes is told `Lost` at
//! once. A monitor pings Redis every [`RedisConfig::health_interval`]; when
//! a ping fails or takes longer than [`RedisConfig::health_timeout`] (a
//! hung Redis), every holder on it is told `Lost` and new acquires are
//! refused with UNAVAILABLE until Redis answers again. Subscriptions are
//! never re-established: a resurrected subscription would be a silent
//! re-acquisition.
//!
//! The module by concern: [`wire`] (portalocker's holder records and ids),
//! [`election`] (its election rules, as pure functions), [`contender`] (one
//! waiter's acquisition, driven by them), [`participant`] (a subscription
//! answering pings, and the held lock), [`conn`] (the connection pool and
//! the subscription handshake), [`link`] (a subscription connection's
//! reader), [`resp`] (the replies it reads), [`probe`] (asking every subscriber for its
//! record, reaping the silent), [`fence`] (the Lua fence scripts) and
//! [`health`] (the monitor that tells holders when Redis is gone).

mod conn;
mod contender;
mod election;
mod fence;
mod health;
mod link;
mod participant;
mod probe;
mod resp;
mod wire;

use super::{Attempt, Backend, Contention, Request};
use crate::error::LockError;
use crate::fds::Descriptors;
use contender::Contender;
use health::monitor;
use participant::Participant;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wire::new_holder_id;

pub use fence::FENCE_BODY;

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
    pool: Mutex<Vec<conn::Idle>>,
    refilling: AtomicBool,
    me: std::sync::Weak<Inner>,
    /// Each held lock is a connection: counted against the descriptors
    /// locks may use.
    fds: Arc<Descriptors>,
}

/// Idle connections kept ready for new subscriptions.
const POOL_SIZE: usize = 4;

/// Most idle connections kept, counting those that held a lock and came
/// back (each is a Redis client).
const POOL_MAX: usize = 32;

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
        // A Redis that answers but refuses RESP3 (older than 6) can never
        // grant: say so at startup. A Redis that is down is tried later.
        if let Err(e) = inner.check_resp3().await
            && e.kind() == redis::ErrorKind::RESP3NotSupported
        {
            return Err(format!("redis at '{url}': {e}"));
        }
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
        name: crate::name::printable(name),
        why: "redis lock names are printable ASCII without spaces: Redis refuses other \
              characters in the connection name each holder gets (<name>-lock-<id>)"
            .into(),
    })
}
