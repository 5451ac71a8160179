//! Unit tests of the queue rules, against real flocks in a temp directory.

use super::*;
use crate::fds::Descriptors;
use crate::fs::Root;
use crate::kinds::{file::FileKind, semaphore::SemaphoreKind};

fn table(dir: &std::path::Path, limits: Limits) -> LockTable {
    table_with(dir, limits, Descriptors::unlimited())
}

/// Semaphores in these tables take a limit of at most this.
const MAX_SEMAPHORE_LIMIT: u32 = 4;

fn table_with(dir: &std::path::Path, limits: Limits, fds: Arc<Descriptors>) -> LockTable {
    let root = Arc::new(Root::open(dir).unwrap());
    let mut kinds = crate::kinds::Backends::new();
    kinds.serve(Kind::File, FileKind::new(root.clone(), fds.clone()));
    kinds.serve(
        Kind::Semaphore,
        SemaphoreKind::new(root.clone(), fds, MAX_SEMAPHORE_LIMIT),
    );
    let state = root.private_subdir(".padlock").unwrap();
    let fences = fence::Fences::open(&state, Descriptors::unlimited()).unwrap();
    LockTable::new(kinds, fences, limits)
}

fn show(t: &LockTable, name: &str) -> Option<LockView> {
    t.get(Kind::File, name, &Detail::show(0, 1000))
}

fn req(name: &str, mode: Mode) -> AcquireRequest {
    AcquireRequest {
        name: name.into(),
        kind: Kind::File,
        mode,
        limit: 0,
        owner: "test".into(),
        peer: "local".into(),
        labels: BTreeMap::new(),
        wait: None,
        quota: None,
    }
}

fn granted(t: &mut Ticket) -> Option<Grant> {
    loop {
        match t.notices.try_recv() {
            Some(Notice::Granted(g)) => return Some(g),
            Some(Notice::Queued { .. }) => continue,
            Some(other) => panic!("unexpected {other:?}"),
            None => return None,
        }
    }
}

#[tokio::test]
async fn fifo_handoff_with_increasing_fences() {
    let dir = tempfile::tempdir().unwrap();
    let t = table(dir.path(), Limits::default());
    let mut a = t.acquire(req("x", Mode::Exclusive)).unwrap();
    let mut b = t.acquire(req("x", Mode::Exclusive)).unwrap();
    let mut c = t.acquire(req("x", Mode::Exclusive)).unwrap();
    let fa = granted(&mut a).unwrap().fence;
    assert!(granted(&mut b).is_none());
    assert_eq!(show(&t, "x").unwrap().waiters.len(), 2);
    drop(a);
    let fb = granted(&mut b).unwrap().fence;
    assert!(granted(&mut c).is_none());
    drop(b);
    let fc = granted(&mut c).unwrap().fence;
    assert!(fa < fb && fb < fc);
    drop(c);
    assert!(show(&t, "x").is_none(), "idle locks are forgotten");
}

#[tokio::test]
async fn readers_share_and_a_waiting_writer_holds_back_later_readers() {
    let dir = tempfile::tempdir().unwrap();
    let t = table(dir.path(), Limits::default());
    let mut r1 = t.acquire(req("rw", Mode::Shared)).unwrap();
    let mut r2 = t.acquire(req("rw", Mode::Shared)).unwrap();
    assert!(granted(&mut r1).is_some() && granted(&mut r2).is_some());
    let mut w = t.acquire(req("rw", Mode::Exclusive)).unwrap();
    let mut r3 = t.acquire(req("rw", Mode::Shared)).unwrap();
    let mut r4 = t.acquire(req("rw", Mode::Shared)).unwrap();
    assert!(granted(&mut w).is_none() && granted(&mut r3).is_none());
    drop((r1, r2));
    assert!(granted(&mut w).is_some());
    assert!(granted(&mut r3).is_none());
    drop(w);
    assert!(
        granted(&mut r3).is_some() && granted(&mut r4).is_some(),
        "readers at the head are granted together"
    );
}

#[tokio::test]
async fn try_once_fails_without_queueing() {
    let dir = tempfile::tempdir().unwrap();
    let t = table(dir.path(), Limits::default());
    let _a = t.acquire(req("x", Mode::Exclusive)).unwrap();
    let mut r = req("x", Mode::Exclusive);
    r.wait = Some(Duration::ZERO);
    assert!(matches!(
        t.acquire(r),
        Err(LockError::NotAcquired { holders: 1, .. })
    ));
    assert!(show(&t, "x").unwrap().waiters.is_empty());
}

#[tokio::test]
async fn semaphore_limits_are_checked_and_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let t = table(dir.path(), Limits::default());
    let sem = |limit| AcquireRequest {
        kind: Kind::Semaphore,
        limit,
        ..req("s", Mode::Exclusive)
    };
    assert!(matches!(
        t.acquire(sem(0)),
        Err(LockError::InvalidArgument(_))
    ));
    assert!(matches!(
        t.acquire(sem(5)),
        Err(LockError::InvalidArgument(_))
    ));
    let mut a = t.acquire(sem(2)).unwrap();
    let mut b = t.acquire(sem(2)).unwrap();
    let mut c = t.acquire(sem(2)).unwrap();
    assert_eq!(granted(&mut a).unwrap().slot, Some(0));
    assert_eq!(granted(&mut b).unwrap().slot, Some(1));
    assert!(granted(&mut c).is_none());
    assert!(matches!(
        t.acquire(sem(3)),
        Err(LockError::LimitMismatch {
            current: 2,
            requested: 3,
            ..
        })
    ));
    drop(a);
    assert_eq!(granted(&mut c).unwrap().slot, Some(0));
    drop((b, c));
    let mut d = t.acquire(sem(3)).unwrap();
    assert!(
        granted(&mut d).is_some(),
        "the limit is forgotten once the semaphore is idle"
    );
}

#[tokio::test]
async fn caps_and_draining() {
    let dir = tempfile::tempdir().unwrap();
    let t = table(
        dir.path(),
        Limits {
            max_waiters_per_lock: 1,
            max_locks: 1,
            ..Limits::default()
        },
    );
    let mut a = t.acquire(req("x", Mode::Exclusive)).unwrap();
    let mut b = t.acquire(req("x", Mode::Exclusive)).unwrap();
    assert!(matches!(
        t.acquire(req("x", Mode::Exclusive)),
        Err(LockError::TooManyWaiters { .. })
    ));
    assert!(matches!(
        t.acquire(req("y", Mode::Exclusive)),
        Err(LockError::TooManyLocks { .. })
    ));
    assert!(granted(&mut a).is_some());
    t.drain();
    assert!(matches!(
        a.notices.try_recv(),
        Some(Notice::Lost {
            reason: LostReason::Shutdown,
            ..
        })
    ));
    assert!(matches!(b.notices.try_recv(), Some(Notice::Queued { .. })));
    assert!(matches!(
        b.notices.try_recv(),
        Some(Notice::Failed(LockError::Draining))
    ));
    assert!(matches!(
        t.acquire(req("z", Mode::Exclusive)),
        Err(LockError::Draining)
    ));
}

#[tokio::test]
async fn outside_holder_is_waited_for_and_noticed_after_release() {
    let dir = tempfile::tempdir().unwrap();
    let t = table(dir.path(), Limits::default());
    let outside = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.path().join("f"))
        .unwrap();
    rustix::fs::flock(&outside, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let mut a = t.acquire(req("f", Mode::Exclusive)).unwrap();
    assert!(matches!(
        a.notices.recv().await,
        Some(Notice::Queued {
            position: 1,
            holders: 0
        })
    ));
    drop(outside);
    let got = tokio::time::timeout(Duration::from_secs(5), a.notices.recv())
        .await
        .unwrap();
    assert!(matches!(got, Some(Notice::Granted(_))));
}

#[tokio::test]
async fn revoke_tells_the_holder_and_hands_over() {
    let dir = tempfile::tempdir().unwrap();
    let t = table(dir.path(), Limits::default());
    let mut a = t.acquire(req("x", Mode::Exclusive)).unwrap();
    let mut b = t.acquire(req("x", Mode::Exclusive)).unwrap();
    let g = granted(&mut a).unwrap();
    assert!(t.revoke(Kind::File, "x", g.holder_id, LostReason::Revoked, "admin"));
    assert!(matches!(
        a.notices.try_recv(),
        Some(Notice::Lost {
            reason: LostReason::Revoked,
            ..
        })
    ));
    assert!(granted(&mut b).is_some());
    assert!(!t.revoke(Kind::File, "x", g.holder_id, LostReason::Revoked, "again"));
}

#[tokio::test]
async fn events_follow_queue_grant_release() {
    let dir = tempfile::tempdir().unwrap();
    let t = table(dir.path(), Limits::default());
    let mut events = t.subscribe();
    let mut a = t.acquire(req("ev", Mode::Exclusive)).unwrap();
    let mut b = t.acquire(req("ev", Mode::Exclusive)).unwrap();
    let ga = granted(&mut a).unwrap();
    drop(a);
    let gb = granted(&mut b).unwrap();
    assert!(t.revoke(Kind::File, "ev", gb.holder_id, LostReason::Revoked, "test"));
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        assert_eq!(&*e.name, "ev");
        seen.push((
            e.id,
            format!("{:?}", e.what)
                .split([' ', '{'])
                .next()
                .unwrap()
                .to_string(),
        ));
    }
    let expected = [
        (ga.holder_id, "Granted"),
        (gb.holder_id, "Queued"),
        (ga.holder_id, "Released"),
        (gb.holder_id, "Granted"),
        (gb.holder_id, "Lost"),
    ];
    let expected: Vec<(u64, String)> = expected.iter().map(|(i, s)| (*i, s.to_string())).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn processes_sharing_a_directory_take_turns() {
    // Two tables on one directory stand for two padlockd processes.
    let dir = tempfile::tempdir().unwrap();
    let a = table(dir.path(), Limits::default());
    let b = table(dir.path(), Limits::default());
    let mut a1 = a.acquire(req("busy", Mode::Exclusive)).unwrap();
    assert!(granted(&mut a1).is_some());
    let mut a2 = a.acquire(req("busy", Mode::Exclusive)).unwrap();
    let mut b1 = b.acquire(req("busy", Mode::Exclusive)).unwrap();
    assert!(granted(&mut b1).is_none(), "a holds it");
    // a hands over: b announced its waiter, so a leaves the lock free and
    // b's next poll takes it, before a's own next waiter.
    drop(a1);
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match b1.notices.recv().await {
                Some(Notice::Granted(g)) => return g,
                Some(Notice::Queued { .. }) => continue,
                other => panic!("{other:?}"),
            }
        }
    })
    .await
    .expect("b granted at a's handoff");
    assert!(got.fence > 0);
    assert!(granted(&mut a2).is_none(), "a's next waiter waits its turn");
    // And back: a's waiter is now blocked by b, announced, and served at
    // b's release.
    drop(b1);
    let back = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match a2.notices.recv().await {
                Some(Notice::Granted(g)) => return g,
                Some(Notice::Queued { .. }) => continue,
                other => panic!("{other:?}"),
            }
        }
    })
    .await
    .expect("a's waiter granted after b's release");
    assert!(back.fence > got.fence);
}

#[tokio::test]
async fn a_release_after_the_lock_was_taken_away_is_a_loss() {
    let dir = tempfile::tempdir().unwrap();
    let t = table(dir.path(), Limits::default());
    let mut kept = t.acquire(req("r", Mode::Exclusive)).unwrap();
    let g = granted(&mut kept).unwrap();
    assert_eq!(kept.release().await, Ok(()));
    let mut taken = t.acquire(req("r", Mode::Exclusive)).unwrap();
    let g2 = granted(&mut taken).unwrap();
    assert!(g2.fence > g.fence);
    assert!(t.revoke(Kind::File, "r", g2.holder_id, LostReason::Revoked, "admin"));
    match taken.release().await {
        Err(Notice::Lost { reason, .. }) => assert_eq!(reason, LostReason::Revoked),
        other => panic!("a release of a revoked lock must be a loss: {other:?}"),
    }
    assert!(show(&t, "r").is_none());
}

#[tokio::test]
async fn a_lone_process_announces_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let t = table(dir.path(), Limits::default());
    let outside = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.path().join("f"))
        .unwrap();
    rustix::fs::flock(&outside, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let mut a = t.acquire(req("f", Mode::Exclusive)).unwrap();
    assert!(granted(&mut a).is_none());
    let wanted = dir.path().join(".padlock/wanted");
    let notes = walk(&wanted);
    assert!(notes.is_empty(), "no other padlockd, yet {notes:?}");
}

#[tokio::test]
async fn an_announcement_ends_with_the_waiter_it_was_for() {
    // A holds slot 0; B holds slot 1 and is the "outside" for A's waiter.
    let dir = tempfile::tempdir().unwrap();
    let a = table(dir.path(), Limits::default());
    let b = table(dir.path(), Limits::default());
    let sem = |limit| AcquireRequest {
        kind: Kind::Semaphore,
        limit,
        ..req("s", Mode::Exclusive)
    };
    let mut a0 = a.acquire(sem(2)).unwrap();
    assert_eq!(granted(&mut a0).unwrap().slot, Some(0));
    let mut b1 = b.acquire(sem(2)).unwrap();
    assert_eq!(granted(&mut b1).unwrap().slot, Some(1));
    let mut waiter = a.acquire(sem(2)).unwrap();
    assert!(granted(&mut waiter).is_none());
    assert!(
        b.shared.fences.is_wanted("semaphore", "s"),
        "a announced its waiter"
    );
    drop(waiter);
    assert!(
        !b.shared.fences.is_wanted("semaphore", "s"),
        "the announcement outlived its waiter"
    );
    drop((a0, b1));
}

/// Names spread over the shards: pages come in name order with each lock
/// once, the counts and the caps cover every shard, and a holder is found
/// by id wherever it is.
#[tokio::test]
async fn pages_counts_and_caps_span_the_shards() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_locks: 120,
        max_holds: 121,
        ..Limits::default()
    };
    let t = table(dir.path(), limits);
    assert!(t.shared.shards.len() >= 8);
    let mut names: Vec<String> = (0..120)
        .map(|i| format!("n/{:03}", (i * 37) % 120))
        .collect();
    let mut tickets: Vec<Ticket> = names
        .iter()
        .map(|name| t.acquire(req(name, Mode::Exclusive)).unwrap())
        .collect();
    names.sort();
    let used: std::collections::HashSet<usize> = names
        .iter()
        .map(|n| t.shared.hasher.hash_one(n.as_str()) as usize & (t.shared.shards.len() - 1))
        .collect();
    assert!(used.len() > 1, "the names all landed in one shard");
    // Paged by 7, with a cursor, in order.
    let mut seen = Vec::new();
    let mut after: Option<(String, Kind)> = None;
    loop {
        let cursor = after.as_ref().map(|(n, k)| (n.as_str(), *k));
        let page = t.list(None, "n/", cursor, 7, &Detail::LIST);
        assert!(page.locks.len() <= 7);
        seen.extend(page.locks.iter().map(|l| l.name.clone()));
        if !page.more {
            break;
        }
        let last = page.locks.last().expect("a page with more is not empty");
        after = Some((last.name.clone(), last.kind));
    }
    assert_eq!(seen, names);
    // A byte budget that one lock exhausts gives pages of one.
    let tight = Detail {
        byte_budget: 1,
        ..Detail::LIST
    };
    let page = t.list(None, "n/", None, 50, &tight);
    assert_eq!((page.locks.len(), page.more), (1, true));
    assert_eq!(page.locks[0].name, names[0]);
    let totals = t.totals("");
    assert_eq!(
        (totals.locks, totals.holders, totals.holds),
        (120, 120, 120)
    );
    assert_eq!(t.totals("n/00").locks, 10);
    // The caps count every shard.
    assert!(matches!(
        t.acquire(req("other", Mode::Exclusive)),
        Err(LockError::TooManyLocks { cap: 120 })
    ));
    let mut waiter = t.acquire(req(&names[5], Mode::Exclusive)).unwrap();
    assert!(matches!(
        t.acquire(req(&names[6], Mode::Exclusive)),
        Err(LockError::TooManyHolds { cap: 121 })
    ));
    // Revoke by id finds the holder in its shard; its waiter gets it.
    let holder = tickets.iter_mut().find(|tk| tk.name() == names[5]).unwrap();
    let id = holder.id();
    assert_eq!(t.holder_lock(id), Some((names[5].clone(), Kind::File)));
    assert!(t.revoke(Kind::File, &names[5], id, LostReason::Revoked, "test"));
    assert!(granted(&mut waiter).is_some());
    drop(waiter);
    drop(tickets);
    let totals = t.totals("");
    assert_eq!((totals.locks, totals.holders, totals.holds), (0, 0, 0));
    assert_eq!(t.shared.tracked.load(Ordering::Relaxed), 0);
    // With every lock forgotten, the cap admits new names again.
    let _fresh = t.acquire(req("other", Mode::Exclusive)).unwrap();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// The table ends a wait at its deadline though nothing polls the waiter's
/// ticket (a transport stops polling when its client reads nothing), says
/// the wait asked for (as the session's own timer does), and does not
/// grant it afterwards.
#[tokio::test(start_paused = true)]
async fn the_table_ends_an_unpolled_wait_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let t = table(dir.path(), Limits::default());
    let mut a = t.acquire(req("d", Mode::Exclusive)).unwrap();
    assert!(granted(&mut a).is_some());
    let mut waits = req("d", Mode::Exclusive);
    waits.wait = Some(Duration::from_millis(200));
    let mut b = t.acquire(waits).unwrap();
    assert!(granted(&mut b).is_none());
    assert_eq!(show(&t, "d").unwrap().waiters.len(), 1);
    // The clock is paused: this runs every timer due before it, in order.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(show(&t, "d").unwrap().waiters.is_empty(), "left at 200 ms");
    match b.notices.try_recv() {
        Some(Notice::Failed(LockError::NotAcquired { waited, .. })) => {
            assert_eq!(waited, Duration::from_millis(200));
        }
        other => panic!("expected Failed(NotAcquired), got {other:?}"),
    }
    drop(a);
    assert!(b.notices.try_recv().is_none(), "not granted after it");
    assert!(show(&t, "d").is_none(), "nobody holds or waits");
    // Its place under --max-holds comes back with the ticket, once.
    drop(b);
    assert_eq!(t.shared.holds.load(Ordering::Acquire), 0);
}
