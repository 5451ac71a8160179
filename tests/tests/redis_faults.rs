//! The redis kind under faults that once wedged a name or misinformed a
//! holder (issue 9, B): a failed attempt must leave no subscription
//! behind, a holder reaped while padlockd was paused is told `Lost` even
//! when it releases, and names or backends Redis refuses cost a bounded
//! number of connections.

use padlock::{Error, Kind, LostReason};
use padlock_e2e::{
    RedisServer, Server, assert_unharmed, eventually, own_redis, own_redis_with, until_waiters,
};
use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};
use tonic::Code;

const GUARD: Duration = Duration::from_secs(30);

fn numsub(redis: &RedisServer, channel: &str) -> u64 {
    let reply = redis.command(&["PUBSUB", "NUMSUB", channel]);
    reply
        .lines()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A subscriber that never answers pings (`redis-cli SUBSCRIBE NAME`).
fn silent_subscriber(redis: &RedisServer, channel: &str) -> std::net::TcpStream {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    write!(
        conn,
        "*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{channel}\r\n",
        channel.len()
    )
    .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    // *3, $9, subscribe, $n, channel, :1
    for _ in 0..6 {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    assert_eq!(line.trim(), ":1");
    conn
}

/// Redis stops while a waiter contends against a subscriber that never
/// answers: the attempt fails, the waiter times out, the subscriber goes.
/// Nothing of the waiter may stay subscribed, so the name is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_leaves_no_subscription_behind() {
    let Some(redis) = own_redis() else {
        return;
    };
    let server = Server::on_redis(&redis);
    let client = server.client().await;
    let subscriber = silent_subscriber(&redis, "zr");
    let waiter = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .lock("zr")
                .redis()
                .wait(Duration::from_secs(8))
                .acquire()
                .await
        })
    };
    eventually("the waiter subscribes", GUARD, async || {
        (numsub(&redis, "zr") == 2).then_some(())
    })
    .await;
    // The fault: Redis stops for 4 s mid-attempt.
    redis.pause(true);
    tokio::time::sleep(Duration::from_secs(4)).await;
    redis.pause(false);
    let result = tokio::time::timeout(GUARD, waiter).await.unwrap().unwrap();
    assert!(result.is_err(), "granted past a silent subscriber?");
    drop(subscriber);
    eventually("no subscription left on zr", GUARD, async || {
        (numsub(&redis, "zr") == 0).then_some(())
    })
    .await;
    let guard = eventually("zr can be taken again", GUARD, async || {
        client
            .lock("zr")
            .redis()
            .wait(Duration::from_secs(2))
            .acquire()
            .await
            .ok()
    })
    .await;
    assert!(guard.fence() > 0);
}

/// padlockd A is paused while its client holds a redis lock; B reaps A's
/// silent subscription and grants the lock. The holder's Release reached
/// A while it was paused: when A resumes it must answer `Lost{backend}`,
/// not `Released`, because others held the lock meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_after_being_reaped_is_a_loss() {
    let Some(redis) = own_redis() else {
        return;
    };
    let a = Server::on_redis(&redis);
    let b = Server::on_redis(&redis);
    let holder = a
        .client()
        .await
        .lock("reaped")
        .redis()
        .acquire()
        .await
        .unwrap();
    let b_client = b.client().await;
    let waiter = {
        let client = b.client().await;
        tokio::spawn(async move { client.lock("reaped").redis().acquire().await })
    };
    until_waiters(&b_client, "reaped", Kind::Redis, 1).await;

    a.pause();
    // The holder releases while A cannot answer.
    let release = tokio::spawn(holder.release());
    let granted = tokio::time::timeout(GUARD, waiter)
        .await
        .expect("B reaps the paused holder and grants")
        .unwrap()
        .unwrap();
    a.signal(rustix::process::Signal::CONT);
    let released = tokio::time::timeout(GUARD, release)
        .await
        .expect("A answers once resumed")
        .unwrap();
    match released {
        Err(Error::Lost(lost)) => {
            assert_eq!(lost.reason, LostReason::Backend, "{lost}");
            eprintln!("the reaped holder was told: {lost}");
        }
        other => panic!("a reaped holder's release must be a loss, got {other:?}"),
    }
    drop(granted);
    assert_unharmed(&a).await;
}

/// A holder still holding when its paused padlockd resumes is told at
/// once (this held before; kept as the companion of the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_reaped_while_paused_is_told_on_resume() {
    let Some(redis) = own_redis() else {
        return;
    };
    let a = Server::on_redis(&redis);
    let b = Server::on_redis(&redis);
    let holder = a
        .client()
        .await
        .lock("reaped2")
        .redis()
        .acquire()
        .await
        .unwrap();
    let b_client = b.client().await;
    let waiter = {
        let client = b.client().await;
        tokio::spawn(async move { client.lock("reaped2").redis().acquire().await })
    };
    until_waiters(&b_client, "reaped2", Kind::Redis, 1).await;
    a.pause();
    let granted = tokio::time::timeout(GUARD, waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let resumed = Instant::now();
    a.signal(rustix::process::Signal::CONT);
    let lost = tokio::time::timeout(GUARD, holder.lost()).await.unwrap();
    assert_eq!(lost.reason, LostReason::Backend, "{lost}");
    eprintln!("told {:?} after SIGCONT", resumed.elapsed());
    assert!(granted.fence() > holder.fence());
}

/// Names Redis refuses in a connection name are refused up front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_redis_cannot_use_are_refused_up_front() {
    let Some(redis) = own_redis() else {
        return;
    };
    let server = Server::on_redis(&redis);
    let client = server.client().await;
    for name in ["a b", "ünï", "x\u{a0}y"] {
        let refused = client
            .lock(name)
            .redis()
            .wait(Duration::from_secs(5))
            .acquire()
            .await;
        match refused {
            Err(Error::Status(s)) => {
                assert_eq!(s.code(), Code::InvalidArgument, "{name:?}: {}", s.message());
                assert!(s.message().contains("printable ASCII"), "{}", s.message());
            }
            other => panic!("{name:?}: expected INVALID_ARGUMENT, got {other:?}"),
        }
    }
    assert_unharmed(&server).await;
}

/// A backend that refuses every attempt (an ACL without the channel)
/// costs each waiter a bounded number of connections, not a storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_backend_costs_few_connections() {
    let acl = ["--user", "padlock", "on", ">pw", "~*", "&allowed*", "+@all"];
    let Some(redis) = own_redis_with(&acl) else {
        return;
    };
    let url = format!("redis://padlock:pw@127.0.0.1:{}", redis.port);
    let server = Server::start_with_args(&["--redis-url", &url]);
    let client = server.client().await;
    let allowed = client.lock("allowed/x").redis().acquire().await.unwrap();

    let connections = || -> u64 {
        let info = redis.command(&["INFO", "stats"]);
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap()
    };
    const WAITERS: u64 = 5;
    let before = connections();
    let started = Instant::now();
    let waiters: Vec<_> = (0..WAITERS)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .lock(format!("forbidden/{i}"))
                    .redis()
                    .wait(Duration::from_secs(6))
                    .acquire()
                    .await
            })
        })
        .collect();
    for waiter in waiters {
        let result = tokio::time::timeout(GUARD, waiter).await.unwrap().unwrap();
        assert!(matches!(result, Err(Error::NotAcquired(_))), "{result:?}");
    }
    let made = connections() - before;
    let seconds = started.elapsed().as_secs_f64();
    let rate = made as f64 / WAITERS as f64 / seconds;
    eprintln!(
        "{made} connections in {seconds:.1} s for {WAITERS} waiters: {rate:.2} per waiter per second"
    );
    assert!(rate < 3.0, "{rate:.2} connections per waiter per second");
    assert!(allowed.is_held());
    assert_unharmed(&server).await;
}

/// A stand-in for Redis 5 on `listener`: answers PING, and refuses every
/// other command as unknown (Redis 5 has no HELLO, so no RESP3).
fn old_redis(listener: std::net::TcpListener) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut writer = conn;
                let line = |reader: &mut BufReader<std::net::TcpStream>| {
                    let mut line = String::new();
                    match reader.read_line(&mut line) {
                        Ok(n) if n > 0 => Some(line.trim_end().to_string()),
                        _ => None,
                    }
                };
                while let Some(head) = line(&mut reader) {
                    let Some(count) = head.strip_prefix('*').and_then(|n| n.parse().ok()) else {
                        return;
                    };
                    let mut words: Vec<String> = Vec::new();
                    for _ in 0..count {
                        let Some(len) = line(&mut reader) else { return };
                        let len: usize = len.trim_start_matches('$').parse().unwrap();
                        let mut word = vec![0u8; len + 2];
                        std::io::Read::read_exact(&mut reader, &mut word).unwrap();
                        words.push(String::from_utf8_lossy(&word[..len]).into_owned());
                    }
                    let reply = match words.first().map(|w| w.to_uppercase()) {
                        Some(ping) if ping == "PING" => "+PONG\r\n".to_string(),
                        Some(_) => format!(
                            "-ERR unknown command `{}`, with args beginning with: \r\n",
                            words[0]
                        ),
                        None => return,
                    };
                    if writer.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// The redis kind needs RESP3 (Redis 6 or later): padlockd refuses to
/// start on an older Redis, and one met after startup (Redis was down
/// then) fails redis acquires at once with the reason, instead of letting
/// them wait on attempts that cannot succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_without_resp3_is_refused_with_the_reason() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    old_redis(listener);
    let dir = tempfile::tempdir().unwrap();
    let child = std::process::Command::new(padlock_e2e::bin("padlockd"))
        .args(["--listen", "127.0.0.1:0", "--redis-url", &url])
        .arg("--lock-dir")
        .arg(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let out = rx
        .recv_timeout(GUARD)
        .expect("padlockd exits on a Redis without RESP3")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("Redis 6 or later"), "{stderr}");

    // Down at startup, an old Redis later on the same port.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let server = Server::start_with_args(&["--redis-url", &format!("redis://127.0.0.1:{port}")]);
    old_redis(std::net::TcpListener::bind(("127.0.0.1", port)).unwrap());
    let client = server.client().await;
    let refused = padlock_e2e::eventually_ok("a refusal that names HELLO", GUARD, async || {
        let waiting = client.lock("old").redis().wait(Duration::from_secs(120));
        match waiting.acquire().await {
            Ok(_) => panic!("granted by a Redis without pub/sub"),
            Err(Error::Status(s)) if s.message().contains("HELLO") => Ok(s),
            // Until the health monitor sees Redis answer: "unavailable".
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_unharmed(&server).await;
}

/// Whatever is published on a lock's channel, however large, is a message
/// to answer or ignore, not a reason to drop the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_message_on_the_lock_channel_does_not_drop_the_lock() {
    let Some(redis) = own_redis() else {
        return;
    };
    let server = Server::on_redis(&redis);
    let client = server.client().await;
    let guard = client.lock("big").redis().acquire().await.unwrap();
    let huge = "x".repeat(3 << 20);
    assert_eq!(redis.command(&["PUBLISH", "big", &huge]).trim(), "1");
    // The holder's connection read it whole and still answers pings.
    assert_eq!(numsub(&redis, "big"), 1);
    guard
        .release()
        .await
        .expect("released, not lost, after a 3 MiB message");
    assert_unharmed(&server).await;
}
