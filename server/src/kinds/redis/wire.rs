//! portalocker's wire records: holder ids, the modes a participant
//! advertises, and the records it answers pings with.

use crate::error::LockError;

/// The holder record version portalocker checks.
pub(super) const PROTOCOL_VERSION: u64 = 1;

/// 32 lowercase hex digits from the OS's random source.
pub(super) fn hex_id() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        filled +=
            rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty())?;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub(super) fn new_holder_id() -> Result<String, LockError> {
    hex_id().map_err(|e| LockError::Backend(format!("no randomness for a holder id: {e}")))
}

pub(super) fn is_holder_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What a participant says it is doing (portalocker's `RedisLockMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WireMode {
    Exclusive,
    Pending,
    Shared,
}

impl WireMode {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            WireMode::Exclusive => "exclusive",
            WireMode::Pending => "pending",
            WireMode::Shared => "shared",
        }
    }
}

/// One subscriber's answer to a ping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    pub(super) holder_id: String,
    pub(super) mode: WireMode,
    /// The reply was not a protocol record (an old portalocker): treated as
    /// an exclusive holder.
    pub(super) legacy: bool,
    /// `None`: the record had no `elected` field (portalocker < 4.2).
    pub(super) elected: Option<bool>,
}

impl Record {
    pub(super) fn parse(payload: &[u8], legacy_index: usize) -> Record {
        let parsed = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| {
                let holder_id = v.get("holder_id")?.as_str()?.to_string();
                let mode = match v.get("mode")?.as_str()? {
                    "exclusive" => WireMode::Exclusive,
                    "pending" => WireMode::Pending,
                    "shared" => WireMode::Shared,
                    _ => return None,
                };
                if v.get("protocol")?.as_u64()? != PROTOCOL_VERSION {
                    return None;
                }
                Some(Record {
                    holder_id,
                    mode,
                    legacy: false,
                    elected: v.get("elected").and_then(serde_json::Value::as_bool),
                })
            });
        parsed.unwrap_or_else(|| Record {
            holder_id: format!("legacy-{legacy_index}"),
            mode: WireMode::Exclusive,
            legacy: true,
            elected: None,
        })
    }
}

/// Side channel on which padlockd announces releases (portalocker does
/// not listen to it, and nothing is ever published on the lock channel
/// but pings).
pub(super) fn release_channel(name: &str) -> String {
    format!("{name}-padlock-released")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_holder_records_like_portalocker() {
        let r = Record::parse(
            br#"{"holder_id":"ab","mode":"pending","protocol":1,"elected":true}"#,
            0,
        );
        assert_eq!(
            (r.mode, r.elected, r.legacy),
            (WireMode::Pending, Some(true), false)
        );
        let old = Record::parse(br#"{"holder_id":"ab","mode":"shared","protocol":1}"#, 0);
        assert_eq!(old.elected, None);
        for junk in [
            &b"pong"[..],
            br#"{"holder_id":"ab","mode":"weird","protocol":1}"#,
            br#"{"holder_id":"ab","mode":"shared","protocol":2}"#,
        ] {
            let legacy = Record::parse(junk, 3);
            assert_eq!(
                (legacy.holder_id.as_str(), legacy.mode, legacy.legacy),
                ("legacy-3", WireMode::Exclusive, true)
            );
        }
    }

    #[test]
    fn holder_ids_are_32_lowercase_hex() {
        let id = hex_id().unwrap();
        assert!(is_holder_id(&id), "{id}");
        assert!(!is_holder_id("ABCDEF0123456789abcdef0123456789"));
        assert!(!is_holder_id("abc"));
    }
}
