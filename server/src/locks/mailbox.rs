//! A one-producer, one-consumer mailbox for [`Notice`]s.
//!
//! A ticket receives at most a few notices in its life (Queued, Granted,
//! then Lost or Failed), but may live for days, and a server holds tens of
//! thousands of them. tokio's mpsc channels allocate a block of 32 slots per
//! channel up front (kilobytes per ticket); this mailbox costs an `Arc` with
//! an empty `VecDeque` and a waker slot until something is sent, and
//! waiting on it is a poll, so the future of a held lock carries no waiter
//! node (a `Notify` waiter is a few hundred bytes of every held lock's
//! future).

use super::Notice;
use futures_util::task::AtomicWaker;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

struct Inner {
    queue: Mutex<VecDeque<Notice>>,
    /// The sender is gone: nothing more will arrive.
    closed: AtomicBool,
    /// The receiver's task, woken by a send or the close.
    waker: AtomicWaker,
}

/// The table's end. Dropping it closes the mailbox.
pub struct Sender(Arc<Inner>);

/// The ticket's end.
pub struct Receiver(Arc<Inner>);

pub fn mailbox() -> (Sender, Receiver) {
    let inner = Arc::new(Inner {
        queue: Mutex::new(VecDeque::new()),
        closed: AtomicBool::new(false),
        waker: AtomicWaker::new(),
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
        // The receiver registers its waker before it looks at the queue
        // for the last time, so it cannot miss this.
        self.0.waker.wake();
        Ok(())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.waker.wake();
    }
}

impl Receiver {
    /// The next notice; `None` once the sender is gone and all was read.
    pub async fn recv(&mut self) -> Option<Notice> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next notice; see [`Receiver::recv`].
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Notice>> {
        if let Some(notice) = self.look() {
            return Poll::Ready(notice);
        }
        self.0.waker.register(cx.waker());
        // Looked again after registering: a send or close in between woke
        // the waker just registered, or is seen here.
        match self.look() {
            Some(notice) => Poll::Ready(notice),
            None => Poll::Pending,
        }
    }

    /// `Some(answer)` when `recv` has one now: a notice, or `None` once
    /// the sender is gone and all was read.
    fn look(&mut self) -> Option<Option<Notice>> {
        if let Some(notice) = self.try_recv() {
            return Some(Some(notice));
        }
        if self.0.closed.load(Ordering::Acquire) {
            // A send may have raced with the close: look once more.
            return Some(self.try_recv());
        }
        None
    }

    /// The next notice if one is waiting.
    pub fn try_recv(&mut self) -> Option<Notice> {
        let mut queue = self.0.queue();
        let notice = queue.pop_front();
        // A ticket lives long and gets a notice or two: no room kept.
        if queue.is_empty() && queue.capacity() > 0 {
            *queue = VecDeque::new();
        }
        notice
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
