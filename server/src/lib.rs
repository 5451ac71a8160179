//! padlockd: a network lock server.
//!
//! Data flows one way: transport ([`grpc`]) -> lock table ([`locks`]) ->
//! kind ([`kinds`]) -> the OS; events flow back through the same holder.
//! [`run`] wires them together from a [`Config`].

pub mod config;
pub mod grpc;
pub mod kinds;
pub mod locks;
mod server;

pub use config::Config;
pub use server::run;
