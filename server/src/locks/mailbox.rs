//! A one-producer, one-consumer mailbox for [`Notice`]s.
//!
//! A ticket receives at most a few notices in its life (Queued, Granted,
//! then Lost or Failed), but may live for days, and a server holds tens of
//! thousands of them. tokio's mpsc channels allocate a block of 32 slots per
//! channel up front (kilobytes per ticket); this mailbox costs an `Arc` with
//! an empty `VecDeque` and a `Notify` until something is sent.

use super::Notice;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

struct Inner {
    queue: Mutex<VecDeque<Notice>>,
    /// The sender is gone: nothing more will arrive.
    closed: AtomicBool,
    notify: Notify,
}

/// The table's end. Dropping it closes the mailbox.
pub struct Sender(Arc<Inner>);

/// The ticket's end.
pub struct Receiver(Arc<Inner>);

pub fn mailbox() -> (Sender, Receiver) {
    let inner = Arc::new(Inner {
        queue: Mutex::new(VecDeque::new()),
        closed: AtomicBool::new(false),
        notify: Notify::new(),
    });
    (Sender(inner.clone()), Receiver(inner))
}

impl Inner {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Notice>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Sender {
    /// Delivers `notice`; gives it back when the receiver is gone.
    pub fn send(&self, notice: Notice) -> Result<(), Notice> {
        // One sender and one receiver: a count of 1 means the receiver left.
        if Arc::strong_count(&self.0) == 1 {
            return Err(notice);
        }
        self.0.queue().push_back(notice);
        // notify_one stores a permit when nobody waits, so a receiver that
        // checks the queue and then waits cannot miss this.
        self.0.notify.notify_one();
        Ok(())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.notify.notify_one();
    }
}

impl Receiver {
    /// The next notice; `None` once the sender is gone and all was read.
    pub async fn recv(&mut self) -> Option<Notice> {
        loop {
            if let Some(notice) = self.try_recv() {
                return Some(notice);
            }
            if self.0.closed.load(Ordering::Acquire) {
                // A send may have raced with the close: look once more.
                return self.try_recv();
            }
            self.0.notify.notified().await;
        }
    }

    /// The next notice if one is waiting.
    pub fn try_recv(&mut self) -> Option<Notice> {
        self.0.queue().pop_front()
    }
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mailbox::Receiver")
    }
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mailbox::Sender")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::locks::LostReason;

    #[tokio::test]
    async fn delivers_in_order_then_closes() {
        let (tx, mut rx) = mailbox();
        let waiter = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(n) = rx.recv().await {
                got.push(n);
            }
            got
        });
        tx.send(Notice::Queued {
            position: 1,
            holders: 1,
        })
        .unwrap();
        tx.send(Notice::Lost {
            reason: LostReason::Shutdown,
            detail: String::new(),
        })
        .unwrap();
        drop(tx);
        let got = waiter.await.unwrap();
        assert_eq!(got.len(), 2);
        assert!(matches!(got[0], Notice::Queued { position: 1, .. }));
    }

    #[test]
    fn send_fails_once_the_receiver_is_gone() {
        let (tx, rx) = mailbox();
        drop(rx);
        assert!(
            tx.send(Notice::Queued {
                position: 1,
                holders: 0
            })
            .is_err()
        );
    }
}
