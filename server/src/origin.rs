//! Keeping web pages out: cross-origin requests that change state, and
//! DNS rebinding against a padlockd on loopback.
//!
//! A browser lets any page send a "simple" cross-site POST (a
//! `text/plain` body, no preflight) to `http://127.0.0.1:7420`, so without
//! a check a page a developer visits could take a lock on their padlockd.
//! Browsers say where such a request comes from: `Origin`, and
//! `Sec-Fetch-Site`. Every request that changes state (any method but GET,
//! HEAD and OPTIONS) from another origin is refused: by `Sec-Fetch-Site`
//! when the browser sends it (any but `same-origin` and `none`), else by
//! an `Origin` that does not name the host the request was sent to.
//!
//! A page can also make its own DNS name resolve to 127.0.0.1 (DNS
//! rebinding); its requests are then same-origin, but carry its name in
//! `Host`. While padlockd listens on a loopback address, only loopback
//! names (`localhost`, `*.localhost`, `127.0.0.0/8`, `::1`) and the names in
//! `--allowed-hosts` are accepted. Clients that are not browsers (the SDK,
//! the CLI, curl) send the address they connect to, which passes.

use crate::refusal::Refusal;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};

/// The `Host` names served: checked while listening on loopback.
#[derive(Debug, Clone, Default)]
pub struct Hosts {
    /// `--allowed-hosts`: extra names (lowercase, without port); `*`
    /// accepts any `Host`.
    pub extra: Vec<String>,
    /// Refuse other `Host` names (padlockd listens on loopback).
    pub check_host: bool,
}

impl Hosts {
    fn allows(&self, host: &str) -> bool {
        let name = strip_port(host).to_ascii_lowercase();
        is_loopback_name(&name) || self.extra.iter().any(|h| h == "*" || *h == name)
    }

    /// A page served under one of `--allowed-hosts` (behind a proxy that
    /// rewrites `Host`) is this server's own page.
    fn is_own_page(&self, origin_host: &str) -> bool {
        let name = strip_port(origin_host).to_ascii_lowercase();
        self.extra.contains(&name)
    }
}

/// A request from a foreign site or `Host`: 403 `forbidden_origin` (gRPC
/// `PERMISSION_DENIED`).
fn refused(message: String) -> Refusal {
    Refusal::new(
        tonic::Code::PermissionDenied,
        StatusCode::FORBIDDEN,
        "forbidden_origin",
        message,
    )
}

/// Checks `Host` (when `hosts` is given) and, for requests that change
/// state, that they do not come from another site's page.
pub fn check<B>(request: &Request<B>, hosts: Option<&Hosts>) -> Result<(), Refusal> {
    let host = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| header_text(request.headers(), header::HOST.as_str()));
    if let (Some(hosts), Some(host)) = (hosts.filter(|h| h.check_host), host.as_deref())
        && !hosts.allows(host)
    {
        return Err(refused(format!(
            "host '{}' is not served: padlockd listens on a loopback address and accepts only \
             loopback names (add others with --allowed-hosts)",
            crate::name::printable(host)
        )));
    }
    let safe = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if safe {
        return Ok(());
    }
    let refused = || {
        Err(refused(format!(
            "{} from another site's web page is refused: padlockd takes no lock and \
             revokes none for a cross-origin request",
            request.method()
        )))
    };
    // A browser's own word, which no page can forge, and which holds
    // behind a proxy that rewrites Host.
    if let Some(site) = header_text(request.headers(), "sec-fetch-site") {
        return match site.as_str() {
            "same-origin" | "none" => Ok(()),
            _ => refused(),
        };
    }
    // Older browsers: the page's origin must name this server.
    if let Some(origin) = header_text(request.headers(), header::ORIGIN.as_str()) {
        // `scheme://host[:port]`, and it must name this server as the
        // request does; `null` (sandboxed pages, files) never matches.
        let origin_host = origin.split_once("://").map(|(_, rest)| rest);
        let same = match (origin_host, host.as_deref()) {
            (Some(o), Some(h)) => same_host(o, h) || hosts.is_some_and(|hs| hs.is_own_page(o)),
            _ => false,
        };
        if !same {
            return refused();
        }
    }
    Ok(())
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string())
}

/// `origin` (from `Origin`) and `host` (from `Host`) name the same host
/// and port (a missing port is the scheme's default on both sides).
fn same_host(origin: &str, host: &str) -> bool {
    origin.eq_ignore_ascii_case(host)
        || strip_default_port(origin).eq_ignore_ascii_case(strip_default_port(host))
}

fn strip_default_port(host: &str) -> &str {
    host.strip_suffix(":80")
        .or_else(|| host.strip_suffix(":443"))
        .unwrap_or(host)
}

/// `host[:port]` or `[v6]:port` without the port.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn is_loopback_name(name: &str) -> bool {
    let name = name.trim_end_matches('.');
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri("/v1/locks/x/hold");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn loopback_hosts() {
        let hosts = Hosts {
            extra: vec!["locks.internal".into()],
            check_host: true,
        };
        for ok in [
            "127.0.0.1:7420",
            "127.9.9.9",
            "localhost:7420",
            "LOCALHOST",
            "app.localhost:1",
            "[::1]:7420",
            "locks.internal:7420",
        ] {
            assert!(hosts.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example:7420",
            "10.0.0.1:7420",
            "[::2]:1",
            "localhost.evil.example",
        ] {
            assert!(!hosts.allows(bad), "{bad}");
        }
        let any = Hosts {
            extra: vec!["*".into()],
            check_host: true,
        };
        assert!(any.allows("evil.example"));
        let get = request("GET", &[("host", "evil.example:7420")]);
        let loopback = Hosts {
            check_host: true,
            ..Hosts::default()
        };
        assert!(check(&get, Some(&loopback)).is_err());
        assert!(
            check(&get, Some(&Hosts::default())).is_ok(),
            "not on loopback"
        );
        assert!(check(&get, None).is_ok());
        // Behind a proxy that rewrites Host, without Sec-Fetch-Site.
        let proxied = request(
            "DELETE",
            &[
                ("host", "127.0.0.1:7420"),
                ("origin", "http://locks.internal"),
            ],
        );
        assert!(check(&proxied, Some(&hosts)).is_ok());
        assert!(check(&proxied, Some(&loopback)).is_err());
        let starred = request(
            "DELETE",
            &[
                ("host", "127.0.0.1:7420"),
                ("origin", "http://evil.example"),
            ],
        );
        assert!(check(&starred, Some(&any)).is_err(), "* is not any origin");
    }

    #[test]
    fn cross_origin_changes_are_refused() {
        let host = ("host", "127.0.0.1:7420");
        let cases = [
            ("POST", vec![host, ("origin", "http://evil.example")], false),
            ("POST", vec![host, ("origin", "null")], false),
            (
                "DELETE",
                vec![host, ("sec-fetch-site", "cross-site")],
                false,
            ),
            ("POST", vec![host, ("sec-fetch-site", "same-site")], false),
            (
                "POST",
                vec![host, ("origin", "http://127.0.0.1:7420")],
                true,
            ),
            (
                "DELETE",
                vec![host, ("sec-fetch-site", "same-origin")],
                true,
            ),
            ("POST", vec![host], true),
            ("GET", vec![host, ("origin", "http://evil.example")], true),
        ];
        for (method, headers, ok) in cases {
            let verdict = check(&request(method, &headers), None);
            assert_eq!(verdict.is_ok(), ok, "{method} {headers:?}: {verdict:?}");
        }
    }
}
