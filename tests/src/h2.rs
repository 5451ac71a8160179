//! A hand-written HTTP/2 client (prior knowledge, no TLS), for the tests
//! that must show what the server does when a client breaks the rules or
//! just sits there: every HTTP/2 library obeys the server's limits and
//! answers its pings on its own, so only hand-written frames can show the
//! server's side. It keeps a log of every frame read, for failure messages.

use padlock::proto::{self as pb, hold_request};
use prost::Message;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Failure guard for every await on the server (never a synchronization).
pub const GUARD: Duration = Duration::from_secs(10);

pub async fn guarded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {GUARD:?}"))
}

// HTTP/2 (RFC 9113) frame types, flags, settings and error codes.
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const REFUSED_STREAM: u32 = 0x7;
pub const STREAM_CLOSED: u32 = 0x5;
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Our (default) SETTINGS_MAX_FRAME_SIZE: the server may not send more.
pub const MAX_FRAME: usize = 16_384;

pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The payload of a DATA frame without its padding.
    pub fn data(&self) -> &[u8] {
        if self.flags & PADDED == 0 {
            return &self.payload;
        }
        let pad = *self
            .payload
            .first()
            .expect("padded DATA without a pad length") as usize;
        assert!(
            pad < self.payload.len(),
            "DATA padding longer than the frame: {}",
            self.describe()
        );
        &self.payload[1..self.payload.len() - pad]
    }

    /// The error code of RST_STREAM, or of GOAWAY (after the last stream id).
    pub fn error_code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        assert!(
            self.payload.len() >= at + 4,
            "short frame: {}",
            self.describe()
        );
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }

    pub fn describe(&self) -> String {
        let kind = match self.kind {
            DATA => "DATA".to_string(),
            HEADERS => "HEADERS".to_string(),
            RST_STREAM => "RST_STREAM".to_string(),
            SETTINGS => "SETTINGS".to_string(),
            PING => "PING".to_string(),
            GOAWAY => "GOAWAY".to_string(),
            WINDOW_UPDATE => "WINDOW_UPDATE".to_string(),
            other => format!("type 0x{other:x}"),
        };
        let shown = &self.payload[..self.payload.len().min(64)];
        let hex: String = shown.iter().map(|b| format!("{b:02x}")).collect();
        let more = if shown.len() < self.payload.len() {
            "…"
        } else {
            ""
        };
        let text = if self.kind == GOAWAY && self.payload.len() > 8 {
            format!(" debug={:?}", String::from_utf8_lossy(&self.payload[8..]))
        } else {
            String::new()
        };
        format!(
            "{kind} flags=0x{:02x} stream={} len={} payload={hex}{more}{text}",
            self.flags,
            self.stream,
            self.payload.len()
        )
    }
}

/// A hand-written HTTP/2 client (prior knowledge, no TLS) that keeps a log
/// of every frame it read, for failure messages.
pub struct RawH2 {
    tcp: TcpStream,
    authority: String,
    seen: Vec<String>,
}

impl RawH2 {
    pub async fn connect(addr: SocketAddr) -> RawH2 {
        let tcp = guarded("TCP connect", TcpStream::connect(addr))
            .await
            .expect("TCP connect to padlockd");
        tcp.set_nodelay(true).expect("nodelay");
        RawH2 {
            tcp,
            authority: addr.to_string(),
            seen: Vec::new(),
        }
    }

    pub fn history(&self) -> String {
        if self.seen.is_empty() {
            "  (no frames)".to_string()
        } else {
            self.seen
                .iter()
                .map(|f| format!("  {f}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
    }

    pub async fn write_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        assert!(payload.len() < MAX_FRAME, "frame too large to send");
        let mut frame = Vec::with_capacity(9 + payload.len());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        frame.push(kind);
        frame.push(flags);
        frame.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        frame.extend_from_slice(payload);
        let write = self.tcp.write_all(&frame);
        if let Err(err) = guarded("write a frame", write).await {
            panic!(
                "writing a frame to padlockd failed: {err}; frames read so far:\n{}",
                self.history()
            );
        }
    }

    pub async fn read_exact(&mut self, buf: &mut [u8], what: &str) {
        let read = tokio::time::timeout(GUARD, self.tcp.read_exact(buf)).await;
        match read {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => panic!(
                "reading {what} failed ({err}): the server closed the connection; \
                 frames read so far:\n{}",
                self.history()
            ),
            Err(_) => panic!(
                "no {what} from the server within {GUARD:?}; frames read so far:\n{}",
                self.history()
            ),
        }
    }

    /// The next frame from the server. PINGs are answered (and returned).
    pub async fn next_frame(&mut self) -> Frame {
        match self.next_frame_or_eof().await {
            Some(frame) => frame,
            None => panic!(
                "the server closed the connection; frames read so far:\n{}",
                self.history()
            ),
        }
    }

    /// [`RawH2::next_frame`], or `None` once the server has closed the
    /// connection (between frames).
    pub async fn next_frame_or_eof(&mut self) -> Option<Frame> {
        let mut head = [0u8; 9];
        match tokio::time::timeout(GUARD, self.tcp.read(&mut head[..1])).await {
            Ok(Ok(0)) => return None,
            Ok(Ok(_)) => {}
            Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Ok(Err(err)) => panic!(
                "reading a frame failed ({err}); frames read so far:\n{}",
                self.history()
            ),
            Err(_) => panic!(
                "no frame from the server within {GUARD:?}; frames read so far:\n{}",
                self.history()
            ),
        }
        self.read_exact(&mut head[1..], "frame header").await;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        assert!(
            len <= MAX_FRAME,
            "the server sent a {len}-byte frame, over our SETTINGS_MAX_FRAME_SIZE; frames so far:\n{}",
            self.history()
        );
        let mut payload = vec![0u8; len];
        self.read_exact(&mut payload, "frame payload").await;
        let frame = Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
            payload,
        };
        self.seen.push(frame.describe());
        if frame.kind == PING && frame.flags & ACK == 0 {
            let opaque = frame.payload.clone();
            self.write_frame(PING, ACK, 0, &opaque).await;
        }
        Some(frame)
    }

    /// Preface and empty SETTINGS; returns the server's SETTINGS (id, value)
    /// after acknowledging them.
    pub async fn handshake(&mut self) -> Vec<(u16, u32)> {
        self.handshake_with(&[]).await
    }

    /// The handshake, announcing an initial stream window of `window`
    /// bytes: with 0 the server can send no response body at all (a client
    /// that never reads).
    pub async fn handshake_with_window(&mut self, window: u32) -> Vec<(u16, u32)> {
        let mut setting = SETTINGS_INITIAL_WINDOW_SIZE.to_be_bytes().to_vec();
        setting.extend_from_slice(&window.to_be_bytes());
        self.handshake_with(&setting).await
    }

    /// Uses `authority` as `:authority` of the requests it opens.
    pub fn set_authority(&mut self, authority: &str) {
        self.authority = authority.to_string();
    }

    async fn handshake_with(&mut self, our_settings: &[u8]) -> Vec<(u16, u32)> {
        let write = self.tcp.write_all(PREFACE);
        guarded("write the preface", write)
            .await
            .expect("write the preface");
        self.write_frame(SETTINGS, 0, 0, our_settings).await;
        let settings = loop {
            let frame = self.next_frame().await;
            match frame.kind {
                SETTINGS if frame.flags & ACK == 0 => break frame.payload,
                GOAWAY => panic!(
                    "the server sent GOAWAY during the handshake:\n{}",
                    self.history()
                ),
                _ => {}
            }
        };
        assert!(
            settings.len() % 6 == 0,
            "malformed SETTINGS payload:\n{}",
            self.history()
        );
        self.write_frame(SETTINGS, ACK, 0, &[]).await;
        settings
            .chunks(6)
            .map(|s| {
                (
                    u16::from_be_bytes([s[0], s[1]]),
                    u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
                )
            })
            .collect()
    }

    /// Opens `stream` with a HEADERS frame for a gRPC call to `path`
    /// (the request side stays open unless `end_stream`).
    pub async fn open_grpc(&mut self, stream: u32, path: &str, end_stream: bool) {
        let mut block = Vec::new();
        for (field, value) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", self.authority.as_str()),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            // Literal header field without indexing, new name; no Huffman.
            block.push(0x00);
            hpack_string(&mut block, field);
            hpack_string(&mut block, value);
        }
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        self.write_frame(HEADERS, flags, stream, &block).await;
    }

    /// Opens `stream` with a complete GET request for `path`.
    pub async fn open_get(&mut self, stream: u32, path: &str) {
        let mut block = Vec::new();
        for (field, value) in [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", path),
            (":authority", self.authority.as_str()),
        ] {
            block.push(0x00);
            hpack_string(&mut block, field);
            hpack_string(&mut block, value);
        }
        self.write_frame(HEADERS, END_HEADERS | END_STREAM, stream, &block)
            .await;
    }

    /// Sends one gRPC message (uncompressed) on `stream` in a DATA frame.
    pub async fn send_grpc_message(&mut self, stream: u32, body: &[u8], end_stream: bool) {
        let mut message = vec![0u8];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes());
        message.extend_from_slice(body);
        let flags = if end_stream { END_STREAM } else { 0 };
        self.write_frame(DATA, flags, stream, &message).await;
    }
}

/// An HPACK string literal, 7-bit length prefix, no Huffman coding.
fn hpack_string(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 127, "{s:?} needs a multi-byte HPACK length");
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// Opens `stream` as a Hold call and sends the Acquire for file lock
/// `name` (the request side stays open: that is the held lock).
pub async fn open_hold(raw: &mut RawH2, stream: u32, name: &str) {
    raw.open_grpc(stream, "/padlock.v1.Padlock/Hold", false)
        .await;
    let request = pb::HoldRequest {
        msg: Some(hold_request::Msg::Acquire(pb::Acquire {
            name: name.to_string(),
            kind: pb::Kind::File as i32,
            owner: "raw HTTP/2 client (tests)".to_string(),
            ..pb::Acquire::default()
        })),
    };
    raw.send_grpc_message(stream, &request.encode_to_vec(), false)
        .await;
}
/// Takes the complete gRPC messages (uncompressed) off the front of `buf`.
pub fn take_messages(buf: &mut Vec<u8>) -> Vec<pb::HoldResponse> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        assert_eq!(buf[0], 0, "compressed gRPC message from the server");
        let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
        if buf.len() < 5 + len {
            break;
        }
        let message = pb::HoldResponse::decode(&buf[5..5 + len]).expect("decode a HoldResponse");
        out.push(message);
        buf.drain(..5 + len);
    }
    out
}
