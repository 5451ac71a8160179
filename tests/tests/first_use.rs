//! What a new user and an operator meet first, against the real padlockd
//! and the real `padlock` CLI: addresses as people write them, errors that
//! say what is wrong (checked whole, not by prefix), one duration syntax,
//! `show` and revoke without a kind, a waiting line on a terminal, the
//! start-up line, and health checks that agree with `/readyz`.

use padlock::{Kind, LostReason};
use padlock_e2e::http::{PATIENCE, json, token_file};
use padlock_e2e::{
    Server, bin, eventually, own_redis, read_line_starting, until_waiters, wait_child,
};
use reqwest::StatusCode;
use std::io::{BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A started `padlock hold` whose stdout is read line by line.
fn spawn_hold(server: &Server, args: &[&str]) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = server
        .cli()
        .arg("hold")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn padlock hold");
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

fn sigterm(child: &Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
}

fn read_all(mut from: impl Read) -> String {
    let mut text = String::new();
    from.read_to_string(&mut text).unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_takes_host_port_and_localhost() {
    let server = Server::start();
    let port = server.addr.port();
    for address in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let out = server
            .cli()
            .args(["--server", &address, "health"])
            .output()
            .unwrap();
        assert_eq!(
            (stdout(&out), stderr(&out)),
            ("serving\n".into(), String::new()),
            "{address}"
        );
        let out = server
            .cli()
            .args(["--server", &address, "list"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{address}: {}", stderr(&out));
    }
}

/// Something on a port that is not padlockd: an HTTP/1.1 server, and one
/// that closes every connection at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_says_when_a_port_is_not_a_padlockd() {
    let http1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http1_port = http1.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in http1.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::Write;
                let mut conn = conn;
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
                // Kept open, as a keep-alive server does, until the client
                // goes.
                while conn.read(&mut buf).is_ok_and(|n| n > 0) {}
            });
        }
    });
    let closer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closer_port = closer.local_addr().unwrap().port();
    std::thread::spawn(move || closer.incoming().for_each(drop));

    let out = Command::new(bin("padlock"))
        .args(["--server", &format!("127.0.0.1:{http1_port}"), "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "padlock: http://127.0.0.1:{http1_port} is not a padlockd: it does not speak gRPC \
             over HTTP/2\n"
        )
    );
    let out = Command::new(bin("padlock"))
        .args(["--server", &format!("127.0.0.1:{closer_port}"), "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "padlock: http://127.0.0.1:{closer_port} closed the connection without answering: \
             it is not a padlockd, it serves https://, or it is at its connection limit\n"
        )
    );
    // A port that takes no connection (its backlog is full): a command
    // that locks (over the lean transport) is told once the connect
    // timeout passes, not after a second try over gRPC.
    let full = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::STREAM,
        None,
    )
    .unwrap();
    rustix::net::bind(&full, &std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    rustix::net::listen(&full, 0).unwrap();
    let full_addr =
        std::net::SocketAddr::try_from(rustix::net::getsockname(&full).unwrap()).unwrap();
    let _queued = std::net::TcpStream::connect(full_addr).unwrap();
    let started = std::time::Instant::now();
    let out = Command::new(bin("padlock"))
        .args(["--server", &full_addr.to_string(), "run", "x", "--", "true"])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "padlock: cannot connect to padlockd at http://{full_addr}: no connection within 10s\n"
        )
    );
    assert!(took < std::time::Duration::from_secs(15), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_and_get_look_in_every_kind() {
    let server = Server::start();
    let client = server.client().await;
    let gpu = client
        .lock("gpu")
        .semaphore(2)
        .owner("trainer")
        .acquire()
        .await
        .unwrap();

    // The CLI: found as a semaphore without --kind; not as a file.
    let out = server.cli().args(["show", "gpu"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = stdout(&out);
    assert!(shown.starts_with("gpu (semaphore, limit 2)\n"), "{shown}");
    assert!(shown.contains("trainer"), "{shown}");
    let out = server
        .cli()
        .args(["show", "--kind", "file", "gpu"])
        .output()
        .unwrap();
    assert_eq!(
        (out.status.code(), stderr(&out)),
        (
            Some(1),
            "padlock: nobody holds or waits for file lock 'gpu'\n".into()
        )
    );
    let out = server.cli().args(["show", "nothing"]).output().unwrap();
    assert_eq!(
        stderr(&out),
        "padlock: nobody holds or waits for a lock named 'nothing' (of any kind)\n"
    );

    // HTTP: the same, and a name held in two kinds is ambiguous (300).
    let http = padlock_e2e::http::client();
    let base = &server.url;
    let (status, body) = json(http.get(format!("{base}/v1/locks/gpu"))).await;
    assert_eq!(
        (status, &body["kind"]),
        (StatusCode::OK, &"semaphore".into())
    );
    let file = client.lock("gpu").owner("editor").acquire().await.unwrap();
    let (status, body) = json(http.get(format!("{base}/v1/locks/gpu"))).await;
    assert_eq!(status, StatusCode::MULTIPLE_CHOICES);
    assert_eq!(
        body["error"],
        serde_json::json!({
            "code": "ambiguous_kind",
            "message": "locks of several kinds are named 'gpu': file, semaphore; add ?kind=file \
                        or ?kind=semaphore"
        })
    );
    // The CLI shows both, each with its kind.
    let out = server.cli().args(["show", "gpu"]).output().unwrap();
    let shown = stdout(&out);
    assert!(
        shown.starts_with("gpu (file)\n") && shown.contains("\ngpu (semaphore, limit 2)\n"),
        "{shown}"
    );
    file.release().await.unwrap();
    gpu.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_of_hold_says_that_hold_is_a_post() {
    let server = Server::start();
    let response = padlock_e2e::http::client()
        .get(format!("{}/v1/locks/deploy/hold", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()["allow"], "POST");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body["error"],
        serde_json::json!({
            "code": "method_not_allowed",
            "message": "holding a lock is a POST: curl -N -X POST .../v1/locks/deploy/hold \
                        (and no lock is named 'deploy/hold')"
        })
    );
    // A lock really named "x/hold" is still shown.
    let client = server.client().await;
    let guard = client.lock("x/hold").acquire().await.unwrap();
    let (status, body) =
        json(padlock_e2e::http::client().get(format!("{}/v1/locks/x/hold", server.url))).await;
    assert_eq!((status, &body["name"]), (StatusCode::OK, &"x/hold".into()));
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_by_holder_id_alone_and_the_lost_message_says_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), "admin-secret");
    let server = Server::start_with_args(&["--admin-token-file", token.to_str().unwrap()]);
    let client = server.client().await;
    let http = padlock_e2e::http::client();
    let base = &server.url;

    // A semaphore holder, revoked with neither kind nor name.
    let slot = client.lock("gpu").semaphore(2).acquire().await.unwrap();
    let url = format!("{base}/v1/holders/{}", slot.holder_id());
    let (status, _) = json(http.delete(&url)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = json(http.delete(&url).bearer_auth("admin-secret")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"revoked": {"name": "gpu", "kind": "semaphore", "id": slot.holder_id()}})
    );
    let lost = tokio::time::timeout(PATIENCE, slot.lost()).await.unwrap();
    assert_eq!(lost.reason, LostReason::Revoked);
    let message = format!("{}", padlock::Error::Lost(lost));
    let peer = message
        .strip_prefix("lock lost: revoked by an administrator over HTTP, from 127.0.0.1:")
        .unwrap_or_else(|| panic!("{message}"));
    assert!(peer.parse::<u16>().is_ok(), "{message}");
    let (status, body) = json(http.delete(&url).bearer_auth("admin-secret")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body["error"]["message"],
        format!("no holder has id {}", slot.holder_id())
    );

    // The lock's own route needs no kind either.
    let slot = client.lock("gpu").semaphore(2).acquire().await.unwrap();
    let (status, body) = json(
        http.delete(format!("{base}/v1/locks/gpu/holders/{}", slot.holder_id()))
            .bearer_auth("admin-secret"),
    )
    .await;
    assert_eq!(
        (status, &body["revoked"]["kind"]),
        (StatusCode::OK, &"semaphore".into())
    );
    tokio::time::timeout(PATIENCE, slot.lost()).await.unwrap();

    // The CLI holder says it once, and exits 70.
    let (mut hold, mut out) = spawn_hold(&server, &["deploy"]);
    let granted = read_line_starting(&mut out, "granted deploy ");
    let id = granted.rsplit("holder=").next().unwrap().to_string();
    let (status, _) = json(
        http.delete(format!("{base}/v1/holders/{id}"))
            .bearer_auth("admin-secret"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let status = wait_child(&mut hold, PATIENCE).expect("padlock hold exits once revoked");
    assert_eq!(status.code(), Some(70));
    let err = read_all(hold.stderr.take().unwrap());
    let rest = err
        .strip_prefix("padlock: lock lost: revoked by an administrator over HTTP, from 127.0.0.1:")
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        rest.trim_end().parse::<u16>().is_ok() && rest.ends_with('\n'),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_acquired_says_who_holds_it() {
    let server = Server::start();
    let client = server.client().await;
    let guard = client
        .lock("report")
        .owner("alice")
        .acquire()
        .await
        .unwrap();
    let out = server
        .cli()
        .args(["hold", "--wait", "0", "report"])
        .output()
        .unwrap();
    assert_eq!(
        (out.status.code(), stderr(&out)),
        (
            Some(75),
            "padlock: not acquired: lock 'report' is held by alice (tried once)\n".into()
        )
    );
    let out = server
        .cli()
        .args(["run", "--wait", "200ms", "report", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(
        (out.status.code(), stderr(&out)),
        (
            Some(75),
            "padlock: not acquired: lock 'report' is held by alice and was not acquired within \
             200ms\n"
                .into()
        )
    );
    // --wait 1m: granted once alice lets go.
    let (mut hold, mut out) = spawn_hold(&server, &["--wait", "1m", "report"]);
    until_waiters(&client, "report", Kind::File, 1).await;
    guard.release().await.unwrap();
    read_line_starting(&mut out, "granted report ");
    sigterm(&hold);
    read_line_starting(&mut out, "released");
    assert!(wait_child(&mut hold, PATIENCE).unwrap().success());
    // Not a terminal: nothing was said while it waited.
    assert_eq!(read_all(hold.stderr.take().unwrap()), "");
}

/// `padlock ARGS` on a terminal of its own (`script` from util-linux),
/// killed when dropped; what it shows is read with a time limit.
struct Terminal {
    child: Child,
    screen: mpsc::Receiver<String>,
    seen: String,
}

impl Terminal {
    fn run(server: &Server, args: &str) -> Terminal {
        let mut child = Command::new("script")
            .args([
                "-qfec",
                &format!("exec {} {args}", bin("padlock").display()),
                "/dev/null",
            ])
            .env("PADLOCK_SERVER", &server.url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("script(1) from util-linux runs the CLI on a terminal");
        let (tx, screen) = mpsc::channel::<String>();
        let mut out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0
                    || tx
                        .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                        .is_err()
                {
                    break;
                }
            }
        });
        Terminal {
            child,
            screen,
            seen: String::new(),
        }
    }

    /// Reads until the screen shows `wanted`; panics after [`PATIENCE`].
    fn until(&mut self, wanted: &str) {
        let deadline = std::time::Instant::now() + PATIENCE;
        while !self.seen.contains(wanted) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.screen.recv_timeout(left) {
                Ok(text) => self.seen.push_str(&text),
                Err(_) => panic!("no {wanted:?} on the terminal; it shows:\n{:?}", self.seen),
            }
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        // The pty closes with script, and the CLI on it gets SIGHUP.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// On a terminal, a waiting `padlock hold` says what it waits for, in
/// place; `-q` keeps it quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_hold_shows_its_place_on_a_terminal() {
    let server = Server::start();
    let client = server.client().await;
    let guard = client
        .lock("deploy")
        .owner("alice")
        .acquire()
        .await
        .unwrap();

    let mut tty = Terminal::run(&server, "hold deploy");
    tty.until("waiting for file lock 'deploy': 1 of 1 in line, held by alice for ");
    tty.until("; waited ");
    guard.release().await.unwrap();
    tty.until("granted deploy ");
    // The waiting line was cleared before the grant was printed.
    let before = &tty.seen[..tty.seen.find("granted deploy ").unwrap()];
    assert!(before.ends_with("\r\x1b[K"), "{before:?}");
    drop(tty);

    // -q on a terminal: only the grant.
    let guard = client
        .lock("deploy")
        .owner("alice")
        .acquire()
        .await
        .unwrap();
    let mut quiet = Terminal::run(&server, "hold -q deploy");
    until_waiters(&client, "deploy", Kind::File, 1).await;
    guard.release().await.unwrap();
    quiet.until("granted deploy ");
    assert!(
        quiet.seen.starts_with("granted deploy "),
        "{:?}",
        quiet.seen
    );
}

/// The start-up line, `--listen` as people write it, and padlockd's flag
/// errors.
#[test]
fn padlockd_takes_a_bare_port_and_says_where_the_dashboard_is() {
    let dir = tempfile::tempdir().unwrap();
    for (listen, host) in [("0", "127.0.0.1"), ("localhost:0", "127.0.0.1")] {
        let mut child = Command::new(bin("padlockd"))
            .args(["--listen", listen, "--idle-timeout", "1h", "--lock-dir"])
            .arg(dir.path())
            .env("PADLOCK_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let line = read_line_starting(&mut out, "padlockd listening on ");
        let _ = child.kill();
        let _ = child.wait();
        let addr = line
            .strip_prefix(&format!("padlockd listening on {host}:"))
            .unwrap_or_else(|| panic!("--listen {listen}: {line}"));
        let port = addr.split(' ').next().unwrap();
        assert_eq!(
            line,
            format!(
                "padlockd listening on {host}:{port} (gRPC and HTTP; the dashboard is at \
                 http://{host}:{port}/)"
            )
        );
    }

    let out = Command::new(bin("padlockd"))
        .args(["--redis-url", "127.0.0.1:6379"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        "padlockd: invalid value '127.0.0.1:6379' for '--redis-url <REDIS_URL>': \
         '127.0.0.1:6379' lacks the scheme: write redis://127.0.0.1:6379 (or \
         redis://:PASSWORD@127.0.0.1:6379)\n"
    );
    let out = Command::new(bin("padlockd"))
        .args(["--idle-timeout", "2d"])
        .output()
        .unwrap();
    assert_eq!(
        stderr(&out),
        "padlockd: invalid value '2d' for '--idle-timeout <IDLE_TIMEOUT>': unknown unit 'd' \
         in '2d' (use ms, s, m or h)\n"
    );
    let out = Command::new(bin("padlockd"))
        .arg("--help")
        .output()
        .unwrap();
    let help = stdout(&out);
    assert!(
        help.contains("Address for gRPC, HTTP and the dashboard"),
        "{help}"
    );
}

/// `padlock health`, the gRPC health service and `/readyz` say the same:
/// not ready while Redis is down, ready again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_agrees_with_readyz_when_redis_is_down() {
    let Some(mut redis) = own_redis() else {
        return;
    };
    let server = Server::on_redis(&redis);
    let http = padlock_e2e::http::client();
    let readyz = format!("{}/readyz", server.url);
    let health = |server: &Server| server.cli().arg("health").output().unwrap();

    let (status, _) = json(http.get(&readyz)).await;
    assert_eq!(status, StatusCode::OK);
    let out = health(&server);
    assert_eq!(
        (out.status.code(), stdout(&out)),
        (Some(0), "serving\n".into())
    );

    redis.kill9();
    eventually("/readyz says 503 with Redis down", PATIENCE, async || {
        let (status, body) = json(http.get(&readyz)).await;
        (status == StatusCode::SERVICE_UNAVAILABLE).then_some(body)
    })
    .await;
    let out = eventually(
        "padlock health fails with Redis down",
        PATIENCE,
        async || {
            let out = health(&server);
            (out.status.code() == Some(1)).then_some(out)
        },
    )
    .await;
    assert_eq!(
        stderr(&out),
        "padlock: padlockd is not ready: it is shutting down, or a backend it serves (Redis) is \
         down (its /readyz says which)\n"
    );
    // /healthz is liveness: still 200.
    let (status, _) = json(http.get(format!("{}/healthz", server.url))).await;
    assert_eq!(status, StatusCode::OK);

    redis.restart();
    eventually("ready again once Redis is back", PATIENCE, async || {
        let (status, _) = json(http.get(&readyz)).await;
        let out = health(&server);
        (status == StatusCode::OK && out.status.success()).then_some(())
    })
    .await;
}
