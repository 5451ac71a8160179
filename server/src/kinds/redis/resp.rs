//! Just enough RESP3 to drive a subscription connection by hand: read the
//! replies of a pipelined batch one by one, and the messages that arrive
//! between them.

use std::io;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// One reply or push. Maps and sets read as arrays; the scalar types the
/// handshake never looks at (doubles, booleans, big numbers) as `Other`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reply {
    Simple(Vec<u8>),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
    Push(Vec<Reply>),
    Other,
}

impl Reply {
    /// The payload of a pub/sub `message` push, if this is one.
    pub(super) fn message_payload(&self) -> Option<&[u8]> {
        match self {
            Reply::Push(items) => match items.as_slice() {
                [
                    Reply::Bulk(Some(kind)),
                    Reply::Bulk(Some(_)),
                    Reply::Bulk(Some(payload)),
                ] if kind == b"message" => Some(payload),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Nesting deeper than this is not a reply the handshake expects.
const MAX_DEPTH: usize = 8;

/// Most bytes the handshake buffers before giving up on the connection
/// (its replies are a few hundred bytes; the messages between them are
/// pings of a few dozen).
pub(super) const MAX_BUFFERED: usize = 1 << 20;

/// Parses one value from the front of `buf`: `Ok(None)` when more bytes
/// are needed, else the value and how many bytes it took.
#[cfg(test)]
pub(super) fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    parse_limited(buf, MAX_BUFFERED)
}

/// [`parse`], with strings and arrays of up to `limit` bytes and items.
fn parse_limited(buf: &[u8], limit: usize) -> Result<Option<(Reply, usize)>, String> {
    parse_at(buf, 0, 0, limit)
}

fn parse_at(
    buf: &[u8],
    at: usize,
    depth: usize,
    limit: usize,
) -> Result<Option<(Reply, usize)>, String> {
    if depth > MAX_DEPTH {
        return Err("reply nested too deep".into());
    }
    let Some(end) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let Some((&kind, line)) = buf[at..at + end].split_first() else {
        return Err("empty reply line".into());
    };
    let next = at + end + 2;
    let number = || -> Result<i64, String> {
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad length or number {:?}", String::from_utf8_lossy(line)))
    };
    let reply = match kind {
        b'+' => (Reply::Simple(line.to_vec()), next),
        b'-' => (
            Reply::Error(String::from_utf8_lossy(line).into_owned()),
            next,
        ),
        b':' => (Reply::Int(number()?), next),
        b'_' => (Reply::Bulk(None), next),
        b',' | b'#' | b'(' => (Reply::Other, next),
        b'$' | b'=' | b'!' => {
            let len = number()?;
            if len < 0 {
                return Ok(Some((Reply::Bulk(None), next)));
            }
            let len = usize::try_from(len).map_err(|_| "bad length")?;
            if len > limit {
                return Err(format!("a {len}-byte string in a reply"));
            }
            if buf.len() < next + len + 2 {
                return Ok(None);
            }
            if &buf[next + len..next + len + 2] != b"\r\n" {
                return Err("string not ended by CRLF".into());
            }
            let bytes = buf[next..next + len].to_vec();
            let reply = if kind == b'!' {
                Reply::Error(String::from_utf8_lossy(&bytes).into_owned())
            } else {
                Reply::Bulk(Some(bytes))
            };
            (reply, next + len + 2)
        }
        b'*' | b'>' | b'~' | b'%' | b'|' => {
            let count = number()?;
            if count < 0 {
                return Ok(Some((Reply::Bulk(None), next)));
            }
            let count = usize::try_from(count).map_err(|_| "bad count")?;
            // A map or attribute has a key and a value per entry.
            let items = if matches!(kind, b'%' | b'|') {
                count.saturating_mul(2)
            } else {
                count
            };
            if items > limit / 3 {
                return Err(format!("{items} items in a reply"));
            }
            let mut values = Vec::with_capacity(items.min(64));
            let mut pos = next;
            for _ in 0..items {
                match parse_at(buf, pos, depth + 1, limit)? {
                    Some((value, after)) => {
                        values.push(value);
                        pos = after;
                    }
                    None => return Ok(None),
                }
            }
            if kind == b'|' {
                // Attributes describe the value that follows: skip them.
                return parse_at(buf, pos, depth + 1, limit);
            }
            let reply = if kind == b'>' {
                Reply::Push(values)
            } else {
                Reply::Array(values)
            };
            (reply, pos)
        }
        other => return Err(format!("unknown reply type {:?}", other as char)),
    };
    Ok(Some(reply))
}

/// Redis's own limit on a string (`proto-max-bulk-len`).
const MAX_REDIS_STRING: usize = 512 << 20;

/// A connection read one reply at a time.
pub(super) struct Replies {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Most bytes a reply may take (strings, items, buffered).
    limit: usize,
}

impl Replies {
    pub(super) fn new(stream: TcpStream) -> Replies {
        Replies {
            stream,
            buf: Vec::new(),
            limit: MAX_BUFFERED,
        }
    }

    /// Takes replies as large as Redis sends (a message published on a
    /// lock's channel, however large, is not a reason to drop the lock).
    pub(super) fn allow_large(&mut self) {
        self.limit = MAX_REDIS_STRING + 1024;
    }

    pub(super) fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// The next reply or push.
    pub(super) async fn next(&mut self) -> io::Result<Reply> {
        loop {
            match parse_limited(&self.buf, self.limit).map_err(|e| invalid(&e))? {
                Some((reply, used)) => {
                    self.buf.drain(..used);
                    return Ok(reply);
                }
                None if self.buf.len() >= self.limit => {
                    return Err(invalid("a reply larger than the limit"));
                }
                None => {
                    let mut chunk = [0u8; 4096];
                    let n = self.stream.read(&mut chunk).await?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "Redis closed the connection",
                        ));
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }

    /// The connection, if nothing was read ahead on it.
    pub(super) fn into_idle(self) -> Option<TcpStream> {
        self.buf.is_empty().then_some(self.stream)
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(bytes: &[u8]) -> Reply {
        let (reply, used) = parse(bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len(), "{}", String::from_utf8_lossy(bytes));
        reply
    }

    #[test]
    fn reads_the_replies_of_a_handshake() {
        assert_eq!(whole(b"+OK\r\n"), Reply::Simple(b"OK".to_vec()));
        assert_eq!(
            whole(b"-ERR unknown command 'HELLO'\r\n"),
            Reply::Error("ERR unknown command 'HELLO'".into())
        );
        assert_eq!(
            whole(b">3\r\n$9\r\nsubscribe\r\n$4\r\nlock\r\n:1\r\n"),
            Reply::Push(vec![
                Reply::Bulk(Some(b"subscribe".to_vec())),
                Reply::Bulk(Some(b"lock".to_vec())),
                Reply::Int(1),
            ])
        );
        assert_eq!(
            whole(b"*2\r\n:1\r\n:1883242065035264\r\n"),
            Reply::Array(vec![Reply::Int(1), Reply::Int(1_883_242_065_035_264)])
        );
        // HELLO 3's map, with a nested empty array and a RESP3 null.
        let hello = b"%3\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n\
                      $7\r\nmodules\r\n*0\r\n";
        assert!(matches!(whole(hello), Reply::Array(v) if v.len() == 6));
        assert_eq!(whole(b"_\r\n"), Reply::Bulk(None));
        assert_eq!(whole(b"$-1\r\n"), Reply::Bulk(None));
        let message = whole(b">3\r\n$7\r\nmessage\r\n$4\r\nlock\r\n$4\r\nping\r\n");
        assert_eq!(message.message_payload(), Some(&b"ping"[..]));
        assert_eq!(Reply::Int(1).message_payload(), None);
    }

    #[test]
    fn waits_for_a_whole_reply_and_takes_only_one() {
        let two = b"+OK\r\n>3\r\n$9\r\nsubscribe\r\n$1\r\nx\r\n:1\r\n";
        for cut in 0..two.len() {
            match parse(&two[..cut]).unwrap() {
                None => assert!(cut < 5, "complete at {cut}"),
                Some((reply, used)) => {
                    assert_eq!((reply, used), (Reply::Simple(b"OK".to_vec()), 5));
                }
            }
        }
        let after_ok = &two[5..];
        for cut in 0..after_ok.len() {
            assert_eq!(parse(&after_ok[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_reply() {
        for junk in [
            &b"?what\r\n"[..],
            b":12x\r\n",
            b"$3\r\nabcd\r\n",
            b"\r\n",
            b"$99999999999\r\n",
            b"*99999999999\r\n",
        ] {
            assert!(parse(junk).is_err(), "{}", String::from_utf8_lossy(junk));
        }
        let deep = "*1\r\n".repeat(MAX_DEPTH + 2) + ":1\r\n";
        assert!(parse(deep.as_bytes()).is_err());
    }
}
