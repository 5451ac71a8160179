//! The errors of taking a lock, shared by the lock table and the
//! backends (which take locks in the outside world), and mapped to gRPC
//! and HTTP statuses once, in the transports.

use std::time::Duration;

/// Errors of the lock table, mapped to gRPC and HTTP statuses once, in the
/// transports.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LockError {
    #[error("invalid lock name '{name}': {why}")]
    InvalidName { name: String, why: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error(
        "semaphore '{name}' has limit {current} while it has holders or waiters; \
         this request asked for limit {requested}"
    )]
    LimitMismatch {
        name: String,
        current: u32,
        requested: u32,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("lock '{name}' already has {cap} waiters (the server's --max-waiters-per-lock)")]
    TooManyWaiters { name: String, cap: usize },
    #[error("the server already tracks {cap} locks (the server's --max-locks)")]
    TooManyLocks { cap: usize },
    #[error(
        "the server already has {cap} lock requests open, held or waiting (the server's --max-holds)"
    )]
    TooManyHolds { cap: usize },
    #[error(
        "this client token already has {cap} lock requests open, held or waiting (its quota in the server's token file)"
    )]
    QuotaExceeded { cap: usize },
    #[error(
        "padlockd has no file descriptor left for another lock: {budget} are in use by locks \
         (its RLIMIT_NOFILE of {limit}, less a reserve for connections)"
    )]
    NoDescriptors { budget: usize, limit: usize },
    #[error("{}", not_acquired(name, *holders, held_by, waited))]
    NotAcquired {
        name: String,
        /// Holders on this server.
        holders: usize,
        /// Who they are (the first few owners).
        held_by: Vec<String>,
        /// The wait that ran out (zero: a try-lock).
        waited: Duration,
    },
    #[error("the server is shutting down and grants no more locks")]
    Draining,
    /// The client token may not use this name.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("lock backend failed: {0}")]
    Backend(String),
}

/// The message of [`LockError::NotAcquired`]: who holds the lock, and how
/// long the request waited.
fn not_acquired(name: &str, holders: usize, held_by: &[String], waited: &Duration) -> String {
    let who = match (holders, held_by) {
        (0, _) | (_, []) => "a process outside this padlockd".to_string(),
        (n, owners) => {
            let mut who = owners.join(", ");
            if n > owners.len() {
                who.push_str(&format!(" and {} more", n - owners.len()));
            }
            who
        }
    };
    if waited.is_zero() {
        format!("lock '{name}' is held by {who} (tried once)")
    } else {
        format!(
            "lock '{name}' is held by {who} and was not acquired within {}",
            padlock_proto::duration::display(*waited)
        )
    }
}
