//! Lock names: what a client may ask for.
//!
//! A name is also a relative path under the lock directory (file and
//! semaphore kinds), so the rules here are the first line of defence against
//! escaping it; the second is `openat2(RESOLVE_BENEATH)` in `kinds::fs`.

use super::LockError;

/// Longest accepted name, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;
/// Longest accepted path component, in bytes. Leaves room for the
/// semaphore suffix `.<NN>.lock` under the usual 255-byte file name limit.
pub const MAX_COMPONENT_BYTES: usize = 240;
/// First path component reserved for padlockd's own state (fences).
pub const RESERVED_DIR: &str = ".padlock";

/// Checks a lock name and returns it unchanged when it is acceptable.
///
/// Accepted: non-empty, at most [`MAX_NAME_BYTES`], relative, `/`-separated
/// components that are non-empty, not `.` or `..`, at most
/// [`MAX_COMPONENT_BYTES`], without NUL or other control characters, and not
/// starting with the reserved [`RESERVED_DIR`].
pub fn validate(name: &str) -> Result<&str, LockError> {
    let bad = |why: &str| LockError::InvalidName {
        name: printable(name),
        why: why.to_string(),
    };
    if name.is_empty() {
        return Err(bad("the name is empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(bad(&format!(
            "the name is {} bytes long; the limit is {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(bad("the name contains NUL or another control character"));
    }
    if name.starts_with('/') {
        return Err(bad("the name must be relative (it starts with '/')"));
    }
    for (i, component) in name.split('/').enumerate() {
        match component {
            "" => {
                return Err(bad(
                    "the name has an empty path component ('//' or a trailing '/')",
                ));
            }
            "." | ".." => return Err(bad("the name has a '.' or '..' path component")),
            c if c.len() > MAX_COMPONENT_BYTES => {
                return Err(bad(&format!(
                    "a path component is {} bytes long; the limit is {MAX_COMPONENT_BYTES}",
                    c.len()
                )));
            }
            RESERVED_DIR if i == 0 => {
                return Err(bad(
                    "names under '.padlock/' are reserved for padlockd's own state",
                ));
            }
            _ => {}
        }
    }
    Ok(name)
}

/// A bounded, escaped copy of a name for error messages and logs.
pub fn printable(name: &str) -> String {
    let mut out: String = name.chars().take(64).flat_map(char::escape_debug).collect();
    if name.chars().count() > 64 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_and_nested_names() {
        for ok in [
            "a",
            "jobs/nightly",
            "x.lock",
            "a b",
            "ünïcode",
            ".hidden",
            "a/.padlock",
        ] {
            assert_eq!(validate(ok).unwrap(), ok);
        }
    }

    #[test]
    fn rejects_hostile_names() {
        let long = "a".repeat(MAX_NAME_BYTES + 1);
        let long_component = "b".repeat(MAX_COMPONENT_BYTES + 1);
        for bad in [
            "",
            "/etc/passwd",
            "../../etc/passwd",
            "a/../../b",
            "a/./b",
            "a//b",
            "a/",
            ".",
            "nul\0byte",
            "new\nline",
            ".padlock/fences/x",
            long.as_str(),
            long_component.as_str(),
        ] {
            let err = validate(bad).unwrap_err();
            assert!(
                matches!(err, LockError::InvalidName { .. }),
                "{bad:?} gave {err:?}"
            );
        }
    }

    #[test]
    fn printable_escapes_and_bounds() {
        assert_eq!(printable("a\0b"), "a\\0b");
        assert_eq!(printable(&"x".repeat(100)).chars().count(), 65);
    }
}
