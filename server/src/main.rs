//! `padlockd`: parse the configuration, serve, shut down.

use padlock_server::config::LogFormat;
use std::process::ExitCode;
use std::time::Duration;

/// jemalloc, with a background thread that gives freed memory back to the
/// system: after a flood of lock requests ends, padlockd shrinks again
/// (glibc's malloc kept nearly all of it; see docs/hardening.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let config = match padlock_server::Config::load() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("padlockd: {message}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PADLOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match config.log_format {
        LogFormat::Json => logs.json().with_current_span(true).init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("padlockd: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(padlock_server::run(config));
    // Whatever a task is stuck in, the process ends now: tasks still
    // running are dropped, not waited for.
    runtime.shutdown_timeout(Duration::from_millis(500));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("padlockd: {err}");
            ExitCode::FAILURE
        }
    }
}
