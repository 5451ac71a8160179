//! Connections: the shared command connection, a small pool of connected
//! and authenticated sockets, and the hand-written handshake that switches
//! a connection to RESP3, names it, subscribes it and counts the channel in
//! one round trip.

use super::link::{Driver, Link, LinkSink};
use super::participant::{ended_cleanly, ending};
use super::resp::{Replies, Reply};
use super::{Inner, POOL_MAX, POOL_SIZE};
use crate::fds::FdToken;
use redis::aio::ConnectionManager;
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

    /// Takes a connection, names it, subscribes it to `channels`, and runs
    /// `then` on it in the same round trip (RESP3 allows any command on a
    /// subscribed connection, and Redis runs a connection's commands in
    /// order, so `then` sees the subscription).
    /// The name is set before subscribing, as portalocker's reaper expects.
    pub(super) async fn subscribe(
        &self,
        client_name: Option<&str>,
        channels: &[&str],
        then: Option<&redis::Cmd>,
    ) -> redis::RedisResult<Subscribed> {
        let (stream, pooled) = match self.take_pooled() {
            Some(idle) => (idle, true),
            None => (Idle::new(self.connect().await?), false),
        };
        self.refill_pool();
        // Channels know no database, but `then` may touch keys (fences):
        // in the database the URL names, as on the command connection.
        let db = self.client.get_connection_info().redis_settings().db();
        let handshake = |idle: Idle| {
            // A connection that held a lock is set up already.
            let db = (!idle.set_up).then_some(db);
            timeout(
                self.config.health_timeout,
                name_and_subscribe(idle.stream, db, client_name, channels, then),
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
            handshake(Idle::new(self.connect().await?)).await
        } else {
            first
        };
        let (replies, early, then) = match done {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io_error("Redis did not confirm a subscription").into()),
        };
        Ok(Subscribed {
            link: Link::start(replies, early),
            then,
        })
    }

    /// Gives a held lock's connection back to the pool once its
    /// subscription is over ([`ending`]: unsubscribed, here or by the
    /// release already (`ended`), unnamed, the release announced),
    /// confirmed, with nothing left unread. Otherwise `driver`
    /// is dropped, which closes the connection. The descriptor count goes
    /// back then, or once the connection is pooled (the pool's connections,
    /// at most [`POOL_MAX`], live in the descriptors' reserve).
    pub(super) fn recycle(
        &self,
        link: LinkSink,
        (driver, counted): (Driver, Option<FdToken>),
        channel: &str,
        ended: bool,
    ) {
        let Some(inner) = self.me.upgrade() else {
            return;
        };
        let channel = channel.to_string();
        tokio::spawn(async move {
            let _open = (driver, counted);
            let limit = inner.config.health_timeout;
            let ending = ending(&channel, ended);
            let Ok(Some(replies)) = timeout(limit, link.send(&ending)).await else {
                return;
            };
            if !ended_cleanly(&channel, ended, &replies) {
                return;
            }
            if let Ok(Some(stream)) = timeout(limit, link.give_back()).await {
                let mut pool = inner.pool.lock().unwrap_or_else(|e| e.into_inner());
                if pool.len() < POOL_MAX {
                    pool.push(Idle {
                        stream,
                        set_up: true,
                    });
                }
            }
        });
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
        let settings = info.redis_settings();
        let connect = async {
            let mut stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            if let Some(password) = settings.password() {
                let mut auth = redis::cmd("AUTH");
                if let Some(user) = settings.username() {
                    auth.arg(user);
                }
                auth.arg(password);
                simple_command(&mut stream, &auth).await?;
            }
            Ok(stream)
        };
        timeout(self.config.health_timeout, connect)
            .await
            .map_err(|_| io_error("timed out connecting to Redis"))?
    }

    /// Checks on a new connection that Redis speaks RESP3 (Redis 6 or
    /// later), which every subscription needs.
    pub(super) async fn check_resp3(&self) -> redis::RedisResult<()> {
        let mut replies = Replies::new(self.connect().await?);
        let hello = async {
            replies.stream_mut().write_all(&hello()).await?;
            check_hello(replies.next().await?)
        };
        timeout(self.config.health_timeout, hello)
            .await
            .map_err(|_| io_error("Redis did not answer HELLO"))?
    }

    pub(super) fn take_pooled(&self) -> Option<Idle> {
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
                        .push(Idle::new(stream)),
                    Err(_) => break,
                }
            }
            inner.refilling.store(false, Ordering::Release);
        });
    }
}

/// A pooled connection.
pub(super) struct Idle {
    stream: tokio::net::TcpStream,
    /// It speaks RESP3 and is in the URL's database already (it held a
    /// lock before).
    set_up: bool,
}

impl Idle {
    fn new(stream: tokio::net::TcpStream) -> Idle {
        Idle {
            stream,
            set_up: false,
        }
    }
}

/// A subscribed connection, driven.
pub(super) struct Subscribed {
    pub(super) link: Link,
    /// The reply to the command run after subscribing.
    pub(super) then: Option<Reply>,
}

/// Names the connection, subscribes it and runs `then`, in one round trip
/// (the commands are pipelined), checking every reply, so the name is set
/// before the subscription exists, as portalocker's reaper expects.
/// Messages published to the new subscription before `then`'s reply are
/// kept, in order; whatever follows stays on the connection.
async fn name_and_subscribe(
    stream: tokio::net::TcpStream,
    set_up: Option<i64>,
    client_name: Option<&str>,
    channels: &[&str],
    then: Option<&redis::Cmd>,
) -> redis::RedisResult<(Replies, Vec<Vec<u8>>, Option<Reply>)> {
    // RESP3, so the subscribed connection can still run `then`, in the
    // database `set_up` names (`None`: the connection is set up already).
    let mut out = Vec::new();
    if let Some(db) = set_up {
        out.extend(hello());
        if db != 0 {
            out.extend(redis::cmd("SELECT").arg(db).get_packed_command());
        }
    }
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
    if let Some(then) = then {
        out.extend(then.get_packed_command());
    }
    let mut replies = Replies::new(stream);
    replies.stream_mut().write_all(&out).await?;
    if let Some(db) = set_up {
        check_hello(replies.next().await?)?;
        if db != 0 {
            expect_ok(&mut replies, "SELECT").await?;
        }
    }
    if client_name.is_some() {
        expect_ok(&mut replies, "CLIENT SETNAME").await?;
    }
    let mut early = Vec::new();
    let keep = |early: &mut Vec<Vec<u8>>, payload: &[u8]| {
        if early.len() >= MAX_EARLY {
            return Err(io_error(
                "too many messages during a subscription's handshake",
            ));
        }
        early.push(payload.to_vec());
        Ok(())
    };
    let mut confirmed = 0;
    while confirmed < channels.len() {
        let reply = replies.next().await?;
        if let Some(payload) = reply.message_payload() {
            keep(&mut early, payload)?;
            continue;
        }
        let expected = Reply::Push(vec![
            Reply::Bulk(Some(b"subscribe".to_vec())),
            Reply::Bulk(Some(channels[confirmed].as_bytes().to_vec())),
            Reply::Int(confirmed as i64 + 1),
        ]);
        if reply != expected {
            return Err(refused_or_unexpected("SUBSCRIBE", reply));
        }
        confirmed += 1;
    }
    let mut then_reply = None;
    if then.is_some() {
        loop {
            let reply = replies.next().await?;
            match reply.message_payload() {
                Some(payload) => keep(&mut early, payload)?,
                None => {
                    then_reply = Some(reply);
                    break;
                }
            }
        }
    }
    Ok((replies, early, then_reply))
}

/// Most messages kept from one handshake: pings come one per contender
/// probe, and the handshake lasts one round trip.
const MAX_EARLY: usize = 1024;

async fn expect_ok(replies: &mut Replies, command: &str) -> redis::RedisResult<()> {
    match replies.next().await? {
        Reply::Simple(ok) if ok == b"OK" => Ok(()),
        other => Err(refused_or_unexpected(command, other)),
    }
}

fn hello() -> Vec<u8> {
    redis::cmd("HELLO").arg(3).get_packed_command()
}

/// HELLO 3's reply is a map of the server's details. A Redis older than 6
/// does not know the command; any other refusal (no password yet, still
/// loading its data) is an ordinary failure, tried again later.
fn check_hello(reply: Reply) -> redis::RedisResult<()> {
    match reply {
        Reply::Array(_) => Ok(()),
        Reply::Error(e) if e.starts_with("ERR unknown command") => Err(redis::RedisError::from((
            redis::ErrorKind::RESP3NotSupported,
            "Redis does not know HELLO 3 (the redis kind needs Redis 6 or later)",
            e,
        ))),
        Reply::Error(e) => Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "Redis refused HELLO 3",
            e,
        ))),
        other => Err(unexpected("HELLO", &other)),
    }
}

fn refused_or_unexpected(command: &str, reply: Reply) -> redis::RedisError {
    match reply {
        Reply::Error(e) => redis::RedisError::from((redis::ErrorKind::Client, "Redis refused", e)),
        other => unexpected(command, &other),
    }
}

pub(super) fn unexpected(command: &str, reply: &Reply) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Client,
        "unexpected reply",
        format!("{command}: {reply:?}"),
    ))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::redis::resp::parse;
    use tokio::net::{TcpListener, TcpStream};

    /// A fake Redis: reads `commands` pipelined commands, answers them all
    /// with `answer` in one write, and returns what it was asked (each
    /// command as its words) once the client hangs up.
    async fn fake_redis(commands: usize, answer: &'static [u8]) -> (TcpStream, FakeAsked) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (mut server, _) = accepted.unwrap();
        let asked = tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut asked = Vec::new();
            while asked.len() < commands {
                let mut chunk = [0u8; 4096];
                let n = server.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the client hung up after {asked:?}");
                buf.extend_from_slice(&chunk[..n]);
                while let Some((Reply::Array(words), used)) = parse(&buf).unwrap() {
                    buf.drain(..used);
                    asked.push(
                        words
                            .iter()
                            .map(|w| match w {
                                Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
                                other => panic!("not a command word: {other:?}"),
                            })
                            .collect::<Vec<_>>()
                            .join(" "),
                    );
                }
            }
            server.write_all(answer).await.unwrap();
            // Hold the connection until the client closes it.
            let _ = server.read(&mut [0u8; 64]).await;
            asked
        });
        (client.unwrap(), asked)
    }

    type FakeAsked = tokio::task::JoinHandle<Vec<String>>;

    #[tokio::test]
    async fn the_handshake_keeps_the_messages_around_the_count_in_order() {
        // A ping published between the subscription and the count's reply,
        // and one after it.
        let (stream, asked) = fake_redis(
            4,
            b"%1\r\n$6\r\nserver\r\n$5\r\nredis\r\n\
              +OK\r\n\
              >3\r\n$9\r\nsubscribe\r\n$4\r\nlock\r\n:1\r\n\
              >3\r\n$7\r\nmessage\r\n$4\r\nlock\r\n$5\r\nearly\r\n\
              *2\r\n:1\r\n:42\r\n\
              >3\r\n$7\r\nmessage\r\n$4\r\nlock\r\n$4\r\nlate\r\n",
        )
        .await;
        let count = redis::cmd("EVAL").arg("count").clone();
        let (replies, early, then) = name_and_subscribe(
            stream,
            Some(0),
            Some("lock-lock-ab"),
            &["lock"],
            Some(&count),
        )
        .await
        .unwrap();
        assert_eq!(early, vec![b"early".to_vec()]);
        assert_eq!(
            then,
            Some(Reply::Array(vec![Reply::Int(1), Reply::Int(42)]))
        );
        // What was read past the count's reply reaches the link's reader,
        // after the early one.
        let mut link = Link::start(replies, early);
        for expected in [&b"early"[..], b"late"] {
            let got = timeout(std::time::Duration::from_secs(5), link.messages.recv())
                .await
                .expect("the messages are delivered")
                .unwrap();
            assert_eq!(got, expected);
        }
        drop(link);
        assert_eq!(
            asked.await.unwrap(),
            [
                "HELLO 3",
                "CLIENT SETNAME lock-lock-ab",
                "SUBSCRIBE lock",
                "EVAL count"
            ]
        );
    }

    #[tokio::test]
    async fn a_connection_that_held_a_lock_is_not_set_up_again() {
        let (stream, asked) = fake_redis(
            3,
            b"+OK\r\n>3\r\n$9\r\nsubscribe\r\n$1\r\nx\r\n:1\r\n*2\r\n:1\r\n:7\r\n",
        )
        .await;
        let count = redis::cmd("EVAL").arg("count").clone();
        let (replies, _, then) =
            name_and_subscribe(stream, None, Some("x-lock-ab"), &["x"], Some(&count))
                .await
                .unwrap();
        assert_eq!(then, Some(Reply::Array(vec![Reply::Int(1), Reply::Int(7)])));
        drop(replies);
        assert_eq!(
            asked.await.unwrap(),
            ["CLIENT SETNAME x-lock-ab", "SUBSCRIBE x", "EVAL count"]
        );
    }

    #[tokio::test]
    async fn a_refused_step_fails_the_handshake_and_says_why() {
        let (stream, _asked) = fake_redis(3, b"-ERR unknown command 'HELLO'\r\n").await;
        let err = name_and_subscribe(stream, Some(0), Some("x-lock-ab"), &["x"], None)
            .await
            .err()
            .expect("refused");
        assert_eq!(err.kind(), redis::ErrorKind::RESP3NotSupported, "{err}");
        // Not an old Redis: one that wants a password first.
        let (stream, _asked) = fake_redis(3, b"-NOAUTH Authentication required.\r\n").await;
        let err = name_and_subscribe(stream, Some(0), Some("x-lock-ab"), &["x"], None)
            .await
            .err()
            .expect("refused");
        assert_ne!(err.kind(), redis::ErrorKind::RESP3NotSupported, "{err}");
        assert!(err.to_string().contains("NOAUTH"), "{err}");
        let (stream, _asked) = fake_redis(
            3,
            b"%0\r\n-NOPERM this user has no permissions to run 'client|setname'\r\n",
        )
        .await;
        let err = name_and_subscribe(stream, Some(0), Some("x-lock-ab"), &["x"], None)
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().contains("NOPERM"), "{err}");
        let (stream, _asked) = fake_redis(
            3,
            b"%0\r\n+OK\r\n>3\r\n$9\r\nsubscribe\r\n$5\r\nother\r\n:1\r\n",
        )
        .await;
        let err = name_and_subscribe(stream, Some(0), Some("x-lock-ab"), &["x"], None)
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().contains("SUBSCRIBE"), "{err}");
    }
}
