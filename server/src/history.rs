//! What happened lately, for the dashboard: the last [`RECENT`] events;
//! for each second of the last [`WINDOW_SECS`], the grants and the peak
//! number of holders and waiters; for each minute, wait and hold times
//! (for percentiles) and which locks were waited for, and how long.
//!
//! Fed by the metrics observer, under the lock table's mutex, so a record
//! is a handful of field updates and one clone, under a mutex of its own
//! that readers hold only while they copy out. Memory is bounded: at most
//! [`RECENT`] events (names and owners are bounded by the table's limits),
//! [`WINDOW_SECS`] seconds, and [`MINUTES`] + 1 minutes that track at most
//! [`TRACKED_PER_MINUTE`] locks each (the rest are counted together).

use crate::locks::{Event, EventKind, Kind};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Events kept for a page that opens now.
pub const RECENT: usize = 500;
/// Seconds of per-second series.
pub const WINDOW_SECS: u64 = 900;
/// Minutes of wait and hold times and contention.
pub const MINUTES: u64 = 15;
/// Locks tracked by name in one minute; the rest go to one bucket.
pub const TRACKED_PER_MINUTE: usize = 256;
/// Queued waits shorter than this are not contention (a Redis lock queues
/// for the round trip of its attempt even when it is free).
const CONTENDED_WAIT: Duration = Duration::from_millis(1);

/// Durations in log-spaced buckets, four per doubling: a percentile is
/// known within about 9%. Microseconds from 1 to 2^40 (12 days).
#[derive(Clone, Debug)]
pub struct Times {
    counts: Vec<u32>,
    count: u64,
    max_us: u64,
}

const STEPS_PER_DOUBLING: f64 = 4.0;
const BUCKETS: usize = 160;

impl Default for Times {
    fn default() -> Times {
        Times {
            counts: vec![0; BUCKETS],
            count: 0,
            max_us: 0,
        }
    }
}

impl Times {
    fn bucket(us: u64) -> usize {
        if us <= 1 {
            return 0;
        }
        ((us as f64).log2() * STEPS_PER_DOUBLING) as usize
    }

    pub fn observe(&mut self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = Times::bucket(us).min(BUCKETS - 1);
        self.counts[i] = self.counts[i].saturating_add(1);
        self.count += 1;
        self.max_us = self.max_us.max(us);
    }

    pub fn merge(&mut self, other: &Times) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
        self.count += other.count;
        self.max_us = self.max_us.max(other.max_us);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max(&self) -> Duration {
        Duration::from_micros(self.max_us)
    }

    /// The `q` quantile (0 < q <= 1): the middle of its bucket, never more
    /// than the largest time seen. `None` when nothing was observed.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0u64;
        for (i, n) in self.counts.iter().enumerate() {
            seen += u64::from(*n);
            if seen >= rank {
                let mid = 2f64.powf((i as f64 + 0.5) / STEPS_PER_DOUBLING);
                let us = (mid as u64).min(self.max_us);
                return Some(Duration::from_micros(us));
            }
        }
        Some(self.max())
    }
}

/// How much one lock was waited for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contention {
    /// Requests that had to queue.
    pub queued: u64,
    /// Grants that came after a wait.
    pub granted_after_wait: u64,
    /// Waits that ended without a grant (timed out, cancelled, gone).
    pub gave_up: u64,
    /// All the time spent waiting, granted or not.
    pub wait_total: Duration,
    pub max_wait: Duration,
    /// The longest queue seen (a waiter's position when it queued).
    pub peak_waiters: u32,
}

impl Contention {
    fn merge(&mut self, other: &Contention) {
        self.queued += other.queued;
        self.granted_after_wait += other.granted_after_wait;
        self.gave_up += other.gave_up;
        self.wait_total += other.wait_total;
        self.max_wait = self.max_wait.max(other.max_wait);
        self.peak_waiters = self.peak_waiters.max(other.peak_waiters);
    }

    fn waited(&mut self, d: Duration) {
        self.wait_total += d;
        self.max_wait = self.max_wait.max(d);
    }
}

/// One second: grants, and the peak and final numbers of holders and
/// waiters (all kinds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Second {
    /// Unix time, in seconds.
    pub at: u64,
    pub grants: u32,
    pub holders: u64,
    pub waiters: u64,
    end_holders: u64,
    end_waiters: u64,
}

#[derive(Default)]
struct Minute {
    /// Unix time, in minutes.
    at: u64,
    grants: u64,
    wait: Times,
    hold: Times,
    locks: HashMap<(Arc<str>, Kind), Contention>,
    /// Locks past [`TRACKED_PER_MINUTE`].
    untracked: Contention,
}

impl Minute {
    fn lock(&mut self, name: &Arc<str>, kind: Kind) -> &mut Contention {
        let key = (name.clone(), kind);
        if self.locks.len() < TRACKED_PER_MINUTE || self.locks.contains_key(&key) {
            self.locks.entry(key).or_default()
        } else {
            &mut self.untracked
        }
    }
}

#[derive(Default)]
struct Inner {
    recent: VecDeque<Event>,
    seconds: VecDeque<Second>,
    /// Holders and waiters at the end of the last second dropped from
    /// `seconds`: the level before the first one kept.
    floor: (u64, u64),
    minutes: VecDeque<Minute>,
}

/// See the module documentation.
#[derive(Default)]
pub struct History {
    inner: Mutex<Inner>,
}

/// One minute, summed up.
#[derive(Clone, Debug)]
pub struct MinuteSummary {
    /// Unix time, in minutes.
    pub at: u64,
    pub grants: u64,
    pub wait: Times,
    pub hold: Times,
}

/// The window, read out by [`History::stats`].
pub struct Stats {
    /// One entry per second, oldest first, ending with the current second.
    pub seconds: Vec<Second>,
    /// Minutes with any event, oldest first.
    pub minutes: Vec<MinuteSummary>,
    pub wait: Times,
    pub hold: Times,
    /// The locks waited for longest in the window, longest first.
    pub contended: Vec<(Arc<str>, Kind, Contention)>,
}

fn unix_secs(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `event`; `holders` and `waiters` are the totals after it;
    /// `queued`: a grant that came after a wait in the queue (not one that
    /// found the lock free).
    pub fn record(&self, event: &Event, holders: u64, waiters: u64, queued: bool) {
        let mut inner = self.inner();
        if inner.recent.len() == RECENT {
            inner.recent.pop_front();
        }
        inner.recent.push_back(event.clone());

        // A clock stepped back counts in the newest second and minute.
        let sec = unix_secs(event.at).max(inner.seconds.back().map_or(0, |s| s.at));
        if inner.seconds.back().is_none_or(|s| s.at < sec) {
            inner.seconds.push_back(Second {
                at: sec,
                ..Second::default()
            });
            while inner
                .seconds
                .front()
                .is_some_and(|s| s.at + WINDOW_SECS <= sec)
            {
                let old = inner.seconds.pop_front().expect("front exists");
                inner.floor = (old.end_holders, old.end_waiters);
            }
        }
        let second = inner.seconds.back_mut().expect("pushed above");
        second.holders = second.holders.max(holders);
        second.waiters = second.waiters.max(waiters);
        second.end_holders = holders;
        second.end_waiters = waiters;
        if matches!(event.what, EventKind::Granted { .. }) {
            second.grants = second.grants.saturating_add(1);
        }

        let minute_at = sec / 60;
        if inner.minutes.back().is_none_or(|m| m.at < minute_at) {
            inner.minutes.push_back(Minute {
                at: minute_at,
                ..Minute::default()
            });
            while inner
                .minutes
                .front()
                .is_some_and(|m| m.at + MINUTES < minute_at)
            {
                inner.minutes.pop_front();
            }
        }
        let minute = inner.minutes.back_mut().expect("pushed above");
        match &event.what {
            EventKind::Queued { position, .. } => {
                let lock = minute.lock(&event.name, event.kind);
                lock.queued += 1;
                lock.peak_waiters = lock.peak_waiters.max(*position);
            }
            EventKind::Granted { waited, .. } => {
                minute.grants += 1;
                minute.wait.observe(*waited);
                if queued && *waited >= CONTENDED_WAIT {
                    let lock = minute.lock(&event.name, event.kind);
                    lock.granted_after_wait += 1;
                    lock.waited(*waited);
                }
            }
            EventKind::Released { held_for } | EventKind::Lost { held_for, .. } => {
                minute.hold.observe(*held_for);
            }
            EventKind::Abandoned { waited } => {
                let lock = minute.lock(&event.name, event.kind);
                lock.gave_up += 1;
                lock.waited(*waited);
            }
        }
    }

    /// The newest `limit` recorded events that `wanted` accepts, oldest
    /// first.
    pub fn recent(&self, limit: usize, wanted: impl Fn(&Event) -> bool) -> Vec<Event> {
        let inner = self.inner();
        let mut events: Vec<Event> = inner
            .recent
            .iter()
            .rev()
            .filter(|e| wanted(e))
            .take(limit)
            .cloned()
            .collect();
        events.reverse();
        events
    }

    /// The window ending at `now`: every second (quiet ones carry the
    /// level before them), the minutes, the times, and the `top` locks
    /// waited for longest among those `visible` accepts.
    pub fn stats(&self, now: SystemTime, top: usize, visible: impl Fn(&str) -> bool) -> Stats {
        let now_sec = unix_secs(now);
        let inner = self.inner();
        let first = now_sec.saturating_sub(WINDOW_SECS - 1);
        let mut seconds = Vec::with_capacity(WINDOW_SECS as usize);
        let mut recorded = inner.seconds.iter().peekable();
        let mut level = inner.floor;
        // Seconds before the window only set the level.
        while let Some(s) = recorded.next_if(|s| s.at < first) {
            level = (s.end_holders, s.end_waiters);
        }
        for at in first..=now_sec {
            match recorded.next_if(|s| s.at == at) {
                Some(s) => {
                    level = (s.end_holders, s.end_waiters);
                    seconds.push(*s);
                }
                None => seconds.push(Second {
                    at,
                    grants: 0,
                    holders: level.0,
                    waiters: level.1,
                    end_holders: level.0,
                    end_waiters: level.1,
                }),
            }
        }

        let oldest_minute = (now_sec / 60).saturating_sub(MINUTES - 1);
        let mut minutes = Vec::new();
        let mut wait = Times::default();
        let mut hold = Times::default();
        let mut locks: HashMap<(Arc<str>, Kind), Contention> = HashMap::new();
        for m in inner.minutes.iter().filter(|m| m.at >= oldest_minute) {
            wait.merge(&m.wait);
            hold.merge(&m.hold);
            minutes.push(MinuteSummary {
                at: m.at,
                grants: m.grants,
                wait: m.wait.clone(),
                hold: m.hold.clone(),
            });
            for (key, c) in m.locks.iter().filter(|(k, _)| visible(&k.0)) {
                locks.entry(key.clone()).or_default().merge(c);
            }
        }
        drop(inner);
        let mut contended: Vec<(Arc<str>, Kind, Contention)> = locks
            .into_iter()
            .map(|((name, kind), c)| (name, kind, c))
            .collect();
        contended.sort_by(|a, b| {
            (b.2.wait_total, b.2.peak_waiters, &a.0).cmp(&(a.2.wait_total, a.2.peak_waiters, &b.0))
        });
        contended.truncate(top);
        Stats {
            seconds,
            minutes,
            wait,
            hold,
            contended,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::locks::Mode;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn event(seq: u64, secs: u64, name: &str, what: EventKind) -> Event {
        Event {
            seq,
            at: at(secs),
            kind: Kind::File,
            name: Arc::from(name),
            id: seq,
            what,
        }
    }

    fn granted(waited: Duration) -> EventKind {
        EventKind::Granted {
            fence: 1,
            slot: None,
            mode: Mode::Exclusive,
            owner: "o".into(),
            waited,
        }
    }

    fn queued(position: u32) -> EventKind {
        EventKind::Queued {
            position,
            mode: Mode::Exclusive,
            owner: "o".into(),
        }
    }

    #[test]
    fn quantiles_are_within_a_bucket() {
        let mut t = Times::default();
        assert_eq!(t.quantile(0.5), None);
        for ms in 1..=100 {
            t.observe(Duration::from_millis(ms));
        }
        let p50 = t.quantile(0.5).unwrap().as_secs_f64() * 1000.0;
        let p99 = t.quantile(0.99).unwrap().as_secs_f64() * 1000.0;
        assert!((45.0..=56.0).contains(&p50), "p50 {p50}");
        assert!((90.0..=100.0).contains(&p99), "p99 {p99}");
        assert_eq!(t.quantile(1.0).unwrap(), Duration::from_millis(100));
        assert_eq!(t.max(), Duration::from_millis(100));
        // Huge and zero durations stay in range.
        t.observe(Duration::from_secs(u64::MAX / 4));
        t.observe(Duration::ZERO);
        assert_eq!(t.count(), 102);
    }

    #[test]
    fn seconds_carry_the_level_and_the_window_slides() {
        let h = History::new();
        let start = 1_000_000;
        h.record(&event(1, start, "a", granted(Duration::ZERO)), 1, 0, true);
        h.record(&event(2, start, "a", queued(1)), 1, 1, true);
        h.record(
            &event(3, start + 3, "a", granted(Duration::from_secs(3))),
            1,
            0,
            true,
        );
        let s = h.stats(at(start + 5), 10, |_| true);
        assert_eq!(s.seconds.len(), WINDOW_SECS as usize);
        let last: Vec<(u64, u32, u64, u64)> = s.seconds[s.seconds.len() - 6..]
            .iter()
            .map(|s| (s.at - start, s.grants, s.holders, s.waiters))
            .collect();
        assert_eq!(
            last,
            [
                (0, 1, 1, 1),
                (1, 0, 1, 1),
                (2, 0, 1, 1),
                (3, 1, 1, 0),
                (4, 0, 1, 0),
                (5, 0, 1, 0)
            ]
        );
        // Long after: the old seconds left the window, the level stays.
        h.record(
            &event(
                4,
                start + 2000,
                "b",
                EventKind::Released {
                    held_for: Duration::from_secs(1),
                },
            ),
            0,
            0,
            false,
        );
        let s = h.stats(at(start + 2001), 10, |_| true);
        assert!(s.seconds.iter().all(|s| s.grants == 0));
        assert_eq!(s.seconds.last().unwrap().holders, 0);
        assert!(s.contended.is_empty(), "a's minute left the window");
        assert_eq!(s.hold.count(), 1);
    }

    #[test]
    fn contention_ranks_by_total_wait_and_is_bounded() {
        let h = History::new();
        let t = 2_000_000;
        h.record(&event(1, t, "short", queued(1)), 0, 1, true);
        h.record(
            &event(2, t, "short", granted(Duration::from_millis(5))),
            0,
            0,
            true,
        );
        h.record(&event(3, t, "long", queued(3)), 0, 1, true);
        h.record(
            &event(4, t, "long", granted(Duration::from_secs(2))),
            0,
            0,
            true,
        );
        h.record(
            &event(
                5,
                t,
                "long",
                EventKind::Abandoned {
                    waited: Duration::from_secs(1),
                },
            ),
            0,
            0,
            false,
        );
        // A grant that found the lock free is not contention, however long
        // it took (the first file of a directory, say).
        h.record(
            &event(6, t, "free", granted(Duration::from_millis(7))),
            0,
            0,
            false,
        );
        let s = h.stats(at(t), 10, |_| true);
        let ranked: Vec<&str> = s.contended.iter().map(|c| &*c.0).collect();
        assert_eq!(ranked, ["long", "short"]);
        assert_eq!(
            s.contended[0].2,
            Contention {
                queued: 1,
                granted_after_wait: 1,
                gave_up: 1,
                wait_total: Duration::from_secs(3),
                max_wait: Duration::from_secs(2),
                peak_waiters: 3,
            }
        );
        // What a token may not see is left out.
        let s = h.stats(at(t), 10, |name| name != "long");
        assert_eq!(s.contended.len(), 1);

        // Many names in one minute: bounded, the rest counted together.
        for i in 0..(TRACKED_PER_MINUTE as u64 + 50) {
            h.record(&event(100 + i, t, &format!("n{i}"), queued(1)), 0, 1, true);
        }
        let inner = h.inner();
        let minute = inner.minutes.back().unwrap();
        assert_eq!(minute.locks.len(), TRACKED_PER_MINUTE);
        assert!(minute.untracked.queued >= 50);
    }

    #[test]
    fn recent_keeps_the_newest_and_filters() {
        let h = History::new();
        for i in 0..(RECENT as u64 + 10) {
            let name = if i % 2 == 0 { "even" } else { "odd" };
            h.record(&event(i + 1, 5, name, queued(1)), 0, 1, true);
        }
        let all = h.recent(RECENT, |_| true);
        assert_eq!(all.len(), RECENT);
        assert_eq!(all.last().unwrap().seq, RECENT as u64 + 10);
        assert_eq!(all.first().unwrap().seq, 11);
        let odd = h.recent(3, |e| &*e.name == "odd");
        let seqs: Vec<u64> = odd.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [506, 508, 510]);
    }
}
