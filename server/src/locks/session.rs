//! One lock request from its arrival to its end, the same for every
//! transport: a gRPC Hold stream and an HTTP hold each drive a
//! [`Session`] and only translate what it says.
//!
//! A session checks the client token's scope, queues the request (the
//! table checks the name, the kind, the caps), then yields its
//! [`Step`]s: `Queued` while it waits, `Granted`, and at the end `Lost`
//! or `Failed`. It enforces the wait: when the deadline passes before the
//! grant, it leaves the queue and fails with who holds the lock, read under
//! the table's lock. Dropping it releases the lock or leaves the queue.

use super::{AcquireRequest, LockError, LockTable, LostReason, Notice, Ticket};
use crate::auth::Scope;
use crate::locks::name::printable;
use std::time::Duration;

/// What a session has to say: the table's [`Notice`]s, as a session
/// yields them (`Queued` only before the grant; `Lost` and `Failed` end it).
pub type Step = Notice;

/// How a release at the holder's request ended.
#[derive(Debug)]
pub enum Released {
    /// The lock was let go while still held (or the wait was given up).
    Released,
    /// The lock had been taken away before the release: the holder must be
    /// told it was lost, not released.
    Lost { reason: LostReason, detail: String },
    /// The session had already ended; there is nothing to say.
    Over,
}

/// See the module documentation.
pub struct Session {
    /// `None` once the session is over.
    ticket: Option<Ticket>,
    /// The wait asked for (zero: a try-lock).
    wait: Duration,
    granted: bool,
    /// A step already taken from the ticket by [`Session::decided`].
    early: Option<Step>,
}

impl LockTable {
    /// Opens a session for `request`, made with a client token of `scope`
    /// (`None`: no token file). Errors that need no waiting come at once.
    pub fn open(
        &self,
        mut request: AcquireRequest,
        scope: Option<&Scope>,
    ) -> Result<Session, LockError> {
        if let Some(scope) = scope {
            if !scope.allows(&request.name) {
                return Err(LockError::PermissionDenied(scope.denied(&request.name)));
            }
            request.quota = scope.quota.clone();
        }
        let wait = request.wait.unwrap_or_default();
        let ticket = self.acquire(request)?;
        tracing::debug!(
            name = %printable(ticket.name()),
            id = ticket.id(),
            kind = ticket.kind().as_str(),
            "requested"
        );
        Ok(Session {
            ticket: Some(ticket),
            wait,
            granted: false,
            early: None,
        })
    }
}

impl Session {
    /// The request's id (the waiter's, then the holder's).
    pub fn id(&self) -> u64 {
        self.ticket.as_ref().map_or(0, Ticket::id)
    }

    pub fn is_granted(&self) -> bool {
        self.granted
    }

    /// The next step; `None` when the session is over (or the server let
    /// it go without a word). Cancel-safe: a transport may select on it and
    /// on its client's messages.
    pub async fn next(&mut self) -> Option<Step> {
        if let Some(step) = self.early.take() {
            return Some(step);
        }
        loop {
            let ticket = self.ticket.as_mut()?;
            // A try-lock is answered by its one attempt, not by a timer;
            // a granted lock has no deadline.
            let deadline = ticket.deadline().filter(|_| !self.granted);
            // The timer is boxed: it exists only while a waiter has a
            // deadline, not in the future of every held lock.
            let expired = deadline.map(|at| Box::pin(tokio::time::sleep_until(at)));
            let notice = match expired {
                None => ticket.notices.recv().await,
                Some(expired) => tokio::select! {
                    notice = ticket.notices.recv() => notice,
                    () = expired => {
                        let ticket = self.ticket.take()?;
                        return Some(Step::Failed(ticket.time_out(self.wait)));
                    }
                },
            };
            match notice {
                Some(Notice::Queued { position, holders }) if !self.granted => {
                    return Some(Step::Queued { position, holders });
                }
                Some(Notice::Queued { .. }) => continue,
                Some(Notice::Granted(grant)) => {
                    self.granted = true;
                    tracing::debug!(fence = grant.fence, "granted");
                    return Some(Step::Granted(grant));
                }
                Some(Notice::Lost { reason, detail }) => {
                    if let Some(ticket) = self.ticket.take() {
                        let (name, id) = (printable(ticket.name()), ticket.id());
                        let kind = ticket.kind().as_str();
                        tracing::info!(%name, id, kind, ?reason, %detail, "lost");
                    }
                    return Some(Step::Lost { reason, detail });
                }
                Some(Notice::Failed(err)) => {
                    self.ticket = None;
                    return Some(Step::Failed(err));
                }
                None => {
                    self.ticket = None;
                    return None;
                }
            }
        }
    }

    /// Waits until the request is granted or has failed (skipping
    /// `Queued`): for a transport that answers a try-lock with a status
    /// before its stream starts. The grant is kept for [`Session::next`].
    pub async fn decided(&mut self) -> Result<(), LockError> {
        loop {
            match self.next().await {
                Some(Step::Queued { .. }) => continue,
                Some(Step::Failed(err)) => return Err(err),
                Some(step) => {
                    self.early = Some(step);
                    return Ok(());
                }
                None => return Err(LockError::Draining),
            }
        }
    }

    /// Ends the session at the holder's request: a waiter leaves the
    /// queue; a holder lets go of its lock once the backend confirms it
    /// still held it (a lock taken away meanwhile, by another padlockd
    /// reaping a paused one, is reported as lost).
    pub async fn release(mut self) -> Released {
        let Some(ticket) = self.ticket.take() else {
            return Released::Over;
        };
        if !self.granted {
            drop(ticket);
            return Released::Released;
        }
        let (name, id) = (printable(ticket.name()), ticket.id());
        let kind = ticket.kind().as_str();
        match ticket.release().await {
            Ok(()) => Released::Released,
            Err(Notice::Lost { reason, detail }) => {
                tracing::info!(%name, id, kind, ?reason, %detail, "lost before its release");
                Released::Lost { reason, detail }
            }
            Err(_) => Released::Over,
        }
    }
}
