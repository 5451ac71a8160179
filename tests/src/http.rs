//! HTTP helpers for the end-to-end tests: a plain client, JSON requests,
//! and readers for the two streaming responses (NDJSON hold streams and
//! server-sent events), each waiting for the next message with a deadline.

use reqwest::StatusCode;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// How long any single expected message may take before a test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A client that never goes through a proxy (the tests talk to 127.0.0.1).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("HTTP client")
}

/// Writes `token` to a fresh file in `dir` and returns its path.
pub fn token_file(dir: &Path, token: &str) -> PathBuf {
    let path = dir.join("admin-token");
    std::fs::write(&path, format!("{token}\n")).expect("write token file");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    path
}

/// Sends a request and returns its status and JSON body (`Value::Null`
/// when the body is not JSON).
pub async fn json(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.expect("HTTP request");
    let status = response.status();
    let text = response.text().await.expect("response body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Asserts the common error shape and returns its code.
#[track_caller]
pub fn error_code(body: &Value) -> &str {
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {body}"));
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "error without a message: {body}");
    code
}

/// Reads a streaming response chunk by chunk.
pub struct Chunks {
    response: reqwest::Response,
    buf: Vec<u8>,
}

impl Chunks {
    pub fn new(response: reqwest::Response) -> Chunks {
        Chunks {
            response,
            buf: Vec::new(),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.response.status()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Bytes up to and including the next `delimiter`, without it; `None`
    /// when the stream ends first. Panics at `deadline`.
    async fn until(&mut self, delimiter: &[u8], deadline: Instant) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self
                .buf
                .windows(delimiter.len())
                .position(|w| w == delimiter)
            {
                let rest = self.buf.split_off(i + delimiter.len());
                let mut item = std::mem::replace(&mut self.buf, rest);
                item.truncate(i);
                return Some(item);
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("the expected message did not come in time")
                .expect("stream broke");
            match chunk {
                Some(bytes) => self.buf.extend_from_slice(&bytes),
                None => return None,
            }
        }
    }
}

/// An NDJSON hold stream: one JSON value per line.
pub struct Lines(pub Chunks);

impl Lines {
    /// The next line, or `None` when the server ended the stream.
    pub async fn next(&mut self) -> Option<Value> {
        let line = self.0.until(b"\n", Instant::now() + PATIENCE).await?;
        Some(serde_json::from_slice(&line).expect("a JSON line"))
    }

    /// The next line, which must have `key` at the top; returns its value.
    pub async fn expect(&mut self, key: &str) -> Value {
        let line = self
            .next()
            .await
            .unwrap_or_else(|| panic!("stream ended before a {key:?} line"));
        assert!(
            line.get(key).is_some(),
            "expected a {key:?} line, got {line}"
        );
        line[key].clone()
    }
}

/// POSTs a hold request; returns the response as lines (any status).
pub async fn hold(http: &reqwest::Client, base: &str, path_and_query: &str) -> Lines {
    let response = http
        .post(format!("{base}/v1/locks/{path_and_query}"))
        .send()
        .await
        .expect("hold request");
    Lines(Chunks::new(response))
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub data: Value,
}

/// A server-sent events stream.
pub struct Events(pub Chunks);

impl Events {
    /// Opens `/v1/events` (with `query`, e.g. `?prefix=x`) and waits for
    /// its `ready` event: from then on no event is missed.
    pub async fn open(http: &reqwest::Client, base: &str, query: &str) -> Events {
        let response = http
            .get(format!("{base}/v1/events{query}"))
            .send()
            .await
            .expect("events request");
        assert_eq!(response.status(), StatusCode::OK);
        let mut events = Events(Chunks::new(response));
        let ready = events
            .next()
            .await
            .expect("the events stream ended at once");
        assert_eq!(ready.event, "ready");
        events
    }

    /// The next event (comments and keep-alives skipped), or `None` when
    /// the stream ends.
    pub async fn next(&mut self) -> Option<SseEvent> {
        self.next_by(Instant::now() + PATIENCE).await
    }

    async fn next_by(&mut self, deadline: Instant) -> Option<SseEvent> {
        loop {
            let block = self.0.until(b"\n\n", deadline).await?;
            let text = String::from_utf8(block).expect("UTF-8 events");
            let mut event = String::from("message");
            let mut data = String::new();
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if data.is_empty() {
                continue;
            }
            let data = serde_json::from_str(&data).expect("JSON event data");
            return Some(SseEvent { event, data });
        }
    }

    /// The next event about lock `name`.
    pub async fn next_for(&mut self, name: &str) -> SseEvent {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let event = self.next_by(deadline).await.expect("events stream ended");
            if event.data["name"] == name {
                return event;
            }
        }
    }
}

/// Sends `request` (a whole HTTP/1.1 request head) over a raw socket, for
/// paths an HTTP client library would normalize (`..`); returns the status
/// and the JSON body.
pub fn raw(addr: SocketAddr, method: &str, target: &str, headers: &str) -> (u16, Value) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    write!(
        stream,
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n{headers}\r\n"
    )
    .expect("write request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read response");
    let text = String::from_utf8_lossy(&response);
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// `name` with every path segment percent-encoded (so `/` stays a
/// separator and anything else is sent as it is).
pub fn encode_path(name: &str) -> String {
    name.split('/')
        .map(|seg| {
            seg.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Parses Prometheus text into `name{labels}` -> value.
pub fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// padlockd's metric `name` (without labels) from `url`'s /metrics.
pub async fn metric(url: &str, name: &str) -> f64 {
    let text = client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    *parse_metrics(&text)
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}
