//! The HTTP side against the real padlockd, with a real HTTP client: every
//! endpoint with good and bad requests (status codes and JSON bodies),
//! revoke reaching an SDK holder, the order of server-sent events, an HTTP
//! holder handing over to a gRPC waiter and back, metrics, the OpenAPI
//! document, and streams ending on shutdown.

use padlock::LostReason;
use padlock_e2e::http::{
    Chunks, Events, PATIENCE, client, encode_path, error_code, hold, json, parse_metrics, raw,
    token_file,
};
use padlock_e2e::{Server, assert_unharmed, eventually_ok};
use reqwest::StatusCode;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const TOKEN: &str = "correct-horse-battery-staple";

/// padlockd with an admin token; the temp dir holding the token file.
fn admin_server() -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let server = Server::start_with_args(&["--admin-token-file", token.to_str().unwrap()]);
    (server, dir)
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_one_error_shape() {
    let server = Server::start();
    let http = client();
    let base = &server.url;

    let (status, body) = json(http.get(format!("{base}/healthz"))).await;
    assert_eq!(
        (status, &body),
        (StatusCode::OK, &serde_json::json!({"status": "ok"}))
    );
    let (status, body) = json(http.get(format!("{base}/readyz"))).await;
    assert_eq!(
        (status, &body),
        (StatusCode::OK, &serde_json::json!({"status": "ready"}))
    );

    // No such route, wrong method: the same error shape.
    let (status, body) = json(http.get(format!("{base}/v2/nothing"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "not_found");
    let (status, body) = json(http.put(format!("{base}/v1/locks"))).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_code(&body), "method_not_allowed");
    let (status, body) = json(http.patch(format!("{base}/v1/locks/a"))).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_code(&body), "method_not_allowed");
    // A POST or DELETE under /v1/locks/ that is not hold or holders/{id}.
    let (status, body) = json(http.post(format!("{base}/v1/locks/a/b"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "not_found");

    // gRPC still works on the same port.
    let grpc = server.client().await;
    assert!(grpc.health_check().await.unwrap());
    let guard = grpc.lock("same/port").acquire().await.unwrap();
    let (status, body) = json(http.get(format!("{base}/v1/locks/same/port"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["holders"][0]["fence"], guard.fence());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_show_locks() {
    let server = Server::start();
    let http = client();
    let base = &server.url;
    let grpc = server.client().await;

    let (status, body) = json(http.get(format!("{base}/v1/locks"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["locks"], serde_json::json!([]));
    assert_eq!(body["next_cursor"], Value::Null);
    assert!(body["now_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);

    let report = grpc
        .lock("reports/nightly")
        .owner("alice")
        .label("team", "data")
        .acquire()
        .await
        .unwrap();
    let mut events = Events::open(&http, base, "?prefix=reports/").await;
    let waiting = {
        let grpc = grpc.clone();
        tokio::spawn(async move { grpc.lock("reports/nightly").owner("bob").acquire().await })
    };
    assert_eq!(events.next().await.unwrap().event, "queued");
    let slot0 = grpc.lock("gpu").semaphore(3).acquire().await.unwrap();
    let slot1 = grpc.lock("gpu").semaphore(3).acquire().await.unwrap();
    let reader1 = grpc.lock("db/schema").shared().acquire().await.unwrap();
    let reader2 = grpc.lock("db/schema").shared().acquire().await.unwrap();
    let (status, lock) = json(http.get(format!("{base}/v1/locks/reports/nightly"))).await;
    assert_eq!(status, StatusCode::OK);

    // One lock, its name with a '/' in the path.
    assert_eq!(lock["name"], "reports/nightly");
    assert_eq!(lock["kind"], "file");
    assert_eq!(lock["mode"], "exclusive");
    assert_eq!(lock["limit"], 0);
    let holder = &lock["holders"][0];
    assert_eq!(holder["id"], report.holder_id());
    assert_eq!(holder["owner"], "alice");
    assert_eq!(holder["fence"], report.fence());
    assert_eq!(holder["slot"], Value::Null);
    assert_eq!(holder["mode"], "exclusive");
    assert_eq!(holder["labels"], serde_json::json!({"team": "data"}));
    assert!(holder["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(holder["since"].as_str().unwrap().ends_with('Z'));
    assert!(holder["since_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
    let waiter = &lock["waiters"][0];
    assert_eq!(
        (&waiter["owner"], &waiter["position"]),
        (&"bob".into(), &1.into())
    );
    assert_eq!(waiter["mode"], "exclusive");
    assert!(waiter["id"].as_str().unwrap().parse::<u64>().is_ok());

    // The semaphore is found with its kind, not without.
    let (status, gpu) = json(http.get(format!("{base}/v1/locks/gpu?kind=semaphore"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&gpu["kind"], &gpu["limit"]),
        (&"semaphore".into(), &3.into())
    );
    let slots: BTreeSet<u64> = gpu["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["slot"].as_u64().unwrap())
        .collect();
    assert_eq!(slots, BTreeSet::from([0, 1]));
    // Without a kind, every kind is looked in; with the wrong one, 404.
    let (status, found) = json(http.get(format!("{base}/v1/locks/gpu"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(found, gpu);
    let (status, body) = json(http.get(format!("{base}/v1/locks/gpu?kind=file"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "not_found");
    assert_eq!(
        body["error"]["message"],
        "no file lock named 'gpu' is held or waited for"
    );
    let (_, shared) = json(http.get(format!("{base}/v1/locks/db/schema"))).await;
    assert_eq!(shared["mode"], "shared");
    assert_eq!(shared["holders"].as_array().unwrap().len(), 2);

    // The list, sorted by name, and its filters.
    let names = |body: &Value| -> Vec<String> {
        body["locks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, all) = json(http.get(format!("{base}/v1/locks"))).await;
    assert_eq!(names(&all), ["db/schema", "gpu", "reports/nightly"]);
    let (_, sems) = json(http.get(format!("{base}/v1/locks?kind=semaphore"))).await;
    assert_eq!(names(&sems), ["gpu"]);
    let (_, prefixed) = json(http.get(format!("{base}/v1/locks?prefix=reports/"))).await;
    assert_eq!(names(&prefixed), ["reports/nightly"]);
    let (_, none) = json(http.get(format!("{base}/v1/locks?prefix=zzz"))).await;
    assert_eq!(names(&none), Vec::<String>::new());

    // Bad parameters: 400 in the common shape.
    for query in [
        "kind=bogus",
        "limit=0",
        "limit=1001",
        "limit=-1",
        "limit=many",
        "cursor=nonsense",
        "cursor=tape:x",
        "colour=blue",
    ] {
        let (status, body) = json(http.get(format!("{base}/v1/locks?{query}"))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(error_code(&body), "invalid_argument", "{query}");
    }
    let (status, body) = json(http.get(format!("{base}/v1/locks/gpu?kind=tape"))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "invalid_argument");

    drop((slot0, slot1, reader1, reader2));
    report.release().await.unwrap();
    waiting.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_bounded_and_complete() {
    let server = Server::start();
    let http = client();
    let base = &server.url;
    let grpc = server.client().await;
    let mut guards = Vec::new();
    let mut expected = Vec::new();
    for i in 0..7 {
        let name = format!("page/{i}");
        guards.push(grpc.lock(&name).acquire().await.unwrap());
        expected.push(name);
    }
    // Same name, two kinds: the cursor must tell them apart.
    guards.push(grpc.lock("page/3").semaphore(2).acquire().await.unwrap());

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut url = format!("{base}/v1/locks?limit=3&prefix=page/");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={}", encode_path(c)));
        }
        let (status, body) = json(http.get(url)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let locks = body["locks"].as_array().unwrap();
        assert!(locks.len() <= 3);
        pages += 1;
        for lock in locks {
            seen.push(format!(
                "{}:{}",
                lock["kind"].as_str().unwrap(),
                lock["name"].as_str().unwrap()
            ));
        }
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let mut want: Vec<String> = expected.iter().map(|n| format!("file:{n}")).collect();
    want.insert(4, "semaphore:page/3".to_string());
    assert_eq!(seen, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_are_refused() {
    let (server, _dir) = admin_server();
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let long = "x".repeat(1100);
    let long_component = format!("a/{}", "y".repeat(300));
    // Raw requests, so that nothing normalizes `..` on the way.
    let paths = [
        "..",
        "../../etc/passwd",
        "a/../../b",
        "a/./b",
        "a//b",
        "%2E%2E/escape",
        "a%2F..%2F..%2Fb",
        "%00",
        "a%0Ab",
        ".padlock/fences",
        long.as_str(),
        long_component.as_str(),
        "%FF%FE",
    ];
    for path in paths {
        for (method, target, headers) in [
            ("GET", format!("/v1/locks/{path}"), ""),
            ("POST", format!("/v1/locks/{path}/hold?wait=0"), ""),
            (
                "DELETE",
                format!("/v1/locks/{path}/holders/1"),
                auth.as_str(),
            ),
        ] {
            let (status, body) = raw(server.addr, method, &target, headers);
            assert_eq!(status, 400, "{method} {target}: {body}");
            assert_eq!(error_code(&body), "invalid_name", "{method} {target}");
        }
    }
    // Nothing was created outside the lock directory (nor in it).
    let parent = server.lock_dir.parent().unwrap();
    assert!(!parent.join("escape").exists() && !parent.join("b").exists());
    let created: Vec<_> = std::fs::read_dir(&server.lock_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != ".padlock")
        .collect();
    assert!(created.is_empty(), "created {created:?}");
    assert_unharmed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_hold_requests() {
    let server = Server::start();
    let http = client();
    let base = &server.url;
    let grpc = server.client().await;
    let _busy = grpc.lock("busy").acquire().await.unwrap();
    let _pool = grpc.lock("pool").semaphore(2).acquire().await.unwrap();

    let post = |path: &str| http.post(format!("{base}/v1/locks/{path}"));
    let long_owner = format!("x/hold?owner={}", "o".repeat(300));
    let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            post("x/hold?mode=weird"),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            post("x/hold?kind=tape"),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            post("x/hold?kind=semaphore"),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            post("x/hold?limit=2"),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            post("x/hold?kind=semaphore&limit=2&mode=shared"),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            post("x/hold?kind=semaphore&limit=100000"),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            post("x/hold?wait=soon"),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            post("x/hold?wait=-1s"),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            post("x/hold?colour=blue"),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            post(&long_owner),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            post("x/hold?wait=1s").body(r#"{"wait": 2}"#),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            post("x/hold").body("{not json"),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            post("x/hold").body(r#"{"colour": "blue"}"#),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            post("x/hold").body(r#"{"wait": -3}"#),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            post("x/hold").body(r#"{"limit": "two"}"#),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            post("x/hold?kind=redis"),
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
        ),
        (
            post("pool/hold?kind=semaphore&limit=5"),
            StatusCode::CONFLICT,
            "limit_mismatch",
        ),
        (
            post("busy/hold?wait=0"),
            StatusCode::CONFLICT,
            "not_acquired",
        ),
        (
            post("busy/hold").body(r#"{"wait": 0}"#),
            StatusCode::CONFLICT,
            "not_acquired",
        ),
    ];
    for (request, want_status, want_code) in cases {
        let request = request.build().unwrap();
        let shown = format!("{} {}", request.method(), request.url());
        let response = http.execute(request).await.unwrap();
        let status = response.status();
        let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap_or_default();
        assert_eq!(status, want_status, "{shown}: {body}");
        assert_eq!(error_code(&body), want_code, "{shown}");
    }
    // None of them left a holder or waiter behind.
    let (_, list) = json(http.get(format!("{base}/v1/locks"))).await;
    let names: Vec<&str> = list["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["busy", "pool"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_over_http_with_query_or_body() {
    let server = Server::start();
    let http = client();
    let base = &server.url;

    // Query parameters; the owner defaults to the User-Agent.
    let mut a = hold(&http, base, "jobs/a/hold?kind=semaphore&limit=2").await;
    assert_eq!(a.0.status(), StatusCode::OK);
    assert_eq!(
        a.0.header("content-type").as_deref(),
        Some("application/x-ndjson")
    );
    let granted = a.expect("granted").await;
    assert_eq!(
        (&granted["name"], &granted["kind"]),
        (&"jobs/a".into(), &"semaphore".into())
    );
    assert_eq!(granted["slot"], 0);
    assert!(granted["fence"].as_u64().unwrap() > 0);

    // JSON body, with labels.
    let response = http
        .post(format!("{base}/v1/locks/jobs/a/hold"))
        .header("user-agent", "nightly-script/1.0")
        .body(r#"{"kind": "semaphore", "limit": 2, "wait": "5s", "labels": {"job": "42"}}"#)
        .send()
        .await
        .unwrap();
    let mut b = padlock_e2e::http::Lines(Chunks::new(response));
    let granted_b = b.expect("granted").await;
    assert_eq!(granted_b["slot"], 1);

    let (_, lock) = json(http.get(format!("{base}/v1/locks/jobs/a?kind=semaphore"))).await;
    let holders = lock["holders"].as_array().unwrap();
    assert_eq!(holders.len(), 2);
    let b_holder = holders.iter().find(|h| h["id"] == granted_b["id"]).unwrap();
    assert_eq!(b_holder["owner"], "nightly-script/1.0");
    assert_eq!(b_holder["labels"], serde_json::json!({"job": "42"}));

    // A third waits with a deadline: queued, then the documented error line.
    let mut c = hold(&http, base, "jobs/a/hold?kind=semaphore&limit=2&wait=300ms").await;
    assert_eq!(c.0.status(), StatusCode::OK);
    let queued = c.expect("queued").await;
    assert_eq!(
        (&queued["position"], &queued["holders"]),
        (&1.into(), &2.into())
    );
    let error = c.expect("error").await;
    assert_eq!(error["code"], "not_acquired");
    assert!(
        c.next().await.is_none(),
        "the stream ends after the error line"
    );

    // A shared hold next to another.
    let mut r1 = hold(&http, base, "db/rw/hold?mode=shared").await;
    let mut r2 = hold(&http, base, "db/rw/hold?mode=shared&wait=0").await;
    assert_eq!(r1.expect("granted").await["mode"], "shared");
    assert_eq!(r2.expect("granted").await["mode"], "shared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_holder_hands_over_to_grpc_waiter_and_back() {
    let server = Server::start();
    let http = client();
    let base = &server.url;
    let grpc = server.client().await;
    let mut events = Events::open(&http, base, "?prefix=handoff").await;

    // An HTTP holder (its own connection, like curl) and a gRPC waiter.
    let curl = client();
    let mut held = hold(&curl, base, "handoff/hold").await;
    let http_fence = held.expect("granted").await["fence"].as_u64().unwrap();
    assert_eq!(events.next_for("handoff").await.event, "granted");
    let waiter = tokio::spawn({
        let grpc = grpc.clone();
        async move { grpc.lock("handoff").acquire().await }
    });
    assert_eq!(events.next_for("handoff").await.event, "queued");

    // The HTTP client goes away: the lock goes to the gRPC waiter.
    drop(held);
    drop(curl);
    let guard = within("the gRPC waiter's grant", waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(
        guard.fence() > http_fence,
        "fence {} after {http_fence}",
        guard.fence()
    );
    assert_eq!(events.next_for("handoff").await.event, "released");
    assert_eq!(events.next_for("handoff").await.event, "granted");

    // And back: an HTTP waiter behind the gRPC holder is told its place,
    // then granted when the gRPC holder releases.
    let mut waiting = hold(&http, base, "handoff/hold").await;
    assert_eq!(waiting.0.status(), StatusCode::OK);
    let queued = waiting.expect("queued").await;
    assert_eq!(
        (&queued["position"], &queued["holders"]),
        (&1.into(), &1.into())
    );
    let grpc_fence = guard.fence();
    guard.release().await.unwrap();
    let granted = waiting.expect("granted").await;
    assert!(granted["fence"].as_u64().unwrap() > grpc_fence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_reaches_an_sdk_holder() {
    let (server, _dir) = admin_server();
    let http = client();
    let base = &server.url;
    let grpc = server.client().await;
    let guard = grpc.lock("deploy/prod").acquire().await.unwrap();
    let id = guard.holder_id().to_string();
    let url = format!("{base}/v1/locks/deploy/prod/holders/{id}");

    // No token, wrong token: 401 with a Bearer challenge; the lock stays.
    let response = http.delete(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(
        response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "unauthenticated");
    let (status, body) = json(http.delete(&url).bearer_auth("wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "unauthenticated");
    let (status, body) = json(http.delete(&url).bearer_auth(&TOKEN[1..])).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );
    assert!(guard.is_held());

    // Bad id, unknown holder, wrong kind.
    let bad = format!("{base}/v1/locks/deploy/prod/holders/abc");
    let (status, body) = json(http.delete(&bad).bearer_auth(TOKEN)).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_argument")
    );
    let unknown = format!("{base}/v1/locks/deploy/prod/holders/999999");
    let (status, body) = json(http.delete(&unknown).bearer_auth(TOKEN)).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let (status, _) = json(
        http.delete(format!("{url}?kind=semaphore"))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The right token: revoked, and the SDK's lost() fires with Revoked.
    let (status, body) = json(http.delete(&url).bearer_auth(TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"revoked": {"name": "deploy/prod", "kind": "file", "id": id}})
    );
    let lost = within("lost()", guard.lost()).await;
    assert_eq!(lost.reason, LostReason::Revoked);
    assert!(!guard.is_held());
    let (status, _) = json(http.get(format!("{base}/v1/locks/deploy/prod"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = json(http.delete(&url).bearer_auth(TOKEN)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The refusals were counted.
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metrics = parse_metrics(&text);
    assert_eq!(metrics["padlock_admin_auth_failures_total"], 3.0);
    assert_eq!(
        metrics["padlock_losses_total{kind=\"file\",reason=\"revoked\"}"],
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_ends_an_http_hold_and_grants_the_next() {
    let (server, _dir) = admin_server();
    let http = client();
    let base = &server.url;
    let mut first = hold(&http, base, "q/hold").await;
    let id = first.expect("granted").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut second = hold(&http, base, "q/hold").await;
    second.expect("queued").await;

    let (status, _) = json(
        http.delete(format!("{base}/v1/locks/q/holders/{id}"))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let lost = first.expect("lost").await;
    assert_eq!(lost["reason"], "revoked");
    assert!(lost["detail"].as_str().unwrap().contains("administrator"));
    assert!(first.next().await.is_none(), "the stream ends after lost");
    second.expect("granted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_are_disabled_without_a_token() {
    let server = Server::start();
    let http = client();
    let grpc = server.client().await;
    let guard = grpc.lock("kept").acquire().await.unwrap();
    let url = format!("{}/v1/locks/kept/holders/{}", server.url, guard.holder_id());
    for request in [http.delete(&url), http.delete(&url).bearer_auth("anything")] {
        let (status, body) = json(request).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(error_code(&body), "admin_disabled");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--admin-token-file")
        );
    }
    assert!(guard.is_held());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_file_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    for (file, says) in [
        (empty.clone(), "is empty"),
        (dir.path().join("missing"), "cannot read"),
    ] {
        let output = std::process::Command::new(padlock_e2e::bin("padlockd"))
            .args(["--listen", "127.0.0.1:0", "--lock-dir"])
            .arg(dir.path().join("locks"))
            .arg("--admin-token-file")
            .arg(&file)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_queued_granted_released_in_order() {
    let server = Server::start();
    let http = client();
    let base = &server.url;
    let grpc = server.client().await;
    let mut events = Events::open(&http, base, "?prefix=seq").await;

    // Another lock's events are filtered out by the prefix.
    drop(grpc.lock("other").acquire().await.unwrap());

    let a = grpc.lock("seq").owner("a").acquire().await.unwrap();
    let b_task = tokio::spawn({
        let grpc = grpc.clone();
        async move { grpc.lock("seq").owner("b").acquire().await }
    });
    let e1 = events.next().await.unwrap();
    let e2 = events.next().await.unwrap();
    let a_fence = a.fence();
    let a_id = a.holder_id().to_string();
    a.release().await.unwrap();
    let b = within("b's grant", b_task).await.unwrap().unwrap();
    let b_fence = b.fence();
    let b_id = b.holder_id().to_string();
    b.release().await.unwrap();
    let e3 = events.next().await.unwrap();
    let e4 = events.next().await.unwrap();
    let e5 = events.next().await.unwrap();

    let seen: Vec<(&str, &str)> = [&e1, &e2, &e3, &e4, &e5]
        .iter()
        .map(|e| (e.event.as_str(), e.data["id"].as_str().unwrap()))
        .collect();
    assert_eq!(
        seen,
        [
            ("granted", a_id.as_str()),
            ("queued", b_id.as_str()),
            ("released", a_id.as_str()),
            ("granted", b_id.as_str()),
            ("released", b_id.as_str()),
        ]
    );
    for e in [&e1, &e2, &e3, &e4, &e5] {
        assert_eq!(e.data["type"], e.event.as_str());
        assert_eq!(
            (&e.data["name"], &e.data["kind"]),
            (&"seq".into(), &"file".into())
        );
        assert!(e.data["at_unix_ms"].as_u64().is_some());
    }
    assert_eq!(
        (&e1.data["fence"], &e1.data["owner"]),
        (&a_fence.into(), &"a".into())
    );
    assert_eq!(
        (&e2.data["position"], &e2.data["owner"]),
        (&1.into(), &"b".into())
    );
    assert!(e3.data["held_ms"].as_u64().is_some());
    assert_eq!(e4.data["fence"], b_fence);
    assert!(b_fence > a_fence);
    assert!(e4.data["waited_ms"].as_u64().is_some());

    // Bad filters are refused in the common shape.
    let (status, body) = json(http.get(format!("{base}/v1/events?kind=tape"))).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_argument")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_named_and_move() {
    let (server, _dir) = admin_server();
    let http = client();
    let base = &server.url;
    let scrape = || async {
        let response = http.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let ct = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        let text = response.text().await.unwrap();
        (parse_metrics(&text), text)
    };
    let (before, text) = scrape().await;
    for (name, kind) in [
        ("padlock_grants_total", "counter"),
        ("padlock_releases_total", "counter"),
        ("padlock_queued_total", "counter"),
        ("padlock_abandoned_total", "counter"),
        ("padlock_losses_total", "counter"),
        ("padlock_holders", "gauge"),
        ("padlock_waiters", "gauge"),
        ("padlock_wait_seconds", "histogram"),
        ("padlock_hold_seconds", "histogram"),
        ("padlock_locks", "gauge"),
        ("padlock_draining", "gauge"),
        ("padlock_admin_auth_failures_total", "counter"),
        ("padlock_http_client_auth_failures_total", "counter"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "no {kind} {name}"
        );
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no help for {name}"
        );
    }
    for reason in ["shutdown", "revoked", "backend"] {
        let key = format!("padlock_losses_total{{kind=\"file\",reason=\"{reason}\"}}");
        assert_eq!(before[&key], 0.0, "{key}");
    }
    assert_eq!(
        before["padlock_wait_seconds_bucket{kind=\"file\",le=\"+Inf\"}"],
        0.0
    );

    let grpc = server.client().await;
    let a = grpc.lock("m").acquire().await.unwrap();
    let mut events = Events::open(&http, base, "?prefix=m").await;
    let b_task = tokio::spawn({
        let grpc = grpc.clone();
        async move { grpc.lock("m").acquire().await }
    });
    assert_eq!(events.next_for("m").await.event, "queued");
    let (during, _) = scrape().await;
    let k = |name: &str| format!("{name}{{kind=\"file\"}}");
    assert_eq!(during[&k("padlock_grants_total")], 1.0);
    assert_eq!(during[&k("padlock_holders")], 1.0);
    assert_eq!(during[&k("padlock_waiters")], 1.0);
    assert_eq!(during[&k("padlock_queued_total")], 1.0);
    assert_eq!(during["padlock_locks"], 1.0);

    a.release().await.unwrap();
    let b = within("b's grant", b_task).await.unwrap().unwrap();
    let id = b.holder_id().to_string();
    let (status, _) = json(
        http.delete(format!("{base}/v1/locks/m/holders/{id}"))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    within("lost()", b.lost()).await;
    let (after, _) = scrape().await;
    assert_eq!(after[&k("padlock_grants_total")], 2.0);
    assert_eq!(after[&k("padlock_releases_total")], 1.0);
    assert_eq!(
        after["padlock_losses_total{kind=\"file\",reason=\"revoked\"}"],
        1.0
    );
    assert_eq!(after[&k("padlock_holders")], 0.0);
    assert_eq!(after[&k("padlock_waiters")], 0.0);
    assert_eq!(after[&k("padlock_wait_seconds_count")], 2.0);
    assert_eq!(after[&k("padlock_hold_seconds_count")], 2.0);
    assert_eq!(
        after["padlock_wait_seconds_bucket{kind=\"file\",le=\"+Inf\"}"],
        2.0
    );
    assert_eq!(after["padlock_locks"], 0.0);
    assert_eq!(after["padlock_grants_total{kind=\"semaphore\"}"], 0.0);
}

/// Every route padlockd serves, with its methods.
fn served_routes() -> BTreeMap<&'static str, BTreeSet<&'static str>> {
    BTreeMap::from([
        ("/", BTreeSet::from(["get"])),
        ("/assets/{file}", BTreeSet::from(["get"])),
        ("/healthz", BTreeSet::from(["get"])),
        ("/readyz", BTreeSet::from(["get"])),
        ("/metrics", BTreeSet::from(["get"])),
        ("/v1/openapi.json", BTreeSet::from(["get"])),
        ("/v1/events", BTreeSet::from(["get"])),
        ("/v1/locks", BTreeSet::from(["get"])),
        ("/v1/locks/{name}", BTreeSet::from(["get"])),
        ("/v1/locks/{name}/hold", BTreeSet::from(["post"])),
        ("/v1/locks/{name}/holders/{id}", BTreeSet::from(["delete"])),
        ("/v1/holders/{id}", BTreeSet::from(["delete"])),
        ("/v1/server", BTreeSet::from(["get"])),
        ("/v1/stats", BTreeSet::from(["get"])),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_lists_every_route() {
    let (server, _dir) = admin_server();
    let http = client();
    let base = &server.url;
    let (status, doc) = json(http.get(format!("{base}/v1/openapi.json"))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert_eq!(doc["info"]["title"], "padlockd");

    let documented: BTreeMap<&str, BTreeSet<&str>> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(path, ops)| {
            (
                path.as_str(),
                ops.as_object()
                    .unwrap()
                    .keys()
                    .map(String::as_str)
                    .collect(),
            )
        })
        .collect();
    assert_eq!(documented, served_routes());

    // Every operation documents its responses; error responses use the
    // common error schema; the admin endpoint names its security scheme.
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            assert!(
                !responses.is_empty(),
                "{method} {path} documents no response"
            );
            for (code, response) in responses {
                if code.starts_with('4') || code.starts_with('5') {
                    let schema = &response["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(
                        schema, "#/components/schemas/ErrorBody",
                        "{method} {path} {code}"
                    );
                }
            }
        }
    }
    let revoke = &doc["paths"]["/v1/locks/{name}/holders/{id}"]["delete"];
    assert_eq!(revoke["security"][0]["admin_token"], serde_json::json!([]));
    assert_eq!(
        doc["components"]["securitySchemes"]["admin_token"]["scheme"],
        "bearer"
    );
    for schema in [
        "Lock",
        "Holder",
        "Waiter",
        "LockList",
        "ErrorBody",
        "HoldLine",
        "Event",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "no schema {schema}"
        );
    }

    // And every documented operation is really served (not the 404 or 405
    // of an unknown route).
    let grpc = server.client().await;
    for (path, methods) in served_routes() {
        // A holder of its own for each route that revokes one.
        let guard = grpc.lock("probe").acquire().await.unwrap();
        let url = format!(
            "{base}{}",
            path.replace("{name}", "probe")
                .replace("{id}", guard.holder_id())
                .replace("{file}", "app.js")
        );
        for method in methods {
            let request = match method {
                "get" => http.get(&url),
                "post" => http.post(&url),
                "delete" => http.delete(&url).bearer_auth(TOKEN),
                other => panic!("unexpected method {other}"),
            };
            let response = request.send().await.unwrap();
            assert!(
                response.status().is_success(),
                "{method} {url}: {}",
                response.status()
            );
            // Streams (events, hold) are dropped here, unread.
        }
        if path.contains("{id}") {
            within("lost()", guard.lost()).await;
        } else {
            within("release()", guard.release()).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_assets_are_embedded() {
    let server = Server::start();
    let http = client();
    let base = &server.url;
    let page = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let html = page.text().await.unwrap();
    assert!(html.contains("/assets/app.js") && html.contains("/assets/app.css"));
    // Nothing from elsewhere: every src and href is a path on this server.
    for attr in ["src=\"", "href=\""] {
        for (i, _) in html.match_indices(attr) {
            let value = &html[i + attr.len()..];
            assert!(
                value.starts_with('/') && !value.starts_with("//"),
                "external reference in the page: {}",
                &value[..value.len().min(60)]
            );
        }
    }
    for (file, ct) in [
        ("app.js", "text/javascript"),
        ("app.css", "text/css"),
        ("icon.svg", "image/svg+xml"),
    ] {
        let response = http
            .get(format!("{base}/assets/{file}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(ct)
        );
        let body = response.text().await.unwrap();
        // (SVG's XML namespace is a name, not something fetched: the
        // markup and the charts' createElementNS use it.)
        let body = body.replace("http://www.w3.org/2000/svg", "");
        assert!(!body.contains("://"), "{file} refers to another server");
    }
    let (status, body) = json(http.get(format!("{base}/assets/secret.txt"))).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::NOT_FOUND, "not_found")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_hold_and_event_streams() {
    // A long grace: if HTTP streams kept the server up, the exit below
    // would take a minute and the test would fail.
    let mut server = Server::start_with_args(&["--shutdown-grace", "60s"]);
    let http = client();
    let base = server.url.clone();
    let mut events = Events::open(&http, &base, "").await;
    let mut holder = hold(&http, &base, "s/hold").await;
    holder.expect("granted").await;
    let mut waiter = hold(&client(), &base, "s/hold").await;
    waiter.expect("queued").await;
    assert_eq!(events.next_for("s").await.event, "granted");
    assert_eq!(events.next_for("s").await.event, "queued");

    server.signal(rustix::process::Signal::TERM);
    let lost = holder.expect("lost").await;
    assert_eq!(lost["reason"], "shutdown");
    assert!(holder.next().await.is_none());
    assert_eq!(waiter.expect("error").await["code"], "draining");
    let e = events.next_for("s").await;
    assert_eq!(
        (e.event.as_str(), &e.data["reason"]),
        ("lost", &"shutdown".into())
    );
    assert_eq!(events.next_for("s").await.event, "abandoned");
    assert!(
        events.next().await.is_none(),
        "the events stream ends on shutdown"
    );
    let status = server.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tokens_guard_the_lock_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let admin = token_file(dir.path(), TOKEN);
    let clients = dir.path().join("client-tokens");
    std::fs::write(&clients, "all-names-token\nbilling-token billing/\n").unwrap();
    let server = Server::start_with_args(&[
        "--admin-token-file",
        admin.to_str().unwrap(),
        "--client-token-file",
        clients.to_str().unwrap(),
    ]);
    let http = client();
    let base = &server.url;
    let with = |request: reqwest::RequestBuilder, token: &str| request.bearer_auth(token);

    // Without a token, or with an unknown one: 401 on every lock endpoint.
    for path in ["/v1/locks", "/v1/locks/billing/a", "/v1/events"] {
        for request in [
            http.get(format!("{base}{path}")),
            with(http.get(format!("{base}{path}")), "nope"),
        ] {
            let (status, body) = json(request).await;
            assert_eq!(
                (status, error_code(&body)),
                (StatusCode::UNAUTHORIZED, "unauthenticated"),
                "{path}"
            );
        }
    }
    let (status, body) = json(http.post(format!("{base}/v1/locks/billing/a/hold?wait=0"))).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );
    // Operators' endpoints stay open.
    for path in ["/healthz", "/readyz", "/metrics", "/v1/openapi.json", "/"] {
        let status = http
            .get(format!("{base}{path}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, StatusCode::OK, "{path}");
    }

    // A token limited to billing/ holds billing/ names only, and sees only them.
    let mut billing_events = {
        let response = with(http.get(format!("{base}/v1/events")), "billing-token")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut events = Events(Chunks::new(response));
        assert_eq!(events.next().await.unwrap().event, "ready");
        events
    };
    let response = with(
        http.post(format!("{base}/v1/locks/other/hold?wait=0")),
        "billing-token",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "permission_denied");
    let other = with(
        http.post(format!("{base}/v1/locks/other/hold")),
        "all-names-token",
    )
    .send()
    .await
    .unwrap();
    let mut other = padlock_e2e::http::Lines(Chunks::new(other));
    other.expect("granted").await;
    let bill = with(
        http.post(format!("{base}/v1/locks/billing/run/hold")),
        "billing-token",
    )
    .send()
    .await
    .unwrap();
    let mut bill = padlock_e2e::http::Lines(Chunks::new(bill));
    let fence = bill.expect("granted").await["fence"].clone();
    // The first event the billing token sees is its own grant, not other's.
    let seen = billing_events.next().await.unwrap();
    assert_eq!(
        (seen.event.as_str(), &seen.data["name"]),
        ("granted", &"billing/run".into())
    );
    assert_eq!(seen.data["fence"], fence);

    let names = |body: &Value| -> Vec<String> {
        body["locks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, list) = json(with(http.get(format!("{base}/v1/locks")), "billing-token")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(names(&list), ["billing/run"]);
    for token in ["all-names-token", TOKEN] {
        let (_, list) = json(with(http.get(format!("{base}/v1/locks")), token)).await;
        assert_eq!(names(&list), ["billing/run", "other"], "{token}");
    }
    let (status, body) = json(with(
        http.get(format!("{base}/v1/locks/other")),
        "billing-token",
    ))
    .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::FORBIDDEN, "permission_denied")
    );
    let (status, _) = json(with(
        http.get(format!("{base}/v1/locks/billing/run")),
        "billing-token",
    ))
    .await;
    assert_eq!(status, StatusCode::OK);

    // Revoke needs the admin token, not a client token.
    let id = list["locks"][0]["holders"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!("{base}/v1/locks/billing/run/holders/{id}");
    let (status, _) = json(with(http.delete(&url), "all-names-token")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = json(with(http.delete(&url), TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bill.expect("lost").await["reason"], "revoked");

    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metrics = parse_metrics(&text);
    assert_eq!(metrics["padlock_http_client_auth_failures_total"], 7.0);
    assert_eq!(metrics["padlock_admin_auth_failures_total"], 1.0);
}

/// Waits until `name` (any kind) has `waiters` waiters, over HTTP;
/// returns the lock as shown then.
async fn until_http_waiters(
    http: &reqwest::Client,
    base: &str,
    name: &str,
    waiters: usize,
) -> Value {
    let what = format!("{waiters} waiter(s) on {name} over HTTP");
    eventually_ok(&what, PATIENCE, async || {
        let (status, body) = json(http.get(format!("{base}/v1/locks/{name}"))).await;
        if status == StatusCode::OK && body["waiters"].as_array().map(Vec::len) == Some(waiters) {
            Ok(body)
        } else {
            Err(format!("{status} {body}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_state_and_stats_show_the_last_minutes() {
    let (server, _dir) = admin_server();
    let http = client();
    let base = &server.url;

    let (status, state) = json(http.get(format!("{base}/v1/server"))).await;
    assert_eq!(status, StatusCode::OK, "{state}");
    assert!(!state["version"].as_str().unwrap().is_empty());
    assert_eq!(state["ready"], true);
    assert_eq!(state["draining"], false);
    assert_eq!(
        state["kinds"],
        serde_json::json!([
            {"kind": "file", "serving": true},
            {"kind": "semaphore", "serving": true},
        ])
    );
    assert_eq!(
        state["lock_dir"].as_str().map(std::path::PathBuf::from),
        Some(server.lock_dir.clone())
    );
    assert!(state["connections"].as_u64().unwrap() >= 1, "{state}");
    assert_eq!(
        (
            &state["revoke_enabled"],
            &state["client_tokens"],
            &state["tls"]
        ),
        (&true.into(), &false.into(), &false.into())
    );
    let started = state["started_unix_ms"].as_u64().unwrap();
    assert!(started <= state["now_unix_ms"].as_u64().unwrap());

    // Contention on one name: a holder, a waiter that waits at least 20 ms.
    let grpc = server.client().await;
    let a = grpc.lock("stats/hot").acquire().await.unwrap();
    let waiter = tokio::spawn({
        let grpc = grpc.clone();
        async move { grpc.lock("stats/hot").acquire().await }
    });
    until_http_waiters(&http, base, "stats/hot", 1).await;
    let (_, state) = json(http.get(format!("{base}/v1/server"))).await;
    assert_eq!(
        (&state["locks"], &state["holders"], &state["waiters"]),
        (&1.into(), &1.into(), &1.into())
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    a.release().await.unwrap();
    let b = within("the waiter's grant", waiter).await.unwrap().unwrap();
    b.release().await.unwrap();
    let cold = grpc.lock("stats/cold").acquire().await.unwrap();
    cold.release().await.unwrap();

    let (status, stats) = json(http.get(format!("{base}/v1/stats?top=5"))).await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    let window = stats["window_seconds"].as_u64().unwrap();
    assert_eq!(window, 900);
    let per_second = &stats["per_second"];
    let series = |key: &str| -> Vec<u64> {
        per_second[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    let (grants, holders, waiters) = (series("grants"), series("holders"), series("waiters"));
    assert_eq!(grants.len() as u64, window);
    assert_eq!((holders.len(), waiters.len()), (grants.len(), grants.len()));
    assert_eq!(grants.iter().sum::<u64>(), 3, "{per_second}");
    assert_eq!(holders.iter().max(), Some(&1));
    assert_eq!(waiters.iter().max(), Some(&1));
    let minutes = stats["per_minute"].as_array().unwrap();
    assert_eq!(
        minutes
            .iter()
            .map(|m| m["grants"].as_u64().unwrap())
            .sum::<u64>(),
        3
    );
    assert_eq!(stats["wait"]["count"], 3);
    assert!(stats["wait"]["max_ms"].as_f64().unwrap() >= 20.0, "{stats}");
    assert_eq!(stats["hold"]["count"], 3);
    assert!(stats["hold"]["p50_ms"].as_f64().is_some());
    let contended = stats["contended"].as_array().unwrap();
    assert_eq!(contended.len(), 1, "only the waited-for name: {stats}");
    let hot = &contended[0];
    assert_eq!(
        (&hot["name"], &hot["kind"]),
        (&"stats/hot".into(), &"file".into())
    );
    assert_eq!(
        (
            &hot["queued"],
            &hot["granted_after_wait"],
            &hot["gave_up"],
            &hot["peak_waiters"]
        ),
        (&1.into(), &1.into(), &0.into(), &1.into())
    );
    assert!(hot["max_wait_ms"].as_u64().unwrap() >= 20, "{hot}");
    assert_eq!(hot["wait_total_ms"], hot["max_wait_ms"]);

    // Bad parameters change nothing and say why.
    for query in ["top=0", "top=101", "top=x", "since=1"] {
        let (status, body) = json(http.get(format!("{base}/v1/stats?{query}"))).await;
        assert_eq!(
            (status, error_code(&body)),
            (StatusCode::BAD_REQUEST, "invalid_argument"),
            "{query}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_client_token_sees_only_its_own_state_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let clients = dir.path().join("client-tokens");
    std::fs::write(&clients, "all-names-token\nbilling-token billing/\n").unwrap();
    let server = Server::start_with_args(&["--client-token-file", clients.to_str().unwrap()]);
    let http = client();
    let base = &server.url;
    for path in ["/v1/server", "/v1/stats"] {
        let (status, body) = json(http.get(format!("{base}{path}"))).await;
        assert_eq!(
            (status, error_code(&body)),
            (StatusCode::UNAUTHORIZED, "unauthenticated"),
            "{path}"
        );
    }
    // Holders and a waiter that gives up on each name, so both are
    // contended.
    let grpc = padlock::Client::builder(server.url.clone())
        .token("all-names-token")
        .connect()
        .await
        .unwrap();
    let _billing = grpc.lock("billing/run").acquire().await.unwrap();
    let _other = grpc.lock("other").acquire().await.unwrap();
    for name in ["billing/run", "other"] {
        let waited = grpc
            .lock(name)
            .wait(Duration::from_millis(20))
            .acquire()
            .await;
        assert!(
            matches!(waited, Err(padlock::Error::NotAcquired(_))),
            "{waited:?}"
        );
    }

    let get = |path: &str, token: &str| json(http.get(format!("{base}{path}")).bearer_auth(token));
    let (status, all) = get("/v1/server", "all-names-token").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all["client_tokens"], true);
    assert_eq!((&all["locks"], &all["holders"]), (&2.into(), &2.into()));
    assert!(
        all["lock_dir"].is_string() && all["connections"].is_u64(),
        "{all}"
    );
    let (status, mine) = get("/v1/server", "billing-token").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((&mine["locks"], &mine["holders"]), (&1.into(), &1.into()));
    assert!(
        mine["lock_dir"].is_null() && mine["connections"].is_null(),
        "{mine}"
    );

    let names = |stats: &Value| -> Vec<String> {
        stats["contended"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, all) = get("/v1/stats", "all-names-token").await;
    let mut seen = names(&all);
    seen.sort();
    assert_eq!(seen, ["billing/run", "other"], "{all}");
    assert!(all["per_second"].is_object() && all["wait"].is_object());
    let (status, mine) = get("/v1/stats", "billing-token").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(names(&mine), ["billing/run"], "{mine}");
    assert_eq!(mine["contended"][0]["gave_up"], 1);
    for key in ["per_second", "per_minute", "wait", "hold"] {
        assert!(mine[key].is_null(), "{key}: {mine}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_replay_recent_history_with_no_gap_and_no_repeat() {
    let server = Server::start();
    let http = client();
    let base = &server.url;
    let grpc = server.client().await;
    // History before anyone follows: one name, then another.
    for _ in 0..3 {
        grpc.lock("replay/a")
            .acquire()
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    let elsewhere = grpc.lock("elsewhere").acquire().await.unwrap();
    elsewhere.release().await.unwrap();

    // Until `ready`: the replayed events.
    let open = |query: String| {
        let http = http.clone();
        async move {
            let response = http
                .get(format!("{base}/v1/events{query}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let mut events = Events(Chunks::new(response));
            let mut replayed = Vec::new();
            loop {
                let event = events.next().await.expect("the stream ended before ready");
                if event.event == "ready" {
                    return (replayed, events);
                }
                replayed.push(event);
            }
        }
    };
    let seqs = |events: &[padlock_e2e::http::SseEvent]| -> Vec<u64> {
        events
            .iter()
            .map(|e| e.data["seq"].as_u64().unwrap())
            .collect()
    };
    let (replayed, _) = open("?replay=500&prefix=replay/".into()).await;
    let types: Vec<&str> = replayed.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(types, ["granted", "released"].repeat(3));
    assert!(replayed.iter().all(|e| e.data["name"] == "replay/a"));
    assert_eq!(seqs(&replayed), [1, 2, 3, 4, 5, 6]);
    let (replayed, _) = open("?replay=2".into()).await;
    assert_eq!(seqs(&replayed), [7, 8], "the last two, oldest first");
    assert_eq!(replayed[0].data["name"], "elsewhere");
    let (replayed, _) = open(String::new()).await;
    assert!(replayed.is_empty(), "no replay unless asked");

    // While one name is granted and released as fast as can be, a follower
    // that opens with a replay sees every event once: the numbers are
    // consecutive across the replay and the live events.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = tokio::spawn({
        let (grpc, stop) = (grpc.clone(), stop.clone());
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                grpc.lock("replay/busy")
                    .acquire()
                    .await
                    .unwrap()
                    .release()
                    .await
                    .unwrap();
            }
        }
    });
    let mut events = Events::open(&http, base, "?prefix=replay/busy").await;
    // Let it get going: 10 events before the follower opens.
    for _ in 0..10 {
        events.next().await.unwrap();
    }
    let (replayed, mut live) = open("?replay=50&prefix=replay/busy".into()).await;
    let mut seen = seqs(&replayed);
    assert!(seen.len() >= 10, "{seen:?}");
    for _ in 0..40 {
        seen.push(live.next().await.unwrap().data["seq"].as_u64().unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    within("the busy loop", busy).await.unwrap();
    let expected: Vec<u64> = (seen[0]..seen[0] + seen.len() as u64).collect();
    assert_eq!(seen, expected, "each event once, none missed");

    let (status, body) = json(http.get(format!("{base}/v1/events?replay=501"))).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_argument"),
        "{body}"
    );
    assert_eq!(body["error"]["message"], "replay must be at most 500");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_shows_when_it_gives_up() {
    let server = Server::start();
    let http = client();
    let base = &server.url;
    let grpc = server.client().await;
    let _held = grpc.lock("deadline").acquire().await.unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let patient = tokio::spawn({
        let grpc = grpc.clone();
        async move {
            grpc.lock("deadline")
                .wait(Duration::from_secs(60))
                .acquire()
                .await
        }
    });
    until_http_waiters(&http, base, "deadline", 1).await;
    let forever = tokio::spawn({
        let grpc = grpc.clone();
        async move { grpc.lock("deadline").acquire().await }
    });
    let shown = until_http_waiters(&http, base, "deadline", 2).await;
    let waiters = shown["waiters"].as_array().unwrap();
    let deadline = waiters[0]["deadline_unix_ms"].as_u64().expect("a deadline");
    let since = waiters[0]["since_unix_ms"].as_u64().unwrap();
    assert!(since >= before.saturating_sub(5), "{shown}");
    assert!(
        (59_000..=60_500).contains(&(deadline - since)),
        "gives up 60 s after it came: {shown}"
    );
    assert!(waiters[0]["deadline"].as_str().unwrap().ends_with('Z'));
    assert!(waiters[1]["deadline_unix_ms"].is_null(), "{shown}");
    assert!(waiters[1]["deadline"].is_null(), "{shown}");
    patient.abort();
    forever.abort();
}
