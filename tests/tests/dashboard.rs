//! The dashboard in a real browser: headless Chromium, driven through
//! chromedriver with plain W3C WebDriver calls, opens the page; locks that
//! SDK clients take appear without a reload; a person types the admin
//! token and revokes a holder; the SDK guard's `lost()` fires.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`tests/run.sh`
//! installs them). Without them the test fails and says what to install,
//! unless it is opted out with `PADLOCK_SKIP_BROWSER=1`.
//!
//! A screenshot is kept in `tests/artifacts/dashboard.png`; with
//! `PADLOCK_UPDATE_SCREENSHOT=1` it is also copied to `docs/dashboard.png`
//! for the README.

use padlock::LostReason;
use padlock_e2e::Server;
use padlock_e2e::http::{PATIENCE, client, token_file};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "dashboard-admin-token";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The browser and its driver, or `None` when opted out.
fn browser() -> Option<(PathBuf, PathBuf)> {
    if padlock_e2e::opted_out("PADLOCK_SKIP_BROWSER") {
        return None;
    }
    let find = |env: &str, names: &[&str]| -> Option<PathBuf> {
        if let Some(path) = std::env::var_os(env) {
            return Some(PathBuf::from(path));
        }
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
            .find(|p| p.is_file())
    };
    let chromium = find("PADLOCK_CHROMIUM", &["chromium", "chromium-browser"]);
    let driver = find("PADLOCK_CHROMEDRIVER", &["chromedriver"]);
    match (chromium, driver) {
        (Some(chromium), Some(driver)) => Some((chromium, driver)),
        (chromium, driver) => panic!(
            "the dashboard test needs headless Chromium and chromedriver (found chromium: {}, \
             chromedriver: {}). Install them with `apt-get install chromium chromium-driver` \
             (tests/run.sh does), or point PADLOCK_CHROMIUM and PADLOCK_CHROMEDRIVER at them. \
             To skip this test on purpose, set PADLOCK_SKIP_BROWSER=1.",
            chromium.map_or("no".into(), |p| p.display().to_string()),
            driver.map_or("no".into(), |p| p.display().to_string()),
        ),
    }
}

/// chromedriver on a free port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start(path: &Path) -> Driver {
        // chromedriver takes a port, not a listener: take a free one.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        // Its own process group, so that Chromium (its child) can be
        // killed with it even when a test fails before closing it.
        let mut child = Command::new(path)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start chromedriver");
        let stdout = child.stdout.take().expect("chromedriver stdout");
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("started successfully") => break,
                Some(Ok(_)) => continue,
                _ => panic!(
                    "chromedriver exited before it was ready: {:?}",
                    child.wait()
                ),
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(group) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One WebDriver session (W3C protocol, JSON over HTTP).
struct Browser {
    http: reqwest::Client,
    session: String,
}

impl Browser {
    async fn open(driver: &Driver, chromium: &Path, profile: &Path) -> Browser {
        let http = client();
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--hide-scrollbars",
                    "--force-device-scale-factor=1", "--window-size=1440,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let response = http
            .post(format!("{}/session", driver.url))
            .json(&capabilities)
            .send()
            .await
            .expect("new session");
        let body: Value = response.json().await.expect("session JSON");
        let session = body["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver could not start Chromium: {body}"))
            .to_string();
        Browser {
            http,
            session: format!("{}/session/{session}", driver.url),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Result<Value, Value> {
        let request = self.http.request(method, format!("{}{path}", self.session));
        let request = if body.is_null() {
            request
        } else {
            request.json(&body)
        };
        let response = request.send().await.expect("WebDriver request");
        let ok = response.status().is_success();
        let body: Value = response.json().await.expect("WebDriver JSON");
        if ok {
            Ok(body["value"].clone())
        } else {
            Err(body["value"].clone())
        }
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, body)
            .await
            .unwrap_or_else(|err| panic!("WebDriver {path}: {err}"))
    }

    async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    async fn script(&self, script: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({ "script": script, "args": args }))
            .await
    }

    /// Polls `script` until it returns true, at most [`PATIENCE`].
    async fn until(&self, what: &str, script: &str, args: Value) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if self.script(script, args.clone()).await == Value::Bool(true) {
                return;
            }
            if Instant::now() > deadline {
                let shot = self.screenshot().await;
                let path = artifact("dashboard-failure.png");
                std::fs::write(&path, shot).expect("write failure screenshot");
                panic!(
                    "the page never showed {what} (screenshot: {})",
                    path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn find(&self, css: &str) -> Result<String, Value> {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await?;
        Ok(found[ELEMENT].as_str().expect("element id").to_string())
    }

    /// Clicks the element `css` selects; retries while the page re-renders
    /// under it (a stale or not-yet-there element), at most [`PATIENCE`].
    async fn click(&self, css: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let clicked = match self.find(css).await {
                Ok(id) => {
                    self.call(
                        reqwest::Method::POST,
                        &format!("/element/{id}/click"),
                        json!({}),
                    )
                    .await
                }
                Err(err) => Err(err),
            };
            match clicked {
                Ok(_) => return,
                Err(err) if Instant::now() > deadline => panic!("cannot click {css}: {err}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await.expect("input to type into");
        self.post(&format!("/element/{id}/clear"), json!({})).await;
        self.post(&format!("/element/{id}/value"), json!({ "text": text }))
            .await;
    }

    async fn screenshot(&self) -> Vec<u8> {
        let shot = self
            .call(reqwest::Method::GET, "/screenshot", Value::Null)
            .await
            .expect("screenshot");
        base64_decode(shot.as_str().expect("base64 PNG"))
    }
}

fn artifact(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts");
    std::fs::create_dir_all(&dir).expect("tests/artifacts");
    dir.join(name)
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let clean: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

/// Is there a holder row of lock `name` (owned by `owner`)?
const HOLDER_SHOWN: &str = "return [...document.querySelectorAll('tr.holder')]
    .some(r => r.dataset.lock === arguments[0] && r.querySelector('.owner').textContent === arguments[1]);";

/// Runs `steps` in a fresh Chromium on the dashboard of `server`, and
/// closes the browser whether they pass or fail.
async fn in_browser<Steps, Fut>(
    (chromium, chromedriver): (PathBuf, PathBuf),
    profile: &Path,
    server: Server,
    steps: Steps,
) where
    Steps: FnOnce(Server, Browser) -> Fut,
    Fut: Future<Output = Browser> + Send + 'static,
{
    let driver = Driver::start(&chromedriver);
    let browser = Browser::open(&driver, &chromium, profile).await;
    let session = (browser.http.clone(), browser.session.clone());
    // In a task, so that a failed step still lets the browser be closed.
    let outcome = tokio::spawn(steps(server, browser)).await;
    let _ = session.0.delete(&session.1).send().await;
    drop(driver);
    if let Err(err) = outcome {
        std::panic::resume_unwind(err.into_panic());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_live_locks_and_revokes() {
    let Some(browser) = browser() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let server = Server::start_with_args(&["--admin-token-file", token.to_str().unwrap()]);
    in_browser(browser, &dir.path().join("profile"), server, drive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_asks_for_a_token_when_the_server_needs_one() {
    let Some(browser) = browser() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let admin = token_file(dir.path(), TOKEN);
    let clients = dir.path().join("client-tokens");
    std::fs::write(&clients, "etl-token etl/\n").unwrap();
    let server = Server::start_with_args(&[
        "--admin-token-file",
        admin.to_str().unwrap(),
        "--client-token-file",
        clients.to_str().unwrap(),
    ]);
    in_browser(
        browser,
        &dir.path().join("profile"),
        server,
        |server, browser| async move {
            let page = format!("{}/", server.url);
            browser.goto(&page).await;
            browser
                .until(
                    "the request for a token",
                    "return document.getElementById('status').dataset.state === 'auth'
                    && !document.getElementById('auth').hidden;",
                    json!([]),
                )
                .await;
            browser.type_into("#token", "etl-token").await;
            browser
                .until(
                    "the live indicator",
                    "return document.getElementById('status').dataset.state === 'live';",
                    json!([]),
                )
                .await;
            // A lock taken after the token was given appears, live.
            let http = client();
            let response = http
                .post(format!("{}/v1/locks/etl/nightly/hold", server.url))
                .bearer_auth("etl-token")
                .header("user-agent", "etl-job/2.1")
                .send()
                .await
                .unwrap();
            let mut hold = padlock_e2e::http::Lines(padlock_e2e::http::Chunks::new(response));
            hold.expect("granted").await;
            browser
                .until(
                    "the etl holder",
                    HOLDER_SHOWN,
                    json!(["etl/nightly", "etl-job/2.1"]),
                )
                .await;
            drop(hold);
            browser
        },
    )
    .await;
}

async fn drive(server: Server, browser: Browser) -> Browser {
    let sdk = server.client().await;
    let page = format!("{}/", server.url);
    browser.goto(&page).await;
    browser
        .until(
            "the live indicator",
            "return document.getElementById('status').dataset.state === 'live';",
            json!([]),
        )
        .await;
    // A reload would lose this mark.
    browser
        .script("window.padlockTestMark = 'same page';", json!([]))
        .await;

    // Locks taken after the page loaded, by SDK clients and by curl-like
    // HTTP holders.
    let nightly = sdk
        .lock("reports/nightly")
        .owner("nightly-report@build-1")
        .label("job", "4711")
        .acquire()
        .await
        .unwrap();
    let deploy = sdk
        .lock("deploy/prod")
        .owner("deploy@ci-runner-3")
        .acquire()
        .await
        .unwrap();
    let mut waiters = Vec::new();
    for owner in ["deploy@ci-runner-7", "deploy@ci-runner-9"] {
        let sdk = sdk.clone();
        waiters.push(tokio::spawn(async move {
            sdk.lock("deploy/prod").owner(owner).acquire().await
        }));
    }
    let mut gpus = Vec::new();
    for owner in ["train-resnet@gpu-box", "train-bert@gpu-box"] {
        gpus.push(
            sdk.lock("gpu")
                .semaphore(4)
                .owner(owner)
                .acquire()
                .await
                .unwrap(),
        );
    }
    let mut readers = Vec::new();
    for owner in ["reporting@db-2", "backup@db-3"] {
        readers.push(
            sdk.lock("db/schema")
                .shared()
                .owner(owner)
                .acquire()
                .await
                .unwrap(),
        );
    }
    let curl = client();
    let hold = curl
        .post(format!("{}/v1/locks/cron/cleanup/hold", server.url))
        .header("user-agent", "curl/7.88.1")
        .send()
        .await
        .unwrap();
    assert!(hold.status().is_success());

    // They appear without a reload.
    browser
        .until(
            "the SDK holder of reports/nightly",
            HOLDER_SHOWN,
            json!(["reports/nightly", "nightly-report@build-1"]),
        )
        .await;
    browser
        .until(
            "two waiters on deploy/prod, two gpu slots, two readers and the curl holder",
            "const rows = (sel, lock) => [...document.querySelectorAll(sel)].filter(r => r.dataset.lock === lock).length;
             return rows('tr.waiter', 'deploy/prod') === 2 && rows('tr.holder', 'gpu') === 2
                 && rows('tr.holder', 'db/schema') === 2 && rows('tr.holder', 'cron/cleanup') === 1;",
            json!([]),
        )
        .await;
    let mark = browser
        .script("return window.padlockTestMark;", json!([]))
        .await;
    assert_eq!(mark, "same page", "the page reloaded");
    // The fence and the owner are on the page as the server has them.
    let fence = browser
        .script(
            "const row = [...document.querySelectorAll('tr.holder')].find(r => r.dataset.lock === arguments[0]);
             return row.querySelector('.fence').textContent;",
            json!(["reports/nightly"]),
        )
        .await;
    assert_eq!(fence, nightly.fence().to_string());
    // Ages tick.
    browser
        .until(
            "an age of at least 1s",
            "return [...document.querySelectorAll('td.age')].some(td => td.textContent !== '0s');",
            json!([]),
        )
        .await;

    let shot = browser.screenshot().await;
    assert!(shot.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
    std::fs::write(artifact("dashboard.png"), &shot).unwrap();
    if std::env::var("PADLOCK_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1") {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard.png");
        std::fs::write(docs, &shot).unwrap();
    }

    // The filter narrows the table to matching names.
    browser.type_into("#filter", "nightly").await;
    browser
        .until(
            "only reports/nightly after filtering",
            "const shown = [...document.querySelectorAll('#locks tbody')].map(b => b.dataset.lock);
             return shown.length === 1 && shown[0] === 'reports/nightly';",
            json!([]),
        )
        .await;

    let row = format!(
        "tr.holder[data-holder-id=\"{}\"] button.revoke",
        nightly.holder_id()
    );
    // A wrong token is refused, and the page says so; the lock stays.
    browser.type_into("#token", "not-the-token").await;
    browser.click(&row).await;
    browser.click(&format!("{row}.confirm")).await;
    browser
        .until(
            "the refusal",
            "return [...document.querySelectorAll('.toast')].some(t => t.textContent.includes('wrong admin token'));",
            json!([]),
        )
        .await;
    assert!(nightly.is_held());

    // The right token revokes: the SDK holder is told, the row goes.
    browser.type_into("#token", TOKEN).await;
    browser.click(&row).await;
    browser.click(&format!("{row}.confirm")).await;
    let lost = tokio::time::timeout(PATIENCE, nightly.lost())
        .await
        .expect("lost() did not fire after the revoke");
    assert_eq!(lost.reason, LostReason::Revoked);
    browser
        .until(
            "the revoked holder gone",
            "return !document.querySelector('tr.holder[data-lock=\"reports/nightly\"]');",
            json!([]),
        )
        .await;

    drop((deploy, gpus, readers, hold, waiters));
    browser
}
