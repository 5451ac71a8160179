//! The padlock wire contract, generated at build time from
//! `proto/padlock/v1/padlock.proto`. Never edit generated code: change the
//! `.proto` file instead.

pub mod codec;
pub mod duration;
mod kind;
pub mod lean;

pub use kind::{Kind, Mode, UnknownKind};

/// `padlock.v1`: the Hold stream and the inspection calls.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("padlock.v1");

    /// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/padlock_descriptor.bin"));

    /// Metadata key that tells apart the statuses sharing one code: with
    /// value [`REQUEST_TIMEOUT`] on a `DEADLINE_EXCEEDED`, the request was
    /// cut by the server's `--request-timeout` (it was not a lock that
    /// could not be had within its wait).
    pub const ERROR_METADATA: &str = "padlock-error";
    /// See [`ERROR_METADATA`].
    pub const REQUEST_TIMEOUT: &str = "request-timeout";
    /// Response metadata of a Session stream: the largest message the
    /// server reads (its `--max-message-bytes`). A larger one ends the
    /// stream and every lock on it, so a client fails such a request alone
    /// instead of sending it (the lean transport's welcome says the same).
    pub const MAX_MESSAGE_METADATA: &str = "padlock-max-message-bytes";
}
