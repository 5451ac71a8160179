//! padlockd: a network lock server.
//!
//! Data flows one way: transport ([`grpc`], [`http`]) -> lock table ([`locks`]) ->
//! kind ([`kinds`]) -> the OS; events flow back through the same holder.
//! [`run`] wires them together from a [`Config`].

pub mod auth;
pub mod config;
mod connections;
pub mod error;
pub mod fds;
pub mod fs;
pub mod grpc;
pub mod history;
pub mod http;
pub mod kinds;
mod lean;
pub mod locks;
pub mod metrics;
pub mod name;
mod origin;
mod refusal;
mod serve;
mod server;

pub use config::Config;
pub use server::run;
