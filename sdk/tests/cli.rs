//! The padlock CLI's own surface: help and argument errors (no server).

use std::process::Command;

fn padlock() -> Command {
    Command::new(env!("CARGO_BIN_EXE_padlock"))
}

#[test]
fn help_names_every_command() {
    let out = padlock().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for cmd in ["run", "hold", "list", "show", "bench", "health"] {
        assert!(help.contains(cmd), "--help lacks {cmd}:\n{help}");
    }
}

#[test]
fn unreachable_server_is_a_clear_error() {
    // Port 1 on loopback: nothing listens there.
    let out = padlock()
        .args(["--server", "http://127.0.0.1:1", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to padlockd at http://127.0.0.1:1"),
        "{err}"
    );
}

#[test]
fn run_needs_a_command() {
    let out = padlock().args(["run", "name"]).output().unwrap();
    assert!(!out.status.success());
}
