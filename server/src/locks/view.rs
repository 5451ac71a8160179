//! Read-only views of the table, for inspection, in bounded pieces.
//!
//! A lock may have thousands of waiters, each with labels, and a server
//! tens of thousands of locks: a view never copies all of it. A page holds
//! at most so many locks, each lock at most so many holders and waiters
//! (with their totals, so a reader knows what was left out), and stops
//! early once its estimated size reaches a byte budget. The work done under
//! a shard's mutex is bounded by the page, not by the table.

use super::{Key, Kind, Lock, LockTable, Mode, Totals};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

/// A read-only view of one lock.
#[derive(Debug, Clone)]
pub struct LockView {
    pub name: String,
    pub kind: Kind,
    pub mode: Option<Mode>,
    pub limit: u32,
    /// The first holders (in grant order), at most [`Detail::max_holders`].
    pub holders: Vec<HolderView>,
    /// Waiters in queue order, from [`Detail::waiter_offset`], at most
    /// [`Detail::max_waiters`].
    pub waiters: Vec<WaiterView>,
    pub holders_total: usize,
    pub waiters_total: usize,
}

#[derive(Debug, Clone)]
pub struct HolderView {
    pub id: u64,
    pub owner: String,
    pub peer: String,
    pub since: SystemTime,
    pub fence: u64,
    pub slot: Option<u32>,
    pub mode: Mode,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct WaiterView {
    pub id: u64,
    pub owner: String,
    pub peer: String,
    pub position: u32,
    pub since: SystemTime,
    /// When it gives up, if it has a wait.
    pub deadline: Option<SystemTime>,
    pub mode: Mode,
    pub labels: BTreeMap<String, String>,
}

/// How much of each lock a view shows.
#[derive(Debug, Clone)]
pub struct Detail {
    pub max_holders: usize,
    /// Waiters skipped from the head of the queue.
    pub waiter_offset: usize,
    pub max_waiters: usize,
    /// A page (or one lock) stops growing past about this many bytes of
    /// names, owners, peers and labels.
    pub byte_budget: usize,
}

impl Detail {
    /// Lists: a glimpse of each lock.
    pub const LIST: Detail = Detail {
        max_holders: 16,
        waiter_offset: 0,
        max_waiters: 16,
        byte_budget: 1 << 20,
    };

    /// One lock: more of it, in pages of waiters.
    pub fn show(waiter_offset: usize, max_waiters: usize) -> Detail {
        Detail {
            max_holders: 1000,
            waiter_offset,
            max_waiters,
            byte_budget: 1 << 20,
        }
    }
}

/// One page of locks.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub locks: Vec<LockView>,
    /// More locks follow this page (after its last one).
    pub more: bool,
}

/// Bytes a view of an entry costs, roughly, once encoded: its text plus
/// the fixed fields.
fn cost(owner: &str, peer: &str, labels: &BTreeMap<String, String>) -> usize {
    160 + owner.len()
        + peer.len()
        + labels
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>()
}

/// The locks whose name starts with `prefix`, in order.
pub(super) fn under<'a>(
    locks: &'a BTreeMap<Key, Lock>,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a Key, &'a Lock)> {
    // Keys sort by name, then kind; `Kind::ALL` is in order.
    let start: Key = (Arc::from(prefix), Kind::ALL[0]);
    locks
        .range((Bound::Included(start), Bound::Unbounded))
        .take_while(move |((name, _), _)| name.starts_with(prefix))
}

/// The first `max` keys, in order, of the locks after `after` whose name
/// starts with `prefix` (and of `kind`, if given): one shard's share of a
/// page. Cloning a key is a reference count, so the work under a shard's
/// mutex is bounded by the page, not by the table.
pub(super) fn keys(
    locks: &BTreeMap<Key, Lock>,
    kind: Option<Kind>,
    prefix: &str,
    after: Option<(&str, Kind)>,
    max: usize,
) -> Vec<Key> {
    let start = match after {
        Some((name, kind)) if name >= prefix => Bound::Excluded((Arc::<str>::from(name), kind)),
        _ => Bound::Included((Arc::<str>::from(prefix), Kind::ALL[0])),
    };
    locks
        .range((start, Bound::Unbounded))
        .take_while(|((name, _), _)| name.starts_with(prefix))
        .filter(|((_, k), _)| kind.is_none_or(|want| *k == want))
        .take(max)
        .map(|(key, _)| key.clone())
        .collect()
}

pub(super) fn view(key: &Key, lock: &Lock, detail: &Detail) -> LockView {
    view_costed(key, lock, detail).0
}

/// The view of one lock within `detail`, and the bytes it costs.
pub(super) fn view_costed(key: &Key, lock: &Lock, detail: &Detail) -> (LockView, usize) {
    let mut spent = 100 + key.0.len();
    let mut holders = Vec::new();
    for h in lock.holders.iter().take(detail.max_holders) {
        let e = &h.entry;
        spent += cost(&e.owner, &e.peer, &e.labels);
        holders.push(HolderView {
            id: e.id,
            owner: e.owner.clone(),
            peer: e.peer.clone(),
            since: e.since,
            fence: h.fence,
            slot: h.held.slot,
            mode: e.mode,
            labels: e.labels.clone(),
        });
        if spent >= detail.byte_budget {
            break;
        }
    }
    let mut waiters = Vec::new();
    let queue = lock.waiters.iter().enumerate().skip(detail.waiter_offset);
    for (i, w) in queue.take(detail.max_waiters) {
        if spent >= detail.byte_budget {
            break;
        }
        spent += cost(&w.owner, &w.peer, &w.labels);
        waiters.push(WaiterView {
            id: w.id,
            owner: w.owner.clone(),
            peer: w.peer.clone(),
            position: i as u32 + 1,
            since: w.since,
            deadline: w.deadline,
            mode: w.mode,
            labels: w.labels.clone(),
        });
    }
    let view = LockView {
        name: key.0.to_string(),
        kind: key.1,
        mode: lock.holders.first().map(|h| h.entry.mode),
        limit: lock.limit,
        holders,
        waiters,
        holders_total: lock.holders.len(),
        waiters_total: lock.waiters.len(),
    };
    (view, spent)
}

impl LockTable {
    /// A page of the locks with holders or waiters whose name starts with
    /// `prefix` (and of `kind`, if given), in (name, kind) order, after the
    /// lock `after`: at most `limit` locks, and fewer when their details
    /// reach `detail.byte_budget`.
    pub fn list(
        &self,
        kind: Option<Kind>,
        prefix: &str,
        after: Option<(&str, Kind)>,
        limit: usize,
        detail: &Detail,
    ) -> Page {
        // The first `limit + 1` matching keys of each shard, merged: the
        // page's keys and whether more follow. Then each lock is viewed
        // under its own shard's mutex (one that ended meanwhile is gone).
        let mut found: Vec<Key> = Vec::new();
        for st in self.each_shard() {
            found.extend(keys(
                &st.locks,
                kind,
                prefix,
                after,
                limit.saturating_add(1),
            ));
        }
        found.sort_unstable();
        let mut page = Page::default();
        let mut spent = 0;
        for key in found {
            if page.locks.len() >= limit || (spent >= detail.byte_budget && !page.locks.is_empty())
            {
                page.more = true;
                break;
            }
            let budget = Detail {
                byte_budget: detail.byte_budget.saturating_sub(spent),
                ..detail.clone()
            };
            let st = self.shard(&key);
            if let Some(lock) = st.locks.get(&key) {
                let (view, used) = view_costed(&key, lock, &budget);
                spent += used;
                page.locks.push(view);
            }
        }
        page
    }

    /// One lock, if it has holders or waiters, with at most what `detail`
    /// allows of its holders and waiters.
    pub fn get(&self, kind: Kind, name: &str, detail: &Detail) -> Option<LockView> {
        let key: Key = (Arc::from(name), kind);
        let st = self.shard(&key);
        st.locks.get(&key).map(|lock| view(&key, lock, detail))
    }

    /// The lock that holder `id` holds, as (name, kind). Looks through
    /// every lock: for an administrator's revoke by id.
    pub fn holder_lock(&self, id: u64) -> Option<(String, Kind)> {
        self.each_shard().find_map(|st| {
            st.locks
                .iter()
                .find(|(_, lock)| lock.holders.iter().any(|h| h.entry.id == id))
                .map(|((name, kind), _)| (name.to_string(), *kind))
        })
    }

    /// Counts, for server info and metrics; `prefix` limits them to the
    /// names starting with it.
    pub fn totals(&self, prefix: &str) -> Totals {
        let mut totals = Totals {
            holds: if prefix.is_empty() {
                self.shared.holds.load(Ordering::Acquire)
            } else {
                0
            },
            ..Totals::default()
        };
        for st in self.each_shard() {
            for (_, lock) in under(&st.locks, prefix) {
                totals.locks += 1;
                totals.holders += lock.holders.len();
                totals.waiters += lock.waiters.len();
            }
        }
        if !prefix.is_empty() {
            totals.holds = totals.holders + totals.waiters;
        }
        totals
    }
}
