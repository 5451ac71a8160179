//! TLS, mutual TLS, client tokens and the connection limit, against the
//! real padlockd. Certificates are generated here, never committed.

use padlock::{Client, Error};
use padlock_e2e::{Server, eventually};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A CA and certificates it signed, as PEM files in a temp directory.
struct Pki {
    dir: tempfile::TempDir,
    ca_key: KeyPair,
    ca_params: CertificateParams,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name = DistinguishedName::new();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "padlock test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki {
            dir,
            ca_key,
            ca_params,
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a certificate for `names`; returns (cert, key) paths.
    fn issue(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        // A subject of its own: a leaf whose subject equals its issuer's
        // looks self-signed to OpenSSL (curl).
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let issuer = Issuer::new(self.ca_params.clone(), &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let cert_path = self.dir.path().join(format!("{file}.pem"));
        let key_path = self.dir.path().join(format!("{file}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn https(server: &Server) -> String {
    format!("https://127.0.0.1:{}", server.addr.port())
}

fn tls_server(pki: &Pki, extra: &[&str]) -> Server {
    let (cert, key) = pki.issue("server", &["127.0.0.1", "localhost"]);
    let mut args = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.into_iter().map(str::to_string).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_with_args(&args)
}

/// `/metrics` of a TLS server, read with curl over HTTP/1.1 (with a
/// client certificate, when the server asks for one).
fn https_metrics(pki: &Pki, server: &Server, identity: Option<&(PathBuf, PathBuf)>) -> String {
    let mut curl = std::process::Command::new("curl");
    curl.args(["-sS", "--http1.1", "--cacert", pki.ca().to_str().unwrap()]);
    if let Some((cert, key)) = identity {
        curl.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    let metrics = curl
        .arg(format!("{}/metrics", https(server)))
        .output()
        .expect("curl (tests/run.sh installs it)");
    assert!(
        metrics.status.success(),
        "{}",
        String::from_utf8_lossy(&metrics.stderr)
    );
    String::from_utf8(metrics.stdout).unwrap()
}

/// Waits until a TLS server has counted at least `want.start()` failed
/// handshakes, and checks it counted no more than `want.end()`.
async fn until_tls_failures(pki: &Pki, server: &Server, want: std::ops::RangeInclusive<u64>) {
    eventually(
        "the failed handshakes counted",
        Duration::from_secs(10),
        || {
            let text = https_metrics(pki, server, None);
            let failures: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("padlock_tls_handshake_failures_total "))
                .expect("the TLS failure counter")
                .parse()
                .unwrap();
            assert!(
                failures <= *want.end(),
                "{failures} failed handshakes, not {want:?}"
            );
            std::future::ready((failures >= *want.start()).then_some(()))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_right_ca_works_and_others_are_refused() {
    let pki = Pki::new();
    let server = tls_server(&pki, &[]);
    let client = Client::builder(https(&server))
        .ca_certificate(read(&pki.ca()))
        .connect()
        .await
        .unwrap();
    let guard = client.lock("tls/ok").acquire().await.unwrap();
    assert!(guard.fence() > 0);
    // It locks over the lean transport, inside TLS.
    assert!(
        https_metrics(&pki, &server, None).contains("\npadlock_lean_connections 1\n"),
        "no lean connection"
    );

    // A CA that did not sign the server's certificate: refused, and its
    // two handshakes (lean, then gRPC) counted.
    until_tls_failures(&pki, &server, 0..=0).await;
    let other = Pki::new();
    let refused = Client::builder(https(&server))
        .ca_certificate(read(&other.ca()))
        .connect()
        .await;
    assert!(matches!(refused, Err(Error::Connect { .. })), "{refused:?}");
    until_tls_failures(&pki, &server, 2..=2).await;

    // A plaintext client fails clearly, without hanging.
    let plain = tokio::time::timeout(Duration::from_secs(10), async {
        let client = Client::connect(server.url.clone()).await?;
        client.lock("tls/plain").acquire().await.map(|_| ())
    })
    .await
    .expect("a plaintext client must not hang");
    assert!(
        plain.is_err(),
        "a plaintext client got a lock from a TLS server"
    );
    // Its lean hello and its gRPC connection each failed a handshake (and
    // more may, as gRPC reconnects or the SDK looks at what answers there
    // to name the error, depending on timing).
    until_tls_failures(&pki, &server, 4..=u64::MAX).await;

    // The CLI with --ca-cert.
    let out = server
        .cli()
        .args([
            "--server",
            &https(&server),
            "--ca-cert",
            pki.ca().to_str().unwrap(),
            "run",
            "tls/cli",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate() {
    let pki = Pki::new();
    let ca = pki.ca();
    let server = tls_server(&pki, &["--tls-client-ca", ca.to_str().unwrap()]);
    let no_cert = async {
        let client = Client::builder(https(&server))
            .ca_certificate(read(&ca))
            .connect()
            .await?;
        client.lock("mtls/x").acquire().await.map(|_| ())
    };
    let refused = tokio::time::timeout(Duration::from_secs(10), no_cert)
        .await
        .expect("no hang");
    assert!(
        refused.is_err(),
        "a client without a certificate got a lock"
    );

    let identity = pki.issue("client", &["client"]);
    let (cert, key) = &identity;
    let client = Client::builder(https(&server))
        .ca_certificate(read(&ca))
        .identity(read(cert), read(key))
        .connect()
        .await
        .unwrap();
    client
        .lock("mtls/x")
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    // Over the lean transport, with its certificate.
    assert!(
        https_metrics(&pki, &server, Some(&identity)).contains("\npadlock_lean_connections 1\n"),
        "no lean connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tokens_authenticate_and_limit_names() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "# team tokens\nbilling-token-0123456789 billing/\nadmin-token-0123456789\n",
    )
    .unwrap();
    let server = Server::start_with_args(&["--client-token-file", tokens.to_str().unwrap()]);
    let code = |r: Result<padlock::LockGuard, Error>| match r {
        Err(Error::Status(s)) => s.code(),
        Ok(_) => tonic::Code::Ok,
        Err(e) => panic!("{e}"),
    };

    let anonymous = server.client().await;
    assert_eq!(
        code(anonymous.lock("billing/x").acquire().await),
        tonic::Code::Unauthenticated
    );
    let wrong = Client::builder(server.url.clone())
        .token("guess")
        .connect()
        .await
        .unwrap();
    assert_eq!(
        code(wrong.lock("billing/x").acquire().await),
        tonic::Code::Unauthenticated
    );
    let metrics = reqwest::get(format!("{}/metrics", server.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Each client was refused twice: the hello of the lean connection it
    // opened when it connected, and the one its lock request opened.
    assert!(
        metrics.contains("padlock_grpc_client_auth_failures_total 4\n"),
        "{metrics}"
    );

    let billing = Client::builder(server.url.clone())
        .token("billing-token-0123456789")
        .connect()
        .await
        .unwrap();
    let held = billing.lock("billing/x").acquire().await.unwrap();
    match billing.lock("hr/x").acquire().await {
        Err(Error::Status(s)) => {
            assert_eq!(s.code(), tonic::Code::PermissionDenied);
            assert!(s.message().contains("billing/"), "{}", s.message());
        }
        other => panic!("expected PERMISSION_DENIED, got {other:?}"),
    }
    let admin = Client::builder(server.url.clone())
        .token("admin-token-0123456789")
        .connect()
        .await
        .unwrap();
    let _hr = admin.lock("hr/x").acquire().await.unwrap();
    // A scoped token sees only its own locks; an unscoped one sees all.
    let names =
        |locks: Vec<padlock::LockInfo>| locks.into_iter().map(|l| l.name).collect::<Vec<_>>();
    assert_eq!(names(billing.list("").await.unwrap()), vec!["billing/x"]);
    assert_eq!(
        names(admin.list("").await.unwrap()),
        vec!["billing/x", "hr/x"]
    );
    assert!(
        matches!(billing.show("hr/x", padlock::Kind::File).await, Err(Error::Status(s)) if s.code() == tonic::Code::PermissionDenied)
    );
    // Health needs no token.
    assert!(anonymous.health_check().await.unwrap());

    // The CLI takes the token from a file or from PADLOCK_TOKEN.
    let token_file = dir.path().join("my-token");
    std::fs::write(&token_file, "admin-token-0123456789\n").unwrap();
    let out = server
        .cli()
        .args([
            "--token-file",
            token_file.to_str().unwrap(),
            "run",
            "ops/x",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = server
        .cli()
        .env("PADLOCK_TOKEN", "billing-token-0123456789")
        .args(["run", "ops/x", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{out:?}"
    );
    assert!(held.is_held());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_get_a_clear_status() {
    // The first client's lean connection (its locks) and its gRPC one
    // (for `show` below).
    let server = Server::start_with_args(&["--max-connections", "2"]);
    let first = server.client().await;
    let held = first.lock("limit/x").acquire().await.unwrap();
    assert_eq!(first.list("limit/").await.unwrap().len(), 1);
    let second = server.client().await;
    match second.lock("limit/y").acquire().await {
        Err(Error::Status(s)) => {
            assert_eq!(s.code(), tonic::Code::ResourceExhausted);
            assert!(s.message().contains("--max-connections"), "{}", s.message());
        }
        other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
    }
    // The held lock is untouched.
    assert!(held.is_held());
    assert_eq!(
        first
            .show("limit/x", padlock::Kind::File)
            .await
            .unwrap()
            .unwrap()
            .holders
            .len(),
        1
    );
    held.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_cap_refuses_new_names_and_keeps_held_ones() {
    let server = Server::start_with_args(&["--max-locks", "1"]);
    let client = server.client().await;
    let held = client.lock("cap/a").acquire().await.unwrap();
    match client.lock("cap/b").acquire().await {
        Err(Error::Status(s)) => {
            assert_eq!(s.code(), tonic::Code::ResourceExhausted);
            assert!(s.message().contains("--max-locks"), "{}", s.message());
        }
        other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
    }
    // The held lock is untouched, and its name still queues.
    assert!(held.is_held());
    assert!(client.lock("cap/a").try_acquire().await.unwrap().is_none());
    let fence = held.fence();
    held.release().await.unwrap();
    let b = client.lock("cap/b").acquire().await.unwrap();
    assert!(b.fence() > 0 && fence > 0);
}
