//! Connections: the shared command connection, a small pool of connected
//! and authenticated sockets, and the hand-written handshake that names a
//! connection and subscribes it in one round trip.

use super::{Inner, POOL_SIZE};
use redis::aio::{ConnectionManager, PubSubSink, PubSubStream};
use std::sync::atomic::Ordering;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

impl Inner {
    pub(super) fn commands(&self) -> ConnectionManager {
        self.commands.clone()
    }

    pub(super) async fn numsub(&self, channel: &str) -> redis::RedisResult<u64> {
        let (_, count): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut self.commands())
            .await?;
        Ok(count)
    }

    /// Opens a connection, names it, and subscribes it to `channels`.
    /// The name is set before subscribing, as portalocker's reaper expects.
    pub(super) async fn subscribe(
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
    pub(super) async fn connect(&self) -> redis::RedisResult<tokio::net::TcpStream> {
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

    pub(super) fn take_pooled(&self) -> Option<tokio::net::TcpStream> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// Keeps [`POOL_SIZE`] connections open and ready, so an acquisition
    /// does not wait for a TCP handshake and authentication.
    pub(super) fn refill_pool(&self) {
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
}

/// Names the connection and subscribes it in one round trip (the commands
/// are pipelined), checking every reply, so the name is set before the
/// subscription exists, as portalocker's reaper expects.
pub(super) async fn name_and_subscribe(
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
pub(super) async fn simple_command(
    stream: &mut tokio::net::TcpStream,
    cmd: &redis::Cmd,
) -> redis::RedisResult<()> {
    stream.write_all(&cmd.get_packed_command()).await?;
    read_ok(stream).await
}

/// Reads the reply `+OK`; an error reply (`-...`) becomes an error.
pub(super) async fn read_ok(stream: &mut tokio::net::TcpStream) -> redis::RedisResult<()> {
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

pub(super) fn io_error(message: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, message.to_string())
}
