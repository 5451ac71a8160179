//! Lock names: what a client may ask for.
//!
//! A name is also a relative path under the lock directory (file and
//! semaphore kinds), so the rules here are the first line of defence against
//! escaping it; the second is `openat2(RESOLVE_BENEATH)` in `crate::fs`.

use crate::error::LockError;

/// Longest accepted name, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;
/// Longest accepted path component, in bytes. Leaves room for the
/// semaphore suffix `.<NN>.lock` under the usual 255-byte file name limit.
pub const MAX_COMPONENT_BYTES: usize = 240;
/// First path component reserved for padlockd's own state (fences).
pub const RESERVED_DIR: &str = ".padlock";

/// Characters that reorder how text around them is shown (Unicode
/// bidirectional controls): a name holding them could display as another
/// name in `padlock list` and the dashboard.
const BIDI_CONTROLS: &[char] = &[
    '\u{061C}', '\u{200E}', '\u{200F}', '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}',
    '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}',
];

fn is_spoofing(c: char) -> bool {
    c.is_control() || BIDI_CONTROLS.contains(&c)
}

/// Checks free text a client sends to be shown to others (owner, labels):
/// no control characters, no bidirectional controls.
pub fn check_text(what: &str, text: &str) -> Result<(), LockError> {
    if text.chars().any(is_spoofing) {
        return Err(LockError::InvalidArgument(format!(
            "{what} contains a control character or a bidirectional control (U+202E and \
             the like); they could make it display as something else"
        )));
    }
    Ok(())
}

/// Checks a lock name and returns it unchanged when it is acceptable.
///
/// Accepted: non-empty, at most [`MAX_NAME_BYTES`], relative, at most
/// `max_components` `/`-separated components that are non-empty, not `.`
/// or `..`, at most [`MAX_COMPONENT_BYTES`], without NUL or other control
/// characters or bidirectional controls, and not starting with the
/// reserved [`RESERVED_DIR`]. Names are compared byte for byte: the NFC
/// and NFD spellings of `é` are two locks.
pub fn validate(name: &str, max_components: usize) -> Result<&str, LockError> {
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
    if name.chars().any(is_spoofing) {
        return Err(bad(
            "the name contains a bidirectional control (U+202E and the like), which could make \
             it display as another name",
        ));
    }
    let components = name.split('/').count();
    if components > max_components {
        return Err(bad(&format!(
            "the name has {components} '/'-separated components; the limit is {max_components} \
             (the server's --max-name-components)"
        )));
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
            assert_eq!(validate(ok, 16).unwrap(), ok);
        }
    }

    #[test]
    fn rejects_hostile_names() {
        let long = "a".repeat(MAX_NAME_BYTES + 1);
        let long_component = "b".repeat(MAX_COMPONENT_BYTES + 1);
        let deep = "d/".repeat(16) + "x";
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
            deep.as_str(),
            "evil\u{202E}txt.exe",
            "a\u{2066}b",
            "a\u{200F}",
        ] {
            let err = validate(bad, 16).unwrap_err();
            assert!(
                matches!(err, LockError::InvalidName { .. }),
                "{bad:?} gave {err:?}"
            );
        }
    }

    #[test]
    fn components_are_capped() {
        let sixteen = vec!["c"; 16].join("/");
        assert!(validate(&sixteen, 16).is_ok());
        let err = validate(&format!("{sixteen}/x"), 16).unwrap_err();
        assert!(
            err.to_string().contains("17 '/'-separated components"),
            "{err}"
        );
        assert!(validate("a/b", 1).is_err());
    }

    #[test]
    fn shown_text_is_checked() {
        assert!(check_text("owner", "padlock[42]@host").is_ok());
        assert!(check_text("owner", "ünïcode ok").is_ok());
        assert!(check_text("owner", "a\u{202E}b").is_err());
        assert!(check_text("a label", "x\ny").is_err());
    }

    #[test]
    fn printable_escapes_and_bounds() {
        assert_eq!(printable("a\u{202E}b"), "a\\u{202e}b");
        assert_eq!(printable("a\0b"), "a\\0b");
        assert_eq!(printable(&"x".repeat(100)).chars().count(), 65);
    }
}
