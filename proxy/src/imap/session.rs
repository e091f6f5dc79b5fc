//! One client's IMAP session: login, the namespace answered from the
//! replica, and each mailbox's commands relayed to its backend.
//!
//! The session owns the client socket and one cached connection per
//! backend it has touched. Commands the proxy must understand (login,
//! LIST, SELECT, CREATE, …) are gathered whole (bounded by
//! `imap.max_command_bytes`) and parsed with [`crate::imap::command`]; in
//! the selected state every other command is relayed piece by piece, its
//! tag swapped for one of the proxy's and literals streamed in chunks.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use corvid_registry::model::{MailboxEntry, MailboxState};
use corvid_registry::tls::MaybeTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;

use crate::backend::{BackendConn, BackendError, BackendSettings};
use crate::config::SelectMode;
use crate::imap::codec::{Frame, FrameError, Framer, Limits, LiteralHeader};
use crate::imap::command::{
    list_match, parse_response, tag_and_name, Arg, Command, CommandBuffer, Response, Status,
};
use crate::login::PasswordCheck;
use crate::namespace::Namespace;
use crate::routing::{RouteError, Router};

/// Everything sessions share.
pub struct Shared {
    /// Mailbox → backend.
    pub router: Router,
    /// Naming rules (must match the backends').
    pub namespace: Namespace,
    /// How passwords are checked.
    pub password_check: PasswordCheck,
    /// How backends are reached.
    pub backend: BackendSettings,
    /// For STARTTLS and implicit TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Client-side framing limits.
    pub limits: Limits,
    /// Largest literal a client may send (checked by the session, which
    /// knows the command's tag).
    pub max_literal: u64,
    /// Largest command the proxy parses itself.
    pub max_command_bytes: usize,
    /// Before login.
    pub login_timeout: Duration,
    /// After login.
    pub idle_timeout: Duration,
    /// Pause before answering a failed login.
    pub failed_login_delay: Duration,
    /// How often IDLE polls a backend that has no IDLE of its own.
    pub idle_poll: Duration,
    /// LOGIN/PLAIN allowed without TLS from non-loopback clients.
    pub allow_plaintext: bool,
    /// Administrators (see everything, may move mailboxes).
    pub admins: Vec<String>,
    /// Servers for new top-level mailboxes.
    pub create_servers: Vec<String>,
    /// How one is chosen.
    pub select_mode: SelectMode,
    /// A cached backend connection idle this long is NOOP-checked first.
    pub noop_after_idle: Duration,
    /// Session ids, for logs.
    pub next_id: AtomicU64,
}

/// How a session ended (internal control flow).
#[derive(Debug)]
enum End {
    /// Client went away or said LOGOUT.
    Done,
    /// Client socket failed.
    Io(std::io::Error),
    /// Session must close after telling the client why (already written).
    Closed(&'static str),
    /// The current command was refused half-way (answer already written);
    /// the session reads the next one.
    Aborted,
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> Self {
        End::Io(e)
    }
}

/// The selected mailbox.
struct Selected {
    server: String,
}

/// Bytes queued for the client are flushed once this many are waiting.
const FLUSH_AT: usize = 64 * 1024;

/// Extensions the proxy lets clients ENABLE (Cyrus 3.6 backends have them).
const ENABLEABLE: &[&str] = &["CONDSTORE", "QRESYNC"];

/// Capabilities after login: what Cyrus 3.6 backends support and the proxy
/// relays faithfully.
const CAPS_AFTER_LOGIN: &str = "IMAP4rev1 LITERAL+ ID ENABLE IDLE NAMESPACE UIDPLUS MOVE \
     CHILDREN LIST-EXTENDED LIST-STATUS SPECIAL-USE UNSELECT ACL RIGHTS=kxten QUOTA \
     METADATA CONDSTORE QRESYNC ESEARCH SORT THREAD=ORDEREDSUBJECT THREAD=REFERENCES \
     BINARY WITHIN SEARCHRES";

/// Commands the proxy parses itself in the authenticated and selected
/// states (everything else is relayed in the selected state).
const PARSED_AFTER_LOGIN: &[&str] = &[
    "CAPABILITY",
    "LOGOUT",
    "ID",
    "NAMESPACE",
    "ENABLE",
    "LIST",
    "LSUB",
    "XLIST",
    "SELECT",
    "EXAMINE",
    "CREATE",
    "DELETE",
    "RENAME",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "STATUS",
    "GETACL",
    "SETACL",
    "DELETEACL",
    "MYRIGHTS",
    "LISTRIGHTS",
    "GETQUOTAROOT",
    "GETMETADATA",
    "SETMETADATA",
    "COPY",
    "MOVE",
    "UID COPY",
    "UID MOVE",
    "LOGIN",
    "AUTHENTICATE",
    "STARTTLS",
];

/// Runs one client session on `stream` to its end.
pub async fn run(shared: Arc<Shared>, stream: MaybeTls, peer: SocketAddr) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("imap", session = id, %peer);
    async move {
        metrics::gauge!("corvid_proxy_sessions_open", "protocol" => "imap").increment(1.0);
        let mut session = Session {
            client: ClientIo::new(stream, shared.limits),
            shared,
            peer,
            user: None,
            admin: false,
            backends: HashMap::new(),
            selected: None,
            enabled: Vec::new(),
            current_tag: String::new(),
        };
        let end = session.serve().await;
        match &end {
            End::Done => tracing::debug!("session ended"),
            End::Io(e) => tracing::debug!(error = %e, "client connection failed"),
            End::Closed(why) => tracing::info!(reason = why, "session closed"),
            End::Aborted => {}
        }
        for (_, conn) in session.backends.drain() {
            tokio::spawn(conn.logout());
        }
        metrics::gauge!("corvid_proxy_sessions_open", "protocol" => "imap").decrement(1.0);
    }
    .instrument(span)
    .await
}

/// The client side: socket, input buffer, framer, output queue.
struct ClientIo {
    stream: MaybeTls,
    rbuf: BytesMut,
    framer: Framer,
    out: Vec<u8>,
}

impl ClientIo {
    fn new(stream: MaybeTls, limits: Limits) -> ClientIo {
        ClientIo {
            stream,
            rbuf: BytesMut::with_capacity(4096),
            framer: Framer::new(limits),
            out: Vec::with_capacity(4096),
        }
    }

    /// The next frame; `Ok(None)` when the client closed.
    async fn frame(&mut self) -> Result<Option<Result<Frame, FrameError>>, std::io::Error> {
        loop {
            match self.framer.next(&mut self.rbuf) {
                Ok(Some(f)) => return Ok(Some(Ok(f))),
                Ok(None) => {}
                Err(e) => return Ok(Some(Err(e))),
            }
            if self.rbuf.capacity() - self.rbuf.len() < 4096 {
                self.rbuf.reserve(16 * 1024);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Ok(None);
            }
        }
    }

    fn queue(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    async fn flush(&mut self) -> Result<(), std::io::Error> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
            // Keep idle sessions small.
            if self.out.capacity() > 64 * 1024 {
                self.out = Vec::with_capacity(4096);
            }
        }
        self.stream.flush().await
    }

    async fn flush_if_full(&mut self) -> Result<(), std::io::Error> {
        if self.out.len() >= FLUSH_AT {
            self.flush().await?;
        }
        Ok(())
    }

    /// Queues `tag status text` and flushes.
    async fn answer(&mut self, tag: &str, status: &str, text: &str) -> Result<(), std::io::Error> {
        self.queue(format!("{tag} {status} {text}\r\n").as_bytes());
        self.flush().await
    }
}

struct Session {
    shared: Arc<Shared>,
    client: ClientIo,
    peer: SocketAddr,
    user: Option<String>,
    admin: bool,
    backends: HashMap<String, BackendConn>,
    selected: Option<Selected>,
    enabled: Vec<String>,
    /// Tag of the command being read, for answers about its literals.
    current_tag: String,
}

/// What a relayed command ended with.
struct Outcome {
    status: Status,
}

impl Session {
    async fn serve(&mut self) -> End {
        let greeting = format!(
            "* OK [CAPABILITY {}] corvid-proxy ready\r\n",
            self.capabilities()
        );
        self.client.queue(greeting.as_bytes());
        if let Err(e) = self.client.flush().await {
            return End::Io(e);
        }
        let started = Instant::now();
        loop {
            let end = match self.next_command(started).await {
                Ok(()) | Err(End::Aborted) => continue,
                Err(end) => end,
            };
            let _ = self.client.flush().await;
            return end;
        }
    }

    fn plaintext_ok(&self) -> bool {
        self.client.stream.is_tls() || self.shared.allow_plaintext || self.peer.ip().is_loopback()
    }

    fn capabilities(&self) -> String {
        if self.user.is_some() {
            return CAPS_AFTER_LOGIN.to_string();
        }
        let mut caps = String::from("IMAP4rev1 LITERAL+ ID ENABLE");
        if self.shared.tls.is_some() && !self.client.stream.is_tls() {
            caps.push_str(" STARTTLS");
        }
        if self.plaintext_ok() {
            caps.push_str(" AUTH=PLAIN SASL-IR");
        } else {
            caps.push_str(" LOGINDISABLED");
        }
        caps
    }

    /// Reads and handles one command (or relays unsolicited backend data).
    async fn next_command(&mut self, started: Instant) -> Result<(), End> {
        let timeout = if self.user.is_some() {
            self.shared.idle_timeout
        } else {
            self.shared
                .login_timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(1))
        };
        let frame = {
            let selected = self.selected.as_ref().map(|s| s.server.clone());
            let backend = selected.and_then(|s| self.backends.get_mut(&s));
            let client = &mut self.client;
            match backend {
                Some(conn) => {
                    tokio::select! {
                        f = tokio::time::timeout(timeout, client.frame()) => f,
                        b = conn.read_frame_untimed() => {
                            return self.unsolicited(b).await;
                        }
                    }
                }
                None => tokio::time::timeout(timeout, client.frame()).await,
            }
        };
        let frame = match frame {
            Err(_) => {
                let why = if self.user.is_some() {
                    "* BYE idle for too long\r\n"
                } else {
                    "* BYE login timeout\r\n"
                };
                self.client.queue(why.as_bytes());
                return Err(End::Closed("timeout"));
            }
            Ok(Err(e)) => return Err(End::Io(e)),
            Ok(Ok(None)) => return Err(End::Done),
            Ok(Ok(Some(f))) => f,
        };
        let (text, literal) = match frame {
            Ok(Frame::Text { bytes, literal }) => (bytes, literal),
            Ok(Frame::Literal(_)) => unreachable!("a command starts with a line"),
            Err(FrameError::LineTooLong) => {
                self.client.queue(b"* BAD line too long\r\n");
                self.client.flush().await?;
                return self.discard_long_line().await;
            }
            Err(FrameError::LiteralTooLarge { header }) => {
                // Not reached (the framer's bound is above the session's),
                // kept for safety.
                return self.literal_too_large("*", header).await;
            }
            Err(FrameError::BadLiteralHeader) => {
                self.client.answer("*", "BAD", "bad literal header").await?;
                return Ok(());
            }
        };
        let Some((tag, name)) = tag_and_name(&text) else {
            let first_word = text.split(|b| *b == b' ').next().unwrap_or(b"");
            if text.iter().all(|b| b.is_ascii_whitespace()) {
                // An empty line: ignored, as Cyrus does.
                return Ok(());
            }
            self.abort_command(literal).await?;
            let tag = String::from_utf8_lossy(first_word).trim().to_string();
            let tag = if tag.is_empty() || tag.len() > 64 {
                "*".into()
            } else {
                tag
            };
            self.client
                .answer(&tag, "BAD", "Missing or invalid command")
                .await?;
            return Ok(());
        };
        if let Some(h) = literal.filter(|h| h.len > self.max_literal()) {
            return self.literal_too_large(&tag, h).await;
        }
        self.current_tag = tag.clone();
        self.dispatch(tag, name, text, literal).await
    }

    fn max_literal(&self) -> u64 {
        self.shared.max_literal
    }

    async fn discard_long_line(&mut self) -> Result<(), End> {
        loop {
            if self.client.framer.discard_line(&mut self.client.rbuf) {
                return Ok(());
            }
            self.client.rbuf.clear();
            self.client.rbuf.reserve(16 * 1024);
            let n = tokio::time::timeout(
                Duration::from_secs(30),
                self.client.stream.read_buf(&mut self.client.rbuf),
            )
            .await
            .map_err(|_| End::Closed("timeout"))??;
            if n == 0 {
                return Err(End::Done);
            }
        }
    }

    /// A literal over the limit: BAD; a non-synchronising one whose data is
    /// on its way cannot be skipped cheaply, so the session ends.
    async fn literal_too_large(&mut self, tag: &str, header: LiteralHeader) -> Result<(), End> {
        metrics::counter!("corvid_proxy_literals_refused_total").increment(1);
        self.client
            .answer(tag, "BAD", "[TOOBIG] Literal too large")
            .await?;
        if header.non_sync {
            self.client.queue(b"* BYE literal too large\r\n");
            return Err(End::Closed("literal too large"));
        }
        // The client sends nothing of a synchronising literal until `+`.
        self.client.framer.reset();
        Ok(())
    }

    /// Skips the rest of a command the proxy refuses: a synchronising
    /// literal is never sent (no `+`), a non-synchronising one is read and
    /// dropped.
    async fn abort_command(&mut self, mut literal: Option<LiteralHeader>) -> Result<(), End> {
        while let Some(h) = literal {
            if !h.non_sync {
                self.client.framer.reset();
                return Ok(());
            }
            loop {
                match self.read_client().await? {
                    Frame::Literal(_) => {}
                    Frame::Text { literal: l, .. } => {
                        literal = l;
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// The next client frame inside a command (EOF and framing errors end
    /// the session: the command cannot be completed).
    async fn read_client(&mut self) -> Result<Frame, End> {
        match tokio::time::timeout(self.shared.idle_timeout, self.client.frame()).await {
            Err(_) => Err(End::Closed("timeout")),
            Ok(Err(e)) => Err(End::Io(e)),
            Ok(Ok(None)) => Err(End::Done),
            Ok(Ok(Some(Ok(Frame::Text {
                literal: Some(h), ..
            }))))
                if h.len > self.max_literal() =>
            {
                let tag = std::mem::take(&mut self.current_tag);
                self.literal_too_large(&tag, h).await?;
                Err(End::Aborted)
            }
            Ok(Ok(Some(Ok(f)))) => Ok(f),
            Ok(Ok(Some(Err(FrameError::LiteralTooLarge { header })))) => {
                let tag = std::mem::take(&mut self.current_tag);
                self.literal_too_large(&tag, header).await?;
                Err(End::Aborted)
            }
            Ok(Ok(Some(Err(e)))) => {
                self.client.queue(format!("* BYE {e}\r\n").as_bytes());
                Err(End::Closed("bad framing inside a command"))
            }
        }
    }

    /// Gathers a whole command (answering `+` for synchronising literals).
    async fn gather(
        &mut self,
        tag: &str,
        text: Bytes,
        mut literal: Option<LiteralHeader>,
    ) -> Result<Option<Command>, End> {
        let mut buf = CommandBuffer::new(self.shared.max_command_bytes);
        if let Err(e) = buf.push_text(&text) {
            self.abort_command(literal).await?;
            self.client.answer(tag, "BAD", &e.to_string()).await?;
            return Ok(None);
        }
        while let Some(h) = literal {
            if buf.raw_len() as u64 + h.len > self.shared.max_command_bytes as u64 {
                self.abort_command(Some(h)).await?;
                self.client
                    .answer(tag, "BAD", "[TOOBIG] Command too long")
                    .await?;
                return Ok(None);
            }
            if !h.non_sync {
                self.client.queue(b"+ go ahead\r\n");
                self.client.flush().await?;
            }
            loop {
                match self.read_client().await? {
                    Frame::Literal(chunk) => {
                        if let Err(e) = buf.push_literal(&chunk) {
                            self.client.answer(tag, "BAD", &e.to_string()).await?;
                            return Err(End::Closed("bad command"));
                        }
                    }
                    Frame::Text { bytes, literal: l } => {
                        if let Err(e) = buf.push_text(&bytes) {
                            self.abort_command(l).await?;
                            self.client.answer(tag, "BAD", &e.to_string()).await?;
                            return Ok(None);
                        }
                        literal = l;
                        break;
                    }
                }
            }
        }
        match buf.command() {
            Ok(c) => Ok(Some(c)),
            Err(e) => {
                self.client.answer(tag, "BAD", &e.to_string()).await?;
                Ok(None)
            }
        }
    }

    async fn dispatch(
        &mut self,
        tag: String,
        name: String,
        text: Bytes,
        literal: Option<LiteralHeader>,
    ) -> Result<(), End> {
        let logged_in = self.user.is_some();
        if !logged_in
            && !matches!(
                name.as_str(),
                "CAPABILITY" | "NOOP" | "LOGOUT" | "ID" | "STARTTLS" | "LOGIN" | "AUTHENTICATE"
            )
        {
            self.abort_command(literal).await?;
            self.client
                .answer(&tag, "BAD", "Please login first")
                .await?;
            return Ok(());
        }
        if name == "APPEND" && logged_in {
            return self.append(tag, text, literal).await;
        }
        let selected = self.selected.is_some();
        let parse = !logged_in
            || PARSED_AFTER_LOGIN.contains(&name.as_str())
            || (!selected && matches!(name.as_str(), "NOOP" | "IDLE"));
        if !parse {
            if !selected {
                self.abort_command(literal).await?;
                let text = if is_selected_state_command(&name) {
                    "No mailbox selected"
                } else {
                    "Unrecognized command"
                };
                self.client.answer(&tag, "BAD", text).await?;
                return Ok(());
            }
            let server = self
                .selected
                .as_ref()
                .map(|s| s.server.clone())
                .unwrap_or_default();
            if name == "IDLE"
                && literal.is_none()
                && self.backends.get(&server).is_some_and(|c| !c.has("IDLE"))
            {
                return self.idle_by_polling(&tag, &server).await;
            }
            let outcome = self.relay(&server, &tag, text, literal).await?;
            if matches!(name.as_str(), "CLOSE" | "UNSELECT") && outcome.status == Status::Ok {
                self.selected = None;
            }
            return Ok(());
        }
        let Some(cmd) = self.gather(&tag, text, literal).await? else {
            return Ok(());
        };
        self.handle(cmd).await
    }

    async fn handle(&mut self, cmd: Command) -> Result<(), End> {
        let tag = cmd.tag.clone();
        match cmd.name.as_str() {
            "CAPABILITY" => {
                let caps = format!("* CAPABILITY {}\r\n", self.capabilities());
                self.client.queue(caps.as_bytes());
                self.client.answer(&tag, "OK", "Completed").await?;
            }
            "NOOP" => self.client.answer(&tag, "OK", "Completed").await?,
            "LOGOUT" => {
                self.client.queue(b"* BYE LOGOUT received\r\n");
                self.client.answer(&tag, "OK", "Completed").await?;
                return Err(End::Done);
            }
            "ID" => {
                self.client
                    .queue(b"* ID (\"name\" \"corvid-proxy\" \"vendor\" \"Corvid\")\r\n");
                self.client.answer(&tag, "OK", "Completed").await?;
            }
            "STARTTLS" => self.starttls(&tag).await?,
            "LOGIN" => self.login(cmd).await?,
            "AUTHENTICATE" => self.authenticate(cmd).await?,
            "NAMESPACE" => {
                let line = format!(
                    "* NAMESPACE {}\r\n",
                    self.shared.namespace.namespace_response()
                );
                self.client.queue(line.as_bytes());
                self.client.answer(&tag, "OK", "Completed").await?;
            }
            "ENABLE" => self.enable(cmd).await?,
            "IDLE" => self.idle_unselected(&tag).await?,
            "LIST" | "XLIST" => self.list(cmd).await?,
            "LSUB" => self.lsub(cmd).await?,
            "SUBSCRIBE" | "UNSUBSCRIBE" => self.send_to_inbox_backend(cmd).await?,
            "SELECT" | "EXAMINE" => self.select(cmd).await?,
            "CREATE" => self.create(cmd).await?,
            "DELETE" => self.delete(cmd).await?,
            "RENAME" => self.rename(cmd).await?,
            "STATUS" | "GETACL" | "SETACL" | "DELETEACL" | "MYRIGHTS" | "LISTRIGHTS"
            | "GETQUOTAROOT" => self.send_to_owner(cmd, 0).await?,
            "GETMETADATA" | "SETMETADATA" => {
                let at = cmd
                    .args
                    .iter()
                    .position(|a| !matches!(a, Arg::List(_)))
                    .unwrap_or(0);
                let mailbox = cmd.args.get(at).and_then(Arg::as_bytes).unwrap_or(b"");
                if mailbox.is_empty() {
                    self.send_to_inbox_backend(cmd).await?
                } else {
                    self.send_to_owner(cmd, at).await?
                }
            }
            "COPY" | "MOVE" | "UID COPY" | "UID MOVE" => self.copy(cmd).await?,
            _ => {
                self.client
                    .answer(&tag, "BAD", "Unrecognized command")
                    .await?
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ login

    async fn starttls(&mut self, tag: &str) -> Result<(), End> {
        let Some(tls) = self.shared.tls.clone() else {
            self.client
                .answer(tag, "BAD", "STARTTLS not available")
                .await?;
            return Ok(());
        };
        if self.client.stream.is_tls() || self.user.is_some() {
            self.client
                .answer(tag, "BAD", "Already in TLS or logged in")
                .await?;
            return Ok(());
        }
        self.client
            .answer(tag, "OK", "Begin TLS negotiation now")
            .await?;
        // Whatever the client sent after STARTTLS, before the handshake, is
        // plaintext an attacker may have injected: it is thrown away.
        self.client.rbuf.clear();
        self.client.framer.reset();
        let Some(tcp) = self.client.stream.take_plain() else {
            return Err(End::Closed("no plain socket"));
        };
        match tokio::time::timeout(
            Duration::from_secs(30),
            tokio_rustls::TlsAcceptor::from(tls).accept(tcp),
        )
        .await
        {
            Ok(Ok(s)) => {
                self.client.stream = MaybeTls::Tls(Box::new(s));
                Ok(())
            }
            _ => Err(End::Closed("TLS handshake failed")),
        }
    }

    async fn login(&mut self, cmd: Command) -> Result<(), End> {
        let (Some(user), Some(pass)) = (
            cmd.args.first().and_then(Arg::as_bytes),
            cmd.args.get(1).and_then(Arg::as_bytes),
        ) else {
            self.client
                .answer(&cmd.tag, "BAD", "LOGIN needs a user name and a password")
                .await?;
            return Ok(());
        };
        let (user, pass) = (
            String::from_utf8_lossy(user).into_owned(),
            String::from_utf8_lossy(pass).into_owned(),
        );
        self.try_login(&cmd.tag, &user, &pass).await
    }

    async fn authenticate(&mut self, cmd: Command) -> Result<(), End> {
        let mech = cmd
            .args
            .first()
            .and_then(Arg::as_str)
            .unwrap_or("")
            .to_ascii_uppercase();
        if mech != "PLAIN" {
            self.client
                .answer(&cmd.tag, "NO", "Unsupported mechanism (only PLAIN)")
                .await?;
            return Ok(());
        }
        let response = match cmd.args.get(1).and_then(Arg::as_bytes) {
            Some(ir) => ir.to_vec(),
            None => {
                self.client.queue(b"+ \r\n");
                self.client.flush().await?;
                match self.read_client().await? {
                    Frame::Text {
                        bytes,
                        literal: None,
                    } => trim_crlf(&bytes).to_vec(),
                    Frame::Text { literal, .. } => {
                        self.abort_command(literal).await?;
                        self.client
                            .answer(&cmd.tag, "BAD", "Malformed response")
                            .await?;
                        return Ok(());
                    }
                    Frame::Literal(_) => unreachable!("no literal announced"),
                }
            }
        };
        if response == b"*" {
            self.client
                .answer(&cmd.tag, "BAD", "Authentication cancelled")
                .await?;
            return Ok(());
        }
        let decoded = if response == b"=" {
            Vec::new()
        } else {
            match base64::engine::general_purpose::STANDARD.decode(&response) {
                Ok(d) => d,
                Err(_) => {
                    self.client
                        .answer(&cmd.tag, "BAD", "Invalid base64")
                        .await?;
                    return Ok(());
                }
            }
        };
        let mut parts = decoded.split(|b| *b == 0);
        let (authz, authn, pass) = (parts.next(), parts.next(), parts.next());
        let (Some(authz), Some(authn), Some(pass), None) = (authz, authn, pass, parts.next())
        else {
            self.client
                .answer(&cmd.tag, "BAD", "Malformed PLAIN response")
                .await?;
            return Ok(());
        };
        if !authz.is_empty() && authz != authn {
            self.client
                .answer(
                    &cmd.tag,
                    "NO",
                    "[AUTHORIZATIONFAILED] Proxy authorization is not offered",
                )
                .await?;
            return Ok(());
        }
        let (user, pass) = (
            String::from_utf8_lossy(authn).into_owned(),
            String::from_utf8_lossy(pass).into_owned(),
        );
        self.try_login(&cmd.tag, &user, &pass).await
    }

    async fn try_login(&mut self, tag: &str, user: &str, pass: &str) -> Result<(), End> {
        if self.user.is_some() {
            self.client.answer(tag, "BAD", "Already logged in").await?;
            return Ok(());
        }
        if !self.plaintext_ok() {
            self.client
                .answer(
                    tag,
                    "NO",
                    "[PRIVACYREQUIRED] Use STARTTLS before logging in",
                )
                .await?;
            return Ok(());
        }
        let valid_name = !user.is_empty()
            && user.len() <= 256
            && !user.bytes().any(|b| b.is_ascii_control() || b == b' ');
        let result = if valid_name {
            self.shared.password_check.check(user, pass).await
        } else {
            Ok(false)
        };
        match result {
            Ok(true) => {
                metrics::counter!("corvid_proxy_logins_total", "protocol" => "imap", "result" => "ok")
                    .increment(1);
                tracing::info!(user, "login");
                self.user = Some(user.to_string());
                self.admin = self.shared.admins.iter().any(|a| a == user);
                let text = format!("[CAPABILITY {}] User logged in", CAPS_AFTER_LOGIN);
                self.client.answer(tag, "OK", &text).await?;
            }
            Ok(false) => {
                metrics::counter!("corvid_proxy_logins_total", "protocol" => "imap", "result" => "failed")
                    .increment(1);
                tracing::info!(user = %user.escape_debug(), "login failed");
                tokio::time::sleep(self.shared.failed_login_delay).await;
                self.client
                    .answer(tag, "NO", "[AUTHENTICATIONFAILED] Authentication failed")
                    .await?;
            }
            Err(e) => {
                metrics::counter!("corvid_proxy_logins_total", "protocol" => "imap", "result" => "unavailable")
                    .increment(1);
                tracing::warn!(user = %user.escape_debug(), error = %e, "password check unavailable");
                self.client
                    .answer(
                        tag,
                        "NO",
                        "[UNAVAILABLE] Authentication is temporarily unavailable",
                    )
                    .await?;
            }
        }
        Ok(())
    }

    fn user(&self) -> &str {
        self.user.as_deref().unwrap_or("")
    }

    // ------------------------------------------------------------ backends

    /// The session's connection to `server`, opened (or checked) as needed.
    async fn conn(&mut self, server: &str) -> Result<&mut BackendConn, BackendError> {
        let stale = match self.backends.get_mut(server) {
            Some(c) if c.last_used.elapsed() >= self.shared.noop_after_idle => {
                !c.check_alive().await
            }
            Some(_) => false,
            None => true,
        };
        if stale {
            self.backends.remove(server);
            let addr = self.shared.router.backend(server).ok_or_else(|| {
                BackendError::Unusable(format!("no address for server {server:?}"))
            })?;
            let user = self.user.clone().unwrap_or_default();
            let conn = BackendConn::connect(server, &addr, &self.shared.backend, &user).await?;
            self.backends.insert(server.to_string(), conn);
        }
        let enabled = self.enabled.clone();
        let conn = self.backends.get_mut(server).expect("inserted above");
        conn.ensure_enabled(&enabled).await?;
        Ok(conn)
    }

    /// A backend failed during a command: drop its connection; if it was
    /// the selected one, the session cannot go on.
    async fn backend_failed(
        &mut self,
        server: &str,
        tag: &str,
        e: &BackendError,
    ) -> Result<(), End> {
        tracing::warn!(server, error = %e, "backend failed");
        metrics::counter!("corvid_proxy_backend_errors_total", "server" => server.to_string(), "kind" => "session")
            .increment(1);
        self.backends.remove(server);
        if self.selected.as_ref().is_some_and(|s| s.server == server) {
            self.client
                .queue(b"* BYE [UNAVAILABLE] lost the connection to the mailbox's server\r\n");
            return Err(End::Closed("selected backend failed"));
        }
        self.client
            .answer(
                tag,
                "NO",
                "[UNAVAILABLE] The mailbox's server is unavailable",
            )
            .await?;
        Ok(())
    }

    /// Data the selected backend sent while no command ran (or its loss).
    async fn unsolicited(&mut self, first: Result<Frame, BackendError>) -> Result<(), End> {
        let server = self
            .selected
            .as_ref()
            .map(|s| s.server.clone())
            .unwrap_or_default();
        let mut frame = match first {
            Ok(f) => f,
            Err(_) => {
                self.backends.remove(&server);
                self.client
                    .queue(b"* BYE [UNAVAILABLE] lost the connection to the mailbox's server\r\n");
                return Err(End::Closed("selected backend failed"));
            }
        };
        loop {
            match frame {
                Frame::Text { bytes, literal } => {
                    self.client.queue(&bytes);
                    if literal.is_none() {
                        break;
                    }
                }
                Frame::Literal(chunk) => self.client.queue(&chunk),
            }
            let conn = self
                .backends
                .get_mut(&server)
                .expect("selected backend cached");
            frame = match conn.read_frame().await {
                Ok(f) => f,
                Err(_) => {
                    self.backends.remove(&server);
                    self.client.queue(
                        b"* BYE [UNAVAILABLE] lost the connection to the mailbox's server\r\n",
                    );
                    return Err(End::Closed("selected backend failed"));
                }
            };
        }
        self.client.flush().await?;
        Ok(())
    }

    /// Relays a command piece by piece to `server` (tag swapped, literals
    /// streamed and made non-synchronising), then its answer back.
    async fn relay(
        &mut self,
        server: &str,
        tag: &str,
        first: Bytes,
        literal: Option<LiteralHeader>,
    ) -> Result<Outcome, End> {
        let failed = Outcome { status: Status::No };
        if let Err(e) = self.conn(server).await {
            self.abort_command(literal).await?;
            self.backend_failed(server, tag, &e).await?;
            return Ok(failed);
        }
        let conn = self.backends.get_mut(server).expect("connected above");
        let our_tag = conn.next_tag();
        let mut piece = Vec::with_capacity(first.len() + 8);
        piece.extend_from_slice(our_tag.as_bytes());
        piece.extend_from_slice(&first[tag.len()..]);
        let mut literal = literal;
        let mut error = None;
        let mut sent = 0u64;
        loop {
            if let Some(h) = literal {
                if !h.non_sync {
                    // Answer `+` ourselves and announce the literal to the
                    // backend as non-synchronising (Cyrus has LITERAL+).
                    rewrite_as_non_sync(&mut piece, h);
                    self.client.queue(b"+ go ahead\r\n");
                    self.client.flush().await?;
                }
            }
            sent += piece.len() as u64;
            if error.is_none() {
                let conn = self.backends.get_mut(server).expect("connected");
                if let Err(e) = conn.write_buffered(&piece).await {
                    error = Some(e);
                }
            }
            let Some(_) = literal else { break };
            loop {
                match self.read_client().await? {
                    Frame::Literal(chunk) => {
                        sent += chunk.len() as u64;
                        if error.is_none() {
                            let conn = self.backends.get_mut(server).expect("connected");
                            if let Err(e) = conn.write_buffered(&chunk).await {
                                error = Some(e);
                            }
                        }
                    }
                    Frame::Text { bytes, literal: l } => {
                        piece.clear();
                        piece.extend_from_slice(&bytes);
                        literal = l;
                        break;
                    }
                }
            }
        }
        metrics::counter!("corvid_proxy_bytes_relayed_total", "direction" => "to_backend")
            .increment(sent);
        if error.is_none() {
            let conn = self.backends.get_mut(server).expect("connected");
            if let Err(e) = conn.write_all(b"").await {
                error = Some(e);
            }
        }
        if let Some(e) = error {
            self.backend_failed(server, tag, &e).await?;
            return Ok(failed);
        }
        match self.relay_answer(server, &our_tag, tag).await? {
            Some(o) => Ok(o),
            None => Ok(failed),
        }
    }

    /// Relays the backend's answer to `our_tag` (untagged data included)
    /// with the client's `tag`. A continuation request (IDLE) lets client
    /// lines through to the backend until the tagged answer. `None`: the
    /// backend failed (already reported).
    async fn relay_answer(
        &mut self,
        server: &str,
        our_tag: &str,
        tag: &str,
    ) -> Result<Option<Outcome>, End> {
        let mut line_start = true;
        let mut client_may_send = false;
        let mut received = 0u64;
        let result = loop {
            let conn = self.backends.get_mut(server).expect("connected");
            let frame = if client_may_send {
                let client = &mut self.client;
                tokio::select! {
                    f = conn.read_frame_untimed() => f,
                    c = tokio::time::timeout(self.shared.idle_timeout, client.frame()) => {
                        match c {
                            Ok(Ok(Some(Ok(Frame::Text { bytes, literal: None })))) => {
                                if let Err(e) = conn.write_all(&bytes).await {
                                    break Err(e);
                                }
                                continue;
                            }
                            Ok(Ok(None)) => return Err(End::Done),
                            Ok(Err(e)) => return Err(End::Io(e)),
                            Err(_) => return Err(End::Closed("timeout")),
                            _ => {
                                self.client.queue(b"* BYE unexpected input during IDLE\r\n");
                                return Err(End::Closed("bad input during IDLE"));
                            }
                        }
                    }
                }
            } else {
                conn.read_frame().await
            };
            let frame = match frame {
                Ok(f) => f,
                Err(e) => break Err(e),
            };
            match frame {
                Frame::Text { bytes, literal } => {
                    received += bytes.len() as u64;
                    if line_start
                        && bytes.starts_with(our_tag.as_bytes())
                        && bytes.get(our_tag.len()) == Some(&b' ')
                    {
                        let outcome = match parse_response(&bytes) {
                            Ok(Response::Tagged { status, .. }) => Outcome { status },
                            _ => Outcome {
                                status: Status::Bad,
                            },
                        };
                        self.client.queue(tag.as_bytes());
                        self.client.queue(&bytes[our_tag.len()..]);
                        break Ok(outcome);
                    }
                    if line_start && bytes.starts_with(b"+") {
                        client_may_send = true;
                        self.client.queue(&bytes);
                        self.client.flush().await?;
                        continue;
                    }
                    self.client.queue(&bytes);
                    line_start = literal.is_none();
                    if line_start && !self.backends.get(server).is_some_and(|c| c.has_buffered()) {
                        self.client.flush().await?;
                    }
                }
                Frame::Literal(chunk) => {
                    received += chunk.len() as u64;
                    self.client.queue(&chunk);
                    self.client.flush_if_full().await?;
                }
            }
        };
        metrics::counter!("corvid_proxy_bytes_relayed_total", "direction" => "to_client")
            .increment(received);
        match result {
            Ok(outcome) => {
                self.client.flush().await?;
                Ok(Some(outcome))
            }
            Err(e) => {
                self.backend_failed(server, tag, &e).await?;
                Ok(None)
            }
        }
    }

    /// Sends a parsed command to `server` with the proxy's tag and relays
    /// the answer.
    async fn forward(&mut self, server: &str, cmd: &Command) -> Result<Option<Outcome>, End> {
        let line = encode_command(&cmd.name, &cmd.args);
        let our_tag = match self.conn(server).await {
            Ok(conn) => match conn.send_tagged(&line).await {
                Ok(t) => t,
                Err(e) => {
                    self.backend_failed(server, &cmd.tag, &e).await?;
                    return Ok(None);
                }
            },
            Err(e) => {
                self.backend_failed(server, &cmd.tag, &e).await?;
                return Ok(None);
            }
        };
        self.relay_answer(server, &our_tag, &cmd.tag).await
    }

    // ------------------------------------------------------------ routing

    /// The internal name of a mailbox argument, or a NO/BAD already sent.
    async fn internal_name(&mut self, tag: &str, arg: Option<&Arg>) -> Result<Option<String>, End> {
        let Some(name) = arg.and_then(Arg::as_bytes) else {
            self.client
                .answer(tag, "BAD", "Missing mailbox name")
                .await?;
            return Ok(None);
        };
        let name = String::from_utf8_lossy(name).into_owned();
        match self.shared.namespace.to_internal(self.user(), &name) {
            Ok(n) => Ok(Some(n)),
            Err(e) => {
                self.client
                    .answer(tag, "NO", &format!("Invalid mailbox name: {e}"))
                    .await?;
                Ok(None)
            }
        }
    }

    /// Routes `internal`, answering NO for the client when it cannot be.
    async fn route(&mut self, tag: &str, internal: &str) -> Result<Option<String>, End> {
        match self.shared.router.locate(internal).await {
            Ok(route) => {
                if !self.admin && !self.may_see(&route.entry) {
                    self.client
                        .answer(tag, "NO", "[NONEXISTENT] Mailbox does not exist")
                        .await?;
                    return Ok(None);
                }
                Ok(Some(route.server))
            }
            Err(RouteError::NotFound) => {
                self.client
                    .answer(tag, "NO", "[NONEXISTENT] Mailbox does not exist")
                    .await?;
                Ok(None)
            }
            Err(e @ RouteError::Reserved) | Err(e @ RouteError::UnknownServer(_)) => {
                self.client
                    .answer(tag, "NO", &format!("[UNAVAILABLE] {e}"))
                    .await?;
                Ok(None)
            }
            Err(RouteError::Registry(e)) => {
                self.client
                    .answer(tag, "NO", &format!("[UNAVAILABLE] {e}"))
                    .await?;
                Ok(None)
            }
        }
    }

    /// Sends a command about the mailbox in argument `at` to its backend.
    async fn send_to_owner(&mut self, cmd: Command, at: usize) -> Result<(), End> {
        let Some(internal) = self.internal_name(&cmd.tag, cmd.args.get(at)).await? else {
            return Ok(());
        };
        let Some(server) = self.route(&cmd.tag, &internal).await? else {
            return Ok(());
        };
        self.forward(&server, &cmd).await?;
        Ok(())
    }

    /// The server of the user's INBOX (subscriptions live there).
    async fn inbox_server(&mut self, tag: &str) -> Result<Option<String>, End> {
        let inbox = match self.shared.namespace.inbox(self.user()) {
            Ok(n) => n,
            Err(e) => {
                self.client.answer(tag, "NO", &format!("{e}")).await?;
                return Ok(None);
            }
        };
        match self.shared.router.locate(&inbox).await {
            Ok(r) => Ok(Some(r.server)),
            Err(_) => match self.shared.create_servers.first().cloned() {
                // Users without an INBOX (administrators) keep their
                // subscriptions on the first server.
                Some(s) => Ok(Some(s)),
                None => {
                    self.client
                        .answer(tag, "NO", "[UNAVAILABLE] No INBOX to keep subscriptions on")
                        .await?;
                    Ok(None)
                }
            },
        }
    }

    async fn send_to_inbox_backend(&mut self, cmd: Command) -> Result<(), End> {
        let Some(server) = self.inbox_server(&cmd.tag).await? else {
            return Ok(());
        };
        self.forward(&server, &cmd).await?;
        Ok(())
    }

    /// LSUB from the INBOX backend, without the subscriptions to mailboxes
    /// that no longer exist anywhere in the murder (as Cyrus's frontend).
    async fn lsub(&mut self, cmd: Command) -> Result<(), End> {
        let Some(server) = self.inbox_server(&cmd.tag).await? else {
            return Ok(());
        };
        let line = encode_command(&cmd.name, &cmd.args);
        let answer = match self.conn(&server).await {
            Ok(conn) => conn.simple(&line).await,
            Err(e) => Err(e),
        };
        let answer = match answer {
            Ok(a) => a,
            Err(e) => return self.backend_failed(&server, &cmd.tag, &e).await,
        };
        for l in &answer.untagged {
            let keep = match lsub_name(l) {
                Some(name) => match self.shared.namespace.to_internal(self.user(), &name) {
                    // A \Noselect parent of subscriptions is kept.
                    Ok(internal) => {
                        !matches!(self.shared.router.peek(&internal), Ok(None))
                            || l.windows(9).any(|w| w.eq_ignore_ascii_case(b"\\Noselect"))
                    }
                    Err(_) => true,
                },
                None => true,
            };
            if keep {
                self.client.queue(l);
            }
        }
        let text = format!(
            "{} {}",
            answer.code.map(|c| format!("[{c}]")).unwrap_or_default(),
            answer.text
        );
        self.client
            .answer(&cmd.tag, answer.status.as_str(), text.trim())
            .await?;
        Ok(())
    }

    /// Whether the user may see `entry` (the `l` right, own mailboxes,
    /// administrators).
    fn may_see(&self, entry: &MailboxEntry) -> bool {
        if self.admin {
            return true;
        }
        let user = self.user();
        if let Ok(inbox) = self.shared.namespace.inbox(user) {
            if at_or_under(&entry.name, &inbox) {
                return true;
            }
        }
        acl_allows(&entry.acl, user, 'l')
    }

    // ------------------------------------------------------------ commands

    async fn enable(&mut self, cmd: Command) -> Result<(), End> {
        let mut now = Vec::new();
        for a in &cmd.args {
            let Some(ext) = a.as_str() else { continue };
            let ext = ext.to_ascii_uppercase();
            if ENABLEABLE.contains(&ext.as_str()) && !self.enabled.contains(&ext) {
                self.enabled.push(ext.clone());
                now.push(ext);
            }
        }
        // QRESYNC implies CONDSTORE (RFC 7162).
        if self.enabled.iter().any(|e| e == "QRESYNC")
            && !self.enabled.iter().any(|e| e == "CONDSTORE")
        {
            self.enabled.push("CONDSTORE".into());
        }
        let mut line = b"* ENABLED".to_vec();
        for e in &now {
            line.push(b' ');
            line.extend_from_slice(e.as_bytes());
        }
        line.extend_from_slice(b"\r\n");
        self.client.queue(&line);
        // The selected backend needs it now; others get it when used.
        if let Some(server) = self.selected.as_ref().map(|s| s.server.clone()) {
            if let Err(e) = self.conn(&server).await {
                return self.backend_failed(&server, &cmd.tag, &e).await;
            }
        }
        self.client.answer(&cmd.tag, "OK", "Completed").await?;
        Ok(())
    }

    async fn idle_unselected(&mut self, tag: &str) -> Result<(), End> {
        self.client.queue(b"+ idling\r\n");
        self.client.flush().await?;
        match self.read_client().await? {
            Frame::Text {
                bytes,
                literal: None,
            } if trim_crlf(&bytes).eq_ignore_ascii_case(b"DONE") => {
                self.client.answer(tag, "OK", "IDLE terminated").await?;
                Ok(())
            }
            Frame::Text { literal, .. } => {
                self.abort_command(literal).await?;
                self.client.answer(tag, "BAD", "Expected DONE").await?;
                Ok(())
            }
            Frame::Literal(_) => unreachable!("no literal announced"),
        }
    }

    /// IDLE for a backend without it: the proxy idles with the client and
    /// polls the backend with NOOP, relaying what it reports.
    async fn idle_by_polling(&mut self, tag: &str, server: &str) -> Result<(), End> {
        self.client.queue(b"+ idling\r\n");
        self.client.flush().await?;
        let poll = self.shared.idle_poll;
        loop {
            let frame = tokio::time::timeout(poll, self.client.frame()).await;
            match frame {
                Err(_) => {
                    let answer = match self.backends.get_mut(server) {
                        Some(conn) => conn.simple(b"NOOP").await,
                        None => Err(BackendError::Closed),
                    };
                    match answer {
                        Ok(a) => {
                            for l in &a.untagged {
                                self.client.queue(l);
                            }
                            self.client.flush().await?;
                        }
                        Err(e) => return self.backend_failed(server, tag, &e).await,
                    }
                }
                Ok(Err(e)) => return Err(End::Io(e)),
                Ok(Ok(None)) => return Err(End::Done),
                Ok(Ok(Some(Ok(Frame::Text {
                    bytes,
                    literal: None,
                }))))
                    if trim_crlf(&bytes).eq_ignore_ascii_case(b"DONE") =>
                {
                    self.client.answer(tag, "OK", "IDLE terminated").await?;
                    return Ok(());
                }
                Ok(Ok(Some(_))) => {
                    self.client.queue(b"* BYE expected DONE\r\n");
                    return Err(End::Closed("bad input during IDLE"));
                }
            }
        }
    }

    async fn select(&mut self, cmd: Command) -> Result<(), End> {
        let Some(internal) = self.internal_name(&cmd.tag, cmd.args.first()).await? else {
            return Ok(());
        };
        let Some(server) = self.route(&cmd.tag, &internal).await? else {
            return Ok(());
        };
        let previous = self.selected.take();
        if let Some(prev) = &previous {
            if prev.server != server {
                // Leave the old backend cleanly; a QRESYNC client learns the
                // old mailbox is closed, as a single server would tell it.
                if let Some(conn) = self.backends.get_mut(&prev.server) {
                    if conn.simple(b"UNSELECT").await.is_err() {
                        self.backends.remove(&prev.server);
                    }
                }
                if self.enabled.iter().any(|e| e == "QRESYNC") {
                    self.client
                        .queue(b"* OK [CLOSED] Previous mailbox closed\r\n");
                }
            }
        }
        if let Some(outcome) = self.forward(&server, &cmd).await? {
            if outcome.status == Status::Ok {
                self.selected = Some(Selected { server });
            }
        }
        Ok(())
    }

    async fn append(
        &mut self,
        tag: String,
        text: Bytes,
        literal: Option<LiteralHeader>,
    ) -> Result<(), End> {
        // The mailbox comes first; it is usually in the first piece, and may
        // be a literal of its own.
        let mut head = CommandBuffer::new(self.shared.max_command_bytes);
        let mut pieces: Vec<(Bytes, Option<LiteralHeader>, Option<Vec<u8>>)> = Vec::new();
        let mut text = text;
        let mut literal = literal;
        let mailbox = loop {
            if let Err(e) = head.push_text(&text) {
                self.abort_command(literal).await?;
                self.client.answer(&tag, "BAD", &e.to_string()).await?;
                return Ok(());
            }
            let parsed = match head.head() {
                Ok(h) => h,
                Err(e) => {
                    self.abort_command(literal).await?;
                    self.client.answer(&tag, "BAD", &e.to_string()).await?;
                    return Ok(());
                }
            };
            if let Some(first) = parsed.args.first() {
                pieces.push((text.clone(), literal, None));
                break first.clone();
            }
            // The mailbox name itself is a literal: gather it.
            let Some(h) = literal else {
                self.client.answer(&tag, "BAD", "Missing arguments").await?;
                return Ok(());
            };
            if h.len > 1024 {
                self.abort_command(Some(h)).await?;
                self.client
                    .answer(&tag, "BAD", "Mailbox name too long")
                    .await?;
                return Ok(());
            }
            if !h.non_sync {
                self.client.queue(b"+ go ahead\r\n");
                self.client.flush().await?;
            }
            let mut data = Vec::new();
            let next = loop {
                match self.read_client().await? {
                    Frame::Literal(c) => data.extend_from_slice(&c),
                    f @ Frame::Text { .. } => break f,
                }
            };
            let _ = head.push_literal(&data);
            let mut rewritten = text.to_vec();
            if !h.non_sync {
                rewrite_as_non_sync(&mut rewritten, h);
            }
            pieces.push((Bytes::from(rewritten), None, Some(data)));
            let Frame::Text { bytes, literal: l } = next else {
                unreachable!()
            };
            text = bytes;
            literal = l;
        };
        let Some(internal) = self.internal_name(&tag, Some(&mailbox)).await? else {
            let last = pieces.last().and_then(|p| p.1);
            self.abort_command(last).await?;
            return Ok(());
        };
        let server = match self.shared.router.locate(&internal).await {
            Ok(r) if self.admin || self.may_see(&r.entry) => r.server,
            Ok(_) | Err(RouteError::NotFound) => {
                let last = pieces.last().and_then(|p| p.1);
                self.abort_command(last).await?;
                self.client
                    .answer(&tag, "NO", "[TRYCREATE] Mailbox does not exist")
                    .await?;
                return Ok(());
            }
            Err(e) => {
                let last = pieces.last().and_then(|p| p.1);
                self.abort_command(last).await?;
                self.client
                    .answer(&tag, "NO", &format!("[UNAVAILABLE] {e}"))
                    .await?;
                return Ok(());
            }
        };
        // Send what was gathered, then stream the rest through `relay`.
        let (last_text, last_literal, _) = pieces.pop().expect("the mailbox piece");
        if !pieces.is_empty() {
            if let Err(e) = self.conn(&server).await {
                self.abort_command(last_literal).await?;
                return self.backend_failed(&server, &tag, &e).await;
            }
        }
        // Earlier pieces (a literal mailbox name): prepend them to the
        // first piece relay sends.
        let mut first = Vec::new();
        for (t, _, data) in &pieces {
            first.extend_from_slice(t);
            if let Some(d) = data {
                first.extend_from_slice(d);
            }
        }
        first.extend_from_slice(&last_text);
        self.relay(&server, &tag, Bytes::from(first), last_literal)
            .await?;
        Ok(())
    }

    async fn create(&mut self, cmd: Command) -> Result<(), End> {
        let Some(internal) = self.internal_name(&cmd.tag, cmd.args.first()).await? else {
            return Ok(());
        };
        if let Ok(Some(e)) = self.shared.router.peek(&internal) {
            if self.admin || self.may_see(&e) {
                self.client
                    .answer(&cmd.tag, "NO", "[ALREADYEXISTS] Mailbox already exists")
                    .await?;
                return Ok(());
            }
        }
        let server = match self.parent_server(&internal) {
            Some(s) => s,
            None => match self.pick_server().await {
                Some(s) => s,
                None => {
                    self.client
                        .answer(
                            &cmd.tag,
                            "NO",
                            "[UNAVAILABLE] No server configured for new top-level mailboxes",
                        )
                        .await?;
                    return Ok(());
                }
            },
        };
        self.forward_then_wait(&server, &cmd, Wait::Active(internal))
            .await
    }

    /// The server of the nearest existing ancestor of `internal`.
    fn parent_server(&self, internal: &str) -> Option<String> {
        let mut name = internal;
        while let Some(pos) = name.rfind('.') {
            name = &name[..pos];
            if let Ok(Some(e)) = self.shared.router.peek(name) {
                return Some(e.server().to_string());
            }
        }
        None
    }

    async fn pick_server(&mut self) -> Option<String> {
        let servers = self.shared.create_servers.clone();
        if servers.is_empty() {
            return None;
        }
        if self.shared.select_mode == SelectMode::FreespaceMost {
            let mut best: Option<(u64, String)> = None;
            for s in &servers {
                let Ok(conn) = self.conn(s).await else {
                    continue;
                };
                let Ok(answer) = conn
                    .simple(b"GETMETADATA \"\" (/shared/vendor/cmu/cyrus-imapd/freespace/total)")
                    .await
                else {
                    continue;
                };
                if let Some(free) = answer.untagged.iter().find_map(|l| freespace_of(l)) {
                    if best.as_ref().is_none_or(|(b, _)| free > *b) {
                        best = Some((free, s.clone()));
                    }
                }
            }
            if let Some((_, s)) = best {
                return Some(s);
            }
        }
        use rand::seq::SliceRandom;
        servers.choose(&mut rand::thread_rng()).cloned()
    }

    async fn delete(&mut self, cmd: Command) -> Result<(), End> {
        let Some(internal) = self.internal_name(&cmd.tag, cmd.args.first()).await? else {
            return Ok(());
        };
        let Some(server) = self.route(&cmd.tag, &internal).await? else {
            return Ok(());
        };
        self.forward_then_wait(&server, &cmd, Wait::Gone(internal))
            .await
    }

    async fn rename(&mut self, cmd: Command) -> Result<(), End> {
        let Some(old) = self.internal_name(&cmd.tag, cmd.args.first()).await? else {
            return Ok(());
        };
        let Some(new) = self.internal_name(&cmd.tag, cmd.args.get(1)).await? else {
            return Ok(());
        };
        let Some(source) = self.route(&cmd.tag, &old).await? else {
            return Ok(());
        };
        let target = cmd.args.get(2).and_then(Arg::as_str).map(str::to_string);
        if let Some(target) = target.filter(|t| t.contains('!') || old == new) {
            // `RENAME a a server!partition`: a move between backends.
            let (dest, partition) = match target.split_once('!') {
                Some((s, p)) => (s.to_string(), Some(p.to_string())),
                None => (target.clone(), None),
            };
            if !self.admin {
                self.client
                    .answer(
                        &cmd.tag,
                        "NO",
                        "[NOPERM] Only administrators can move mailboxes between servers",
                    )
                    .await?;
                return Ok(());
            }
            if self.shared.router.backend(&dest).is_none() {
                self.client
                    .answer(&cmd.tag, "NO", &format!("Unknown server {dest:?}"))
                    .await?;
                return Ok(());
            }
            if dest == source {
                // A partition move on one backend.
                let mut args = cmd.args.clone();
                if let Some(p) = &partition {
                    args[2] = Arg::Atom(p.clone());
                }
                let local = Command {
                    tag: cmd.tag.clone(),
                    name: cmd.name.clone(),
                    args,
                };
                return self
                    .forward_then_wait(&source, &local, Wait::Active(new))
                    .await;
            }
            let mut args = vec![cmd.args[0].clone(), Arg::Atom(dest.clone())];
            if let Some(p) = partition {
                args.push(Arg::Atom(p));
            }
            let xfer = Command {
                tag: cmd.tag.clone(),
                name: "XFER".into(),
                args,
            };
            return self
                .forward_then_wait(&source, &xfer, Wait::At(old, dest))
                .await;
        }
        if let Some(dest) = self.parent_server(&new) {
            if dest != source && !new.starts_with(&format!("{old}.")) {
                self.client
                    .answer(
                        &cmd.tag,
                        "NO",
                        "[CANNOT] The new name is on another server; an administrator can move the mailbox first",
                    )
                    .await?;
                return Ok(());
            }
        }
        self.forward_then_wait(&source, &cmd, Wait::Active(new))
            .await
    }

    /// Forwards `cmd`; on OK, waits (bounded) until the replica shows its
    /// effect before the client hears OK (read your own writes).
    async fn forward_then_wait(
        &mut self,
        server: &str,
        cmd: &Command,
        wait: Wait,
    ) -> Result<(), End> {
        let line = encode_command(&cmd.name, &cmd.args);
        let our_tag = match self.conn(server).await {
            Ok(conn) => match conn.send_tagged(&line).await {
                Ok(t) => t,
                Err(e) => return self.backend_failed(server, &cmd.tag, &e).await,
            },
            Err(e) => return self.backend_failed(server, &cmd.tag, &e).await,
        };
        // Hold the tagged line back until the replica has caught up.
        let mut line_start = true;
        let mut refusal = None;
        let answer = loop {
            let conn = self.backends.get_mut(server).expect("connected");
            let frame = match conn.read_frame().await {
                Ok(f) => f,
                Err(e) => return self.backend_failed(server, &cmd.tag, &e).await,
            };
            match frame {
                Frame::Text { bytes, literal } => {
                    if line_start
                        && bytes.starts_with(our_tag.as_bytes())
                        && bytes.get(our_tag.len()) == Some(&b' ')
                    {
                        break bytes;
                    }
                    // Cyrus's XFER reports a failed move as `* NO …` and
                    // still answers OK (cyrus-imapd 3.6): remember it.
                    if line_start && bytes.starts_with(b"* NO ") {
                        refusal =
                            Some(String::from_utf8_lossy(trim_crlf(&bytes[5..])).into_owned());
                    }
                    self.client.queue(&bytes);
                    line_start = literal.is_none();
                }
                Frame::Literal(chunk) => self.client.queue(&chunk),
            }
        };
        let ok = matches!(
            parse_response(&answer),
            Ok(Response::Tagged {
                status: Status::Ok,
                ..
            })
        );
        if ok {
            if let (Wait::At(name, dest), Some(why)) = (&wait, &refusal) {
                tracing::warn!(mailbox = %name, server = %dest, reason = %why, "move failed on the source backend");
                let text = format!("[UNAVAILABLE] The move to {dest} failed: {why}");
                self.client.answer(&cmd.tag, "NO", &text).await?;
                return Ok(());
            }
            let seen = match &wait {
                Wait::Active(n) => {
                    self.shared
                        .router
                        .wait_active(n, Duration::from_secs(10))
                        .await
                }
                Wait::Gone(n) => {
                    self.shared
                        .router
                        .wait_gone(n, Duration::from_secs(10))
                        .await
                }
                Wait::At(n, dest) => self.wait_at(n, dest, Duration::from_secs(60)).await,
            };
            if !seen {
                metrics::counter!("corvid_proxy_read_your_writes_timeouts_total").increment(1);
                tracing::warn!(command = %cmd.name, "the registry did not show the change in time");
                if let Wait::At(_, dest) = &wait {
                    let text = format!(
                        "[UNAVAILABLE] The source server reported the move done, but the registry does not show the mailbox on {dest}"
                    );
                    self.client.answer(&cmd.tag, "NO", &text).await?;
                    return Ok(());
                }
            }
        }
        if !ok && self.shared.router.replica().status().master.is_none() {
            // The backend could not reach the registry either; say so, so
            // that the user (and the operator reading the log) know why.
            let text = match parse_response(&answer) {
                Ok(Response::Tagged { text, .. }) => text,
                _ => String::new(),
            };
            let text = format!(
                "[UNAVAILABLE] {text} (the mailbox registry is unreachable; try again later)"
            );
            self.client.answer(&cmd.tag, "NO", text.trim()).await?;
            return Ok(());
        }
        self.client.queue(cmd.tag.as_bytes());
        self.client.queue(&answer[our_tag.len()..]);
        self.client.flush().await?;
        Ok(())
    }

    async fn wait_at(&self, name: &str, server: &str, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if let Ok(Some(e)) = self.shared.router.peek(name) {
                if e.state == MailboxState::Active && e.server() == server {
                    return true;
                }
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            self.shared
                .router
                .wait_active(name, Duration::from_millis(500))
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // ------------------------------------------------------------ LIST

    async fn list(&mut self, cmd: Command) -> Result<(), End> {
        let mut args = cmd.args.as_slice();
        let mut selection = Vec::new();
        if let Some(Arg::List(opts)) = args.first() {
            selection = opts
                .iter()
                .filter_map(|a| a.as_str().map(str::to_ascii_uppercase))
                .collect();
            args = &args[1..];
        }
        let (Some(reference), Some(patterns)) = (args.first(), args.get(1)) else {
            self.client
                .answer(&cmd.tag, "BAD", "LIST needs a reference and a pattern")
                .await?;
            return Ok(());
        };
        let mut returns = Vec::new();
        if let (Some(Arg::Atom(r)), Some(Arg::List(opts))) = (args.get(2), args.get(3)) {
            if r.eq_ignore_ascii_case("RETURN") {
                returns = opts
                    .iter()
                    .filter_map(|a| match a {
                        Arg::Atom(s) => Some(s.to_ascii_uppercase()),
                        Arg::List(_) => Some("(".into()),
                        _ => None,
                    })
                    .collect();
            }
        }
        let backend_only = selection
            .iter()
            .any(|s| s == "SUBSCRIBED" || s == "SPECIAL-USE")
            || returns.iter().any(|r| {
                r == "STATUS"
                    || r == "SPECIAL-USE"
                    || r == "SUBSCRIBED"
                    || r == "MYRIGHTS"
                    || r == "METADATA"
            })
            || cmd.name == "XLIST";
        let reference = String::from_utf8_lossy(reference.as_bytes().unwrap_or(b"")).into_owned();
        let patterns: Vec<String> = match patterns {
            Arg::List(items) => items
                .iter()
                .filter_map(|a| {
                    a.as_bytes()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                })
                .collect(),
            other => vec![String::from_utf8_lossy(other.as_bytes().unwrap_or(b"")).into_owned()],
        };
        let sep = self.shared.namespace.separator();
        if patterns.len() == 1 && patterns[0].is_empty() {
            // The hierarchy delimiter query.
            self.client
                .queue(format!("* LIST (\\Noselect) \"{sep}\" \"\"\r\n").as_bytes());
            self.client.answer(&cmd.tag, "OK", "Completed").await?;
            return Ok(());
        }
        let visible = match self.visible_mailboxes() {
            Ok(v) => v,
            Err(e) => {
                self.client
                    .answer(&cmd.tag, "NO", &format!("[UNAVAILABLE] {e}"))
                    .await?;
                return Ok(());
            }
        };
        let full: Vec<String> = patterns
            .iter()
            .map(|p| join_reference(&reference, p, sep))
            .collect();
        if backend_only {
            if selection.iter().any(|s| s == "SUBSCRIBED") {
                return self.send_to_inbox_backend(cmd).await;
            }
            // Only backends know STATUS, special-use and subscriptions: ask
            // every backend holding a matching mailbox, in parallel.
            let mut servers = BTreeSet::new();
            for (ext, entry) in &visible {
                if full.iter().any(|p| list_match(p, ext, sep)) {
                    servers.insert(entry.server().to_string());
                }
            }
            return self.fan_out(&cmd, servers).await;
        }
        let names: BTreeSet<&str> = visible.iter().map(|(e, _)| e.as_str()).collect();
        let mut emitted = BTreeSet::new();
        for (ext, _) in &visible {
            if full.iter().any(|p| list_match(p, ext, sep)) {
                if emitted.insert(ext.clone()) {
                    let children = has_children(&names, ext, sep);
                    let flags = if children {
                        "\\HasChildren"
                    } else {
                        "\\HasNoChildren"
                    };
                    self.list_line(flags, sep, ext);
                }
            } else {
                // A `%` may stop at a level that holds no mailbox of its own:
                // that parent is listed \Noselect.
                let mut at = 0;
                while let Some(pos) = ext[at..].find(sep) {
                    let parent = &ext[..at + pos];
                    at += pos + sep.len_utf8();
                    if !names.contains(parent)
                        && full.iter().any(|p| list_match(p, parent, sep))
                        && emitted.insert(parent.to_string())
                    {
                        self.list_line("\\Noselect \\HasChildren", sep, parent);
                    }
                }
            }
            self.client.flush_if_full().await?;
        }
        self.client.answer(&cmd.tag, "OK", "Completed").await?;
        Ok(())
    }

    fn list_line(&mut self, flags: &str, sep: char, ext: &str) {
        let mut line = format!("* LIST ({flags}) \"{sep}\" ").into_bytes();
        crate::imap::command::write_astring(&mut line, ext.as_bytes());
        line.extend_from_slice(b"\r\n");
        self.client.queue(&line);
    }

    /// Every active mailbox the user may see, as (what the user sees,
    /// entry), INBOX and its children first, then in Cyrus's order.
    fn visible_mailboxes(
        &self,
    ) -> Result<Vec<(String, MailboxEntry)>, corvid_registry::raft::RegistryError> {
        let user = self.user().to_string();
        let inbox = self.shared.namespace.inbox(&user).ok();
        // One scan; the user's own mailboxes are listed first, as Cyrus does.
        let (mut own, mut others) = (Vec::new(), Vec::new());
        for e in self.shared.router.list("")? {
            if e.state != MailboxState::Active || !self.may_see(&e) {
                continue;
            }
            let Some(ext) = self.shared.namespace.to_external(&user, &e.name) else {
                continue;
            };
            if inbox.as_deref().is_some_and(|i| at_or_under(&e.name, i)) {
                own.push((ext, e));
            } else {
                others.push((ext, e));
            }
        }
        own.append(&mut others);
        Ok(own)
    }

    /// Sends `cmd` to each of `servers` at once and relays every answer's
    /// untagged data; OK unless every backend failed.
    async fn fan_out(&mut self, cmd: &Command, servers: BTreeSet<String>) -> Result<(), End> {
        let line = encode_command(&cmd.name, &cmd.args);
        let mut conns = Vec::new();
        for s in &servers {
            if self.conn(s).await.is_ok() {
                if let Some(c) = self.backends.remove(s) {
                    conns.push(c);
                }
            }
        }
        let results = futures::future::join_all(conns.into_iter().map(|mut c| {
            let line = line.clone();
            async move {
                let r = c.simple(&line).await;
                (c, r)
            }
        }))
        .await;
        let mut any_ok = servers.is_empty();
        for (conn, result) in results {
            match result {
                Ok(answer) => {
                    if answer.status == Status::Ok {
                        any_ok = true;
                    }
                    for l in &answer.untagged {
                        self.client.queue(l);
                    }
                    self.backends.insert(conn.server.clone(), conn);
                }
                Err(e) => {
                    tracing::warn!(server = %conn.server, error = %e, "backend failed during LIST");
                }
            }
            self.client.flush_if_full().await?;
        }
        if any_ok {
            self.client.answer(&cmd.tag, "OK", "Completed").await?;
        } else {
            self.client
                .answer(&cmd.tag, "NO", "[UNAVAILABLE] No server answered")
                .await?;
        }
        Ok(())
    }

    // ------------------------------------------------------------ COPY/MOVE

    async fn copy(&mut self, cmd: Command) -> Result<(), End> {
        let Some(source) = self.selected.as_ref().map(|s| s.server.clone()) else {
            self.client
                .answer(&cmd.tag, "BAD", "No mailbox selected")
                .await?;
            return Ok(());
        };
        let Some(internal) = self.internal_name(&cmd.tag, cmd.args.get(1)).await? else {
            return Ok(());
        };
        let dest = match self.shared.router.locate(&internal).await {
            Ok(r) if self.admin || self.may_see(&r.entry) => r.server,
            Ok(_) | Err(RouteError::NotFound) => {
                self.client
                    .answer(&cmd.tag, "NO", "[TRYCREATE] Mailbox does not exist")
                    .await?;
                return Ok(());
            }
            Err(e) => {
                self.client
                    .answer(&cmd.tag, "NO", &format!("[UNAVAILABLE] {e}"))
                    .await?;
                return Ok(());
            }
        };
        if dest == source {
            self.forward(&source, &cmd).await?;
            return Ok(());
        }
        self.copy_across(&cmd, &source, &dest).await
    }

    /// COPY/MOVE to a mailbox on another backend: FETCH each message's
    /// flags, date and body from the source and APPEND it to the
    /// destination as it streams in; COPYUID from the APPENDUIDs. MOVE
    /// expunges the source messages only after every APPEND succeeded.
    async fn copy_across(&mut self, cmd: &Command, source: &str, dest: &str) -> Result<(), End> {
        let uid = cmd.name.starts_with("UID ");
        let moving = cmd.name.ends_with("MOVE");
        let Some(set) = cmd.args.first().and_then(Arg::as_str).map(str::to_string) else {
            self.client
                .answer(&cmd.tag, "BAD", "Missing message set")
                .await?;
            return Ok(());
        };
        let mut mailbox = Vec::new();
        encode_arg(&mut mailbox, &cmd.args[1]);
        if let Err(e) = self.conn(dest).await {
            return self.backend_failed(dest, &cmd.tag, &e).await;
        }
        let Some(mut dconn) = self.backends.remove(dest) else {
            return Ok(());
        };
        let result = self
            .stream_messages(&mut dconn, source, uid, &set, &mailbox)
            .await;
        let appends = match result {
            Ok(Ok(a)) => a,
            Ok(Err(text)) => {
                self.backends.insert(dest.to_string(), dconn);
                self.client.answer(&cmd.tag, "NO", &text).await?;
                return Ok(());
            }
            Err(e) => {
                // The source (selected) backend failed: the session ends.
                drop(dconn);
                return self.backend_failed(source, &cmd.tag, &e).await;
            }
        };
        // Every APPEND's answer, in order.
        let mut source_uids = Vec::new();
        let mut dest_uids = Vec::new();
        let mut validity = None;
        let mut failure = None;
        for (src_uid, tag) in &appends {
            match dconn.collect(tag).await {
                Ok(a) if a.status == Status::Ok => {
                    if let Some((v, u)) = a.code.as_deref().and_then(appenduid_of) {
                        validity = Some(v);
                        dest_uids.push(u);
                        source_uids.push(*src_uid);
                    }
                }
                Ok(a) => failure = Some(a.text),
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        if failure.is_none() {
            self.backends.insert(dest.to_string(), dconn);
        } else {
            metrics::counter!("corvid_proxy_backend_errors_total", "server" => dest.to_string(), "kind" => "append")
                .increment(1);
        }
        if let Some(text) = failure {
            // Nothing is expunged: a MOVE that failed half-way leaves the
            // source whole (the destination may hold copies).
            self.client
                .answer(
                    &cmd.tag,
                    "NO",
                    &format!("[UNAVAILABLE] Copy to the other server failed: {text}"),
                )
                .await?;
            return Ok(());
        }
        let copyuid = match validity {
            Some(v) if !source_uids.is_empty() => Some(format!(
                "COPYUID {v} {} {}",
                uid_list(&source_uids),
                uid_list(&dest_uids)
            )),
            _ => None,
        };
        if moving && !appends.is_empty() {
            if let Some(c) = &copyuid {
                self.client
                    .queue(format!("* OK [{c}] Moved\r\n").as_bytes());
            }
            let all: Vec<u64> = appends.iter().map(|(u, _)| *u).collect();
            let uids = uid_list(&all);
            for step in [
                format!("UID STORE {uids} +FLAGS.SILENT (\\Deleted)"),
                format!("UID EXPUNGE {uids}"),
            ] {
                let conn = match self.backends.get_mut(source) {
                    Some(c) => c,
                    None => return Err(End::Closed("selected backend gone")),
                };
                match conn.simple(step.as_bytes()).await {
                    Ok(a) => {
                        // Flag changes of the STORE are the proxy's own
                        // business; the EXPUNGEs are the client's.
                        for l in a.untagged.iter().filter(|l| !is_fetch_line(l)) {
                            self.client.queue(l);
                        }
                        if a.status != Status::Ok {
                            self.client
                                .answer(
                                    &cmd.tag,
                                    "NO",
                                    &format!(
                                        "Copied, but removing the originals failed: {}",
                                        a.text
                                    ),
                                )
                                .await?;
                            return Ok(());
                        }
                    }
                    Err(e) => return self.backend_failed(source, &cmd.tag, &e).await,
                }
            }
            self.client.answer(&cmd.tag, "OK", "Completed").await?;
            return Ok(());
        }
        let text = match copyuid {
            Some(c) => format!("[{c}] Completed"),
            None => "Completed".to_string(),
        };
        self.client.answer(&cmd.tag, "OK", &text).await?;
        Ok(())
    }

    /// FETCHes the messages of `set` on `source` and pipelines an APPEND of
    /// each to `dconn` as its body streams in. Returns (source UID, APPEND
    /// tag) per message, or the source's refusal text.
    async fn stream_messages(
        &mut self,
        dconn: &mut BackendConn,
        source: &str,
        uid: bool,
        set: &str,
        mailbox: &[u8],
    ) -> Result<Result<Vec<(u64, String)>, String>, BackendError> {
        let conn = self.backends.get_mut(source).ok_or(BackendError::Closed)?;
        let fetch = format!(
            "{}FETCH {set} (UID FLAGS INTERNALDATE BODY.PEEK[])",
            if uid { "UID " } else { "" }
        );
        let tag = conn.send_tagged(fetch.as_bytes()).await?;
        let mut appends = Vec::new();
        let mut in_fetch: Option<u64> = None;
        loop {
            let conn = self.backends.get_mut(source).ok_or(BackendError::Closed)?;
            match conn.read_frame().await? {
                Frame::Text { bytes, literal } => {
                    if in_fetch.is_none()
                        && bytes.starts_with(tag.as_bytes())
                        && bytes.get(tag.len()) == Some(&b' ')
                    {
                        return Ok(match parse_response(&bytes) {
                            Ok(Response::Tagged {
                                status: Status::Ok, ..
                            }) => Ok(appends),
                            Ok(Response::Tagged { text, .. }) => Err(text),
                            _ => Err("unexpected answer".into()),
                        });
                    }
                    if in_fetch.is_some() {
                        // The rest of a FETCH line after the body.
                        if literal.is_none() {
                            in_fetch = None;
                        }
                        continue;
                    }
                    match (fetch_item(&bytes), literal) {
                        (Some(item), Some(h)) => {
                            let dtag = dconn.next_tag();
                            let mut line = format!("{dtag} APPEND ").into_bytes();
                            line.extend_from_slice(mailbox);
                            line.extend_from_slice(format!(" ({})", item.flags).as_bytes());
                            if let Some(date) = &item.date {
                                line.extend_from_slice(format!(" \"{date}\"").as_bytes());
                            }
                            line.push(b' ');
                            LiteralHeader {
                                non_sync: true,
                                ..h
                            }
                            .encode(&mut line);
                            dconn.write_buffered(&line).await?;
                            appends.push((item.uid, dtag));
                            in_fetch = Some(item.uid);
                            if h.len == 0 {
                                dconn.write_all(b"\r\n").await?;
                            }
                        }
                        _ => {
                            // Other untagged data about the selected mailbox
                            // reaches the client as usual.
                            if !bytes.windows(7).any(|w| w == b" FETCH ") {
                                self.client.queue(&bytes);
                            }
                        }
                    }
                }
                Frame::Literal(chunk) => {
                    dconn.write_buffered(&chunk).await?;
                    let conn = self.backends.get_mut(source).ok_or(BackendError::Closed)?;
                    if !conn.in_literal() {
                        dconn.write_all(b"\r\n").await?;
                    }
                }
            }
        }
    }
}

/// What a FETCH line says about one message before its body.
struct FetchItem {
    uid: u64,
    flags: String,
    date: Option<String>,
}

/// Reads `* n FETCH (UID u FLAGS (...) INTERNALDATE "..." BODY[] {len}`.
fn fetch_item(line: &[u8]) -> Option<FetchItem> {
    let text = std::str::from_utf8(line).ok()?;
    if !text.starts_with("* ") || !text.contains(" FETCH (") {
        return None;
    }
    let upper = text.to_ascii_uppercase();
    let uid_at = upper.find("UID ")? + 4;
    let uid: u64 = text[uid_at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let flags = match upper.find("FLAGS (") {
        Some(at) => {
            let rest = &text[at + 7..];
            let end = rest.find(')')?;
            rest[..end]
                .split_whitespace()
                .filter(|f| !f.eq_ignore_ascii_case("\\Recent"))
                .collect::<Vec<_>>()
                .join(" ")
        }
        None => String::new(),
    };
    let date = upper.find("INTERNALDATE \"").and_then(|at| {
        let rest = &text[at + 14..];
        rest.find('"').map(|end| rest[..end].to_string())
    });
    Some(FetchItem { uid, flags, date })
}

/// The mailbox name of a `* LSUB (flags) "sep" name` line (quoted or atom;
/// `None` for anything else, e.g. a literal, which is then kept as is).
fn lsub_name(line: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(trim_crlf(line)).ok()?;
    let rest = text.strip_prefix("* LSUB ")?;
    let after_flags = &rest[rest.find(')')? + 1..];
    let after_flags = after_flags.trim_start();
    // The separator: "x" or NIL.
    let name = if let Some(r) = after_flags.strip_prefix('"') {
        let end = r.find('"')?;
        r[end + 1..].trim_start()
    } else {
        after_flags.strip_prefix("NIL")?.trim_start()
    };
    if let Some(q) = name.strip_prefix('"') {
        let q = q.strip_suffix('"')?;
        Some(q.replace("\\\"", "\"").replace("\\\\", "\\"))
    } else if name.starts_with('{') || name.is_empty() {
        None
    } else {
        Some(name.to_string())
    }
}

/// Whether an untagged line is a FETCH response (`* n FETCH …`).
fn is_fetch_line(line: &[u8]) -> bool {
    let mut words = line.split(|b| *b == b' ');
    words.next() == Some(b"*")
        && words
            .next()
            .is_some_and(|n| !n.is_empty() && n.iter().all(u8::is_ascii_digit))
        && words
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case(b"FETCH"))
}

/// `[APPENDUID validity uid]` → (validity, uid).
fn appenduid_of(code: &str) -> Option<(u64, u64)> {
    let mut words = code.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("APPENDUID") {
        return None;
    }
    Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
}

/// A UID list as `1,2,5`.
fn uid_list(uids: &[u64]) -> String {
    uids.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// What `forward_then_wait` waits for.
enum Wait {
    /// The mailbox exists and is active.
    Active(String),
    /// The mailbox is gone.
    Gone(String),
    /// The mailbox is active on this server.
    At(String, String),
}

/// Whether internal name `name` is `parent` or below it.
fn at_or_under(name: &str, parent: &str) -> bool {
    name.strip_prefix(parent)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// Commands that only make sense with a mailbox selected.
fn is_selected_state_command(name: &str) -> bool {
    matches!(
        name,
        "CHECK"
            | "CLOSE"
            | "UNSELECT"
            | "EXPUNGE"
            | "SEARCH"
            | "FETCH"
            | "STORE"
            | "COPY"
            | "MOVE"
            | "SORT"
            | "THREAD"
            | "ESEARCH"
    ) || name.starts_with("UID ")
}

/// `{n}` → `{n+}` at the end of a piece (its CRLF kept).
fn rewrite_as_non_sync(piece: &mut Vec<u8>, h: LiteralHeader) {
    let mut header = Vec::new();
    LiteralHeader {
        non_sync: false,
        ..h
    }
    .encode(&mut header);
    if piece.ends_with(&header) {
        piece.truncate(piece.len() - header.len());
        LiteralHeader {
            non_sync: true,
            ..h
        }
        .encode(piece);
    }
}

fn trim_crlf(b: &[u8]) -> &[u8] {
    let b = b.strip_suffix(b"\n").unwrap_or(b);
    b.strip_suffix(b"\r").unwrap_or(b)
}

/// A command line (without tag and CRLF) rebuilt from parsed arguments:
/// strings quoted or sent as non-synchronising literals, atoms as they
/// came.
pub fn encode_command(name: &str, args: &[Arg]) -> Vec<u8> {
    let mut out = name.as_bytes().to_vec();
    for a in args {
        out.push(b' ');
        encode_arg(&mut out, a);
    }
    out
}

fn encode_arg(out: &mut Vec<u8>, arg: &Arg) {
    match arg {
        Arg::Atom(a) => out.extend_from_slice(a.as_bytes()),
        Arg::Quoted(b) | Arg::Literal(b) => crate::imap::command::write_quoted_or_literal(out, b),
        Arg::Nil => out.extend_from_slice(b"NIL"),
        Arg::List(items) => {
            out.push(b'(');
            for (i, a) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b' ');
                }
                encode_arg(out, a);
            }
            out.push(b')');
        }
    }
}

/// Whether `acl` (`id TAB rights TAB …`) gives `user` the right `right`,
/// directly or through `anyone`, minus negative (`-id`) entries.
pub fn acl_allows(acl: &str, user: &str, right: char) -> bool {
    let mut fields = acl.split('\t');
    let mut granted = false;
    let mut denied = false;
    while let (Some(id), Some(rights)) = (fields.next(), fields.next()) {
        if let Some(neg) = id.strip_prefix('-') {
            if (neg == user || neg == "anyone") && rights.contains(right) {
                denied = true;
            }
        } else if (id == user || id == "anyone") && rights.contains(right) {
            granted = true;
        }
    }
    granted && !denied
}

fn join_reference(reference: &str, pattern: &str, sep: char) -> String {
    if reference.is_empty() || pattern.starts_with(sep) {
        return pattern.to_string();
    }
    if reference.ends_with(sep) {
        format!("{reference}{pattern}")
    } else {
        format!("{reference}{sep}{pattern}")
    }
}

fn has_children(names: &BTreeSet<&str>, ext: &str, sep: char) -> bool {
    let prefix = format!("{ext}{sep}");
    names
        .range(prefix.as_str()..)
        .next()
        .is_some_and(|n| n.starts_with(&prefix))
}

/// The free space from a `* METADATA "" (…freespace/total "N")` line.
fn freespace_of(line: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(line);
    let rest = text.split("freespace/total").nth(1)?;
    let digits: String = rest
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_rights_follow_cyrus_rules() {
        let acl = "alice\tlrswipkxtecda\tanyone\tlr\t-bob\tl\t";
        assert!(acl_allows(acl, "alice", 'l'));
        assert!(acl_allows(acl, "carol", 'l'));
        assert!(!acl_allows(acl, "carol", 'w'));
        assert!(!acl_allows(acl, "bob", 'l'));
        assert!(!acl_allows("", "alice", 'l'));
    }

    #[test]
    fn own_mailboxes_are_the_inbox_and_below() {
        assert!(at_or_under("user.alice", "user.alice"));
        assert!(at_or_under("user.alice.Sent", "user.alice"));
        assert!(!at_or_under("user.alicex", "user.alice"));
        assert!(!at_or_under("user.bob", "user.alice"));
    }

    #[test]
    fn references_join_patterns() {
        assert_eq!(join_reference("", "*", '.'), "*");
        assert_eq!(join_reference("INBOX", "%", '.'), "INBOX.%");
        assert_eq!(join_reference("INBOX.", "%", '.'), "INBOX.%");
        assert_eq!(join_reference("INBOX/", "%", '/'), "INBOX/%");
    }

    #[test]
    fn children_are_found_in_order() {
        let names: BTreeSet<&str> = ["INBOX", "INBOX.Sent", "shared.team"].into_iter().collect();
        assert!(has_children(&names, "INBOX", '.'));
        assert!(!has_children(&names, "INBOX.Sent", '.'));
        assert!(has_children(&names, "shared", '.'));
    }

    #[test]
    fn sync_literals_are_re_announced_non_sync() {
        let mut p = b"C1 APPEND INBOX {12}\r\n".to_vec();
        rewrite_as_non_sync(
            &mut p,
            LiteralHeader {
                len: 12,
                non_sync: false,
                binary: false,
            },
        );
        assert_eq!(p, b"C1 APPEND INBOX {12+}\r\n");
    }

    #[test]
    fn fetch_lines_give_uid_flags_and_date() {
        let l = b"* 3 FETCH (UID 17 FLAGS (\\Seen \\Recent $Label) INTERNALDATE \"30-Nov-2026 06:00:00 +0000\" BODY[] {120}\r\n";
        let item = fetch_item(l).unwrap();
        assert_eq!(item.uid, 17);
        assert_eq!(item.flags, "\\Seen $Label");
        assert_eq!(item.date.as_deref(), Some("30-Nov-2026 06:00:00 +0000"));
        assert_eq!(appenduid_of("APPENDUID 1234 56"), Some((1234, 56)));
        assert_eq!(uid_list(&[1, 2, 9]), "1,2,9");
        assert!(is_fetch_line(b"* 6 FETCH (FLAGS (\\Deleted) UID 6)\r\n"));
        assert!(!is_fetch_line(b"* 6 EXPUNGE\r\n"));
    }

    #[test]
    fn lsub_lines_give_their_mailbox() {
        assert_eq!(
            lsub_name(b"* LSUB () \".\" INBOX.Sent\r\n").as_deref(),
            Some("INBOX.Sent")
        );
        assert_eq!(
            lsub_name(b"* LSUB (\\Noselect) \"/\" \"INBOX/a b\"\r\n").as_deref(),
            Some("INBOX/a b")
        );
        assert_eq!(lsub_name(b"* LSUB () NIL foo\r\n").as_deref(), Some("foo"));
        assert_eq!(lsub_name(b"* LSUB () \".\" {5}\r\n"), None);
        assert_eq!(lsub_name(b"* LIST () \".\" x\r\n"), None);
    }

    #[test]
    fn freespace_is_read_from_metadata() {
        let l = b"* METADATA \"\" (/shared/vendor/cmu/cyrus-imapd/freespace/total \"123456\")";
        assert_eq!(freespace_of(l), Some(123456));
    }
}
