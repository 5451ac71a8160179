//! A ticket: a place in a lock's queue, then the lock itself; what a
//! [`super::Session`] drives.

use super::*;

/// A place in a lock's queue, then the lock itself. Dropping the ticket
/// leaves the queue or releases the lock.
pub struct Ticket {
    pub(super) table: LockTable,
    pub(super) key: Key,
    pub(super) id: u64,
    /// When the wait ends (`None`: never, or a try-lock).
    pub(super) deadline: Option<tokio::time::Instant>,
    /// Queued, Granted, Lost or Failed, in that order of life.
    pub notices: mailbox::Receiver,
    /// The client token's place in its quota, given back on drop.
    pub(super) _quota: Option<QuotaSlot>,
    /// Still in the table: dropping the ticket leaves it.
    pub(super) placed: bool,
}

impl Ticket {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn kind(&self) -> Kind {
        self.key.1
    }

    pub fn name(&self) -> &str {
        &self.key.0
    }

    /// When the wait for a grant ends, if it does.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        self.deadline
    }

    /// Gives up the wait: leaves the queue and says why, with the holders
    /// the lock has at this moment.
    pub fn time_out(self, waited: Duration) -> LockError {
        let err = {
            let st = self.table.shard(&self.key);
            match st.locks.get(&self.key) {
                Some(lock) => not_acquired(&self.key, lock, waited),
                None => LockError::NotAcquired {
                    name: name::printable(&self.key.0),
                    holders: 0,
                    held_by: Vec::new(),
                    waited,
                },
            }
        };
        drop(self);
        err
    }

    /// Releases a held lock at the holder's request, after making sure that
    /// it was still held: `Err` with why when it had been lost on the
    /// backend meanwhile (the holder must be told `Lost`, not `Released`).
    pub async fn release(mut self) -> Result<(), Notice> {
        let confirm = {
            let st = self.table.shard(&self.key);
            st.locks.get(&self.key).and_then(|lock| {
                lock.holders
                    .iter()
                    .find(|h| h.entry.id == self.id)
                    .map(|h| h.held.confirm())
            })
        };
        if let Some(Some(confirm)) = confirm
            && let Err(detail) = confirm.await
        {
            let key = &self.key;
            self.table
                .revoke(key.1, &key.0, self.id, LostReason::Backend, &detail);
        }
        // Released only if it is still held at the moment it is let go;
        // otherwise it was taken away (revoked, lost, drained), and the
        // `Lost` sent for that is on its way.
        self.placed = false;
        if self.table.leave(&self.key, self.id) {
            return Ok(());
        }
        while let Some(notice) = self.notices.recv().await {
            if matches!(notice, Notice::Lost { .. }) {
                return Err(notice);
            }
        }
        Err(Notice::Lost {
            reason: LostReason::Backend,
            detail: "the lock had ended before its release".into(),
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.placed {
            self.table.leave(&self.key, self.id);
        }
    }
}
