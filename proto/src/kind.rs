//! The kinds and modes of lock, named once for the server, the SDK and the
//! CLI: their names on the command line, in URLs and JSON (`file`,
//! `semaphore`, `redis`; `exclusive`, `shared`), and their numbers on the
//! wire.

use crate::v1;
use std::fmt;
use std::str::FromStr;

/// What is locked: `file`, a `flock(2)` on a file in the lock directory;
/// `semaphore`, one of N slot files (portalocker's BoundedSemaphore);
/// `redis`, a Redis pub/sub lock (portalocker's RedisLock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Kind {
    // (No doc comments on the variants: clap would turn them into a long
    // list in every --help.)
    File,
    Semaphore,
    Redis,
}

impl Kind {
    /// Every kind, in order (the first is the smallest), as lists and
    /// metrics show them.
    pub const ALL: [Kind; 3] = [Kind::File, Kind::Semaphore, Kind::Redis];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Semaphore => "semaphore",
            Kind::Redis => "redis",
        }
    }

    /// Its place in [`Kind::ALL`], for per-kind arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The kind a wire value names; `KIND_UNSPECIFIED` (0) is `file`.
    pub fn from_wire(value: i32) -> Result<Kind, UnknownKind> {
        match v1::Kind::try_from(value) {
            Ok(v1::Kind::Unspecified | v1::Kind::File) => Ok(Kind::File),
            Ok(v1::Kind::Semaphore) => Ok(Kind::Semaphore),
            Ok(v1::Kind::Redis) => Ok(Kind::Redis),
            Err(_) => Err(UnknownKind(value.to_string())),
        }
    }
}

impl From<Kind> for v1::Kind {
    fn from(kind: Kind) -> v1::Kind {
        match kind {
            Kind::File => v1::Kind::File,
            Kind::Semaphore => v1::Kind::Semaphore,
            Kind::Redis => v1::Kind::Redis,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Kind, UnknownKind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKind(s.to_string()))
    }
}

/// A kind that is not one of [`Kind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKind(pub String);

impl fmt::Display for UnknownKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown kind '{}'; expected file, semaphore or redis",
            self.0
        )
    }
}

impl std::error::Error for UnknownKind {}

/// How a lock is held: alone, or with other shared holders (readers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Mode {
    Exclusive,
    Shared,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Exclusive => "exclusive",
            Mode::Shared => "shared",
        }
    }

    /// The mode a wire value names; `MODE_UNSPECIFIED` (0) is exclusive.
    pub fn from_wire(value: i32) -> Option<Mode> {
        match v1::Mode::try_from(value) {
            Ok(v1::Mode::Unspecified | v1::Mode::Exclusive) => Some(Mode::Exclusive),
            Ok(v1::Mode::Shared) => Some(Mode::Shared),
            Err(_) => None,
        }
    }
}

impl From<Mode> for v1::Mode {
    fn from(mode: Mode) -> v1::Mode {
        match mode {
            Mode::Exclusive => v1::Mode::Exclusive,
            Mode::Shared => v1::Mode::Shared,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_wire_values_round_trip() {
        for kind in Kind::ALL {
            assert_eq!(kind.as_str().parse::<Kind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.as_str());
            assert_eq!(Kind::from_wire(v1::Kind::from(kind) as i32), Ok(kind));
            assert_eq!(Kind::ALL[kind.index()], kind);
        }
        assert_eq!(Kind::from_wire(0), Ok(Kind::File));
        assert_eq!(
            Kind::from_wire(9).unwrap_err().to_string(),
            "unknown kind '9'; expected file, semaphore or redis"
        );
        assert!("File".parse::<Kind>().is_err());
        assert!(Kind::ALL.windows(2).all(|w| w[0] < w[1]), "in order");
        for mode in [Mode::Exclusive, Mode::Shared] {
            assert_eq!(Mode::from_wire(v1::Mode::from(mode) as i32), Some(mode));
        }
        assert_eq!(Mode::from_wire(0), Some(Mode::Exclusive));
        assert_eq!(Mode::from_wire(7), None);
    }
}
