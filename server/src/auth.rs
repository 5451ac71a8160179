//! Client tokens: who may take which locks.
//!
//! With `--client-token-file FILE`, every lock request (gRPC `Padlock`
//! service, HTTP lock endpoints) needs `authorization: Bearer <token>`. The
//! file has one token per line, optionally followed by whitespace and the
//! lock-name prefix that token may use, and by a quota `max_holds=N`: the
//! most lock requests (held and awaited) the token may have open at once.
//! Blank lines and `#` comments are skipped:
//!
//! ```text
//! # token                           prefix (optional)  quota (optional)
//! 3f9c2b7e6a1d4c8e9b0a5f7d2c1e8b4a  billing/           max_holds=100
//! 8e1d5a9c3b7f2e6d0c4a8b1f5e9d3c7a
//! 5b2e8d1c7a4f0e3b9c6d2a8f1e5b7c3d  max_holds=10
//! ```
//!
//! Missing or unknown token: UNAUTHENTICATED (HTTP 401). A name outside the
//! token's prefix: PERMISSION_DENIED (HTTP 403). A quota reached:
//! RESOURCE_EXHAUSTED (HTTP 429), and the token's other locks and every
//! other token are unaffected. Health, reflection and the admin endpoints
//! are not covered (admin has its own token).

use crate::locks::Quota;
use std::path::Path;
use std::sync::Arc;

/// What a request's token allows.
#[derive(Debug, Clone)]
pub struct Scope {
    /// Lock names must start with this (`None`: any name).
    pub prefix: Option<String>,
    /// Lock requests the token may have open at once (`None`: no quota
    /// beyond the server's own caps).
    pub quota: Option<Arc<Quota>>,
}

impl Scope {
    /// Checks that `name` is within the scope.
    pub fn allows(&self, name: &str) -> bool {
        self.prefix.as_deref().is_none_or(|p| name.starts_with(p))
    }

    /// The prefix that lists names starting with `prefix` that this scope
    /// may see; `None` when there are none.
    pub fn narrow(&self, prefix: &str) -> Option<String> {
        match self.prefix.as_deref() {
            None => Some(prefix.to_string()),
            Some(own) if prefix.starts_with(own) => Some(prefix.to_string()),
            Some(own) if own.starts_with(prefix) => Some(own.to_string()),
            Some(_) => None,
        }
    }

    /// The error for a name outside the scope.
    pub fn denied(&self, name: &str) -> String {
        format!(
            "this client token may only use lock names starting with '{}'; '{}' does not",
            self.prefix.as_deref().unwrap_or(""),
            crate::name::printable(name)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing client token: send `authorization: Bearer <token>`")]
    Missing,
    #[error("invalid client token")]
    Invalid,
}

/// The tokens of `--client-token-file`.
#[derive(Debug, Default)]
pub struct ClientTokens {
    tokens: Vec<(Vec<u8>, Scope)>,
}

impl ClientTokens {
    /// Reads a token file; `Err` names the file and line.
    pub fn from_file(path: &Path) -> Result<ClientTokens, String> {
        let shown = path.display();
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read client token file {shown}: {e}"))?;
        let tokens =
            ClientTokens::parse(&text).map_err(|e| format!("client token file {shown}: {e}"))?;
        if tokens.tokens.is_empty() {
            return Err(format!("client token file {shown} has no tokens"));
        }
        Ok(tokens)
    }

    pub fn parse(text: &str) -> Result<ClientTokens, String> {
        let mut tokens = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let token = words.next().unwrap_or_default();
            let mut prefix = None;
            let mut quota = None;
            for word in words {
                if let Some(text) = word.strip_prefix("max_holds=") {
                    let max: usize = text.parse().ok().filter(|m| *m > 0).ok_or_else(|| {
                        format!(
                            "line {}: max_holds must be a positive number, not '{text}'",
                            n + 1
                        )
                    })?;
                    if quota.replace(Quota::new(max)).is_some() {
                        return Err(format!("line {}: max_holds is given twice", n + 1));
                    }
                } else if prefix.is_none() && quota.is_none() {
                    prefix = Some(word.to_string());
                } else {
                    return Err(format!(
                        "line {}: expected `TOKEN [PREFIX] [max_holds=N]`",
                        n + 1
                    ));
                }
            }
            tokens.push((token.as_bytes().to_vec(), Scope { prefix, quota }));
        }
        Ok(ClientTokens { tokens })
    }

    /// Checks an `authorization` header value.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<Scope, AuthError> {
        let header = authorization.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix(b"Bearer ")
            .or_else(|| header.strip_prefix(b"bearer "))
            .ok_or(AuthError::Invalid)?;
        // Compare against every token in constant time per byte, so the
        // timing says nothing about which token (or how much of it) matched.
        let mut found = None;
        for (candidate, scope) in &self.tokens {
            if constant_time_eq(token, candidate) {
                found = Some(scope.clone());
            }
        }
        found.ok_or(AuthError::Invalid)
    }
}

/// Compares without an early exit, so the time taken does not tell how
/// much of a guess was right. It depends only on the expected length.
pub fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = (given.len() != expected.len()) as u8;
    for (i, e) in expected.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(!e);
        diff |= std::hint::black_box(g ^ e);
    }
    diff == 0
}

/// The gRPC interceptor: rejects requests without a valid token and
/// attaches the token's [`Scope`] to those with one.
#[derive(Clone)]
pub struct GrpcAuth {
    tokens: Option<Arc<ClientTokens>>,
    on_failure: Arc<dyn Fn() + Send + Sync>,
}

impl GrpcAuth {
    /// `tokens: None` lets every request through (no token file).
    pub fn new(
        tokens: Option<Arc<ClientTokens>>,
        on_failure: impl Fn() + Send + Sync + 'static,
    ) -> GrpcAuth {
        GrpcAuth {
            tokens,
            on_failure: Arc::new(on_failure),
        }
    }
}

impl tonic::service::Interceptor for GrpcAuth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(request);
        };
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        match tokens.check(header) {
            Ok(scope) => {
                request.extensions_mut().insert(scope);
                Ok(request)
            }
            Err(err) => {
                (self.on_failure)();
                Err(tonic::Status::unauthenticated(err.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tokens_with_optional_prefixes() {
        let tokens = ClientTokens::parse("# comment\n\nabc billing/\n  def  \n").unwrap();
        assert_eq!(
            tokens.check(Some(b"Bearer abc")).unwrap().prefix.as_deref(),
            Some("billing/")
        );
        assert_eq!(tokens.check(Some(b"Bearer def")).unwrap().prefix, None);
        assert!(matches!(
            tokens.check(Some(b"Bearer abd")),
            Err(AuthError::Invalid)
        ));
        assert!(matches!(
            tokens.check(Some(b"abc")),
            Err(AuthError::Invalid)
        ));
        assert!(matches!(tokens.check(None), Err(AuthError::Missing)));
        assert!(ClientTokens::parse("a b c").is_err());
    }

    #[test]
    fn parses_quotas() {
        let tokens =
            ClientTokens::parse("abc billing/ max_holds=3\ndef max_holds=5\nghi team-a/\n")
                .unwrap();
        let abc = tokens.check(Some(b"Bearer abc")).unwrap();
        assert_eq!(abc.prefix.as_deref(), Some("billing/"));
        assert_eq!(abc.quota.as_ref().unwrap().max, 3);
        let def = tokens.check(Some(b"Bearer def")).unwrap();
        assert_eq!((def.prefix, def.quota.unwrap().max), (None, 5));
        assert!(tokens.check(Some(b"Bearer ghi")).unwrap().quota.is_none());
        // Every request with one token shares its quota.
        let again = tokens.check(Some(b"Bearer abc")).unwrap();
        assert!(Arc::ptr_eq(
            abc.quota.as_ref().unwrap(),
            again.quota.as_ref().unwrap()
        ));
        for bad in [
            "abc max_holds=0",
            "abc max_holds=x",
            "abc p/ max_holds=1 max_holds=2",
            "abc max_holds=1 p/",
            "abc p/ q/",
        ] {
            assert!(ClientTokens::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scopes_check_prefixes() {
        let scope = Scope {
            prefix: Some("billing/".into()),
            quota: None,
        };
        assert!(scope.allows("billing/run"));
        assert!(!scope.allows("hr/run"));
        assert!(scope.denied("hr/run").contains("billing/"));
        assert_eq!(scope.narrow("").as_deref(), Some("billing/"));
        assert_eq!(scope.narrow("bill").as_deref(), Some("billing/"));
        assert_eq!(scope.narrow("billing/x").as_deref(), Some("billing/x"));
        assert_eq!(scope.narrow("hr/"), None);
        let open = Scope {
            prefix: None,
            quota: None,
        };
        assert!(open.allows("anything"));
        assert_eq!(open.narrow("x").as_deref(), Some("x"));
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
