//! A WebDriver client for the dashboard tests (and the screenshot tool):
//! headless Chromium driven through chromedriver with plain W3C WebDriver
//! calls (JSON over HTTP), no extra crate.

use crate::http::{PATIENCE, client};
use crate::{Server, eventually_ok, poll_until};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The browser and its driver, or `None` when opted out.
pub fn browser() -> Option<(PathBuf, PathBuf)> {
    if crate::opted_out("PADLOCK_SKIP_BROWSER") {
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
pub struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    pub fn start(path: &Path) -> Driver {
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
pub struct Browser {
    pub http: reqwest::Client,
    pub session: String,
}

impl Browser {
    pub async fn open(driver: &Driver, chromium: &Path, profile: &Path) -> Browser {
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

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> Result<Value, Value> {
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

    pub async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, body)
            .await
            .unwrap_or_else(|err| panic!("WebDriver {path}: {err}"))
    }

    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub async fn script(&self, script: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({ "script": script, "args": args }))
            .await
    }

    /// Polls `script` until it returns true, at most [`PATIENCE`]; on
    /// failure, keeps a screenshot of the page.
    pub async fn until(&self, what: &str, script: &str, args: Value) {
        let shown = poll_until(PATIENCE, async || {
            match self.script(script, args.clone()).await {
                Value::Bool(true) => Ok(()),
                other => Err(other),
            }
        })
        .await;
        if let Err(last) = shown {
            let shot = self.screenshot().await;
            let path = artifact("dashboard-failure.png");
            std::fs::write(&path, shot).expect("write failure screenshot");
            panic!(
                "the page never showed {what} (the script last returned {last}; screenshot: {})",
                path.display()
            );
        }
    }

    pub async fn find(&self, css: &str) -> Result<String, Value> {
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
    pub async fn click(&self, css: &str) {
        let what = format!("a click on {css}");
        eventually_ok(&what, PATIENCE, async || {
            let id = self.find(css).await?;
            let path = format!("/element/{id}/click");
            self.call(reqwest::Method::POST, &path, json!({})).await
        })
        .await;
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await.expect("input to type into");
        self.post(&format!("/element/{id}/clear"), json!({})).await;
        self.post(&format!("/element/{id}/value"), json!({ "text": text }))
            .await;
    }

    pub async fn screenshot(&self) -> Vec<u8> {
        let shot = self
            .call(reqwest::Method::GET, "/screenshot", Value::Null)
            .await
            .expect("screenshot");
        base64_decode(shot.as_str().expect("base64 PNG"))
    }
}

pub fn artifact(name: &str) -> PathBuf {
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

/// Runs `steps` in a fresh Chromium on the dashboard of `server`, and
/// closes the browser whether they pass or fail.
pub async fn in_browser<Steps, Fut>(
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
