//! Framing of the lean transport (see `LeanRequest` in the `.proto`): the
//! magic that opens a connection, and length-prefixed frames.

use prost::bytes::{Buf, BufMut, Bytes, BytesMut};

/// The first bytes a lean client sends: "PADLOCK", then the version.
pub const MAGIC: &[u8; 8] = b"PADLOCK\x01";

/// Bytes of a frame's length prefix (big-endian).
pub const PREFIX: usize = 4;

/// Bytes read at most in one go while a large frame comes in, so that a
/// frame announced large but sent slowly pins memory only as it arrives.
pub const READ_STEP: usize = 64 * 1024;

/// Appends `message` to `out` as one frame.
pub fn encode(message: &impl prost::Message, out: &mut BytesMut) {
    let len = message.encoded_len();
    out.reserve(PREFIX + len);
    // A message over 4 GiB cannot exist here: each side caps what it sends
    // far below that.
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // Cannot fail: the room was reserved above.
    let _ = message.encode(out);
}

/// A frame whose announced length is over the reader's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    pub len: usize,
    pub max: usize,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a frame of {} bytes is over the limit of {} bytes",
            self.len, self.max
        )
    }
}

/// Takes the next whole frame's body off the front of `buf`. `Ok(None)`:
/// not all of it is there yet; then `buf` has room reserved for (a step
/// of) the rest, so the next read fills it.
pub fn take(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, TooLarge> {
    let Some(prefix) = buf.get(..PREFIX) else {
        buf.reserve(PREFIX.max(256));
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > max {
        return Err(TooLarge { len, max });
    }
    let whole = PREFIX + len;
    if buf.len() < whole {
        buf.reserve((whole - buf.len()).min(READ_STEP));
        return Ok(None);
    }
    let mut frame = buf.split_to(whole);
    frame.advance(PREFIX);
    Ok(Some(frame.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1 as pb;

    #[test]
    fn frames_round_trip_and_arrive_in_pieces() {
        let ping = pb::LeanRequest {
            msg: Some(pb::lean_request::Msg::Ping(7)),
        };
        let mut wire = BytesMut::new();
        encode(&ping, &mut wire);
        encode(&ping, &mut wire);
        let whole = wire.clone();
        // Byte by byte: nothing until the whole frame is there.
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for byte in whole.iter() {
            buf.put_u8(*byte);
            while let Some(frame) = take(&mut buf, 64).unwrap() {
                frames.push(<pb::LeanRequest as prost::Message>::decode(frame).unwrap());
            }
        }
        assert_eq!(frames, vec![ping.clone(), ping]);
        assert!(buf.is_empty());
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_before_it_is_read() {
        let mut buf = BytesMut::from(&[0u8, 0, 1, 0][..]);
        assert_eq!(take(&mut buf, 255), Err(TooLarge { len: 256, max: 255 }));
        // A large announced frame reserves only a step of room.
        let mut buf = BytesMut::from(&[0x00u8, 0x40, 0, 0][..]);
        assert_eq!(take(&mut buf, usize::MAX), Ok(None));
        assert!(
            buf.capacity() <= PREFIX + READ_STEP + 64,
            "{}",
            buf.capacity()
        );
    }
}
