//! `siege`: how a legitimate client fares while padlockd is attacked.
//!
//! For each attack of issue 9 it starts a fresh padlockd (the workspace's
//! build, or `PADLOCK_TEST_PADLOCKD`), measures a legitimate client that
//! acquires and releases file locks on its own names for a few seconds,
//! starts the attack, measures the same client again while the attack
//! runs, and prints one row: the client's throughput and latency, idle and
//! under attack. It also prints the server's memory through a flood of
//! waiting Hold streams up to `--max-holds`, and how two padlockd sharing
//! a lock directory share one contended name.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! cargo run --release -p padlock-e2e --bin siege            # every attack
//! cargo run --release -p padlock-e2e --bin siege -- fifo    # attacks whose name contains "fifo"
//! ```
//!
//! Numbers, not verdicts: nothing here fails a build (the e2e tests check
//! the behaviour). The figures go in docs/hardening.md.

use padlock::Client;
use padlock_e2e::h2::RawH2;
use padlock_e2e::{RedisServer, Server};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// How long each measurement runs.
const WINDOW: Duration = Duration::from_secs(3);

struct Stats {
    ops: f64,
    p50: Duration,
    p99: Duration,
    failures: usize,
}

/// One client on its own connection: acquire, release, on its own names,
/// for `WINDOW`.
async fn legit(server: &Server) -> Stats {
    let client = server.client().await;
    let mut samples = Vec::new();
    let mut failures = 0;
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < WINDOW {
        let t = Instant::now();
        let got = tokio::time::timeout(
            Duration::from_secs(5),
            client
                .lock(format!("legit/{}", i % 8))
                .wait(Duration::from_secs(4))
                .acquire(),
        )
        .await;
        match got {
            Ok(Ok(guard)) => {
                let _ = guard.release().await;
                samples.push(t.elapsed());
            }
            _ => failures += 1,
        }
        i += 1;
    }
    let elapsed = start.elapsed();
    samples.sort_unstable();
    let pick = |q: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    Stats {
        ops: samples.len() as f64 / elapsed.as_secs_f64(),
        p50: pick(0.5),
        p99: pick(0.99),
        failures,
    }
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn row(name: &str, idle: &Stats, hit: &Stats, note: &str) {
    let ratio = hit.p99.as_secs_f64() / idle.p99.as_secs_f64().max(1e-9);
    println!(
        "| {name} | {:.0} | {} | {} | {:.0} | {} | {} | {:.1}x | {} | {note} |",
        idle.ops,
        us(idle.p50),
        us(idle.p99),
        hit.ops,
        us(hit.p50),
        us(hit.p99),
        ratio,
        hit.failures
    );
}

/// The server's resident memory, from /proc.
fn rss_mib(server: &Server) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// A client holding a lock request with the largest owner and labels.
fn heavy(client: &Client, name: &str) -> padlock::LockBuilder {
    let mut lock = client.lock(name).owner("o".repeat(256));
    for l in 0..16 {
        lock = lock.label(format!("{l:02}{}", "k".repeat(254)), "v".repeat(256));
    }
    lock
}

type Attack = fn(&Server) -> std::pin::Pin<Box<dyn Future<Output = Box<dyn std::any::Any>> + '_>>;

/// An attack: padlockd flags, what it does (returning what must stay
/// alive while it lasts), and a note for the table.
struct Case {
    name: &'static str,
    args: &'static [&'static str],
    attack: Attack,
    note: &'static str,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "fence counter flocked by a local user",
            args: &[],
            note: "8 waiters on the victim name stay queued",
            attack: |server| {
                Box::pin(async move {
                    let client = server.client().await;
                    client.lock("victim").acquire().await.unwrap();
                    let counter = server.lock_dir.join(".padlock/fences/file/victim.fence");
                    let file = std::fs::File::open(counter).unwrap();
                    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).unwrap();
                    let waiters: Vec<_> = (0..8)
                        .map(|_| {
                            let client = client.clone();
                            tokio::spawn(async move { client.lock("victim").acquire().await })
                        })
                        .collect();
                    Box::new((file, waiters, client)) as Box<dyn std::any::Any>
                })
            },
        },
        Case {
            name: "FIFO and socket names, requested in a loop",
            args: &[],
            note: "each request refused at once",
            attack: |server| {
                Box::pin(async move {
                    let fifo = server.lock_dir.join("fifo");
                    std::process::Command::new("mkfifo")
                        .arg(&fifo)
                        .status()
                        .unwrap();
                    let client = server.client().await;
                    let task = tokio::spawn(async move {
                        loop {
                            let _ = client.lock("fifo").acquire().await;
                        }
                    });
                    Box::new(AbortOnDrop(task)) as Box<dyn std::any::Any>
                })
            },
        },
        Case {
            name: "names through a symlink to .padlock, in a loop",
            args: &[],
            note: "each request refused at once",
            attack: |server| {
                Box::pin(async move {
                    std::os::unix::fs::symlink(".padlock", server.lock_dir.join("state-link"))
                        .unwrap();
                    let client = server.client().await;
                    let task = tokio::spawn(async move {
                        loop {
                            // The legitimate client's own fence counter.
                            let _ = client
                                .lock("state-link/fences/file/legit.d/0.fence")
                                .acquire()
                                .await;
                        }
                    });
                    Box::new(AbortOnDrop(task)) as Box<dyn std::any::Any>
                })
            },
        },
        Case {
            name: "lists by 8 HTTP/2 connections that never read (2,000 heavy waiters)",
            args: &["--request-timeout", "2s"],
            note: "non-reading connections are closed after the request timeout",
            attack: |server| {
                Box::pin(async move {
                    let client = server.client().await;
                    let _holder = client.lock("big").acquire().await.unwrap();
                    let mut keep: Vec<Box<dyn std::any::Any>> = vec![Box::new(_holder)];
                    for _ in 0..2000 {
                        let lock = heavy(&client, "big");
                        keep.push(Box::new(AbortOnDrop(tokio::spawn(async move {
                            let _ = lock.acquire().await;
                        }))));
                    }
                    let addr = server.addr;
                    keep.push(Box::new(AbortOnDrop(tokio::spawn(async move {
                        loop {
                            let mut conns = Vec::new();
                            for _ in 0..8 {
                                let mut raw = RawH2::connect(addr).await;
                                raw.handshake_with_window(0).await;
                                for stream in (1..=15).step_by(2) {
                                    raw.open_get(stream, "/v1/locks/big?waiter_limit=1000")
                                        .await;
                                }
                                conns.push(raw);
                            }
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }))));
                    Box::new(keep) as Box<dyn std::any::Any>
                })
            },
        },
        Case {
            name: "hold flood: heavy waiting streams up to --max-holds 5000",
            args: &["--max-holds", "5000"],
            note: "requests past the cap refused (RESOURCE_EXHAUSTED)",
            attack: |server| {
                Box::pin(async move {
                    let mut keep: Vec<Box<dyn std::any::Any>> = Vec::new();
                    let holder = server.client().await;
                    keep.push(Box::new(holder.lock("flood").acquire().await.unwrap()));
                    for c in 0..8 {
                        let client = server.client().await;
                        for _ in 0..700 {
                            let lock = heavy(&client, &format!("flood/{}", c % 2));
                            keep.push(Box::new(AbortOnDrop(tokio::spawn(async move {
                                let _ = lock.acquire().await;
                            }))));
                        }
                    }
                    Box::new(keep) as Box<dyn std::any::Any>
                })
            },
        },
        Case {
            name: "17-component names, in a loop",
            args: &[],
            note: "refused before any directory is made",
            attack: |server| {
                Box::pin(async move {
                    let client = server.client().await;
                    let deep = vec!["d"; 17].join("/");
                    let task = tokio::spawn(async move {
                        loop {
                            let _ = client.lock(deep.as_str()).acquire().await;
                        }
                    });
                    Box::new(AbortOnDrop(task)) as Box<dyn std::any::Any>
                })
            },
        },
        Case {
            name: "500 connections stalled after one byte of preface",
            args: &["--request-timeout", "2s", "--idle-timeout", "0s"],
            note: "each closed after the request timeout",
            attack: |server| {
                Box::pin(async move {
                    let mut conns = Vec::new();
                    for _ in 0..500 {
                        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
                        tcp.write_all(b"P").await.unwrap();
                        conns.push(tcp);
                    }
                    Box::new(conns) as Box<dyn std::any::Any>
                })
            },
        },
        Case {
            name: "cross-origin POSTs from a web page, in a loop",
            args: &[],
            note: "each refused with 403",
            attack: |server| {
                Box::pin(async move {
                    let url = format!("{}/v1/locks/csrf/hold?wait=0", server.url);
                    let task = tokio::spawn(async move {
                        let web = padlock_e2e::http::client();
                        loop {
                            let _ = web
                                .post(&url)
                                .header("origin", "http://evil.example")
                                .body("x")
                                .send()
                                .await;
                        }
                    });
                    Box::new(AbortOnDrop(task)) as Box<dyn std::any::Any>
                })
            },
        },
        Case {
            name: "one connection holding file locks until the descriptors run out (RLIMIT 2048)",
            args: &[],
            note: "grants past the budget refused; connections and health work",
            attack: |server| {
                Box::pin(async move {
                    let client = server.client().await;
                    let mut held = Vec::new();
                    while let Ok(g) = client
                        .lock(format!("fd/{}", held.len()))
                        .wait(Duration::ZERO)
                        .acquire()
                        .await
                    {
                        held.push(g);
                    }
                    // Room for the legitimate client's own locks.
                    for _ in 0..8 {
                        held.pop();
                    }
                    Box::new((held, client)) as Box<dyn std::any::Any>
                })
            },
        },
    ]
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn siege(filter: &str) {
    println!(
        "| attack | idle ops/s | idle p50 µs | idle p99 µs | attacked ops/s | attacked p50 µs | attacked p99 µs | p99 ratio | failures | note |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for case in cases().into_iter().filter(|c| c.name.contains(filter)) {
        let start = || {
            if case.name.contains("RLIMIT 2048") {
                Server::start_with_nofile(2048, case.args)
            } else {
                Server::start_with_args(case.args)
            }
        };
        // An older padlockd does not know every flag.
        let Ok(server) = std::panic::catch_unwind(start) else {
            println!(
                "| {} | - | - | - | - | - | - | - | - | padlockd did not start with {:?} |",
                case.name, case.args
            );
            continue;
        };
        let idle = legit(&server).await;
        let attack = (case.attack)(&server).await;
        let hit = legit(&server).await;
        row(case.name, &idle, &hit, case.note);
        drop(attack);
    }
}

/// RSS through a flood of waiting streams (the heaviest allowed, then
/// plain ones), up to the cap and back.
async fn memory(filter: &str) {
    if !"memory".contains(filter) && !filter.is_empty() {
        return;
    }
    memory_flood(true).await;
    memory_flood(false).await;
}

async fn memory_flood(heavy_labels: bool) {
    const CAP: u64 = 20_000;
    let server = Server::start_with_args(&["--max-holds", "20000"]);
    let before = rss_mib(&server);
    let holder = server.client().await;
    let mut held = Vec::new();
    for c in 0..4 {
        held.push(holder.lock(format!("mem/{c}")).acquire().await.unwrap());
    }
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    // --max-streams-per-connection is 1,000: 20 connections.
    for c in 0..20 {
        let client = server.client().await;
        for _ in 0..1000 {
            let name = format!("mem/{}", c % 4);
            let lock = if heavy_labels {
                heavy(&client, &name)
            } else {
                client.lock(name)
            };
            let refused = refused.clone();
            tasks.push(tokio::spawn(async move {
                if lock.acquire().await.is_err() {
                    refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }));
        }
    }
    let start = Instant::now();
    let waiting = loop {
        let info = holder.server_info().await.unwrap();
        let settled = info.waiters + refused.load(std::sync::atomic::Ordering::Relaxed);
        if settled >= 20_000 || start.elapsed() > Duration::from_secs(120) {
            break info.waiters;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let at_cap = rss_mib(&server);
    let refused = refused.load(std::sync::atomic::Ordering::Relaxed);
    for t in &tasks {
        t.abort();
    }
    let start = Instant::now();
    loop {
        let info = holder.server_info().await.unwrap();
        if info.waiters == 0 || start.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let closed = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let soon = rss_mib(&server);
    // Allocators give memory back after a while, if at all.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let later = rss_mib(&server);
    let what = if heavy_labels {
        "with a 256 B owner and 16 labels of 512 B each"
    } else {
        "without labels"
    };
    println!(
        "\nmemory, --max-holds {CAP}: 4 holders and {waiting} waiting Hold streams {what} on 20 \
         connections ({refused} more refused at the cap): RSS {before:.1} MiB before, \
         {at_cap:.1} MiB at the cap ({:.1} KiB per stream), {soon:.1} MiB 1 s after they closed, \
         {later:.1} MiB {:.0} s after",
        (at_cap - before) * 1024.0 / (waiting + 4) as f64,
        closed.elapsed().as_secs_f64()
    );
    drop(held);
}

/// Two padlockd on one lock directory, 8 looping clients each on one name.
async fn fairness(filter: &str) {
    if !"fairness".contains(filter) && !filter.is_empty() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = Server::start_in(dir.path(), &[]);
    let b = Server::start_in(dir.path(), &[]);
    let stop = Instant::now() + Duration::from_secs(10);
    let mut tasks = Vec::new();
    for (side, server) in [("a", &a), ("b", &b)] {
        for _ in 0..8 {
            let client = server.client().await;
            tasks.push(tokio::spawn(async move {
                let mut grants = 0u64;
                let mut worst = Duration::ZERO;
                while Instant::now() < stop {
                    let t = Instant::now();
                    let wait =
                        stop.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
                    match client.lock("shared-name").wait(wait).acquire().await {
                        Ok(guard) => {
                            worst = worst.max(t.elapsed());
                            grants += 1;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            drop(guard);
                        }
                        Err(_) => worst = worst.max(t.elapsed()),
                    }
                }
                (side, grants, worst)
            }));
        }
    }
    let mut per_side = std::collections::BTreeMap::<&str, (u64, Duration)>::new();
    for t in tasks {
        let (side, grants, worst) = t.await.unwrap();
        let e = per_side.entry(side).or_default();
        e.0 += grants;
        e.1 = e.1.max(worst);
    }
    println!(
        "\nfairness, two padlockd on one lock directory, 8 clients each on one name, 10 s, 1 ms holds:"
    );
    for (side, (grants, worst)) in per_side {
        println!(
            "  padlockd {side}: {grants} grants, longest wait {:.0} ms",
            worst.as_secs_f64() * 1e3
        );
    }
}

/// Redis stalls for 4 s while the legitimate client uses file locks, and
/// redis waiters contend on the stalled Redis.
async fn redis_stall(filter: &str) {
    if !"redis stall".contains(filter) && !filter.is_empty() {
        return;
    }
    let redis = RedisServer::start();
    let server = Server::start_with_args(&["--redis-url", &redis.url]);
    let idle = legit(&server).await;
    let client = server.client().await;
    let _holder = client.lock("r").redis().acquire().await.unwrap();
    let waiters: Vec<_> = (0..16)
        .map(|_| {
            let c = client.clone();
            AbortOnDrop(tokio::spawn(async move {
                let _ = c.lock("r").redis().acquire().await;
            }))
        })
        .collect();
    redis.pause(true);
    let hit = legit(&server).await;
    redis.pause(false);
    row(
        "Redis stopped (SIGSTOP) under 16 redis waiters",
        &idle,
        &hit,
        "file locks unaffected; redis holders told Lost",
    );
    drop(waiters);
}

#[tokio::main]
async fn main() {
    let filter = std::env::args().nth(1).unwrap_or_default();
    siege(&filter).await;
    redis_stall(&filter).await;
    memory(&filter).await;
    fairness(&filter).await;
}
