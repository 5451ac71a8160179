//! Fences for redis locks: `INCR <name>-fence` in Lua, lifted above what
//! this process has seen and above an epoch floor from Redis's clock.

use super::conn::unexpected;
use super::resp::Reply;
use super::{FENCES_SEEN_CAP, Inner};
use std::sync::LazyLock;

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
pub(super) static FENCE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&format!("{FENCE_BODY}\nreturn v")));

/// `PUBSUB NUMSUB` of the lock channel (KEYS[2]) and, when the caller is
/// its only subscriber, a fence, in one round trip: `{subscribers, fence}`
/// (fence 0 when not alone). Being alone and drawing the fence happen
/// atomically, exactly when the lock is known to be ours.
static FENCE_IF_ALONE_SOURCE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "local n = redis.call('PUBSUB', 'NUMSUB', KEYS[2])[2]\n\
         if n > 1 then return {{n, 0}} end\n{FENCE_BODY}\nreturn {{n, v}}"
    )
});

pub(super) static FENCE_IF_ALONE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&FENCE_IF_ALONE_SOURCE));

impl Inner {
    pub(super) async fn draw_fence(&self, name: &str) -> redis::RedisResult<u64> {
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
    pub(super) async fn fence_if_alone(
        &self,
        name: &str,
    ) -> redis::RedisResult<(u64, Option<u64>)> {
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

    /// [`FENCE_IF_ALONE`] as a command to pipeline after a subscription
    /// (`EVAL` with the source: it runs even on a Redis that has not seen
    /// the script, and Redis caches it by its hash).
    pub(super) fn fence_if_alone_command(&self, name: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(FENCE_IF_ALONE_SOURCE.as_str())
            .arg(2)
            .arg(format!("{name}-fence"))
            .arg(name)
            .arg(self.fence_floor(name));
        cmd
    }

    /// Reads the reply of [`Inner::fence_if_alone_command`], as
    /// [`Inner::fence_if_alone`] returns it.
    pub(super) fn fence_if_alone_reply(
        &self,
        name: &str,
        reply: Reply,
    ) -> redis::RedisResult<(u64, Option<u64>)> {
        let (subscribers, fence) = match &reply {
            Reply::Array(values) => match values.as_slice() {
                [Reply::Int(n), Reply::Int(fence)] => (
                    u64::try_from(*n).map_err(|_| unexpected("EVAL", &reply))?,
                    u64::try_from(*fence).map_err(|_| unexpected("EVAL", &reply))?,
                ),
                _ => return Err(unexpected("EVAL", &reply)),
            },
            Reply::Error(e) => {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "Redis refused the fence script",
                    e.clone(),
                )));
            }
            _ => return Err(unexpected("EVAL", &reply)),
        };
        if subscribers > 1 {
            return Ok((subscribers, None));
        }
        self.saw_fence(name, fence);
        Ok((subscribers, Some(fence)))
    }

    /// One above the last fence this process saw for `name`.
    pub(super) fn fence_floor(&self, name: &str) -> u64 {
        let seen = self.fences_seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(name).map_or(0, |f| f + 1)
    }

    pub(super) fn saw_fence(&self, name: &str, fence: u64) {
        let mut seen = self.fences_seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= FENCES_SEEN_CAP && !seen.contains_key(name) {
            seen.clear();
        }
        seen.insert(name.to_string(), fence);
    }
}
