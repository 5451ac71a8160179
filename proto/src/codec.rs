//! The prost codec with small per-stream buffers.
//!
//! tonic's default codec gives every stream an 8 KiB encode buffer and an
//! 8 KiB decode buffer. A held lock is a long-lived stream that carries a
//! handful of tiny messages, so those two buffers would be most of what a
//! held lock costs the server. Here they start at [`BUFFER_BYTES`] and grow
//! on demand (a larger message still decodes, up to the configured limit).
//!
//! A message that does not decode (bad wire format, a string that is not
//! UTF-8) is the sender's fault: it fails with INVALID_ARGUMENT and the
//! decoder's explanation, not with tonic's INTERNAL.

use std::marker::PhantomData;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// Initial buffer size per stream and direction.
pub const BUFFER_BYTES: usize = 64;
/// Encoded bytes after which a streaming encoder yields (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `application/grpc+proto` via prost, with small initial buffers.
#[derive(Debug, Clone)]
pub struct SmallCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallCodec<T, U> {
    fn default() -> Self {
        SmallCodec(PhantomData)
    }
}

impl<T, U> Codec for SmallCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = SmallDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        SmallDecoder(PhantomData)
    }
}

/// Decodes `U` with prost; undecodable input is INVALID_ARGUMENT.
#[derive(Debug)]
pub struct SmallDecoder<U>(PhantomData<U>);

impl<U: prost::Message + Default> Decoder for SmallDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|err| {
            Status::invalid_argument(format!("malformed message (not valid protobuf): {err}"))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
    }
}
