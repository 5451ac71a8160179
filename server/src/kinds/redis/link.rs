//! A subscription connection driven by padlockd itself: one task reads
//! it, hands each pub/sub message to the subscriber and each other reply
//! to the command that asked for it, in order. A held lock's connection
//! that ends its subscription cleanly goes back to the pool instead of
//! being closed (a TCP connection and a Redis client less per grant).

use super::resp::{Replies, Reply};
use std::collections::VecDeque;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// A driven subscription connection.
pub(super) struct Link {
    pub(super) sink: LinkSink,
    /// Message payloads in arrival order; `None` once the connection ended.
    /// Bounded: a subscriber that does not keep up stops the reading, and
    /// Redis holds (then, past its output limit, drops) the rest.
    pub(super) messages: mpsc::Receiver<Vec<u8>>,
    /// Dropping it closes the connection.
    pub(super) driver: Driver,
}

/// Sends commands on a [`Link`]'s connection.
#[derive(Clone)]
pub(super) struct LinkSink(mpsc::UnboundedSender<Request>);

/// The task driving a connection: aborted (and the connection closed) when
/// dropped, unless it was told to give the connection back.
pub(super) struct Driver(tokio::task::AbortHandle);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Messages read but not yet taken by the subscriber.
const MESSAGES: usize = 256;

enum Request {
    /// Write `bytes`, then hand back the next `replies` replies.
    Send {
        bytes: Vec<u8>,
        replies: usize,
        answer: oneshot::Sender<Vec<Reply>>,
    },
    /// Hand the connection back, if nothing is pending on it.
    Return { answer: oneshot::Sender<TcpStream> },
}

impl Link {
    /// Drives `replies` (a connection just subscribed); `early` are the
    /// messages its handshake already read, delivered first.
    pub(super) fn start(mut replies: Replies, early: Vec<Vec<u8>>) -> Link {
        // Past the handshake, any message Redis relays is read whole.
        replies.allow_large();
        let (requests_tx, requests) = mpsc::unbounded_channel();
        let (messages_tx, messages) = mpsc::channel(MESSAGES.max(early.len()));
        for payload in early {
            let _ = messages_tx.try_send(payload);
        }
        let task = tokio::spawn(drive(replies, requests, messages_tx));
        Link {
            sink: LinkSink(requests_tx),
            messages,
            driver: Driver(task.abort_handle()),
        }
    }
}

impl LinkSink {
    /// Sends `commands` in one write and returns their replies, one each
    /// (`None`: the connection ended first).
    pub(super) async fn send(&self, commands: &[redis::Cmd]) -> Option<Vec<Reply>> {
        let bytes = commands
            .iter()
            .flat_map(|c| c.get_packed_command())
            .collect();
        let (answer, answered) = oneshot::channel();
        let request = Request::Send {
            bytes,
            replies: commands.len(),
            answer,
        };
        self.0.send(request).ok()?;
        answered.await.ok()
    }

    /// Ends the driver and returns its connection, if every command sent
    /// on it was answered and nothing more was read; otherwise it closes.
    pub(super) async fn give_back(&self) -> Option<TcpStream> {
        let (answer, answered) = oneshot::channel();
        self.0.send(Request::Return { answer }).ok()?;
        answered.await.ok()
    }
}

async fn drive(
    mut replies: Replies,
    mut requests: mpsc::UnboundedReceiver<Request>,
    messages: mpsc::Sender<Vec<u8>>,
) {
    // Commands waiting for replies: how many, the ones read so far.
    let mut pending: VecDeque<(usize, Vec<Reply>, oneshot::Sender<Vec<Reply>>)> = VecDeque::new();
    loop {
        tokio::select! {
            request = requests.recv() => match request {
                // Nobody can ask anything any more: close.
                None => return,
                Some(Request::Send { bytes, replies: count, answer }) => {
                    if replies.stream_mut().write_all(&bytes).await.is_err() {
                        return;
                    }
                    pending.push_back((count, Vec::with_capacity(count), answer));
                }
                Some(Request::Return { answer }) => {
                    if pending.is_empty()
                        && let Some(stream) = replies.into_idle()
                    {
                        let _ = answer.send(stream);
                    }
                    return;
                }
            },
            // (`next` keeps what it read when it is not finished.)
            reply = replies.next() => {
                let Ok(reply) = reply else {
                    return;
                };
                if let Some(payload) = reply.message_payload() {
                    if pending.is_empty() {
                        // (Fails only when nobody reads any more.)
                        let _ = messages.send(payload.to_vec()).await;
                    } else {
                        // A command waits for its reply behind this: never
                        // hold it up (a release's UNSUBSCRIBE). A ping
                        // dropped here is one for a lock being let go.
                        let _ = messages.try_send(payload.to_vec());
                    }
                    continue;
                }
                // A reply nobody asked for: the connection is not what it
                // should be.
                let Some((count, got, _)) = pending.front_mut() else {
                    return;
                };
                got.push(reply);
                if got.len() == *count
                    && let Some((_, got, answer)) = pending.pop_front()
                {
                    let _ = answer.send(got);
                }
            }
        }
    }
}
