//! portalocker's rules for who takes a redis lock, as pure functions: the
//! holder records of one probe in, a decision out. They follow portalocker
//! 4.4.2's `RedisLock` method for method (`_holders_are_compatible`,
//! `_writer_is_elected`, `_must_forfeit`, `_resolve_lock_holders`,
//! `_resolve_exclusive_writer`, `_confirm_probe_verdict`), so a padlockd and
//! a Python process contending for one name elect the same writer.
//!
//! In short: readers join readers; writers advertise `pending`, and the
//! lowest pending holder id is elected, unless another writer already
//! advertises a won election (it keeps it); an elected writer waits for the
//! readers to drain and for undecided lower-id writers to decide, then
//! promotes itself to `exclusive` and confirms with one more probe.

use super::wire::{Record, WireMode};

/// The contender deciding.
#[derive(Debug, Clone, Copy)]
pub(super) struct Me<'a> {
    pub(super) holder_id: &'a str,
    /// A writer (else a reader).
    pub(super) exclusive: bool,
    /// It won an election earlier and advertises it (`writer_elected`).
    pub(super) elected: bool,
    /// A try-lock: it does not wait for readers to drain.
    pub(super) try_once: bool,
}

/// What to do after a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    /// The lock is ours; a writer advertises `exclusive` (and elected),
    /// then confirms.
    Take,
    /// Stay subscribed and probe again, advertising `pending` with this
    /// `elected` (a won election keeps new readers out and later writers
    /// deferring).
    Keep { elected: bool },
    /// Unsubscribe and retry as a fresh contender (the election, if any,
    /// is given up).
    Leave,
}

/// What a promoted writer's confirming probe says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Confirmed,
    /// Inconclusive: probe again (until the probe timeout).
    Retry,
    /// Give the promotion up and retry as a fresh contender.
    Demote,
}

/// `_resolve_lock_holders` and `_resolve_exclusive_writer`: the decision
/// for one probe; `None` holders: an inconclusive probe (the subscriber
/// count moved, or someone did not answer).
pub(super) fn resolve(me: Me<'_>, holders: Option<&[Record]>) -> Decision {
    if let Some(holders) = holders {
        // `_holders_are_compatible`: a reader joins only readers.
        if !me.exclusive && holders.iter().all(|h| h.mode == WireMode::Shared) {
            return Decision::Take;
        }
        if me.exclusive
            && let Some(decision) = resolve_writer(me, holders)
        {
            return decision;
        }
    }
    // An elected writer keeps its election over a noisy probe.
    if holders.is_none() && me.elected {
        return Decision::Keep { elected: true };
    }
    Decision::Leave
}

/// `_resolve_exclusive_writer`; `None`: the election is lost or forfeited.
fn resolve_writer(me: Me<'_>, holders: &[Record]) -> Option<Decision> {
    let shared_present = holders.iter().any(|h| h.mode == WireMode::Shared);
    if me.elected {
        if must_forfeit(me, holders) {
            return None;
        }
        if shared_present {
            return Some(Decision::Keep { elected: true });
        }
        // A lower-id pending writer still saying `elected: false` may be
        // promoting on a stale view: hold the promotion one round.
        let undecided_lower = holders.iter().any(|h| {
            h.holder_id != me.holder_id
                && h.mode == WireMode::Pending
                && h.elected == Some(false)
                && h.holder_id.as_str() < me.holder_id
        });
        if undecided_lower {
            return Some(Decision::Keep { elected: true });
        }
        return Some(Decision::Take);
    }
    if !writer_is_elected(me, holders) {
        return None;
    }
    if !shared_present {
        return Some(Decision::Take);
    }
    if me.try_once {
        // Won, but the readers would have to drain: a try-lock gives up
        // without ever advertising the election.
        return None;
    }
    Some(Decision::Keep { elected: true })
}

/// `_writer_is_elected`: nobody holds exclusively, nobody else advertises
/// a won election, and this writer has the lowest pending holder id.
fn writer_is_elected(me: Me<'_>, holders: &[Record]) -> bool {
    if holders.iter().any(|h| h.mode == WireMode::Exclusive) {
        return false;
    }
    if holders
        .iter()
        .any(|h| h.elected == Some(true) && h.holder_id != me.holder_id)
    {
        return false;
    }
    holders
        .iter()
        .filter(|h| h.mode == WireMode::Pending)
        .map(|h| h.holder_id.as_str())
        .min()
        == Some(me.holder_id)
}

/// `_must_forfeit`: an exclusive holder, a lower-id elected writer, or a
/// lower-id pending writer of portalocker < 4.2 (no `elected` field, it
/// elects itself by the id sort) outranks an election.
fn must_forfeit(me: Me<'_>, holders: &[Record]) -> bool {
    holders
        .iter()
        .filter(|h| h.holder_id != me.holder_id)
        .any(|h| {
            let lower = h.holder_id.as_str() < me.holder_id;
            h.mode == WireMode::Exclusive
                || (h.elected == Some(true) && lower)
                || (h.mode == WireMode::Pending && h.elected.is_none() && lower)
        })
}

/// `_confirm_probe_verdict`, for a writer already advertising `exclusive`.
/// A demote outranks a retry.
pub(super) fn confirm(me: Me<'_>, holders: &[Record]) -> Verdict {
    let mut verdict = Verdict::Confirmed;
    for h in holders.iter().filter(|h| h.holder_id != me.holder_id) {
        if h.mode == WireMode::Shared {
            return Verdict::Demote;
        }
        let lower = h.holder_id.as_str() < me.holder_id;
        if h.mode == WireMode::Exclusive {
            // A legacy or pre-4.2 rival never confirms, so never demotes.
            if h.legacy || h.elected.is_none() || lower {
                return Verdict::Demote;
            }
            continue;
        }
        if !lower {
            continue;
        }
        if h.elected.is_none() {
            return Verdict::Demote;
        }
        verdict = Verdict::Retry;
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    const PENDING: WireMode = WireMode::Pending;
    const SHARED: WireMode = WireMode::Shared;
    const EXCLUSIVE: WireMode = WireMode::Exclusive;

    /// A 4.2+ record (with `elected`).
    fn rec(id: &str, mode: WireMode, elected: bool) -> Record {
        Record {
            holder_id: id.into(),
            mode,
            legacy: false,
            elected: Some(elected),
        }
    }

    /// A portalocker 4.0/4.1 record: no `elected` field.
    fn old(id: &str, mode: WireMode) -> Record {
        Record {
            elected: None,
            ..rec(id, mode, false)
        }
    }

    /// A reply that is not a protocol record: an exclusive holder.
    fn legacy(index: usize) -> Record {
        Record::parse(b"pong", index)
    }

    fn writer(id: &str) -> Me<'_> {
        Me {
            holder_id: id,
            exclusive: true,
            elected: false,
            try_once: false,
        }
    }

    fn elected(id: &str) -> Me<'_> {
        Me {
            elected: true,
            ..writer(id)
        }
    }

    fn reader(id: &str) -> Me<'_> {
        Me {
            exclusive: false,
            ..writer(id)
        }
    }

    fn try_writer(id: &str) -> Me<'_> {
        Me {
            try_once: true,
            ..writer(id)
        }
    }

    use Decision::{Keep, Leave, Take};

    #[test]
    fn decisions_follow_portalocker() {
        let kept = Keep { elected: true };
        let cases: Vec<(&str, Me, Option<Vec<Record>>, Decision)> = vec![
            // Readers join readers only; a pending writer keeps them out.
            (
                "reader among readers",
                reader("b"),
                Some(vec![rec("a", SHARED, false), rec("b", SHARED, false)]),
                Take,
            ),
            (
                "reader behind a pending writer",
                reader("b"),
                Some(vec![rec("a", PENDING, false), rec("b", SHARED, false)]),
                Leave,
            ),
            (
                "reader behind an exclusive holder",
                reader("b"),
                Some(vec![rec("a", EXCLUSIVE, true), rec("b", SHARED, false)]),
                Leave,
            ),
            (
                "reader behind a legacy holder",
                reader("b"),
                Some(vec![legacy(0), rec("b", SHARED, false)]),
                Leave,
            ),
            // portalocker's doctests of _writer_is_elected (holder bbb).
            (
                "lower pending id wins",
                writer("bbb"),
                Some(vec![rec("aaa", PENDING, false), rec("bbb", PENDING, false)]),
                Leave,
            ),
            (
                "lowest pending id takes a free channel",
                writer("bbb"),
                Some(vec![rec("bbb", PENDING, false), rec("ccc", PENDING, false)]),
                Take,
            ),
            (
                "even the lowest defers to an incumbent",
                writer("bbb"),
                Some(vec![rec("bbb", PENDING, false), rec("zzz", PENDING, true)]),
                Leave,
            ),
            // A fresh winner with readers present: waits for them, elected.
            (
                "won, readers drain first",
                writer("a"),
                Some(vec![rec("a", PENDING, false), rec("r", SHARED, false)]),
                kept,
            ),
            (
                "won, try-lock gives up",
                try_writer("a"),
                Some(vec![rec("a", PENDING, false), rec("r", SHARED, false)]),
                Leave,
            ),
            (
                "won, try-lock takes a reader-free channel",
                try_writer("a"),
                Some(vec![rec("a", PENDING, false), rec("b", PENDING, false)]),
                Take,
            ),
            (
                "an exclusive holder: no election",
                writer("a"),
                Some(vec![rec("a", PENDING, false), rec("b", EXCLUSIVE, true)]),
                Leave,
            ),
            (
                "a legacy holder: no election",
                writer("a"),
                Some(vec![rec("a", PENDING, false), legacy(1)]),
                Leave,
            ),
            // An incumbent keeps its election against newcomers...
            (
                "incumbent, lower newcomer",
                elected("m"),
                Some(vec![rec("a", PENDING, false), rec("m", PENDING, true)]),
                kept,
            ),
            (
                "incumbent, readers still there",
                elected("m"),
                Some(vec![rec("m", PENDING, true), rec("r", SHARED, false)]),
                kept,
            ),
            (
                "incumbent, higher pending: takes it",
                elected("m"),
                Some(vec![rec("m", PENDING, true), rec("z", PENDING, false)]),
                Take,
            ),
            (
                "incumbent, higher elected: takes it",
                elected("m"),
                Some(vec![rec("m", PENDING, true), rec("z", PENDING, true)]),
                Take,
            ),
            (
                "incumbent alone: takes it",
                elected("m"),
                Some(vec![rec("m", PENDING, true)]),
                Take,
            ),
            // ...unless the probe outranks it (_must_forfeit).
            (
                "incumbent, an exclusive holder",
                elected("m"),
                Some(vec![rec("m", PENDING, true), rec("z", EXCLUSIVE, true)]),
                Leave,
            ),
            (
                "incumbent, a lower elected rival",
                elected("m"),
                Some(vec![rec("a", PENDING, true), rec("m", PENDING, true)]),
                Leave,
            ),
            (
                "incumbent, a lower 4.1 writer",
                elected("m"),
                Some(vec![old("a", PENDING), rec("m", PENDING, true)]),
                Leave,
            ),
            (
                "incumbent, a higher 4.1 writer",
                elected("m"),
                Some(vec![rec("m", PENDING, true), old("z", PENDING)]),
                Take,
            ),
            (
                "incumbent, a legacy holder",
                elected("m"),
                Some(vec![legacy(0), rec("m", PENDING, true)]),
                Leave,
            ),
            // An inconclusive probe: an incumbent keeps its election.
            ("inconclusive, incumbent", elected("m"), None, kept),
            ("inconclusive, fresh writer", writer("m"), None, Leave),
            ("inconclusive, reader", reader("m"), None, Leave),
        ];
        for (what, me, holders, want) in cases {
            assert_eq!(resolve(me, holders.as_deref()), want, "{what}");
        }
    }

    #[test]
    fn confirmation_follows_portalocker() {
        use Verdict::{Confirmed, Demote, Retry};
        let me = writer("m");
        let cases: Vec<(&str, Vec<Record>, Verdict)> = vec![
            ("alone", vec![rec("m", EXCLUSIVE, true)], Confirmed),
            (
                "a reader",
                vec![rec("m", EXCLUSIVE, true), rec("r", SHARED, false)],
                Demote,
            ),
            (
                "a lower exclusive rival",
                vec![rec("a", EXCLUSIVE, true), rec("m", EXCLUSIVE, true)],
                Demote,
            ),
            (
                "a higher exclusive rival demotes itself",
                vec![rec("m", EXCLUSIVE, true), rec("z", EXCLUSIVE, true)],
                Confirmed,
            ),
            (
                "a higher 4.1 exclusive rival never does",
                vec![rec("m", EXCLUSIVE, true), old("z", EXCLUSIVE)],
                Demote,
            ),
            (
                "a legacy rival",
                vec![rec("m", EXCLUSIVE, true), legacy(0)],
                Demote,
            ),
            (
                "a lower 4.1 pending writer",
                vec![old("a", PENDING), rec("m", EXCLUSIVE, true)],
                Demote,
            ),
            (
                "a lower undecided writer",
                vec![rec("a", PENDING, false), rec("m", EXCLUSIVE, true)],
                Retry,
            ),
            (
                "a higher pending writer defers",
                vec![rec("m", EXCLUSIVE, true), rec("z", PENDING, false)],
                Confirmed,
            ),
            (
                "a demote outranks a retry",
                vec![
                    rec("a", PENDING, false),
                    rec("m", EXCLUSIVE, true),
                    rec("r", SHARED, false),
                ],
                Demote,
            ),
        ];
        for (what, holders, want) in cases {
            assert_eq!(confirm(me, &holders), want, "{what}");
        }
    }
}
