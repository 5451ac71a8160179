//! The admin token that guards mutating endpoints (revoke).
//!
//! One shared secret, read once at startup from `--admin-token-file`, sent
//! by clients as `Authorization: Bearer <token>`. Without a token file the
//! mutating endpoints are disabled (403), so a server started without
//! thought never lets anyone revoke locks.

use super::error::ApiError;
use crate::auth::constant_time_eq;
use axum::http::{HeaderMap, StatusCode, header};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Longest token accepted in the file, so a wrong path (a log, a binary)
/// is refused at startup rather than read whole.
const MAX_TOKEN_BYTES: usize = 4096;

/// The configured admin token, if any, and how often it was refused.
#[derive(Debug, Default)]
pub struct Admin {
    token: Option<Vec<u8>>,
    /// Requests refused for a missing or wrong token (for `/metrics`).
    pub failures: AtomicU64,
}

/// Why the admin token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read admin token file {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("admin token file {path} is empty")]
    Empty { path: String },
    #[error("admin token file {path} holds more than one line or over {MAX_TOKEN_BYTES} bytes")]
    Malformed { path: String },
}

impl Admin {
    /// Mutating endpoints disabled.
    pub fn disabled() -> Admin {
        Admin::default()
    }

    /// An admin token, given directly (tests, embedding).
    pub fn with_token(token: &str) -> Admin {
        Admin {
            token: Some(token.as_bytes().to_vec()),
            failures: AtomicU64::new(0),
        }
    }

    /// Reads the token from `path`: one line; surrounding whitespace and
    /// the trailing newline are ignored.
    pub fn from_file(path: &Path) -> Result<Admin, TokenError> {
        let shown = path.display().to_string();
        let text = std::fs::read(path).map_err(|err| TokenError::Read {
            path: shown.clone(),
            err,
        })?;
        let token = text.trim_ascii();
        if token.is_empty() {
            return Err(TokenError::Empty { path: shown });
        }
        if token.len() > MAX_TOKEN_BYTES || token.iter().any(|b| b.is_ascii_control()) {
            return Err(TokenError::Malformed { path: shown });
        }
        warn_if_readable_by_others(path);
        Ok(Admin::with_token(std::str::from_utf8(token).map_err(
            |_| TokenError::Malformed {
                path: shown.clone(),
            },
        )?))
    }

    pub fn is_enabled(&self) -> bool {
        self.token.is_some()
    }

    /// Does the request carry the admin token? (No failure is counted: a
    /// read endpoint asks this before it checks for a client token.)
    pub fn is_admin(&self, headers: &HeaderMap) -> bool {
        match (&self.token, bearer(headers)) {
            (Some(expected), Some(given)) => constant_time_eq(given.as_bytes(), expected),
            _ => false,
        }
    }

    /// Checks `Authorization: Bearer <token>`: 403 when no token is
    /// configured, 401 when the header is missing or the token is wrong.
    pub fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = &self.token else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "admin_disabled",
                "admin endpoints are disabled: start padlockd with --admin-token-file FILE \
                 (or PADLOCK_ADMIN_TOKEN_FILE) to enable them",
            ));
        };
        let given = bearer(headers);
        let refused = |message: &str| {
            self.failures.fetch_add(1, Ordering::Relaxed);
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                message,
            ))
        };
        match given {
            None => {
                refused("this endpoint needs the admin token: send 'Authorization: Bearer <token>'")
            }
            Some(given) if constant_time_eq(given.as_bytes(), expected) => Ok(()),
            Some(_) => refused("wrong admin token"),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o007 != 0
    {
        tracing::warn!(
            path = %path.display(),
            "the admin token file is readable by every user; chmod o-rwx it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn compares_whole_tokens() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"secrets", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
    }

    #[test]
    fn statuses() {
        let off = Admin::disabled();
        assert_eq!(
            off.authorize(&headers("Bearer x")).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        let on = Admin::with_token("s3cret");
        assert!(on.authorize(&headers("Bearer s3cret")).is_ok());
        assert_eq!(
            on.authorize(&HeaderMap::new()).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            on.authorize(&headers("Bearer nope")).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            on.authorize(&headers("Basic s3cret")).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(on.failures.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn token_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").unwrap();
        assert!(
            Admin::from_file(&path)
                .unwrap()
                .authorize(&headers("Bearer s3cret"))
                .is_ok()
        );
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            Admin::from_file(&path),
            Err(TokenError::Empty { .. })
        ));
        std::fs::write(&path, "a\nb\n").unwrap();
        assert!(matches!(
            Admin::from_file(&path),
            Err(TokenError::Malformed { .. })
        ));
        assert!(matches!(
            Admin::from_file(&dir.path().join("missing")),
            Err(TokenError::Read { .. })
        ));
    }
}
