//! One POP3 client: the AUTHORIZATION state served here (CAPA, USER/PASS,
//! AUTH PLAIN, STLS, QUIT), then, once the password is checked, the INBOX
//! looked up in the replica, the proxy logged in to that backend's pop3d
//! on the user's behalf, and bytes copied both ways until either side
//! closes.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use corvid_registry::tls::MaybeTls;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tracing::Instrument;

use crate::backend::BackendStream;
use crate::pop3::backend::{self as pop3_backend, Login};
use crate::pop3::codec::{self, Command, Line, LineReader, Offer, MAX_LINE};
use crate::pop3::Shared;
use crate::routing::{RouteError, Service};

/// Session ids, for log lines (POP3's own sequence; IMAP has another).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The greeting. No APOP timestamp: APOP would keep the password from
/// the proxy, which must check it.
const GREETING: &[u8] = b"+OK corvid-proxy POP3 ready\r\n";

/// How a session ended (for the log line).
#[derive(Debug)]
enum End {
    /// QUIT, or the client went away.
    Done,
    /// The client socket failed.
    Io(std::io::Error),
    /// Closed by the proxy after telling the client why.
    Closed(&'static str),
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> Self {
        End::Io(e)
    }
}

/// What a command led to.
enum Step {
    /// Read the next command.
    Next,
    /// Logged in on the backend: relay from now on.
    Relay {
        user: String,
        server: String,
        stream: BackendStream,
        extra: BytesMut,
    },
}

/// Runs one client session on `stream` to its end.
pub async fn run(shared: Arc<Shared>, stream: MaybeTls, peer: SocketAddr) {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("pop3", session = id, %peer);
    async move {
        metrics::gauge!("corvid_proxy_sessions_open", "protocol" => "pop3").increment(1.0);
        let mut session = Session {
            shared,
            stream,
            rbuf: BytesMut::with_capacity(1024),
            lines: LineReader::new(MAX_LINE),
            peer,
            user: None,
            deadline: tokio::time::Instant::now(),
        };
        let end = session.serve().await;
        // A TLS client is owed a close_notify (else it sees a truncation).
        let _ = tokio::time::timeout(Duration::from_secs(2), session.stream.shutdown()).await;
        match &end {
            End::Done => tracing::debug!("session ended"),
            End::Io(e) => tracing::debug!(error = %e, "client connection failed"),
            End::Closed(why) => tracing::info!(reason = why, "session closed"),
        }
        metrics::gauge!("corvid_proxy_sessions_open", "protocol" => "pop3").decrement(1.0);
    }
    .instrument(span)
    .await
}

struct Session {
    shared: Arc<Shared>,
    stream: MaybeTls,
    rbuf: BytesMut,
    lines: LineReader,
    peer: SocketAddr,
    /// The name given by USER, waiting for PASS.
    user: Option<String>,
    /// When the login timeout expires.
    deadline: tokio::time::Instant,
}

impl Session {
    async fn serve(&mut self) -> End {
        self.deadline = tokio::time::Instant::now() + self.shared.login_timeout;
        if let Err(e) = self.send(GREETING).await {
            return End::Io(e);
        }
        loop {
            let step = match self.next_line().await {
                Ok(Line::TooLong) => self
                    .send(&codec::err(None, "Line too long"))
                    .await
                    .map(|_| Step::Next)
                    .map_err(End::from),
                Ok(Line::Text(line)) => match codec::parse(&line) {
                    Ok(cmd) => self.handle(cmd).await,
                    Err(e) => self
                        .send(&codec::err(None, &e.to_string()))
                        .await
                        .map(|_| Step::Next)
                        .map_err(End::from),
                },
                Err(end) => Err(end),
            };
            match step {
                Ok(Step::Next) => {}
                Ok(Step::Relay {
                    user,
                    server,
                    stream,
                    extra,
                }) => return self.relay(&user, &server, stream, extra).await,
                Err(end) => return end,
            }
        }
    }

    /// Writes and flushes.
    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// The next client line before login, within the login timeout.
    async fn next_line(&mut self) -> Result<Line, End> {
        loop {
            if let Some(line) = self.lines.next(&mut self.rbuf) {
                return Ok(line);
            }
            self.rbuf.reserve(1024);
            let read = tokio::time::timeout_at(self.deadline, self.stream.read_buf(&mut self.rbuf));
            match read.await {
                Err(_) => {
                    let _ = self.send(&codec::err(None, "Login timeout")).await;
                    return Err(End::Closed("login timeout"));
                }
                Ok(Err(e)) => return Err(End::Io(e)),
                Ok(Ok(0)) => return Err(End::Done),
                Ok(Ok(_)) => {}
            }
        }
    }

    fn offer(&self) -> Offer {
        Offer {
            stls: self.shared.tls.is_some() && !self.stream.is_tls(),
            login: self.plaintext_ok(),
        }
    }

    fn plaintext_ok(&self) -> bool {
        self.stream.is_tls() || self.shared.allow_plaintext || self.peer.ip().is_loopback()
    }

    async fn handle(&mut self, cmd: Command) -> Result<Step, End> {
        match cmd {
            Command::Capa => self.send(&codec::capa(self.offer())).await?,
            Command::Quit => {
                self.send(&codec::ok("corvid-proxy signing off")).await?;
                return Err(End::Done);
            }
            Command::Stls => self.stls().await?,
            Command::User(name) => {
                if !self.plaintext_ok() {
                    self.send(&codec::err(None, "Use STLS before logging in"))
                        .await?;
                } else {
                    // Any name is taken: whether it exists shows only
                    // after PASS, and only to someone with its password.
                    self.user = Some(name);
                    self.send(&codec::ok("Name is a valid mailbox")).await?;
                }
            }
            Command::Pass(password) => {
                let Some(user) = self.user.take() else {
                    self.send(&codec::err(None, "Give USER first")).await?;
                    return Ok(Step::Next);
                };
                return self.login(user, &password).await;
            }
            Command::Auth { mechanism, initial } => {
                return self.auth(mechanism, initial).await;
            }
            Command::Apop => {
                self.send(&codec::err(None, "APOP is not offered; use USER/PASS"))
                    .await?
            }
            Command::NeedsLogin(name) => {
                self.send(&codec::err(None, &format!("{name} needs a login first")))
                    .await?
            }
        }
        Ok(Step::Next)
    }

    async fn stls(&mut self) -> Result<(), End> {
        let Some(tls) = self.shared.tls.clone() else {
            self.send(&codec::err(None, "STLS not available")).await?;
            return Ok(());
        };
        if self.stream.is_tls() {
            self.send(&codec::err(None, "Already in TLS")).await?;
            return Ok(());
        }
        self.send(&codec::ok("Begin TLS negotiation now")).await?;
        // Whatever the client sent after STLS, before the handshake, is
        // plaintext an attacker may have injected: it is thrown away, and so
        // is a USER given in plaintext.
        self.rbuf.clear();
        self.lines.reset();
        self.user = None;
        let Some(tcp) = self.stream.take_plain() else {
            return Err(End::Closed("no plain socket"));
        };
        match tokio::time::timeout(
            Duration::from_secs(30),
            tokio_rustls::TlsAcceptor::from(tls).accept(tcp),
        )
        .await
        {
            Ok(Ok(s)) => {
                self.stream = MaybeTls::Tls(Box::new(s));
                Ok(())
            }
            _ => Err(End::Closed("TLS handshake failed")),
        }
    }

    async fn auth(
        &mut self,
        mechanism: Option<String>,
        initial: Option<String>,
    ) -> Result<Step, End> {
        let Some(mechanism) = mechanism else {
            // The pre-RFC 5034 form some clients still send: list the
            // mechanisms.
            let list: &[u8] = if self.plaintext_ok() {
                b"+OK\r\nPLAIN\r\n.\r\n"
            } else {
                b"+OK\r\n.\r\n"
            };
            self.send(list).await?;
            return Ok(Step::Next);
        };
        if mechanism != "PLAIN" {
            self.send(&codec::err(None, "Unsupported SASL mechanism (only PLAIN)"))
                .await?;
            return Ok(Step::Next);
        }
        if !self.plaintext_ok() {
            self.send(&codec::err(None, "Use STLS before logging in"))
                .await?;
            return Ok(Step::Next);
        }
        let response = match initial {
            Some(r) => r,
            None => {
                self.send(b"+ \r\n").await?;
                match self.next_line().await? {
                    Line::Text(l) => String::from_utf8_lossy(&l).into_owned(),
                    Line::TooLong => {
                        self.send(&codec::err(None, "Response too long")).await?;
                        return Ok(Step::Next);
                    }
                }
            }
        };
        if response.trim() == "*" {
            self.send(&codec::err(None, "Authentication cancelled"))
                .await?;
            return Ok(Step::Next);
        }
        let plain = match codec::decode_plain(&response) {
            Ok(p) => p,
            Err(e) => {
                self.send(&codec::err(None, &e.to_string())).await?;
                return Ok(Step::Next);
            }
        };
        if !plain.authzid.is_empty() && plain.authzid != plain.authcid {
            self.send(&codec::err(
                Some("AUTH"),
                "Proxy authorization is not offered",
            ))
            .await?;
            return Ok(Step::Next);
        }
        self.login(plain.authcid, &plain.password).await
    }

    /// Checks the password; on success logs in to the INBOX's backend.
    async fn login(&mut self, user: String, password: &str) -> Result<Step, End> {
        let valid_name = !user.is_empty()
            && user.len() <= 256
            && !user.bytes().any(|b| b.is_ascii_control() || b == b' ');
        let result = if valid_name {
            self.shared.password_check.check(&user, password).await
        } else {
            Ok(false)
        };
        match result {
            Ok(true) => {}
            Ok(false) => {
                metrics::counter!("corvid_proxy_logins_total", "protocol" => "pop3", "result" => "failed")
                    .increment(1);
                tracing::info!(user = %user.escape_debug(), "login failed");
                tokio::time::sleep(self.shared.failed_login_delay).await;
                self.send(&codec::err(Some("AUTH"), "Authentication failed"))
                    .await?;
                return Ok(Step::Next);
            }
            Err(e) => {
                metrics::counter!("corvid_proxy_logins_total", "protocol" => "pop3", "result" => "unavailable")
                    .increment(1);
                tracing::warn!(user = %user.escape_debug(), error = %e, "password check unavailable");
                self.send(&codec::err(
                    Some("SYS/TEMP"),
                    "Authentication is temporarily unavailable",
                ))
                .await?;
                return Ok(Step::Next);
            }
        }
        metrics::counter!("corvid_proxy_logins_total", "protocol" => "pop3", "result" => "ok")
            .increment(1);
        // The password was right: no delay on what follows.
        let server = match self.inbox_server(&user).await {
            Ok(s) => s,
            Err((code, text)) => {
                tracing::info!(user, reason = %text, "login: no usable INBOX");
                self.send(&codec::err(Some(code), &text)).await?;
                return Ok(Step::Next);
            }
        };
        let Some(addr) = self.shared.router.service(&server, Service::Pop3) else {
            tracing::warn!(user, server, "no POP3 address for the INBOX's server");
            self.send(&codec::err(
                Some("SYS/TEMP"),
                "The mailbox's server is not reachable from here",
            ))
            .await?;
            return Ok(Step::Next);
        };
        let started = Instant::now();
        let login = pop3_backend::login(&addr, &self.shared.backend, &user).await;
        metrics::histogram!("corvid_proxy_backend_connect_seconds", "server" => server.clone())
            .record(started.elapsed().as_secs_f64());
        match login {
            Ok(Login::Ready {
                line,
                stream,
                extra,
            }) => {
                tracing::info!(user, server, "login");
                let mut answer = line.to_vec();
                answer.extend_from_slice(b"\r\n");
                self.send(&answer).await?;
                Ok(Step::Relay {
                    user,
                    server,
                    stream,
                    extra,
                })
            }
            Ok(Login::Refused { line, code }) => {
                if matches!(code.as_deref(), Some("IN-USE" | "LOGIN-DELAY")) {
                    // The client can act on these (another session holds
                    // the maildrop; wait before polling again): relay.
                    tracing::info!(user, server, code = ?code, "backend refused the login");
                    let mut answer = line.to_vec();
                    answer.extend_from_slice(b"\r\n");
                    self.send(&answer).await?;
                } else {
                    self.backend_failed(&server, &String::from_utf8_lossy(&line))
                        .await?;
                }
                Ok(Step::Next)
            }
            Err(e) => {
                self.backend_failed(&server, &e.to_string()).await?;
                Ok(Step::Next)
            }
        }
    }

    async fn backend_failed(&mut self, server: &str, why: &str) -> Result<(), End> {
        tracing::warn!(server, error = %why, "POP3 backend login failed");
        metrics::counter!("corvid_proxy_backend_errors_total", "server" => server.to_string(), "kind" => "pop3")
            .increment(1);
        self.send(&codec::err(
            Some("SYS/TEMP"),
            "The mailbox's server is unavailable; try again later",
        ))
        .await?;
        Ok(())
    }

    /// The server holding `user`'s INBOX, or the response code and text
    /// for the client.
    async fn inbox_server(&self, user: &str) -> Result<String, (&'static str, String)> {
        let inbox = self
            .shared
            .namespace
            .inbox(user)
            .map_err(|_| ("SYS/PERM", "no mailbox for this user".to_string()))?;
        match self.shared.router.locate(&inbox).await {
            Ok(route) => Ok(route.server),
            Err(RouteError::NotFound) => Err(("SYS/PERM", "no mailbox for this user".to_string())),
            Err(e @ RouteError::Reserved) => Err(("SYS/TEMP", e.to_string())),
            Err(e) => {
                tracing::warn!(user, error = %e, "INBOX lookup failed");
                Err((
                    "SYS/TEMP",
                    "The mailbox cannot be located now; try again later".to_string(),
                ))
            }
        }
    }

    /// Copies bytes both ways until either side is done, or the client has
    /// been idle (neither sending nor receiving) for the idle timeout.
    async fn relay(
        &mut self,
        user: &str,
        server: &str,
        mut backend: BackendStream,
        extra: BytesMut,
    ) -> End {
        // Bytes the backend sent past its +OK (none expected) go first to
        // the client; commands the client pipelined behind its login go
        // first to the backend.
        let pending = std::mem::take(&mut self.rbuf);
        let early = async {
            if !extra.is_empty() {
                self.stream.write_all(&extra).await?;
                self.stream.flush().await?;
            }
            if !pending.is_empty() {
                backend.write_all(&pending).await?;
                backend.flush().await?;
            }
            Ok::<_, std::io::Error>(())
        };
        if let Err(e) = early.await {
            return End::Io(e);
        }
        let counters = Arc::new(Counters::new());
        counters.add_to_backend(pending.len() as u64);
        counters.add_to_client(extra.len() as u64);
        let mut client = Watched {
            inner: &mut self.stream,
            counters: counters.clone(),
        };
        let idle = self.shared.idle_timeout;
        let copy = tokio::io::copy_bidirectional(&mut client, &mut backend);
        let watchdog = async {
            loop {
                let quiet = counters.quiet_for();
                if quiet >= idle {
                    return;
                }
                // Wake at the idle deadline, or every 10 s to keep the
                // byte counters current on long sessions.
                tokio::time::sleep((idle - quiet).min(Duration::from_secs(10))).await;
                counters.report();
            }
        };
        tokio::pin!(watchdog);
        let end = tokio::select! {
            r = copy => match r {
                Ok(_) => End::Done,
                Err(e) => End::Io(e),
            },
            _ = &mut watchdog => {
                tracing::info!(user, server, "idle for too long");
                End::Closed("idle timeout")
            }
        };
        counters.report();
        let _ = tokio::time::timeout(Duration::from_secs(2), backend.shutdown()).await;
        end
    }
}

/// Relay progress: bytes each way and when the client last moved.
struct Counters {
    base: Instant,
    /// Milliseconds since `base` of the last client read or write.
    last: AtomicU64,
    to_backend: AtomicU64,
    to_client: AtomicU64,
    /// What was already added to the metrics (to_backend, to_client).
    reported: std::sync::Mutex<(u64, u64)>,
}

impl Counters {
    fn new() -> Counters {
        Counters {
            base: Instant::now(),
            last: AtomicU64::new(0),
            to_backend: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            reported: std::sync::Mutex::new((0, 0)),
        }
    }

    fn touch(&self) {
        self.last
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn add_to_backend(&self, n: u64) {
        self.to_backend.fetch_add(n, Ordering::Relaxed);
        self.touch();
    }

    fn add_to_client(&self, n: u64) {
        self.to_client.fetch_add(n, Ordering::Relaxed);
        self.touch();
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }

    /// Adds what moved since the last report to the byte counters.
    fn report(&self) {
        let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        let now = (
            self.to_backend.load(Ordering::Relaxed),
            self.to_client.load(Ordering::Relaxed),
        );
        metrics::counter!("corvid_proxy_bytes_relayed_total", "direction" => "to_backend")
            .increment(now.0 - reported.0);
        metrics::counter!("corvid_proxy_bytes_relayed_total", "direction" => "to_client")
            .increment(now.1 - reported.1);
        *reported = now;
    }
}

/// The client stream, counting what passes and when.
struct Watched<'a> {
    inner: &'a mut MaybeTls,
    counters: Arc<Counters>,
}

impl AsyncRead for Watched<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.counters.add_to_backend(n as u64);
        }
        r
    }
}

impl AsyncWrite for Watched<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut *this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                this.counters.add_to_client(n as u64);
            }
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}
