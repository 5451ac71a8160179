//! padlockd's command line: help, and bad values that must stop startup.

use std::process::Command;

fn padlockd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_padlockd"))
}

#[test]
fn help_lists_every_setting_with_its_env_twin() {
    let out = padlockd().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--lock-dir",
        "--keepalive-interval",
        "--keepalive-timeout",
        "--max-message-bytes",
        "--max-waiters-per-lock",
        "--max-semaphore-limit",
        "--shutdown-grace",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    assert!(
        help.contains("PADLOCK_LISTEN") && help.contains("PADLOCK_LOCK_DIR"),
        "{help}"
    );
}

#[test]
fn bad_values_stop_startup_with_a_message_naming_them() {
    let cases: [(&[&str], &str); 3] = [
        (&["--listen", "nowhere"], "--listen"),
        (&["--keepalive-timeout", "soon"], "--keepalive-timeout"),
        (&["--max-locks=-3"], "--max-locks"),
    ];
    for (args, named) in cases {
        let out = padlockd().args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(named),
            "{args:?}: stderr does not name {named}: {err}"
        );
    }
}

#[test]
fn unusable_lock_dir_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let out = padlockd()
        .args(["--listen", "127.0.0.1:0", "--lock-dir"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot use lock directory"), "{err}");
}

/// Starts padlockd with `args` and `env`; `Ok` once it listens (then it is
/// killed), `Err(stderr)` when it exits first.
fn start(args: &[&str], env: &[(&str, &str)]) -> Result<(), String> {
    use std::io::{BufRead, BufReader, Read};
    let dir = tempfile::tempdir().unwrap();
    let mut child = padlockd()
        .args(["--lock-dir", dir.path().to_str().unwrap()])
        .args(args)
        .envs(env.iter().copied())
        .env("PADLOCK_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.starts_with("padlockd listening on ") {
        child.kill().unwrap();
        child.wait().unwrap();
        return Ok(());
    }
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    child.wait().unwrap();
    Err(err)
}

#[test]
fn config_file_env_and_flags_take_precedence_in_that_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("padlockd.toml");
    let config = file.to_str().unwrap();

    // The file alone applies: a bad value in it stops startup, naming the key.
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\nkeepalive_timeout = \"soon\"\n",
    )
    .unwrap();
    let err = start(&["--config", config], &[]).unwrap_err();
    assert!(
        err.contains("key `keepalive_timeout`") && err.contains("soon"),
        "{err}"
    );

    // The environment beats the file: the file's bad value is not used.
    let err = start(
        &["--config", config],
        &[
            ("PADLOCK_KEEPALIVE_TIMEOUT", "2s"),
            ("PADLOCK_LISTEN", "nowhere"),
        ],
    )
    .unwrap_err();
    assert!(
        err.contains("--listen") && err.contains("nowhere"),
        "env beats file for listen: {err}"
    );
    start(
        &["--config", config],
        &[("PADLOCK_KEEPALIVE_TIMEOUT", "2s")],
    )
    .expect("env overrides the bad file value");

    // Flags beat the environment.
    start(
        &["--config", config, "--keepalive-timeout", "1s"],
        &[("PADLOCK_KEEPALIVE_TIMEOUT", "never")],
    )
    .expect("the flag overrides the bad env value");

    // PADLOCK_CONFIG names the file too.
    let err = start(&[], &[("PADLOCK_CONFIG", config)]).unwrap_err();
    assert!(err.contains("key `keepalive_timeout`"), "{err}");

    // Unknown keys are refused.
    std::fs::write(&file, "lsiten = \"127.0.0.1:0\"\n").unwrap();
    let err = start(&["--config", config], &[]).unwrap_err();
    assert!(err.contains("unknown key `lsiten`"), "{err}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::{BufRead, BufReader, Read};
    let dir = tempfile::tempdir().unwrap();
    let mut child = padlockd()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--lock-dir",
            dir.path().to_str().unwrap(),
        ])
        .env("PADLOCK_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("padlockd listening on "), "{line}");
    // SIGTERM: the shutdown is logged too, then the process exits.
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(child.wait().unwrap().success());
    let lines: Vec<&str> = logs.lines().collect();
    assert!(lines.len() >= 2, "{logs}");
    for line in lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            value.get("level").is_some() && value.get("fields").is_some(),
            "{line}"
        );
    }
}

#[test]
fn kinds_must_be_servable() {
    let err = start(&["--listen", "127.0.0.1:0", "--kinds", "redis"], &[]).unwrap_err();
    assert!(
        err.contains("--kinds includes redis, which needs --redis-url"),
        "{err}"
    );
    let err = start(&["--listen", "127.0.0.1:0", "--kinds", "file,nfs"], &[]).unwrap_err();
    assert!(err.contains("nfs"), "{err}");
    start(
        &["--listen", "127.0.0.1:0", "--kinds", "file,semaphore"],
        &[],
    )
    .expect("file and semaphore need nothing else");
}
