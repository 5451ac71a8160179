//! Admission: a request is checked, placed at the end of its lock's queue
//! under the server's caps, given its first chance at the lock, and then
//! either has its answer or waits (a try-lock that was not granted is
//! withdrawn).

use super::*;

impl LockTable {
    /// Checks a request against the rules that need no state: the name,
    /// the kind and its limit, owner, labels and wait.
    fn check(&self, req: &AcquireRequest) -> Result<(), LockError> {
        let limits = &self.shared.limits;
        name::validate(&req.name, limits.max_name_components)?;
        let Some(backend) = self.shared.kinds.get(&req.kind) else {
            return Err(self.not_served(req.kind));
        };
        backend.check_request(req.kind, req.mode, req.limit)?;
        req.check_metadata()?;
        backend.check_available()?;
        backend.check_name(&req.name)
    }

    /// Why a kind is refused that this server does not serve.
    pub(super) fn not_served(&self, kind: Kind) -> LockError {
        LockError::Unavailable(match self.shared.not_served.get(&kind) {
            Some(why) => why.clone(),
            None => format!("this server does not serve {kind} locks (see its --kinds)"),
        })
    }

    /// Joins the queue for a lock. The returned ticket has already received
    /// `Granted` when the lock was free, or `Queued` otherwise.
    pub fn acquire(&self, req: AcquireRequest) -> Result<Ticket, LockError> {
        self.check(&req)?;
        let quota = req.quota.as_ref().map(|quota| quota.take()).transpose()?;
        let key: Key = (Arc::from(req.name.as_str()), req.kind);
        let try_once = req.try_once();
        let deadline = req.deadline();
        let (tx, notices) = mailbox::mailbox();
        let id = self.place(&key, req, tx)?;
        // From here on the ticket owns the place: dropping it cleans up.
        let ticket = Ticket {
            table: self.clone(),
            key: key.clone(),
            id,
            deadline,
            notices,
            _quota: quota,
            placed: true,
        };
        self.pump(&key, false);
        self.settle(ticket, try_once)
    }

    /// Admits a request under the server's caps and puts it at the end of
    /// its lock's queue (the lock is tracked from now on); its id.
    fn place(&self, key: &Key, req: AcquireRequest, tx: mailbox::Sender) -> Result<u64, LockError> {
        let limits = &self.shared.limits;
        let since = SystemTime::now();
        let try_once = req.try_once();
        let gives_up = req
            .wait
            .filter(|w| !w.is_zero())
            .and_then(|w| since.checked_add(w));
        let shared = &*self.shared;
        let mut st = self.shard(key);
        // Drain sets the flag and then takes each shard's mutex: a request
        // placed before it looks at this shard is drained with it.
        if shared.draining.load(Ordering::Acquire) {
            return Err(LockError::Draining);
        }
        if let Some(lock) = st.locks.get(key) {
            if lock.limit != req.limit {
                return Err(LockError::LimitMismatch {
                    name: name::printable(&req.name),
                    current: lock.limit,
                    requested: req.limit,
                });
            }
            if lock.waiters.len() >= limits.max_waiters_per_lock {
                return Err(LockError::TooManyWaiters {
                    name: name::printable(&req.name),
                    cap: limits.max_waiters_per_lock,
                });
            }
        }
        let reserve = |count: &AtomicUsize, cap: usize| {
            count
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < cap).then_some(n + 1)
                })
                .is_ok()
        };
        if !reserve(&shared.holds, limits.max_holds) {
            return Err(LockError::TooManyHolds {
                cap: limits.max_holds,
            });
        }
        if !st.locks.contains_key(key) {
            if !reserve(&shared.tracked, limits.max_locks) {
                self.unhold();
                return Err(LockError::TooManyLocks {
                    cap: limits.max_locks,
                });
            }
            st.locks.insert(key.clone(), Lock::new(req.limit));
        }
        let id = self.new_id();
        let lock = st.locks.get_mut(key).expect("entry was just checked");
        lock.waiters.push_back(Entry {
            id,
            owner: req.owner,
            peer: req.peer,
            since,
            mode: req.mode,
            labels: req.labels,
            deadline: gives_up,
            try_once,
            tx,
            expiry: None,
        });
        Ok(id)
    }

    /// After the first pump: a request already granted (or failed) has its
    /// notice; a try-lock that is not being attempted is withdrawn, not
    /// acquired; any other request waits, and is told its place.
    fn settle(&self, mut ticket: Ticket, try_once: bool) -> Result<Ticket, LockError> {
        let (key, id) = (ticket.key.clone(), ticket.id);
        let mut st = self.shard(&key);
        let Some(lock) = st.locks.get_mut(&key) else {
            return Ok(ticket); // drained meanwhile: the ticket was told
        };
        let Some(index) = lock.waiters.iter().position(|w| w.id == id) else {
            return Ok(ticket); // granted (or failed) already
        };
        // A try-lock being attempted right now gets its answer from that
        // attempt (it makes one try only); otherwise it is not granted.
        let attempted = lock.attempt.as_ref().is_some_and(|a| a.id == id);
        if try_once && !attempted {
            // Withdrawn quietly: it was never announced as queued.
            lock.waiters.remove(index);
            let err = not_acquired(&key, lock, Duration::ZERO);
            self.unhold();
            self.forget_if_idle(&mut st, &key);
            drop(st);
            ticket.placed = false;
            drop(ticket);
            if index == 0 {
                // Readers held back by this writer may go now.
                self.pump(&key, false);
            }
            return Err(err);
        }
        // The wait ends at its deadline whether or not the session is
        // polled (see `Expiry`).
        if let Some(at) = ticket.deadline {
            lock.waiters[index].expiry = Some(self.expiry(&key, id, at));
        }
        let waiter = &lock.waiters[index];
        let _ = waiter.tx.send(Notice::Queued {
            position: index as u32 + 1,
            holders: lock.holders.len() as u32,
        });
        let what = EventKind::Queued {
            position: index as u32 + 1,
            mode: waiter.mode,
            owner: waiter.owner.clone(),
        };
        self.emit(&key, id, what);
        Ok(ticket)
    }
}
