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
