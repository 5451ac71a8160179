//! Hostile and malformed requests: every one ends its Hold stream with a
//! precise gRPC status and a message a person can act on, the same padlockd
//! keeps granting locks afterwards, and nothing outside the lock directory
//! is ever created, opened for writing or locked.
//!
//! The SDK never sends most of these, so they go through the raw generated
//! client.

use padlock::proto as pb;
use padlock_e2e::{Server, assert_unharmed, eventually_ok};
use pb::hold_request::Msg as Req;
use pb::hold_response::Msg as Resp;
use pb::padlock_client::PadlockClient;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Failure guard for every await on the server (never a synchronization).
const GUARD: Duration = Duration::from_secs(10);

async fn guarded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {GUARD:?}"))
}

/// A raw gRPC client on its own connection.
async fn raw(server: &Server) -> PadlockClient<Channel> {
    let channel = Endpoint::from_shared(server.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect to padlockd");
    PadlockClient::new(channel)
}

fn acquire(name: &str) -> pb::Acquire {
    pb::Acquire {
        name: name.to_string(),
        kind: pb::Kind::File as i32,
        mode: pb::Mode::Exclusive as i32,
        owner: "bad_input test".into(),
        ..pb::Acquire::default()
    }
}

fn semaphore(name: &str, limit: u32) -> pb::Acquire {
    pb::Acquire {
        kind: pb::Kind::Semaphore as i32,
        limit,
        ..acquire(name)
    }
}

fn msg_acquire(a: pb::Acquire) -> pb::HoldRequest {
    pb::HoldRequest {
        msg: Some(Req::Acquire(a)),
    }
}

fn msg_release() -> pb::HoldRequest {
    pb::HoldRequest {
        msg: Some(Req::Release(pb::Release {})),
    }
}

/// One raw Hold stream: our half stays open until this is dropped.
struct RawHold {
    requests: mpsc::Sender<pb::HoldRequest>,
    responses: tonic::Streaming<pb::HoldResponse>,
}

impl RawHold {
    /// Opens a Hold stream and sends `first` on it. `Err` when the server
    /// answered with a status before any message (a trailers-only reply).
    async fn open(client: &PadlockClient<Channel>, first: pb::HoldRequest) -> Result<Self, Status> {
        let (requests, rx) = mpsc::channel(4);
        requests.send(first).await.expect("queue first message");
        let mut client = client.clone();
        let responses = guarded("open Hold", client.hold(ReceiverStream::new(rx)))
            .await?
            .into_inner();
        Ok(RawHold {
            requests,
            responses,
        })
    }

    async fn send(&self, msg: pb::HoldRequest) {
        self.requests.send(msg).await.expect("send on Hold stream");
    }

    /// The next message from the server; panics on a status or stream end.
    async fn next(&mut self) -> Resp {
        match guarded("next Hold message", self.responses.message()).await {
            Ok(Some(pb::HoldResponse { msg: Some(msg) })) => msg,
            other => panic!("expected a Hold message, got {other:?}"),
        }
    }

    /// The status that ends the stream; panics on any message before it.
    async fn status(mut self) -> Status {
        let end = guarded("Hold status", self.responses.message()).await;
        drop(self.requests);
        match end {
            Err(status) => status,
            other => panic!("expected the stream to end with an error status, got {other:?}"),
        }
    }
}

/// Sends one request on a fresh Hold stream and returns the status it ends with.
async fn status_of(client: &PadlockClient<Channel>, first: pb::HoldRequest) -> Status {
    match RawHold::open(client, first).await {
        Err(status) => status,
        Ok(hold) => hold.status().await,
    }
}

/// Asserts the code and that the message contains every fragment.
#[track_caller]
fn assert_status(status: &Status, code: Code, fragments: &[&str], case: &str) {
    assert_eq!(
        status.code(),
        code,
        "{case}: wrong code (message: {:?})",
        status.message()
    );
    for fragment in fragments {
        assert!(
            status.message().contains(fragment),
            "{case}: message {:?} lacks {fragment:?}",
            status.message()
        );
    }
    eprintln!("{case}: {:?} {:?}", status.code(), status.message());
}

/// Waits until the server tracks no lock at all: a refused request leaves
/// nothing behind in the table.
async fn assert_table_empties(server: &Server) {
    let client = server.client().await;
    eventually_ok("the table empties", GUARD, async || {
        let info = client.server_info().await.expect("server info");
        if info.locks == 0 && info.holders == 0 && info.waiters == 0 {
            Ok(())
        } else {
            Err(format!(
                "{} lock(s), {} holder(s), {} waiter(s)",
                info.locks, info.holders, info.waiters
            ))
        }
    })
    .await;
}

/// Every path under `dir` (relative), symlinks not followed.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let entry = entry.expect("dir entry");
            let path = entry.path();
            out.insert(path.strip_prefix(root).expect("prefix").to_path_buf());
            if entry.file_type().expect("file type").is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// Hostile names, symlinks inside the lock directory that point outside,
/// and the boundaries of the length limits, for both file and semaphore
/// kinds; afterwards nothing exists next to the lock directory that was not
/// there before, nothing outside was created or locked, and the same
/// padlockd still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_are_refused_and_nothing_outside_the_lock_dir_is_touched() {
    // The lock directory sits two levels down in a directory of our own, so
    // that `../..` from it still lands somewhere we can watch.
    let base = tempfile::tempdir().expect("tempdir");
    let lock_dir = base.path().join("a/b/locks");
    std::fs::create_dir_all(&lock_dir).expect("lock dir");
    let outside = tempfile::tempdir().expect("outside tempdir");
    let outside_dir = outside.path().join("dir");
    std::fs::create_dir(&outside_dir).expect("outside dir");
    let outside_file = outside.path().join("file");
    std::fs::write(&outside_file, "not padlockd's\n").expect("outside file");

    // Symlinks an attacker (or a careless admin) left in the lock dir.
    use std::os::unix::fs::symlink;
    symlink(&outside_dir, lock_dir.join("escape")).unwrap();
    symlink(&outside_file, lock_dir.join("f")).unwrap();
    symlink(outside_dir.join("created"), lock_dir.join("dangling")).unwrap();
    symlink("../..", lock_dir.join("up")).unwrap();

    let before = tree(base.path());
    let server = Server::start_in(&lock_dir, &[]);
    let client = raw(&server).await;

    let long_name = "a".repeat(1025);
    let long_component = format!("x/{}", "b".repeat(241));
    let name_cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("empty name", String::new(), vec!["the name is empty"]),
        (
            "absolute name",
            "/etc/passwd".into(),
            vec!["'/etc/passwd'", "must be relative"],
        ),
        (
            "dot-dot escape",
            "../../etc/passwd".into(),
            vec!["'.' or '..' path component"],
        ),
        (
            "dot-dot inside",
            "a/../b".into(),
            vec!["'.' or '..' path component"],
        ),
        ("dot", "a/./b".into(), vec!["'.' or '..' path component"]),
        (
            "empty component",
            "a//b".into(),
            vec!["empty path component"],
        ),
        ("trailing slash", "a/".into(), vec!["empty path component"]),
        (
            "NUL",
            "nul\0byte".into(),
            vec!["nul\\0byte", "NUL or another control character"],
        ),
        (
            "newline",
            "new\nline".into(),
            vec!["NUL or another control character"],
        ),
        (
            "reserved state dir",
            ".padlock/fences/file/x".into(),
            vec!["reserved for padlockd's own state"],
        ),
        (
            "over-long name",
            long_name.clone(),
            vec!["the name is 1025 bytes long; the limit is 1024"],
        ),
        (
            "over-long component",
            long_component.clone(),
            vec!["a path component is 241 bytes long; the limit is 240"],
        ),
    ];
    for (case, name, fragments) in &name_cases {
        for (kind, request) in [("file", acquire(name)), ("semaphore", semaphore(name, 2))] {
            let status = status_of(&client, msg_acquire(request)).await;
            let mut want = vec!["invalid lock name"];
            want.extend(fragments);
            assert_status(
                &status,
                Code::InvalidArgument,
                &want,
                &format!("{case} ({kind})"),
            );
            assert_unharmed(&server).await;
        }
    }

    // Names that pass validation but reach outside through a symlink.
    let symlink_cases = [
        ("symlinked dir", acquire("escape/x")),
        ("symlinked dir, new subdir", acquire("escape/new/x")),
        ("symlinked dir, semaphore", semaphore("escape/s", 2)),
        ("symlinked file", acquire("f")),
        ("dangling symlink", acquire("dangling")),
        ("relative symlink up", acquire("up/x")),
        ("relative symlink up, semaphore", semaphore("up/s", 1)),
    ];
    for (case, request) in symlink_cases {
        let status = status_of(&client, msg_acquire(request)).await;
        assert_status(
            &status,
            Code::InvalidArgument,
            &["invalid lock name", "goes through a symlink"],
            case,
        );
        assert_unharmed(&server).await;
    }

    // The documented limits are exactly where they are documented: a
    // 240-byte component and a 1024-byte name are accepted.
    let c240 = "c".repeat(240);
    let d240 = "d".repeat(240);
    let n1024 = format!("{d240}/{d240}/{d240}/{d240}/{}", "g".repeat(60));
    assert_eq!(n1024.len(), 1024);
    let sdk = server.client().await;
    for (what, builder) in [
        ("240-byte component, file", sdk.lock(&c240)),
        (
            "240-byte component, semaphore",
            sdk.lock(&c240).semaphore(3),
        ),
        ("1024-byte name", sdk.lock(&n1024)),
    ] {
        let guard = guarded(what, builder.wait(Duration::from_secs(5)).acquire())
            .await
            .unwrap_or_else(|e| panic!("{what} was refused: {e}"));
        guarded("release", guard.release()).await.expect("release");
    }

    assert_unharmed(&server).await;
    assert_table_empties(&server).await;

    // Nothing new next to (or above) the lock directory...
    let after: BTreeSet<PathBuf> = tree(base.path())
        .into_iter()
        .filter(|p| !p.starts_with("a/b/locks/"))
        .collect();
    let before: BTreeSet<PathBuf> = before
        .into_iter()
        .filter(|p| !p.starts_with("a/b/locks/"))
        .collect();
    assert_eq!(after, before, "something appeared outside the lock dir");
    // ... nothing created through the symlinks ...
    assert_eq!(
        tree(outside.path()),
        BTreeSet::from([PathBuf::from("dir"), PathBuf::from("file")]),
        "something was created outside through a symlink"
    );
    assert_eq!(
        std::fs::read_to_string(&outside_file).unwrap(),
        "not padlockd's\n"
    );
    // ... and the symlinked file is not locked by padlockd.
    let fd = std::fs::File::open(&outside_file).unwrap();
    rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .expect("the file behind the symlink is locked by someone");
    // The symlinks themselves are still symlinks.
    for link in ["escape", "f", "dangling", "up"] {
        let meta = std::fs::symlink_metadata(lock_dir.join(link)).unwrap();
        assert!(meta.file_type().is_symlink(), "{link} was replaced");
    }
    server.assert_alive();
}

/// Semaphore limits: 0, above --max-semaphore-limit, a limit on a file
/// lock, a shared semaphore, and a limit that disagrees with current holders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_limits_are_refused() {
    let server = Server::start_with_args(&["--max-semaphore-limit", "8"]);
    let client = raw(&server).await;

    let status = status_of(&client, msg_acquire(semaphore("sem", 0))).await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &["a semaphore needs a limit of at least 1"],
        "limit 0",
    );
    assert_unharmed(&server).await;

    let status = status_of(&client, msg_acquire(semaphore("sem", 9))).await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &[
            "semaphore limit 9 is above the server's maximum of 8",
            "--max-semaphore-limit",
        ],
        "limit 9 > max 8",
    );
    assert_unharmed(&server).await;

    // The maximum itself is fine.
    let sdk = server.client().await;
    let max = guarded("limit 8", sdk.lock("sem-max").semaphore(8).acquire())
        .await
        .expect("limit 8 (the maximum) is accepted");
    assert_eq!(max.slot(), Some(0));
    guarded("release", max.release()).await.unwrap();

    let status = status_of(
        &client,
        msg_acquire(pb::Acquire {
            limit: 3,
            ..acquire("file-with-limit")
        }),
    )
    .await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &["limit 3 was given for a file lock"],
        "limit on a file lock",
    );
    assert_unharmed(&server).await;

    let status = status_of(
        &client,
        msg_acquire(pb::Acquire {
            mode: pb::Mode::Shared as i32,
            ..semaphore("sem-shared", 2)
        }),
    )
    .await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &["semaphore slots are exclusive"],
        "shared semaphore",
    );
    assert_unharmed(&server).await;

    // Limit mismatch while the semaphore is held with limit 2.
    let held = guarded("hold sem", sdk.lock("sem").semaphore(2).acquire())
        .await
        .expect("semaphore limit 2");
    let status = status_of(&client, msg_acquire(semaphore("sem", 3))).await;
    assert_status(
        &status,
        Code::FailedPrecondition,
        &[
            "semaphore 'sem' has limit 2 while it has holders or waiters",
            "asked for limit 3",
        ],
        "limit mismatch while held",
    );
    // The holder is unaffected and the right limit still gets a slot.
    assert!(held.is_held());
    let second = guarded("second slot", sdk.lock("sem").semaphore(2).try_acquire())
        .await
        .expect("limit 2 again")
        .expect("the second slot is free");
    assert_eq!(second.slot(), Some(1));
    drop(second);
    guarded("release", held.release()).await.unwrap();
    assert_unharmed(&server).await;
    assert_table_empties(&server).await;

    // Once nobody holds or waits, a different limit is fine.
    let relimited = guarded("relimit", sdk.lock("sem").semaphore(3).acquire())
        .await
        .expect("a new limit once the semaphore is idle");
    guarded("release", relimited.release()).await.unwrap();
    server.assert_alive();
}

/// Enum values this server does not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kind_and_mode_are_refused() {
    let server = Server::start();
    let client = raw(&server).await;

    let status = status_of(
        &client,
        msg_acquire(pb::Acquire {
            kind: 99,
            ..acquire("enum")
        }),
    )
    .await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &["unknown kind 99"],
        "kind 99",
    );
    assert_unharmed(&server).await;

    let status = status_of(
        &client,
        msg_acquire(pb::Acquire {
            mode: 99,
            ..acquire("enum")
        }),
    )
    .await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &["unknown mode 99"],
        "mode 99",
    );
    assert_unharmed(&server).await;

    let status = status_of(
        &client,
        msg_acquire(pb::Acquire {
            kind: -1,
            ..acquire("enum")
        }),
    )
    .await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &["unknown kind -1"],
        "kind -1",
    );
    assert_unharmed(&server).await;
    assert_table_empties(&server).await;
    server.assert_alive();
}

/// Messages out of order on a Hold stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_stream_protocol_violations_are_refused() {
    let server = Server::start();
    let client = raw(&server).await;
    let sdk = server.client().await;

    // Release before Acquire.
    let status = status_of(&client, msg_release()).await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &["Release before Acquire"],
        "Release first",
    );
    assert_unharmed(&server).await;

    // A HoldRequest with no message at all.
    let status = status_of(&client, pb::HoldRequest { msg: None }).await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &["empty HoldRequest"],
        "empty HoldRequest",
    );
    assert_unharmed(&server).await;

    // A second Acquire after the grant: refused, and the first lock is
    // released (someone else can take it at once).
    let mut hold = RawHold::open(&client, msg_acquire(acquire("twice")))
        .await
        .expect("open");
    let Resp::Granted(granted) = hold.next().await else {
        panic!("expected Granted");
    };
    hold.send(msg_acquire(acquire("other"))).await;
    let status = hold.status().await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &[
            "a second Acquire on one Hold stream",
            "the lock was released",
        ],
        "second Acquire while holding",
    );
    let next = guarded("take twice", sdk.lock("twice").try_acquire())
        .await
        .expect("try_acquire")
        .expect("the refused stream's lock is free again");
    assert!(next.fence() > granted.fence);
    assert_unharmed(&server).await;

    // A second Acquire while queued: refused, and the queue place is gone.
    let mut hold = RawHold::open(&client, msg_acquire(acquire("twice")))
        .await
        .expect("open");
    let Resp::Queued(queued) = hold.next().await else {
        panic!("expected Queued behind the SDK holder");
    };
    assert_eq!((queued.position, queued.holders), (1, 1));
    hold.send(msg_acquire(acquire("twice"))).await;
    let status = hold.status().await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &["a second Acquire on one Hold stream"],
        "second Acquire while queued",
    );
    guarded("release", next.release()).await.unwrap();
    assert_unharmed(&server).await;
    assert_table_empties(&server).await;
    server.assert_alive();
}

/// A message over --max-message-bytes ends the stream with an error; the
/// connection and the server carry on. Metadata under the byte limit but
/// over the owner/label limits is INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused() {
    let server = Server::start_with_args(&["--max-message-bytes", "4096"]);
    let client = raw(&server).await;

    let status = status_of(
        &client,
        msg_acquire(pb::Acquire {
            owner: "o".repeat(8000),
            ..acquire("big")
        }),
    )
    .await;
    // tonic's decoder refuses the frame before padlockd sees the message.
    assert_status(
        &status,
        Code::OutOfRange,
        &["message length too large", "the limit is: 4096 bytes"],
        "8000-byte owner, --max-message-bytes 4096",
    );
    assert_unharmed(&server).await;

    let labels = (0..20)
        .map(|i| (format!("label-{i}"), "v".repeat(250)))
        .collect();
    let status = status_of(
        &client,
        msg_acquire(pb::Acquire {
            labels,
            ..acquire("big")
        }),
    )
    .await;
    assert_status(
        &status,
        Code::OutOfRange,
        &["message length too large", "the limit is: 4096 bytes"],
        "20 x 250-byte labels, --max-message-bytes 4096",
    );
    assert_unharmed(&server).await;

    // The same raw connection still works for a normal request.
    let mut hold = RawHold::open(&client, msg_acquire(acquire("big")))
        .await
        .expect("open on the same connection");
    assert!(matches!(hold.next().await, Resp::Granted(_)));
    // An oversized second message on a held stream ends it too and frees the lock.
    hold.send(msg_acquire(pb::Acquire {
        owner: "o".repeat(8000),
        ..acquire("big")
    }))
    .await;
    let status = hold.status().await;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let sdk = server.client().await;
    let again = guarded(
        "big free",
        sdk.lock("big").wait(Duration::from_secs(5)).acquire(),
    )
    .await
    .expect("the lock of the stream that sent an oversized message is free");
    drop(again);

    // Under the message limit but over padlockd's own metadata limits.
    let status = status_of(
        &client,
        msg_acquire(pb::Acquire {
            owner: "o".repeat(300),
            ..acquire("meta")
        }),
    )
    .await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &["owner is 300 bytes long; the limit is 256"],
        "300-byte owner",
    );
    assert_unharmed(&server).await;

    let labels = (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
    let status = status_of(
        &client,
        msg_acquire(pb::Acquire {
            labels,
            ..acquire("meta")
        }),
    )
    .await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &["at most 16 labels"],
        "17 labels",
    );
    assert_unharmed(&server).await;
    assert_table_empties(&server).await;
    server.assert_alive();
}

/// More waiters than --max-waiters-per-lock: RESOURCE_EXHAUSTED, and the
/// waiter that fit is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_cap_is_enforced() {
    let server = Server::start_with_args(&["--max-waiters-per-lock", "1"]);
    let client = raw(&server).await;
    let sdk = server.client().await;

    let holder = guarded("holder", sdk.lock("capped").acquire())
        .await
        .expect("holder");
    let mut waiter = RawHold::open(&client, msg_acquire(acquire("capped")))
        .await
        .expect("open waiter");
    let Resp::Queued(queued) = waiter.next().await else {
        panic!("expected Queued");
    };
    assert_eq!(queued.position, 1);

    let status = status_of(&client, msg_acquire(acquire("capped"))).await;
    assert_status(
        &status,
        Code::ResourceExhausted,
        &[
            "lock 'capped' already has 1 waiters",
            "--max-waiters-per-lock",
        ],
        "second waiter with cap 1",
    );
    // Through the SDK too, as a user would see it.
    match guarded("sdk waiter", sdk.lock("capped").acquire()).await {
        Err(padlock::Error::Status(s)) => assert_eq!(s.code(), Code::ResourceExhausted),
        other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
    }
    // Other names are not affected by the cap on this one.
    assert_unharmed(&server).await;

    // The queued waiter is still in line and gets the lock.
    let fence = holder.fence();
    guarded("release", holder.release()).await.unwrap();
    let Resp::Granted(granted) = waiter.next().await else {
        panic!("expected Granted");
    };
    assert!(granted.fence > fence);
    waiter.send(msg_release()).await;
    assert!(matches!(waiter.next().await, Resp::Released(_)));
    assert_unharmed(&server).await;
    assert_table_empties(&server).await;
    server.assert_alive();
}
