//! `padlock bench`: a load generator for any padlockd deployment.
//!
//! Prints, for one run: the floor (a bare gRPC health check round trip on
//! the same connection), the uncontended acquire+release cycle, throughput
//! of many clients on distinct names, handoff latency on one contended
//! name, and the server's resident memory per held lock. With
//! `--redis-url`, the same run measures a raw Redis lock at one and at
//! `--clients` connections and prints padlock's ratios to it.

use clap::Args;
use padlock::{Client, ClientBuilder, Kind, LockBuilder};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Seconds to run each timed phase.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Concurrent clients (one connection each) in the throughput phase.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Handoffs to measure on one contended name.
    #[arg(long, default_value_t = 2000)]
    handoffs: usize,
    /// Locks held at once in the memory phase (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    held: usize,
    /// Connections the held locks are spread over.
    #[arg(long, default_value_t = 16)]
    held_connections: usize,
    /// Kind to measure (a semaphore with limit 1).
    #[arg(long, value_enum, default_value_t = Kind::File)]
    kind: Kind,
    /// Prefix of every lock name the benchmark uses.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// The server's lock directory, when it is on this machine: adds the
    /// phase that measures how soon a waiter notices the release of a
    /// flock held outside padlockd (as by portalocker or flock(1)).
    #[arg(long)]
    lock_dir: Option<std::path::PathBuf>,
    /// The Redis the server uses (`redis://HOST:PORT`, no password): adds
    /// the floor of the redis kind, a raw Redis lock round trip (`SET NX
    /// PX`, then compare-and-delete) from this client to that Redis.
    #[arg(long)]
    redis_url: Option<String>,
    /// Each lock on a Hold stream of its own, instead of as an op on the
    /// client's one Session stream (the SDK's default; see
    /// `ClientBuilder::multiplex`).
    #[arg(long)]
    hold_streams: bool,
    /// The Session stream over gRPC, instead of padlockd's lean transport
    /// (see `ClientBuilder::lean`).
    #[arg(long, conflicts_with = "hold_streams")]
    grpc_session: bool,
}

/// Latency summary of one phase.
struct Summary {
    p50: Duration,
    p99: Duration,
    ops_per_sec: f64,
}

fn summarize(mut samples: Vec<Duration>, elapsed: Duration) -> Summary {
    samples.sort_unstable();
    let pick = |q: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    Summary {
        p50: pick(0.50),
        p99: pick(0.99),
        ops_per_sec: samples.len() as f64 / elapsed.as_secs_f64(),
    }
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

impl BenchArgs {
    fn lock(&self, client: &Client, name: &str) -> LockBuilder {
        let builder = client
            .lock(format!("{}/{name}", self.prefix))
            .owner("padlock bench");
        match self.kind {
            Kind::Semaphore => builder.semaphore(1),
            Kind::Redis => builder.redis(),
            Kind::File => builder,
        }
    }
}

/// Runs `op` back to back for `seconds`, returning each run's latency.
async fn timed<F, Fut>(seconds: Duration, mut op: F) -> Result<(Vec<Duration>, Duration), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < seconds {
        let t = Instant::now();
        op().await?;
        samples.push(t.elapsed());
    }
    Ok((samples, start.elapsed()))
}

/// Runs `work` as a task of its own and waits for it.
async fn spawned<T: Send + 'static>(
    work: impl Future<Output = Result<T, String>> + Send + 'static,
) -> Result<T, String> {
    tokio::spawn(work).await.map_err(|e| e.to_string())?
}

pub async fn run(
    client: &Client,
    connection: &ClientBuilder,
    server: &str,
    args: BenchArgs,
) -> Result<(), String> {
    let phase = Duration::try_from_secs_f64(args.seconds).map_err(|e| format!("--seconds: {e}"))?;
    let err = |e: padlock::Error| e.to_string();
    let own;
    let (client, connection) = if args.hold_streams || args.grpc_session {
        let connection = match args.hold_streams {
            true => connection.clone().multiplex(false),
            false => connection.clone().lean(false),
        };
        own = (connection.clone().connect().await.map_err(err)?, connection);
        (&own.0, &own.1)
    } else {
        (client, connection)
    };
    println!(
        "padlock bench against {server} (kind {}, {} s per phase{})\n",
        args.kind,
        args.seconds,
        if args.hold_streams {
            ", one Hold stream per lock"
        } else if args.grpc_session {
            ", locks as ops on one gRPC Session stream per client"
        } else {
            ", locks as ops on one Session per client (the lean transport where the URL allows)"
        }
    );
    println!("| measure | p50 | p99 | ops/s |");
    println!("| --- | --- | --- | --- |");

    // Warm up the connection and the server's code paths.
    for _ in 0..200 {
        client.health_check().await.map_err(err)?;
        args.lock(client, "warmup")
            .acquire()
            .await
            .map_err(err)?
            .release()
            .await
            .map_err(err)?;
    }

    // Each loop runs as a task on the runtime's workers, as a service's
    // request handler would, not on the thread that blocks on `main`
    // (which would add a cross-thread wake-up to every round trip).
    let (samples, elapsed) = {
        let client = client.clone();
        spawned(async move {
            timed(phase, || async {
                client.health_check().await.map(|_| ()).map_err(err)
            })
            .await
        })
        .await?
    };
    let floor = summarize(samples, elapsed);
    println!(
        "| floor: gRPC health check round trip | {} | {} | {:.0} |",
        us(floor.p50),
        us(floor.p99),
        floor.ops_per_sec
    );

    let (samples, elapsed) = {
        let builder = args.lock(client, "uncontended");
        spawned(async move {
            timed(phase, || async {
                let guard = builder.clone().acquire().await.map_err(err)?;
                guard.release().await.map_err(err)
            })
            .await
        })
        .await?
    };
    let cycle = summarize(samples, elapsed);
    println!(
        "| acquire+release cycle, one connection | {} | {} | {:.0} |",
        us(cycle.p50),
        us(cycle.p99),
        cycle.ops_per_sec
    );

    // Many clients, distinct names, one connection each. Every client
    // connects first, and takes and releases its lock once untimed (which
    // opens its Session stream: connection set-up, not a lock cycle);
    // then all start at once, so the window is shared.
    let (go, start) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let c = connection.clone().connect().await.map_err(err)?;
        let builder = args.lock(&c, &format!("client-{i}"));
        builder
            .clone()
            .acquire()
            .await
            .map_err(err)?
            .release()
            .await
            .map_err(err)?;
        let mut start = start.clone();
        tasks.push(tokio::spawn(async move {
            let _ = start.wait_for(|go| *go).await;
            timed(phase, || {
                let b = builder.clone();
                async move { b.acquire().await.map_err(err)?.release().await.map_err(err) }
            })
            .await
        }));
    }
    let _ = go.send(true);
    let mut all = Vec::new();
    let mut longest = Duration::ZERO;
    for task in tasks {
        let (samples, elapsed) = task.await.map_err(|e| e.to_string())??;
        all.extend(samples);
        longest = longest.max(elapsed);
    }
    let many = summarize(all, longest);
    println!(
        "| acquire+release, {} clients on distinct names (total) | {} | {} | {:.0} |",
        args.clients,
        us(many.p50),
        us(many.p99),
        many.ops_per_sec
    );

    // Handoff: the holder releases while exactly one waiter is queued; the
    // latency is from sending Release to the waiter holding the grant.
    let waiter_client = connection.clone().connect().await.map_err(err)?;
    let mut holder = args
        .lock(client, "contended")
        .acquire()
        .await
        .map_err(err)?;
    let mut handoffs = Vec::with_capacity(args.handoffs);
    let started = Instant::now();
    for i in 0..args.handoffs {
        let next_client = if i % 2 == 0 { &waiter_client } else { client };
        let builder = args.lock(next_client, "contended");
        let (granted_tx, granted_rx) = oneshot::channel();
        tokio::spawn(async move {
            let guard = builder.acquire().await;
            let _ = granted_tx.send((Instant::now(), guard));
        });
        let name = format!("{}/contended", args.prefix);
        let kind = args.kind;
        loop {
            let info = client.show(&name, kind).await.map_err(err)?;
            if info.is_some_and(|l| l.waiters.len() == 1) {
                break;
            }
            tokio::task::yield_now().await;
        }
        let released_at = Instant::now();
        holder.release().await.map_err(err)?;
        let (granted_at, guard) = granted_rx.await.map_err(|e| e.to_string())?;
        holder = guard.map_err(err)?;
        handoffs.push(granted_at.saturating_duration_since(released_at));
    }
    holder.release().await.map_err(err)?;
    let handoff = summarize(handoffs, started.elapsed());
    println!(
        "| handoff on one contended name | {} | {} | - |",
        us(handoff.p50),
        us(handoff.p99)
    );

    if let Some(dir) = &args.lock_dir {
        let wake = outside_release(client, &args, dir).await?;
        println!(
            "| waiter noticing an outside flock release | {} | {} | - |",
            us(wake.p50),
            us(wake.p99)
        );
    }

    println!(
        "\ncycle / floor at p50: {:.2}x (target <= 2.5x for file and semaphore)",
        cycle.p50.as_secs_f64() / floor.p50.as_secs_f64()
    );

    if let Some(url) = &args.redis_url {
        // The lock teams use instead, measured in the same run: a raw
        // Redis lock (SET NX PX, then a compare-and-delete script).
        let raw = raw_redis_lock(url, phase, 1).await?;
        let raw_many = raw_redis_lock(url, phase, args.clients).await?;
        println!("\n| raw Redis lock (SET NX PX + compare-and-delete) | p50 | p99 | ops/s |");
        println!("| --- | --- | --- | --- |");
        println!(
            "| one connection | {} | {} | {:.0} |",
            us(raw.p50),
            us(raw.p99),
            raw.ops_per_sec
        );
        println!(
            "| {} clients on distinct keys (total) | {} | {} | {:.0} |",
            args.clients,
            us(raw_many.p50),
            us(raw_many.p99),
            raw_many.ops_per_sec
        );
        println!(
            "\npadlock {} against the raw Redis lock: cycle p50 {:.2}x (lower is better), \
             {} clients {:.2}x the ops/s (higher is better)",
            args.kind,
            cycle.p50.as_secs_f64() / raw.p50.as_secs_f64(),
            args.clients,
            many.ops_per_sec / raw_many.ops_per_sec
        );
    }

    if args.held > 0 && args.kind == Kind::Redis {
        println!(
            "\n(memory phase skipped for the redis kind: each held lock is one Redis connection)"
        );
    } else if args.held > 0 {
        held_memory(client, connection, &args).await?;
    }
    Ok(())
}

/// A process outside padlockd (here: this one, with a plain flock) holds
/// the lock file while a padlock client waits; measures from the outside
/// release to the grant.
async fn outside_release(
    client: &Client,
    args: &BenchArgs,
    dir: &std::path::Path,
) -> Result<Summary, String> {
    use rustix::fs::{FlockOperation, flock};
    let err = |e: padlock::Error| e.to_string();
    let name = format!("{}/outside", args.prefix);
    let path = dir.join(&name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let rounds = 200;
    let mut samples = Vec::with_capacity(rounds);
    let started = Instant::now();
    for _ in 0..rounds {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        flock(&file, FlockOperation::LockExclusive)
            .map_err(|e| format!("flock {}: {e}", path.display()))?;
        let builder = client.lock(name.clone()).owner("padlock bench");
        let (granted_tx, granted_rx) = oneshot::channel();
        tokio::spawn(async move {
            let guard = builder.acquire().await;
            let _ = granted_tx.send((Instant::now(), guard));
        });
        loop {
            let info = client.show(&name, padlock::Kind::File).await.map_err(err)?;
            if info.is_some_and(|l| l.waiters.len() == 1) {
                break;
            }
            tokio::task::yield_now().await;
        }
        let released_at = Instant::now();
        drop(file);
        let (granted_at, guard) = granted_rx.await.map_err(|e| e.to_string())?;
        guard.map_err(err)?.release().await.map_err(err)?;
        samples.push(granted_at.saturating_duration_since(released_at));
    }
    Ok(summarize(samples, started.elapsed()))
}

/// Holds `args.held` locks at once and reports the server's RSS growth.
async fn held_memory(
    client: &Client,
    connection: &ClientBuilder,
    args: &BenchArgs,
) -> Result<(), String> {
    let err = |e: padlock::Error| e.to_string();
    let before = client.server_info().await.map_err(err)?;
    let per_connection = args.held.div_ceil(args.held_connections.max(1));
    let mut tasks = Vec::new();
    for c in 0..args.held_connections.max(1) {
        let conn = connection.clone().connect().await.map_err(err)?;
        let range = (c * per_connection)..((c + 1) * per_connection).min(args.held);
        let builders: Vec<LockBuilder> = range
            .map(|i| args.lock(&conn, &format!("held-{i}")))
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut guards = Vec::with_capacity(builders.len());
            for b in builders {
                guards.push(b.acquire().await?);
            }
            Ok::<_, padlock::Error>(guards)
        }));
    }
    let mut guards = Vec::with_capacity(args.held);
    for task in tasks {
        guards.extend(task.await.map_err(|e| e.to_string())?.map_err(err)?);
    }
    let during = client.server_info().await.map_err(err)?;
    let grown = during.rss_bytes.saturating_sub(before.rss_bytes);
    println!(
        "\nserver RSS: {:.1} MiB idle, {:.1} MiB with {} locks held ({} held per the server): {:.2} KiB per held lock (target <= 4 KiB)",
        before.rss_bytes as f64 / 1048576.0,
        during.rss_bytes as f64 / 1048576.0,
        guards.len(),
        during.holders,
        grown as f64 / 1024.0 / guards.len().max(1) as f64
    );
    drop(guards);
    Ok(())
}

/// A raw Redis lock, the one most teams write instead of a lock service:
/// `SET key token NX PX 10000` to take it, a compare-and-delete script to
/// give it back. `clients` loops, each on its own connection and key, as
/// tasks that start together once all are connected; the summary covers
/// them all.
async fn raw_redis_lock(url: &str, phase: Duration, clients: usize) -> Result<Summary, String> {
    let addr = url
        .strip_prefix("redis://")
        .map(|rest| rest.trim_end_matches('/'))
        .filter(|rest| !rest.contains('@'))
        .ok_or_else(|| format!("--redis-url {url}: expected redis://HOST:PORT without a password"))?
        .to_string();
    let (go, start) = tokio::sync::watch::channel(false);
    let (ready_tx, mut ready) = tokio::sync::mpsc::channel::<()>(clients.max(1));
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let addr = addr.clone();
        let (start, ready) = (start.clone(), ready_tx.clone());
        tasks.push(tokio::spawn(async move {
            let key = format!("padlock-bench-raw-{i}");
            raw_redis_loop(&addr, phase, &key, (ready, start)).await
        }));
    }
    drop(ready_tx);
    // Every loop connected (or failed), then all start.
    while ready.recv().await.is_some() {}
    let _ = go.send(true);
    let mut all = Vec::new();
    let mut longest = Duration::ZERO;
    for task in tasks {
        let (samples, elapsed) = task.await.map_err(|e| e.to_string())??;
        all.extend(samples);
        longest = longest.max(elapsed);
    }
    Ok(summarize(all, longest))
}

/// One client of [`raw_redis_lock`]: takes and gives back `key` for
/// `phase`, one round trip each.
async fn raw_redis_loop(
    addr: &str,
    phase: Duration,
    key: &str,
    (ready, mut start): (
        tokio::sync::mpsc::Sender<()>,
        tokio::sync::watch::Receiver<bool>,
    ),
) -> Result<(Vec<Duration>, Duration), String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let command = |args: &[&str]| {
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        out
    };
    let unlock = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
    let set = command(&["SET", key, "token", "NX", "PX", "10000"]);
    let del = command(&["EVAL", unlock, "1", key, "token"]);
    drop(ready);
    let _ = start.wait_for(|go| *go).await;
    let mut line = String::new();
    let mut round = async |cmd: &str, want: &str| -> Result<(), String> {
        write
            .write_all(cmd.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        line.clear();
        read.read_line(&mut line).await.map_err(|e| e.to_string())?;
        if line.trim_end() == want {
            Ok(())
        } else {
            Err(format!("raw Redis lock: expected {want}, got {line:?}"))
        }
    };
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < phase {
        let t = Instant::now();
        round(&set, "+OK").await?;
        round(&del, ":1").await?;
        samples.push(t.elapsed());
    }
    Ok((samples, start.elapsed()))
}
