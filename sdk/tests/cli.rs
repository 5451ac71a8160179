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
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "padlock: connection refused: is padlockd running at http://127.0.0.1:1?\n"
    );
    // host:port means http://host:port.
    let out = padlock()
        .args(["--server", "127.0.0.1:1", "list"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "padlock: connection refused: is padlockd running at http://127.0.0.1:1?\n"
    );
}

#[test]
fn run_without_a_command_says_how_before_connecting() {
    // No server anywhere: the usage mistake is told, not the connection.
    let out = padlock()
        .args(["--server", "http://127.0.0.1:1", "run", "myjob"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "padlock: run needs the command to run, after `--`: \
         padlock run myjob -- COMMAND [ARGS...]\n"
    );
}

#[test]
fn help_groups_connection_flags_and_lists_exit_codes() {
    let out = padlock().args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let (lock_part, connection) = help
        .split_once("Connection:")
        .unwrap_or_else(|| panic!("no Connection heading:\n{help}"));
    for flag in ["--server", "--ca-cert", "--token-file"] {
        assert!(
            connection.contains(flag),
            "{flag} not under Connection:\n{help}"
        );
        assert!(
            !lock_part.contains(flag),
            "{flag} among the lock flags:\n{help}"
        );
    }
    for code in ["75 ", "70 ", "2    bad usage"] {
        assert!(
            help.contains(code),
            "exit code {code} not in run --help:\n{help}"
        );
    }
    let out = padlock().args(["show", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("The lock's name"), "{help}");
    assert!(help.contains("look in every kind"), "{help}");
}

#[test]
fn wait_takes_one_duration_syntax() {
    let out = padlock()
        .args([
            "--server",
            "http://127.0.0.1:1",
            "hold",
            "--wait",
            "1m",
            "x",
        ])
        .output()
        .unwrap();
    // Parsed: the failure is the connection, not the flag.
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "padlock: connection refused: is padlockd running at http://127.0.0.1:1?\n"
    );
    let out = padlock()
        .args(["hold", "--wait", "5 parsecs", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: invalid value '5 parsecs' for '--wait <DURATION>': "),
        "{err}"
    );
}
