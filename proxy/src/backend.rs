//! Connections to Cyrus backends, the Cyrus way: the proxy logs in with its
//! own authentication id and the client's user as authorization id
//! (backends list the proxy in `proxyservers`), after STARTTLS when the
//! backend's address says `/tls`. Commands carry the proxy's own tags
//! (`C1`, `C2`, …), so they never clash with the client's.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use corvid_registry::tls::MaybeTls;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::imap::codec::{Frame, FrameError, Framer, Limits};
use crate::imap::command::{parse_response, Response, Status};
use crate::routing::BackendAddr;

/// Why talking to a backend failed.
#[derive(Debug, Error)]
pub enum BackendError {
    /// TCP, TLS or the socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// No answer in time.
    #[error("backend did not answer within {0:?}")]
    Timeout(Duration),
    /// The backend closed the connection.
    #[error("backend closed the connection")]
    Closed,
    /// The backend's bytes do not frame as IMAP.
    #[error("backend protocol error: {0}")]
    Protocol(String),
    /// The backend refused the proxy's login.
    #[error("backend refused the login: {0}")]
    LoginRefused(String),
    /// The backend refused STARTTLS or has no usable mechanism.
    #[error("backend cannot be used: {0}")]
    Unusable(String),
}

impl From<FrameError> for BackendError {
    fn from(e: FrameError) -> Self {
        BackendError::Protocol(e.to_string())
    }
}

/// How the proxy reaches and logs in to backends.
#[derive(Clone)]
pub struct BackendSettings {
    /// The proxy's authentication id.
    pub authname: String,
    /// Its password.
    pub password: Arc<String>,
    /// TCP connect, TLS and login, together.
    pub connect_timeout: Duration,
    /// One command's answer.
    pub command_timeout: Duration,
    /// Client configuration for `/tls` backends.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Bounds for the backend's lines and literals.
    pub limits: Limits,
}

/// A backend socket, plain or TLS (after STARTTLS).
pub type BackendStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

/// Replaces the plain socket of `stream` by TLS to `host`, once the
/// protocol's STARTTLS (or STLS) was accepted.
pub async fn upgrade_to_tls(
    stream: &mut BackendStream,
    host: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(), BackendError> {
    let Some(tcp) = stream.take_plain() else {
        return Err(BackendError::Unusable("TLS started twice".into()));
    };
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| BackendError::Unusable(format!("TLS server name: {e}")))?;
    let tls_stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    *stream = MaybeTls::Tls(Box::new(tls_stream));
    Ok(())
}

/// The answer to one command the proxy sent for itself.
#[derive(Debug)]
pub struct Answer {
    /// Untagged lines (with any literals inlined), in order.
    pub untagged: Vec<Bytes>,
    /// OK, NO or BAD.
    pub status: Status,
    /// Response code, without brackets.
    pub code: Option<String>,
    /// Human-readable text.
    pub text: String,
}

/// Bytes of untagged data kept per internal command ([`BackendConn::simple`]).
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// One logged-in connection to a backend.
pub struct BackendConn {
    /// The server name (part of a location before `!`).
    pub server: String,
    stream: BackendStream,
    rbuf: BytesMut,
    framer: Framer,
    next_tag: u64,
    /// Capabilities after login.
    pub capabilities: Vec<String>,
    /// When the backend last answered.
    pub last_used: Instant,
    /// Extensions enabled on it (replayed ENABLE).
    pub enabled: Vec<String>,
    command_timeout: Duration,
}

impl BackendConn {
    /// Connects to `addr` and logs in as the proxy on behalf of `user`
    /// (empty `user`: no authorization id, as LMTP and XFER do).
    pub async fn connect(
        server: &str,
        addr: &BackendAddr,
        settings: &BackendSettings,
        user: &str,
    ) -> Result<BackendConn, BackendError> {
        let started = Instant::now();
        let result = tokio::time::timeout(settings.connect_timeout, async {
            let mut conn = BackendConn::open(server, addr, settings).await?;
            let authz = user;
            conn.authenticate_plain(authz, &settings.authname, &settings.password)
                .await?;
            if conn.capabilities.is_empty() {
                conn.refresh_capabilities().await?;
            }
            Ok::<_, BackendError>(conn)
        })
        .await
        .unwrap_or(Err(BackendError::Timeout(settings.connect_timeout)));
        metrics::histogram!("corvid_proxy_backend_connect_seconds", "server" => server.to_string())
            .record(started.elapsed().as_secs_f64());
        if result.is_err() {
            metrics::counter!("corvid_proxy_backend_errors_total", "server" => server.to_string(), "kind" => "connect")
                .increment(1);
        }
        result
    }

    /// Checks a user's own password by logging in to `addr` as that user.
    /// The connection is closed afterwards.
    pub async fn check_password(
        server: &str,
        addr: &BackendAddr,
        settings: &BackendSettings,
        user: &str,
        password: &str,
    ) -> Result<bool, BackendError> {
        tokio::time::timeout(settings.connect_timeout, async {
            let mut conn = BackendConn::open(server, addr, settings).await?;
            let ok = match conn.authenticate_plain("", user, password).await {
                Ok(()) => true,
                Err(BackendError::LoginRefused(_)) => false,
                Err(e) => return Err(e),
            };
            let _ = conn.simple(b"LOGOUT").await;
            Ok(ok)
        })
        .await
        .unwrap_or(Err(BackendError::Timeout(settings.connect_timeout)))
    }

    /// TCP, greeting and (for `/tls`) STARTTLS; not logged in.
    async fn open(
        server: &str,
        addr: &BackendAddr,
        settings: &BackendSettings,
    ) -> Result<BackendConn, BackendError> {
        let tcp = TcpStream::connect(addr.host_port()).await?;
        let _ = tcp.set_nodelay(true);
        let mut conn = BackendConn {
            server: server.to_string(),
            stream: MaybeTls::Plain(tcp),
            rbuf: BytesMut::with_capacity(4096),
            framer: Framer::new(settings.limits),
            next_tag: 0,
            capabilities: Vec::new(),
            last_used: Instant::now(),
            enabled: Vec::new(),
            command_timeout: settings.command_timeout,
        };
        let greeting = conn.read_text().await?;
        if !greeting.starts_with(b"* OK") {
            return Err(BackendError::Unusable(format!(
                "greeting {:?}",
                String::from_utf8_lossy(&greeting).trim_end()
            )));
        }
        if addr.tls {
            let tls = settings.tls.clone().ok_or_else(|| {
                BackendError::Unusable("/tls backend but no backend.tls_ca".into())
            })?;
            let answer = conn.simple(b"STARTTLS").await?;
            if answer.status != Status::Ok {
                return Err(BackendError::Unusable(format!(
                    "STARTTLS refused: {}",
                    answer.text
                )));
            }
            // Nothing the backend sent before the handshake may be used.
            conn.rbuf.clear();
            upgrade_to_tls(&mut conn.stream, &addr.host, tls).await?;
        }
        Ok(conn)
    }

    /// AUTHENTICATE PLAIN with an initial response.
    async fn authenticate_plain(
        &mut self,
        authz: &str,
        authn: &str,
        password: &str,
    ) -> Result<(), BackendError> {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{authz}\0{authn}\0{password}"));
        let tag = self
            .send_tagged(format!("AUTHENTICATE PLAIN {token}").as_bytes())
            .await?;
        loop {
            let text = self.read_text().await?;
            match parse_response(&text).map_err(|e| BackendError::Protocol(e.to_string()))? {
                // A backend without SASL-IR asks for the response.
                Response::Continuation { .. } => {
                    self.write_all(format!("{token}\r\n").as_bytes()).await?;
                }
                Response::Tagged {
                    tag: t,
                    status,
                    code,
                    text,
                } if t == tag => {
                    // Cyrus sends its post-login capabilities in the OK:
                    // no CAPABILITY round trip needed then.
                    if let Some(caps) = code.as_deref().and_then(|c| c.strip_prefix("CAPABILITY "))
                    {
                        self.set_capabilities(caps);
                    }
                    return match status {
                        Status::Ok => Ok(()),
                        _ => Err(BackendError::LoginRefused(text)),
                    };
                }
                Response::Untagged { line } => {
                    if let Some(rest) = line.strip_prefix(b"* CAPABILITY ") {
                        self.set_capabilities(&String::from_utf8_lossy(rest));
                    }
                }
                _ => {}
            }
        }
    }

    async fn refresh_capabilities(&mut self) -> Result<(), BackendError> {
        let answer = self.simple(b"CAPABILITY").await?;
        for line in &answer.untagged {
            if let Some(rest) = line.strip_prefix(b"* CAPABILITY ") {
                self.set_capabilities(&String::from_utf8_lossy(rest));
            }
        }
        Ok(())
    }

    fn set_capabilities(&mut self, caps: &str) {
        self.capabilities = caps
            .split_whitespace()
            .map(|s| s.to_ascii_uppercase())
            .collect();
    }

    /// Whether the backend announced `cap` (upper case).
    pub fn has(&self, cap: &str) -> bool {
        self.capabilities.iter().any(|c| c == cap)
    }

    /// Whether backend bytes are waiting in the input buffer (more of the
    /// answer is already here: no need to flush the client yet).
    pub fn has_buffered(&self) -> bool {
        !self.rbuf.is_empty()
    }

    /// Whether the backend is in the middle of sending a literal.
    pub fn in_literal(&self) -> bool {
        self.framer.in_literal()
    }

    /// A fresh tag of the proxy's own.
    pub fn next_tag(&mut self) -> String {
        self.next_tag += 1;
        format!("C{}", self.next_tag)
    }

    /// Writes `tag SP rest CRLF` and returns the tag.
    pub async fn send_tagged(&mut self, rest: &[u8]) -> Result<String, BackendError> {
        let tag = self.next_tag();
        let mut line = Vec::with_capacity(tag.len() + rest.len() + 3);
        line.extend_from_slice(tag.as_bytes());
        line.push(b' ');
        line.extend_from_slice(rest);
        line.extend_from_slice(b"\r\n");
        self.write_all(&line).await?;
        Ok(tag)
    }

    /// Writes raw bytes and flushes.
    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Writes raw bytes without flushing.
    pub async fn write_buffered(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// The next frame from the backend, waiting up to the command timeout.
    pub async fn read_frame(&mut self) -> Result<Frame, BackendError> {
        let limit = self.command_timeout;
        tokio::time::timeout(limit, self.read_frame_untimed())
            .await
            .map_err(|_| BackendError::Timeout(limit))?
    }

    /// The next frame, however long it takes (IDLE, unsolicited data).
    pub async fn read_frame_untimed(&mut self) -> Result<Frame, BackendError> {
        loop {
            if let Some(frame) = self.framer.next(&mut self.rbuf)? {
                self.last_used = Instant::now();
                return Ok(frame);
            }
            self.rbuf.reserve(16 * 1024);
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(BackendError::Closed);
            }
        }
    }

    /// Reads one whole line, literals inlined (bounded by
    /// `MAX_ANSWER_BYTES`).
    async fn read_text(&mut self) -> Result<Vec<u8>, BackendError> {
        let mut line = Vec::new();
        loop {
            match self.read_frame().await? {
                Frame::Text { bytes, literal } => {
                    line.extend_from_slice(&bytes);
                    if literal.is_none() {
                        return Ok(line);
                    }
                }
                Frame::Literal(chunk) => line.extend_from_slice(&chunk),
            }
            if line.len() > MAX_ANSWER_BYTES {
                return Err(BackendError::Protocol("answer too large".into()));
            }
        }
    }

    /// Sends a command of the proxy's own and collects its whole answer.
    pub async fn simple(&mut self, rest: &[u8]) -> Result<Answer, BackendError> {
        let tag = self.send_tagged(rest).await?;
        self.collect(&tag).await
    }

    /// Reads until the tagged answer to `tag`, collecting untagged lines.
    pub async fn collect(&mut self, tag: &str) -> Result<Answer, BackendError> {
        let mut untagged = Vec::new();
        let mut size = 0usize;
        loop {
            let line = self.read_text().await?;
            match parse_response(&line).map_err(|e| BackendError::Protocol(e.to_string()))? {
                Response::Tagged {
                    tag: t,
                    status,
                    code,
                    text,
                } if t == tag => {
                    return Ok(Answer {
                        untagged,
                        status,
                        code,
                        text,
                    })
                }
                Response::Untagged { .. } => {
                    if line.starts_with(b"* BYE") {
                        return Err(BackendError::Closed);
                    }
                    size += line.len();
                    if size > MAX_ANSWER_BYTES {
                        return Err(BackendError::Protocol("answer too large".into()));
                    }
                    untagged.push(Bytes::from(line));
                }
                _ => {}
            }
        }
    }

    /// NOOP, to check a connection that idled before reusing it.
    pub async fn check_alive(&mut self) -> bool {
        matches!(self.simple(b"NOOP").await, Ok(a) if a.status == Status::Ok)
    }

    /// Replays ENABLE for `exts` not yet enabled here; swallows `* ENABLED`.
    pub async fn ensure_enabled(&mut self, exts: &[String]) -> Result<(), BackendError> {
        let missing: Vec<&String> = exts.iter().filter(|e| !self.enabled.contains(e)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut cmd = b"ENABLE".to_vec();
        for e in &missing {
            cmd.push(b' ');
            cmd.extend_from_slice(e.as_bytes());
        }
        self.simple(&cmd).await?;
        self.enabled.extend(missing.into_iter().cloned());
        Ok(())
    }

    /// Ends the session politely (best effort, bounded).
    pub async fn logout(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.simple(b"LOGOUT")).await;
    }
}
