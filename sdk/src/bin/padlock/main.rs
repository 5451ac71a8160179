//! `padlock`: hold padlockd locks from the shell.
//!
//! Exit status of `padlock run`: the command's own status (128 + signal if
//! it was killed); 75 when the lock was not acquired within `--wait`; 70
//! when the lock was lost while the command ran (the command is sent
//! SIGTERM first); 1 for other errors (server unreachable, bad request).

mod bench;

use clap::{Args, Parser, Subcommand};
use padlock::{Client, ClientBuilder, Error, Kind, LockBuilder, LockGuard, LockInfo};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};
use tokio::signal::unix::{SignalKind, signal};

/// Not acquired within --wait (EX_TEMPFAIL).
const EXIT_NOT_ACQUIRED: u8 = 75;
/// The lock was lost while held.
const EXIT_LOST: u8 = 70;

/// Exit codes, for `--help`.
const EXIT_CODES: &str = "\
Exit status:
  0    done (`run`: the command's own status; 128 + N if signal N killed it)
  75   the lock was not acquired within --wait (held by someone else)
  70   the lock was lost while held (`run` sends the command SIGTERM first)
  1    any other error (server unreachable, bad request)
  2    bad usage
";

#[derive(Parser)]
#[command(
    name = "padlock",
    version,
    about = "Hold padlockd locks from the shell",
    after_help = EXIT_CODES
)]
struct Cli {
    /// padlockd's address: http://HOST:PORT, https://HOST:PORT, or HOST:PORT.
    #[arg(
        long,
        global = true,
        env = "PADLOCK_SERVER",
        default_value = padlock::DEFAULT_SERVER,
        help_heading = "Connection"
    )]
    server: String,
    /// CA bundle (PEM) that signed the server's certificate, for https:// servers.
    #[arg(
        long,
        global = true,
        env = "PADLOCK_CA_CERT",
        help_heading = "Connection"
    )]
    ca_cert: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for servers that require one (mutual TLS).
    #[arg(
        long,
        global = true,
        env = "PADLOCK_CLIENT_CERT",
        requires = "client_key",
        help_heading = "Connection"
    )]
    client_cert: Option<std::path::PathBuf>,
    /// Client certificate's private key (PEM).
    #[arg(
        long,
        global = true,
        env = "PADLOCK_CLIENT_KEY",
        requires = "client_cert",
        help_heading = "Connection"
    )]
    client_key: Option<std::path::PathBuf>,
    /// File holding the client token (first line). PADLOCK_TOKEN gives the
    /// token itself.
    #[arg(
        long,
        global = true,
        env = "PADLOCK_TOKEN_FILE",
        help_heading = "Connection"
    )]
    token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Hold a lock while a command runs: `padlock run NAME -- COMMAND [ARGS]`.
    /// The command gets PADLOCK_FENCE (and PADLOCK_SLOT for semaphores) in
    /// its environment.
    #[command(after_help = EXIT_CODES)]
    Run {
        #[command(flatten)]
        lock: LockArgs,
        /// The command and its arguments, after `--`.
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Hold a lock until interrupted (Ctrl-C or SIGTERM); prints the grant.
    #[command(after_help = EXIT_CODES)]
    Hold {
        #[command(flatten)]
        lock: LockArgs,
    },
    /// List locks with holders or waiters.
    List {
        /// Only names starting with this prefix.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Show one lock: its holders and waiters.
    Show {
        /// The lock's name.
        name: String,
        /// Only this kind [default: look in every kind].
        #[arg(long, value_enum)]
        kind: Option<Kind>,
    },
    /// Measure latency and throughput of a padlockd deployment.
    Bench(bench::BenchArgs),
    /// Check that padlockd serves (standard gRPC health check): exit 0 when
    /// it does, 1 otherwise. Usable as a container health check.
    Health,
}

#[derive(Args)]
struct LockArgs {
    /// Kind of lock [default: file, or semaphore when --limit is given].
    #[arg(long, value_enum)]
    kind: Option<Kind>,
    /// Take the lock in shared (read) mode.
    #[arg(long)]
    shared: bool,
    /// Semaphore slot count.
    #[arg(long)]
    limit: Option<u32>,
    /// Give up after this long: 500ms, 30s, 1m, 1h or seconds (0: try
    /// once). Default: wait as long as it takes.
    #[arg(long, value_name = "DURATION", value_parser = padlock::duration::parse)]
    wait: Option<Duration>,
    /// Who holds the lock, as shown by `padlock list`.
    #[arg(long)]
    owner: Option<String>,
    /// Say nothing while waiting (on a terminal, a waiting line shows the
    /// queue position, the holders and the time waited).
    #[arg(long, short)]
    quiet: bool,
    /// The lock's name.
    name: String,
}

impl LockArgs {
    fn kind(&self) -> Kind {
        self.kind.unwrap_or(if self.limit.is_some() {
            Kind::Semaphore
        } else {
            Kind::File
        })
    }

    fn builder(&self, client: &Client) -> Result<LockBuilder, String> {
        let mut builder = client.lock(&self.name);
        match (self.kind(), self.limit) {
            (Kind::Semaphore, Some(limit)) => builder = builder.semaphore(limit),
            (Kind::Semaphore, None) => return Err("--kind semaphore needs --limit N".into()),
            (_, Some(_)) => return Err("--limit only applies to semaphores".into()),
            (Kind::Redis, None) => builder = builder.redis(),
            (Kind::File, None) => {}
        }
        if self.shared {
            builder = builder.shared();
        }
        if let Some(wait) = self.wait {
            builder = builder.wait(wait);
        }
        if let Some(owner) = &self.owner {
            builder = builder.owner(owner);
        }
        Ok(builder)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("padlock: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The connection settings from the global flags.
fn connection(cli: &Cli) -> Result<ClientBuilder, String> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let mut builder = Client::builder(&cli.server);
    if let Some(ca) = &cli.ca_cert {
        builder = builder.ca_certificate(read(ca)?);
    }
    if let (Some(cert), Some(key)) = (&cli.client_cert, &cli.client_key) {
        builder = builder.identity(read(cert)?, read(key)?);
    }
    let token = match (&cli.token_file, std::env::var("PADLOCK_TOKEN")) {
        (Some(file), _) => {
            let text = String::from_utf8(read(file)?)
                .map_err(|_| format!("{}: not UTF-8", file.display()))?;
            Some(text.lines().next().unwrap_or_default().trim().to_string())
        }
        (None, Ok(token)) => Some(token),
        (None, Err(_)) => None,
    };
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        builder = builder.token(token);
    }
    Ok(builder)
}

async fn run(cli: Cli) -> Result<ExitCode, String> {
    // Usage mistakes are told before anything is connected to.
    if let Command::Run { lock, command } = &cli.command
        && command.is_empty()
    {
        eprintln!(
            "padlock: run needs the command to run, after `--`: padlock run {} -- COMMAND [ARGS...]",
            lock.name
        );
        return Ok(ExitCode::from(2));
    }
    let connection = connection(&cli)?;
    // Only commands that lock use the lean transport; the others need
    // only the gRPC connection.
    let locks = matches!(
        cli.command,
        Command::Run { .. } | Command::Hold { .. } | Command::Bench(_)
    );
    let client = match locks {
        true => connection.clone(),
        false => connection.clone().lean(false),
    }
    .connect()
    .await
    .map_err(|e| e.to_string())?;
    match cli.command {
        Command::Run { lock, command } => run_command(&client, &lock, &command).await,
        Command::Hold { lock } => hold(&client, &lock).await,
        Command::List { prefix } => {
            let locks = client.list(&prefix).await.map_err(|e| e.to_string())?;
            print!("{}", render_list(&locks, SystemTime::now()));
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { name, kind } => {
            let kinds = match kind {
                Some(kind) => vec![kind],
                None => Kind::ALL.to_vec(),
            };
            let mut found = Vec::new();
            for kind in kinds {
                if let Some(info) = client.show(&name, kind).await.map_err(|e| e.to_string())? {
                    found.push(info);
                }
            }
            if found.is_empty() {
                return Err(match kind {
                    Some(kind) => {
                        format!("nobody holds or waits for {} lock '{name}'", kind.as_str())
                    }
                    None => {
                        format!("nobody holds or waits for a lock named '{name}' (of any kind)")
                    }
                });
            }
            let shown: Vec<String> = found
                .iter()
                .map(|info| render_show(info, SystemTime::now()))
                .collect();
            print!("{}", shown.join("\n"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Health => match client.health_check().await {
            Ok(true) => {
                println!("serving");
                Ok(ExitCode::SUCCESS)
            }
            Ok(false) => Err(
                "padlockd is not ready: it is shutting down, or a backend it serves (Redis) is \
                 down (its /readyz says which)"
                    .into(),
            ),
            Err(e) => Err(e.to_string()),
        },
        Command::Bench(args) => bench::run(&client, &connection, &cli.server, args)
            .await
            .map(|()| ExitCode::SUCCESS),
    }
}

/// Acquires, or says why not: `Err(exit code)` after printing the reason.
/// While it waits, on a terminal, a line (updated in place) says what for.
async fn acquire(client: &Client, lock: &LockArgs) -> Result<LockGuard, ExitCode> {
    let mut builder = lock.builder(client).map_err(|message| {
        eprintln!("padlock: {message}");
        ExitCode::FAILURE
    })?;
    let progress = !lock.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (queued_tx, mut queued) = tokio::sync::watch::channel(None::<String>);
    if progress {
        builder = builder.on_queued(move |q| {
            let _ = queued_tx.send(Some(q.waiter_id));
        });
    }
    let started = std::time::Instant::now();
    let acquiring = builder.acquire();
    tokio::pin!(acquiring);
    let mut shown = false;
    let result = loop {
        tokio::select! {
            result = &mut acquiring => break result,
            changed = queued.changed(), if progress => {
                if changed.is_err() {
                    continue;
                }
                let Some(id) = queued.borrow_and_update().clone() else { continue };
                // Queued: say so until granted, refreshed twice a second.
                let watch = async {
                    loop {
                        let line = waiting_line(client, lock, &id, started.elapsed()).await;
                        eprint!("\r\x1b[K{line}");
                        shown = true;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                };
                tokio::select! {
                    result = &mut acquiring => break result,
                    () = watch => unreachable!("the waiting line loops"),
                }
            }
        }
    };
    if shown {
        eprint!("\r\x1b[K");
    }
    match result {
        Ok(guard) => Ok(guard),
        Err(Error::NotAcquired(message)) => {
            eprintln!("padlock: not acquired: {message}");
            Err(ExitCode::from(EXIT_NOT_ACQUIRED))
        }
        Err(err) => {
            eprintln!("padlock: {err}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// "waiting for file lock 'x': 2 of 3 in line, held by padlock[42]@host
/// for 1m05s; waited 12.0s".
async fn waiting_line(client: &Client, lock: &LockArgs, id: &str, waited: Duration) -> String {
    let kind = lock.kind();
    let waited = span(waited);
    let head = format!("waiting for {} lock '{}'", kind.as_str(), lock.name);
    let Ok(Some(info)) = client.show(&lock.name, kind).await else {
        return format!("{head}; waited {waited}");
    };
    let place = match info.waiters.iter().find(|w| w.id == id) {
        Some(me) => format!("{} of {} in line", me.position, info.waiters_total),
        None => format!("{} in line", info.waiters_total),
    };
    let now = SystemTime::now();
    let held = match info.holders.first() {
        Some(h) if info.holders_total > 1 => format!(
            "held by {} and {} more for {}",
            h.owner,
            info.holders_total - 1,
            age(h.since, now)
        ),
        Some(h) => format!("held by {} for {}", h.owner, age(h.since, now)),
        None => "held by a process outside padlockd".to_string(),
    };
    format!("{head}: {place}, {held}; waited {waited}")
}

async fn run_command(
    client: &Client,
    lock: &LockArgs,
    command: &[String],
) -> Result<ExitCode, String> {
    let guard = match acquire(client, lock).await {
        Ok(guard) => guard,
        Err(code) => return Ok(code),
    };
    let mut child = tokio::process::Command::new(&command[0]);
    child
        .args(&command[1..])
        .env("PADLOCK_FENCE", guard.fence().to_string())
        .env("PADLOCK_NAME", &lock.name);
    if let Some(slot) = guard.slot() {
        child.env("PADLOCK_SLOT", slot.to_string());
    }
    let mut child = child
        .spawn()
        .map_err(|e| format!("cannot run '{}': {e}", command[0]))?;
    let pid = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32));
    let send = |sig: rustix::process::Signal| {
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, sig);
        }
    };
    let (mut term, mut int) = signals()?;
    let lost = guard.lost();
    tokio::pin!(lost);
    let mut lost_reason = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.map_err(|e| format!("waiting for the command: {e}"))?,
            reason = &mut lost, if lost_reason.is_none() => {
                eprintln!("padlock: {reason}; sending SIGTERM to the command");
                send(rustix::process::Signal::TERM);
                lost_reason = Some(reason);
            }
            // Pass signals on and keep holding until the command exits.
            _ = term.recv() => send(rustix::process::Signal::TERM),
            _ = int.recv() => send(rustix::process::Signal::INT),
        }
    };
    if lost_reason.is_some() {
        return Ok(ExitCode::from(EXIT_LOST));
    }
    if let Err(err) = guard.release().await {
        eprintln!("padlock: {err}");
        return Ok(ExitCode::from(EXIT_LOST));
    }
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

fn signals() -> Result<(tokio::signal::unix::Signal, tokio::signal::unix::Signal), String> {
    let term =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let int = signal(SignalKind::interrupt()).map_err(|e| format!("cannot handle SIGINT: {e}"))?;
    Ok((term, int))
}

async fn hold(client: &Client, lock: &LockArgs) -> Result<ExitCode, String> {
    let (mut term, mut int) = signals()?;
    let guard = match acquire(client, lock).await {
        Ok(guard) => guard,
        Err(code) => return Ok(code),
    };
    match guard.slot() {
        Some(slot) => println!(
            "granted {} fence={} slot={slot} holder={}",
            lock.name,
            guard.fence(),
            guard.holder_id()
        ),
        None => println!(
            "granted {} fence={} holder={}",
            lock.name,
            guard.fence(),
            guard.holder_id()
        ),
    }
    tokio::select! {
        lost = guard.lost() => {
            eprintln!("padlock: {lost}");
            Ok(ExitCode::from(EXIT_LOST))
        }
        _ = term.recv() => release(guard).await,
        _ = int.recv() => release(guard).await,
    }
}

async fn release(guard: LockGuard) -> Result<ExitCode, String> {
    match guard.release().await {
        Ok(()) => {
            println!("released");
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            eprintln!("padlock: {err}");
            Ok(ExitCode::from(EXIT_LOST))
        }
    }
}

/// "3.2s", "4m05s", "2h03m": how long ago `since` was.
fn age(since: SystemTime, now: SystemTime) -> String {
    span(now.duration_since(since).unwrap_or_default())
}

/// How long until a waiter gives up ("-": it waits as long as it takes).
fn gives_up(deadline: Option<SystemTime>, now: SystemTime) -> String {
    match deadline {
        Some(deadline) => span(deadline.duration_since(now).unwrap_or_default()),
        None => "-".into(),
    }
}

/// "0.4s", "3.2s", "4m05s", "2h03m".
fn span(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    let secs = ms / 1000;
    match secs {
        0..60 => format!("{}.{}s", secs, (ms % 1000) / 100),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// Lays out rows as columns separated by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

fn render_list(locks: &[LockInfo], now: SystemTime) -> String {
    if locks.is_empty() {
        return "no locks are held or waited for\n".into();
    }
    let rows: Vec<Vec<String>> = locks
        .iter()
        .map(|l| {
            let holders = if l.limit > 0 {
                format!("{}/{}", l.holders_total, l.limit)
            } else {
                l.holders_total.to_string()
            };
            let oldest = l.holders.iter().map(|h| h.since).min();
            vec![
                l.name.clone(),
                l.kind.as_str().into(),
                l.mode.map_or("-".into(), |m| m.to_string()),
                holders,
                l.waiters_total.to_string(),
                l.holders
                    .iter()
                    .map(|h| h.fence)
                    .max()
                    .map_or("-".into(), |f| f.to_string()),
                oldest.map_or("-".into(), |s| age(s, now)),
                l.holders.first().map_or("-".into(), |h| h.owner.clone()),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "KIND", "MODE", "HOLDERS", "WAITERS", "FENCE", "HELD FOR", "OWNER",
        ],
        &rows,
    )
}

fn render_show(l: &LockInfo, now: SystemTime) -> String {
    let mut out = format!("{} ({}", l.name, l.kind.as_str());
    if l.limit > 0 {
        out.push_str(&format!(", limit {}", l.limit));
    }
    out.push_str(")\n\nholders:\n");
    let holders: Vec<Vec<String>> = l
        .holders
        .iter()
        .map(|h| {
            vec![
                h.id.clone(),
                h.mode.to_string(),
                h.fence.to_string(),
                h.slot.map_or("-".into(), |s| s.to_string()),
                age(h.since, now),
                h.peer.clone(),
                h.owner.clone(),
            ]
        })
        .collect();
    out.push_str(&table(
        &["ID", "MODE", "FENCE", "SLOT", "HELD FOR", "PEER", "OWNER"],
        &holders,
    ));
    if l.waiters_total == 0 {
        out.push_str("\nwaiters: none\n");
        return out;
    }
    out.push_str("\nwaiters:\n");
    let waiters: Vec<Vec<String>> = l
        .waiters
        .iter()
        .map(|w| {
            vec![
                w.position.to_string(),
                w.id.clone(),
                w.mode.to_string(),
                age(w.since, now),
                gives_up(w.deadline, now),
                w.peer.clone(),
                w.owner.clone(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "POS",
            "ID",
            "MODE",
            "WAITING",
            "GIVES UP IN",
            "PEER",
            "OWNER",
        ],
        &waiters,
    ));
    let shown = (l.holders.len(), l.waiters.len());
    let total = (l.holders_total as usize, l.waiters_total as usize);
    if shown.0 < total.0 || shown.1 < total.1 {
        out.push_str(&format!(
            "\n(showing {} of {} holders and {} of {} waiters)\n",
            shown.0, total.0, shown.1, total.1
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use padlock::{Holder, Mode, Waiter};

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn holder(id: &str, owner: &str, fence: u64, since: SystemTime) -> Holder {
        Holder {
            id: id.into(),
            owner: owner.into(),
            peer: "127.0.0.1:5000".into(),
            since,
            fence,
            slot: None,
            mode: Mode::Exclusive,
            labels: Default::default(),
        }
    }

    fn lock(name: &str, kind: Kind, limit: u32, holders: Vec<Holder>) -> LockInfo {
        LockInfo {
            name: name.into(),
            kind,
            mode: Some(Mode::Exclusive),
            limit,
            holders_total: holders.len() as u32,
            holders,
            waiters: vec![],
            waiters_total: 0,
        }
    }

    #[test]
    fn list_is_a_readable_table() {
        let now = at(1000 * 1000);
        let holder = holder("7", "cron", 42, at(1000 * 1000 - 75_000));
        let lock = lock("jobs/nightly", Kind::Semaphore, 3, vec![holder]);
        let text = render_list(&[lock], now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "NAME          KIND       MODE       HOLDERS  WAITERS  FENCE  HELD FOR  OWNER"
        );
        assert_eq!(
            lines[1],
            "jobs/nightly  semaphore  exclusive  1/3      0        42     1m15s     cron"
        );
        assert_eq!(render_list(&[], now), "no locks are held or waited for\n");
    }

    #[test]
    fn show_says_when_nobody_waits() {
        let now = at(1000 * 1000);
        let holder = holder("7", "cron", 42, at(1000 * 1000 - 2_000));
        let mut lock = lock("jobs/nightly", Kind::File, 0, vec![holder]);
        assert_eq!(
            render_show(&lock, now),
            "jobs/nightly (file)\n\n\
             holders:\n\
             ID  MODE       FENCE  SLOT  HELD FOR  PEER            OWNER\n\
             7   exclusive  42     -     2.0s      127.0.0.1:5000  cron\n\
             \n\
             waiters: none\n"
        );
        lock.waiters = vec![Waiter {
            id: "8".into(),
            owner: "bob".into(),
            peer: "127.0.0.1:5001".into(),
            position: 1,
            since: at(1000 * 1000 - 1_500),
            deadline: Some(at(1000 * 1000 + 28_500)),
            mode: Mode::Exclusive,
            labels: Default::default(),
        }];
        lock.waiters_total = 1;
        let text = render_show(&lock, now);
        let waiters: Vec<&str> = text.lines().skip_while(|l| *l != "waiters:").collect();
        assert_eq!(
            waiters,
            [
                "waiters:",
                "POS  ID  MODE       WAITING  GIVES UP IN  PEER            OWNER",
                "1    8   exclusive  1.5s     28.5s        127.0.0.1:5001  bob",
            ]
        );
    }

    #[test]
    fn ages() {
        let now = at(10_000_000);
        assert_eq!(age(at(10_000_000 - 3_250), now), "3.2s");
        assert_eq!(age(at(10_000_000 - 7_500_000), now), "2h05m");
        assert_eq!(gives_up(None, now), "-");
    }
}
