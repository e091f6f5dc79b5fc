//! The MUPDATE server: one task per connection, speaking the protocol as
//! Cyrus 3.6 peers expect it (see `codec` for the bytes).
//!
//! A session reads frames from the pure [`RequestDecoder`], runs each command
//! against the [`Registry`], and writes replies in order. Replies to pipelined
//! commands are batched into one write. After UPDATE, the session streams
//! committed changes while still answering NOOP and LOGOUT.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, OwnedSemaphorePermit, Semaphore};

use super::codec::{self, Command, Frame, Greeting, Limits, Request, RequestDecoder, Status};
use crate::auth::{AuthError, Identity, SaslExchange, SaslServer, SaslStep};
use crate::directory::Directory;
use crate::model::{
    server_of, Change, ClientSession, MailboxEntry, MailboxState, Outcome, RegistryCommand,
};
use crate::store::{StateEvent, StateItem};
use crate::tls::MaybeTls;

/// Settings of the MUPDATE listener.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Name sent in the greeting.
    pub server_name: String,
    /// Most concurrent connections; more are answered `* BYE`.
    pub max_connections: usize,
    /// Most concurrent connections not yet authenticated; more are answered
    /// `* BYE` at once.
    pub max_unauthenticated: usize,
    /// An authenticated connection idle this long is closed.
    pub idle_timeout: Duration,
    /// A connection not authenticated this long after it opened is closed.
    pub login_timeout: Duration,
    /// Most password checks (PBKDF2) running at once, each on a blocking
    /// thread so that they never hold up Raft's tasks.
    pub max_parallel_auth: usize,
    /// Pause before answering a failed authentication (slows guessing).
    pub failed_auth_delay: Duration,
    /// Allow PLAIN on connections that are neither TLS nor loopback.
    pub allow_plaintext: bool,
    /// Line and literal bounds.
    pub limits: Limits,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            server_name: "corvid".into(),
            max_connections: 4096,
            max_unauthenticated: 256,
            idle_timeout: Duration::from_secs(30 * 60),
            login_timeout: Duration::from_secs(30),
            max_parallel_auth: default_parallel_auth(),
            failed_auth_delay: Duration::from_secs(1),
            allow_plaintext: false,
            limits: Limits::default(),
        }
    }
}

/// One password check per CPU core.
pub fn default_parallel_auth() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Everything a session needs, shared by all sessions.
pub struct ServerContext {
    /// The registry: a master node or a replica.
    pub directory: Directory,
    /// SASL mechanisms and credentials.
    pub sasl: SaslServer,
    /// TLS configuration for STARTTLS, if any.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Settings.
    pub settings: ServerSettings,
    /// Permits for password checks ([`ServerSettings::max_parallel_auth`]).
    auth_slots: Semaphore,
}

impl ServerContext {
    /// The shared context of a MUPDATE listener.
    pub fn new(
        directory: Directory,
        sasl: SaslServer,
        tls: Option<Arc<rustls::ServerConfig>>,
        settings: ServerSettings,
    ) -> ServerContext {
        let auth_slots = Semaphore::new(settings.max_parallel_auth.max(1));
        ServerContext {
            directory,
            sasl,
            tls,
            settings,
            auth_slots,
        }
    }
}

/// A connection's place among the unauthenticated ones; given back when it
/// authenticates or closes.
struct LoginSlot(#[allow(dead_code)] OwnedSemaphorePermit);

impl LoginSlot {
    fn new(permit: OwnedSemaphorePermit) -> LoginSlot {
        metrics::gauge!("corvid_mupdate_connections_unauthenticated").increment(1.0);
        LoginSlot(permit)
    }
}

impl Drop for LoginSlot {
    fn drop(&mut self) {
        metrics::gauge!("corvid_mupdate_connections_unauthenticated").decrement(1.0);
    }
}

/// Accepts connections for as long as the task runs. `accept()` errors
/// (out of descriptors, ...) are counted and retried after a pause; they
/// never end the loop.
pub async fn serve(listener: TcpListener, ctx: Arc<ServerContext>) {
    let slots = Arc::new(Semaphore::new(ctx.settings.max_connections));
    let login_slots = Arc::new(Semaphore::new(ctx.settings.max_unauthenticated));
    metrics::gauge!("corvid_mupdate_connections_max").set(ctx.settings.max_connections as f64);
    let mut acceptor = crate::net::Acceptor::new(listener, "mupdate");
    loop {
        let (socket, peer) = acceptor.accept().await;
        let _ = socket.set_nodelay(true);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refuse(socket, "connections", "Server Unable: too many connections");
            continue;
        };
        let Ok(login) = login_slots.clone().try_acquire_owned() else {
            refuse(
                socket,
                "unauthenticated",
                "Server Unable: too many connections waiting to log in",
            );
            continue;
        };
        let login = LoginSlot::new(login);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            metrics::gauge!("corvid_mupdate_connections_open").increment(1.0);
            let mut session = Session::new(ctx, MaybeTls::Plain(socket), peer, login);
            if let Err(e) = session.run().await {
                tracing::debug!(%peer, "mupdate session ended: {e}");
            }
            drop(session);
            metrics::gauge!("corvid_mupdate_connections_open").decrement(1.0);
            drop(permit);
        });
    }
}

/// Handles of the per-command metrics, looked up by name once per process
/// rather than twice per command (a FIND is a few microseconds; two lookups
/// in the recorder's maps were a visible part of it).
struct CommandMetrics {
    /// `corvid_mupdate_commands_total` per command and result (`ok`, `no`,
    /// `bad`); the last row is the `invalid` pseudo-command (lines that do
    /// not parse).
    done: Vec<[metrics::Counter; 3]>,
    /// `corvid_mupdate_command_duration_seconds` per command.
    duration: Vec<metrics::Histogram>,
}

/// Row of [`CommandMetrics::done`] for lines that are not a command.
const INVALID: usize = Command::NAMES.len();

impl CommandMetrics {
    /// The process's handles. Built on first use, which is after the daemon
    /// installed its recorder (before it accepts any connection).
    fn get() -> &'static CommandMetrics {
        static HANDLES: std::sync::OnceLock<CommandMetrics> = std::sync::OnceLock::new();
        HANDLES.get_or_init(|| {
            let names = Command::NAMES.iter().copied().chain(["invalid"]);
            CommandMetrics {
                done: names
                    .map(|command| {
                        ["ok", "no", "bad"].map(|result| {
                            metrics::counter!("corvid_mupdate_commands_total", "command" => command, "result" => result)
                        })
                    })
                    .collect(),
                duration: Command::NAMES
                    .iter()
                    .map(|&command| {
                        metrics::histogram!("corvid_mupdate_command_duration_seconds", "command" => command)
                    })
                    .collect(),
            }
        })
    }

    fn count(&self, command: usize, status: Status) {
        let result = match status {
            Status::Ok => 0,
            Status::No => 1,
            Status::Bad => 2,
        };
        self.done[command][result].increment(1);
    }
}

/// How long a NOOP on an UPDATE stream waits for a replica to catch up with
/// the cluster before answering with what it has.
const NOOP_SYNC_TIMEOUT: Duration = Duration::from_secs(1);

/// Answers a connection over a cap with `* BYE` and closes it.
fn refuse(mut socket: tokio::net::TcpStream, cap: &'static str, reason: &'static str) {
    metrics::counter!("corvid_mupdate_connections_rejected_total", "limit" => cap).increment(1);
    tokio::spawn(async move {
        let mut out = Vec::new();
        codec::write_bye(&mut out, reason);
        // Bounded: a peer that reads nothing cannot keep the descriptor.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            socket.write_all(&out).await?;
            socket.shutdown().await
        })
        .await;
    });
}

/// Why a session stops.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("peer closed the connection")]
    Closed,
    #[error("logout")]
    Logout,
    #[error("idle timeout")]
    Idle,
    #[error("not authenticated within the login timeout")]
    LoginTimeout,
    #[error("closed after a protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// An UPDATE subscription in progress.
struct Streaming {
    tag: String,
    servers: Vec<String>,
    events: broadcast::Receiver<StateEvent>,
    /// Changes at or below this index were sent (in the initial dump or
    /// pushed since).
    sent_up_to: u64,
}

struct Session {
    ctx: Arc<ServerContext>,
    stream: MaybeTls,
    peer: SocketAddr,
    decoder: RequestDecoder,
    input: BytesMut,
    output: Vec<u8>,
    identity: Option<Identity>,
    streaming: Option<Streaming>,
    /// The connection's client session: its writes are numbered, so a
    /// retried write is applied once (see [`crate::model::ClientTag`]).
    client: ClientSession,
    /// Held until the session authenticates.
    login: Option<LoginSlot>,
    /// When an unauthenticated session is closed.
    login_deadline: tokio::time::Instant,
    /// When the session last started waiting for input (the idle timeout
    /// counts from it).
    waiting_since: tokio::time::Instant,
    /// Fires at or before the input deadline; kept across reads.
    idle_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Session {
    fn new(ctx: Arc<ServerContext>, stream: MaybeTls, peer: SocketAddr, login: LoginSlot) -> Self {
        let decoder = RequestDecoder::new(ctx.settings.limits);
        let now = tokio::time::Instant::now();
        let login_deadline = now + ctx.settings.login_timeout;
        Session {
            ctx,
            stream,
            peer,
            decoder,
            input: BytesMut::with_capacity(4096),
            output: Vec::with_capacity(4096),
            identity: None,
            streaming: None,
            client: ClientSession::new(),
            login: Some(login),
            login_deadline,
            waiting_since: now,
            idle_timer: None,
        }
    }

    fn plaintext_allowed(&self) -> bool {
        self.stream.is_tls() || self.peer.ip().is_loopback() || self.ctx.settings.allow_plaintext
    }

    fn greeting(&mut self) {
        let g = Greeting {
            mechanisms: self
                .ctx
                .sasl
                .mechanisms(self.plaintext_allowed())
                .into_iter()
                .map(String::from)
                .collect(),
            starttls: self.ctx.tls.is_some() && !self.stream.is_tls(),
            partial_update: true,
            server_name: self.ctx.settings.server_name.clone(),
            implementation: "Corvid".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            role: "(master)".into(),
        };
        codec::write_greeting(&mut self.output, &g);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.output.is_empty() {
            self.stream.write_all(&self.output).await?;
            self.stream.flush().await?;
            self.output.clear();
        }
        Ok(())
    }

    /// Reads more input, within the idle timeout, and before login within
    /// what is left of the login timeout.
    async fn fill(&mut self) -> Result<(), SessionEnd> {
        // One timer for the whole session, pushed back only when it fires
        // early: a timeout per read would register and cancel a timer for
        // every command.
        self.waiting_since = tokio::time::Instant::now();
        let mut idle = self
            .idle_timer
            .take()
            .unwrap_or_else(|| Box::pin(tokio::time::sleep_until(self.input_deadline())));
        let res = loop {
            tokio::select! {
                read = self.stream.read_buf(&mut self.input) => {
                    break match read {
                        Ok(0) => Err(SessionEnd::Closed),
                        Ok(_) => Ok(()),
                        Err(e) => Err(e.into()),
                    };
                }
                () = &mut idle => {
                    let deadline = self.input_deadline();
                    if tokio::time::Instant::now() < deadline {
                        idle.as_mut().reset(deadline);
                        continue;
                    }
                    if self.identity.is_none() && deadline == self.login_deadline {
                        metrics::counter!("corvid_mupdate_login_timeouts_total").increment(1);
                        codec::write_bye(&mut self.output, "login timeout");
                        self.flush().await?;
                        break Err(SessionEnd::LoginTimeout);
                    }
                    codec::write_bye(&mut self.output, "idle for too long");
                    self.flush().await?;
                    break Err(SessionEnd::Idle);
                }
            }
        };
        self.idle_timer = Some(idle);
        res
    }

    /// When the session is closed if no more input comes: the idle timeout
    /// after it started waiting, and before login the login deadline if
    /// sooner.
    fn input_deadline(&self) -> tokio::time::Instant {
        let idle = self.waiting_since + self.ctx.settings.idle_timeout;
        match self.identity {
            Some(_) => idle,
            None => idle.min(self.login_deadline),
        }
    }

    async fn run(&mut self) -> Result<(), SessionEnd> {
        let res = self.serve_commands().await;
        if res.is_err() && !self.output.is_empty() {
            // A BYE written on the way out (a stream that cannot go on) is
            // delivered before the connection closes; bounded, as the peer
            // may be the reason we stop.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
        }
        res
    }

    async fn serve_commands(&mut self) -> Result<(), SessionEnd> {
        self.greeting();
        self.flush().await?;
        loop {
            while let Some(frame) = self.decoder.decode(&mut self.input) {
                match frame {
                    Frame::GoAhead => {
                        codec::write_go_ahead(&mut self.output);
                        // The peer waits for this before sending the literal.
                        self.flush().await?;
                    }
                    Frame::Bad { tag, reason } => {
                        CommandMetrics::get().count(INVALID, Status::Bad);
                        codec::write_status(&mut self.output, tag.as_deref(), Status::Bad, &reason);
                    }
                    Frame::Fatal { tag, reason } => {
                        // Far more announced than could ever be accepted:
                        // answer, then close rather than read it through.
                        CommandMetrics::get().count(INVALID, Status::Bad);
                        codec::write_status(&mut self.output, tag.as_deref(), Status::Bad, &reason);
                        self.flush().await?;
                        let _ = self.stream.shutdown().await;
                        return Err(SessionEnd::Protocol(reason));
                    }
                    Frame::Request(req) => {
                        let command = req.command.ordinal();
                        let started = Instant::now();
                        let result = self.command(req).await;
                        CommandMetrics::get().duration[command]
                            .record(started.elapsed().as_secs_f64());
                        result?;
                    }
                }
            }
            self.flush().await?;
            if self.streaming.is_some() {
                self.stream_until_input().await?;
            } else {
                self.fill().await?;
            }
        }
    }

    fn reply(&mut self, tag: &str, command: usize, status: Status, text: &str) {
        CommandMetrics::get().count(command, status);
        codec::write_status(&mut self.output, Some(tag), status, text);
    }

    async fn command(&mut self, req: Request) -> Result<(), SessionEnd> {
        let Request { tag, command } = req;
        let name = command.ordinal();
        if self.streaming.is_some() && !matches!(command, Command::Noop | Command::Logout) {
            self.reply(&tag, name, Status::Bad, "not legal when streaming");
            return Ok(());
        }
        let authenticated = self.identity.is_some();
        match command {
            Command::Noop => {
                // A NOOP is a synchronisation point for UPDATE streams: every
                // change committed in the cluster before it is pushed before
                // its OK, on a follower or a replica too.
                if self.streaming.is_some()
                    && !self.ctx.directory.sync_point(NOOP_SYNC_TIMEOUT).await
                {
                    metrics::counter!("corvid_mupdate_noop_sync_timeouts_total").increment(1);
                }
                self.drain_stream().await?;
                self.reply(&tag, name, Status::Ok, "Noop done");
            }
            Command::Logout => {
                self.reply(&tag, name, Status::Ok, "bye-bye");
                self.flush().await?;
                let _ = self.stream.shutdown().await;
                return Err(SessionEnd::Logout);
            }
            Command::Starttls => self.starttls(&tag).await?,
            Command::Compress { .. } => {
                self.reply(&tag, name, Status::No, "compression is not supported")
            }
            Command::Authenticate {
                mechanism,
                initial_response,
            } => {
                self.authenticate(&tag, &mechanism, initial_response)
                    .await?
            }
            _ if !authenticated => self.reply(&tag, name, Status::Bad, "Please login first"),
            Command::Find { name: mailbox } => match self.ctx.directory.find(&mailbox).await {
                Ok(entry) => {
                    if let Some(e) = entry {
                        write_entry(&mut self.output, &tag, &e);
                    }
                    self.reply(&tag, name, Status::Ok, "Search completed");
                }
                Err(e) => self.reply(&tag, name, Status::No, &e.to_string()),
            },
            Command::List { prefix } => match self.ctx.directory.list(prefix.as_deref()).await {
                Ok(entries) => {
                    for e in &entries {
                        write_entry(&mut self.output, &tag, e);
                        if self.output.len() > 64 * 1024 {
                            self.flush().await?;
                        }
                    }
                    self.reply(&tag, name, Status::Ok, "list complete");
                }
                Err(e) => self.reply(&tag, name, Status::No, &e.to_string()),
            },
            Command::Update { servers } => self.start_update(&tag, servers).await?,
            Command::Reserve { .. }
            | Command::Activate { .. }
            | Command::Deactivate { .. }
            | Command::Delete { .. } => {
                if !self.identity.as_ref().is_some_and(|i| i.admin) {
                    self.reply(
                        &tag,
                        name,
                        Status::No,
                        "permission denied: not an administrator",
                    );
                    return Ok(());
                }
                let Some(cmd) = registry_command(command) else {
                    return Ok(());
                };
                let client = self.client.next_request();
                match self.ctx.directory.write(client, cmd).await {
                    Ok(Outcome::Done) => self.reply(&tag, name, Status::Ok, "done"),
                    Ok(Outcome::Refused(r)) => self.reply(&tag, name, Status::No, &r.to_string()),
                    Ok(Outcome::Batch(_)) => self.reply(&tag, name, Status::Ok, "done"),
                    Err(e) => self.reply(&tag, name, Status::No, &e.to_string()),
                }
            }
        }
        Ok(())
    }

    async fn starttls(&mut self, tag: &str) -> Result<(), SessionEnd> {
        if self.stream.is_tls() {
            self.reply(tag, Command::STARTTLS, Status::Bad, "TLS already active");
            return Ok(());
        }
        if self.identity.is_some() {
            self.reply(
                tag,
                Command::STARTTLS,
                Status::Bad,
                "Can't Starttls after authentication",
            );
            return Ok(());
        }
        let Some(config) = self.ctx.tls.clone() else {
            self.reply(
                tag,
                Command::STARTTLS,
                Status::No,
                "TLS is not configured on this server",
            );
            return Ok(());
        };
        self.reply(
            tag,
            Command::STARTTLS,
            Status::Ok,
            "Begin TLS negotiation now",
        );
        self.flush().await?;
        // Anything pipelined after STARTTLS in plaintext is dropped: it could
        // be injected by a man in the middle.
        self.input.clear();
        let Some(tcp) = self.stream.take_plain() else {
            return Err(SessionEnd::Closed);
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        match tokio::time::timeout(Duration::from_secs(30), acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                self.stream = MaybeTls::Tls(Box::new(tls));
                self.greeting();
                Ok(())
            }
            Ok(Err(e)) => Err(SessionEnd::Io(e)),
            Err(_) => Err(SessionEnd::Idle),
        }
    }

    /// Reads one SASL response line.
    async fn sasl_line(&mut self) -> Result<Result<Vec<u8>, ()>, SessionEnd> {
        loop {
            if let Some(line) = self.decoder.decode_line(&mut self.input) {
                return Ok(line.map_err(|_| ()));
            }
            self.fill().await?;
        }
    }

    async fn authenticate(
        &mut self,
        tag: &str,
        mechanism: &str,
        initial: Option<Vec<u8>>,
    ) -> Result<(), SessionEnd> {
        const NAME: usize = Command::AUTHENTICATE;
        if self.identity.is_some() {
            self.reply(tag, NAME, Status::Bad, "already authenticated");
            return Ok(());
        }
        let mut exchange = match self.ctx.sasl.start(mechanism, self.plaintext_allowed()) {
            Ok(x) => x,
            Err(e) => {
                self.reply(tag, NAME, Status::No, &e.to_string());
                return Ok(());
            }
        };
        let b64 = base64::engine::general_purpose::STANDARD;
        // "=" is an explicitly empty initial response (RFC 4959).
        let mut input = match initial.as_deref() {
            None => None,
            Some(b"=") => Some(Vec::new()),
            Some(raw) => match b64.decode(raw) {
                Ok(d) => Some(d),
                Err(_) => {
                    self.reply(tag, NAME, Status::Bad, "Invalid base64 in initial response");
                    return Ok(());
                }
            },
        };
        let failed = loop {
            let (back, step) = self.step_blocking(exchange, input.take()).await?;
            exchange = back;
            match step {
                Ok(SaslStep::Challenge(challenge)) => {
                    codec::write_sasl_challenge(&mut self.output, &challenge);
                    self.flush().await?;
                    match self.sasl_line().await? {
                        Err(()) => break Some("SASL response too long"),
                        Ok(line) if line == b"*" => {
                            self.reply(tag, NAME, Status::No, "Client canceled authentication");
                            return Ok(());
                        }
                        Ok(line) => match b64.decode(&line) {
                            Ok(d) => input = Some(d),
                            Err(_) => break Some("Invalid base64 in SASL response"),
                        },
                    }
                }
                Ok(SaslStep::Success {
                    identity,
                    final_data,
                }) => {
                    if let Some(data) = final_data {
                        // Cyrus sends the server's final SASL data as one more
                        // challenge, which the client answers with an empty line.
                        codec::write_sasl_challenge(&mut self.output, &data);
                        self.flush().await?;
                        match self.sasl_line().await? {
                            Ok(line) if line.is_empty() => {}
                            Ok(line) if line == b"*" => {
                                self.reply(tag, NAME, Status::No, "Client canceled authentication");
                                return Ok(());
                            }
                            _ => break Some("unexpected data after SASL success"),
                        }
                    }
                    tracing::info!(peer = %self.peer, user = %identity.user, "authenticated");
                    metrics::counter!("corvid_mupdate_auth_total", "result" => "ok").increment(1);
                    self.identity = Some(identity);
                    // No longer counts against `max_unauthenticated`.
                    self.login = None;
                    self.reply(tag, NAME, Status::Ok, "Authenticated");
                    return Ok(());
                }
                Err(e) => {
                    tracing::info!(peer = %self.peer, "authentication failed: {e}");
                    break None;
                }
            }
        };
        metrics::counter!("corvid_mupdate_auth_total", "result" => "failed").increment(1);
        tokio::time::sleep(self.ctx.settings.failed_auth_delay).await;
        self.reply(
            tag,
            NAME,
            Status::No,
            failed.unwrap_or("authentication failed"),
        );
        Ok(())
    }

    /// Runs one SASL step (PLAIN's PBKDF2, or the decoy's for an unknown
    /// user) on a blocking thread, at most `max_parallel_auth` at once, so
    /// that a burst of logins cannot starve the tasks that keep Raft alive.
    async fn step_blocking(
        &self,
        mut exchange: SaslExchange,
        input: Option<Vec<u8>>,
    ) -> Result<(SaslExchange, Result<SaslStep, AuthError>), SessionEnd> {
        let _permit = self
            .ctx
            .auth_slots
            .acquire()
            .await
            .map_err(std::io::Error::other)?;
        tokio::task::spawn_blocking(move || {
            let step = exchange.step(input.as_deref());
            (exchange, step)
        })
        .await
        .map_err(|e| SessionEnd::Io(std::io::Error::other(e)))
    }

    async fn start_update(&mut self, tag: &str, servers: Vec<String>) -> Result<(), SessionEnd> {
        // Subscribe before the dump so that no change falls between the two.
        let events = self.ctx.directory.store().subscribe();
        if let Err(e) = self.ctx.directory.read_barrier().await {
            self.reply(tag, Command::UPDATE, Status::No, &e.to_string());
            return Ok(());
        }
        // The dump streams from one point-in-time view, in key order (which
        // is Cyrus's order), a chunk at a time: memory stays bounded however
        // large the registry.
        let store = self.ctx.directory.store().clone();
        let filter = servers.clone();
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let walk = tokio::task::spawn_blocking(move || {
            store.scan_chunks(true, |part| {
                let part = match part {
                    Ok(meta) => Ok(meta.last_log_id.map_or(0, |l| l.index)),
                    Err(items) => Err(items
                        .into_iter()
                        .filter_map(|i| match i {
                            StateItem::Mailbox(e)
                                if filter.is_empty() || filter.iter().any(|s| s == e.server()) =>
                            {
                                Some(e)
                            }
                            _ => None,
                        })
                        .collect::<Vec<_>>()),
                };
                tx.blocking_send(part).is_ok()
            })
        });
        let mut index = 0;
        while let Some(part) = rx.recv().await {
            match part {
                Ok(i) => index = i,
                Err(entries) => {
                    for e in &entries {
                        write_entry(&mut self.output, tag, e);
                    }
                    if self.output.len() > 64 * 1024 {
                        self.flush().await?;
                    }
                }
            }
        }
        if let Err(e) = walk.await.map_err(std::io::Error::other)? {
            self.output.clear();
            self.reply(tag, Command::UPDATE, Status::No, &e.to_string());
            return Ok(());
        }
        self.reply(tag, Command::UPDATE, Status::Ok, "streaming starts");
        self.streaming = Some(Streaming {
            tag: tag.to_owned(),
            servers,
            events,
            sent_up_to: index,
        });
        metrics::gauge!("corvid_mupdate_update_subscribers").increment(1.0);
        Ok(())
    }

    /// Writes every change already received by the subscription.
    async fn drain_stream(&mut self) -> Result<(), SessionEnd> {
        loop {
            let Some(st) = self.streaming.as_mut() else {
                return Ok(());
            };
            match st.events.try_recv() {
                Ok(ev) => push_event(&mut self.output, st, ev)?,
                Err(broadcast::error::TryRecvError::Empty) => return Ok(()),
                Err(broadcast::error::TryRecvError::Lagged(n)) => self.catch_up(n).await?,
                Err(e) => return Err(stream_lost(&mut self.output, e.to_string())),
            }
        }
    }

    /// The subscriber fell more than the broadcast's capacity behind (a slow
    /// slave under heavy write load): instead of dropping it, which makes a
    /// Cyrus slave wait for its retry delay and then take the whole list
    /// again, push the current entry of every mailbox the missed log
    /// records touched. Only if that part of the log was compacted is the
    /// stream given up.
    async fn catch_up(&mut self, missed: u64) -> Result<(), SessionEnd> {
        let st = self.streaming.as_mut().expect("streaming");
        let store = self.ctx.directory.store().clone();
        let from = st.sent_up_to + 1;
        let to = *store.watch_applied().borrow();
        let touched = tokio::task::spawn_blocking(move || store.entries_touched(from, to))
            .await
            .map_err(std::io::Error::other)??;
        let Some(entries) = touched else {
            return Err(stream_lost(
                &mut self.output,
                format!("fell {missed} changes behind and the log was compacted"),
            ));
        };
        metrics::counter!("corvid_mupdate_update_catch_ups_total").increment(1);
        tracing::info!(peer = %self.peer, missed, mailboxes = entries.len(), "UPDATE subscriber fell behind; pushing current entries");
        for (name, entry) in &entries {
            match entry {
                Some(e) if st.wants(&e.location) => write_entry(&mut self.output, &st.tag, e),
                // Deleted, or not (any longer) on a partial subscriber's
                // servers: it may have moved away from them while the
                // subscriber was behind, and where it was is not known here,
                // so the subscriber is told it is gone from its view (a
                // DELETE of a name it never had is a no-op on a Cyrus slave).
                _ => codec::write_delete(&mut self.output, &st.tag, name),
            }
        }
        st.sent_up_to = st.sent_up_to.max(to);
        Ok(())
    }

    /// While streaming: push changes as they commit until client input arrives.
    async fn stream_until_input(&mut self) -> Result<(), SessionEnd> {
        let idle = self.ctx.settings.idle_timeout;
        let deadline = tokio::time::Instant::now() + idle;
        loop {
            let st = self.streaming.as_mut().expect("streaming");
            tokio::select! {
                read = self.stream.read_buf(&mut self.input) => {
                    return match read {
                        Ok(0) => Err(SessionEnd::Closed),
                        Ok(_) => Ok(()),
                        Err(e) => Err(e.into()),
                    };
                }
                ev = st.events.recv() => {
                    match ev {
                        Ok(ev) => push_event(&mut self.output, st, ev)?,
                        Err(broadcast::error::RecvError::Lagged(n)) => self.catch_up(n).await?,
                        Err(e) => {
                            let end = stream_lost(&mut self.output, e.to_string());
                            self.flush().await?;
                            return Err(end);
                        }
                    }
                    self.drain_stream().await?;
                    self.flush().await?;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    codec::write_bye(&mut self.output, "idle for too long");
                    self.flush().await?;
                    return Err(SessionEnd::Idle);
                }
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.streaming.is_some() {
            metrics::gauge!("corvid_mupdate_update_subscribers").decrement(1.0);
        }
    }
}

/// A stream that fell behind (or whose state was replaced) cannot be resumed:
/// the slave must reconnect and resync, as Cyrus slaves do on any error.
fn stream_lost(out: &mut Vec<u8>, why: String) -> SessionEnd {
    codec::write_bye(out, "update stream interrupted; resynchronize");
    SessionEnd::Io(std::io::Error::other(format!("update stream lost: {why}")))
}

fn push_event(out: &mut Vec<u8>, st: &mut Streaming, ev: StateEvent) -> Result<(), SessionEnd> {
    let batch = match ev {
        StateEvent::Changes(c) => c,
        StateEvent::Reset => return Err(stream_lost(out, "state replaced by a snapshot".into())),
    };
    if batch.index <= st.sent_up_to {
        return Ok(());
    }
    st.sent_up_to = batch.index;
    for change in &batch.changes {
        match change {
            Change::Put {
                entry,
                previous_location,
            } => {
                if st.wants(&entry.location)
                    || previous_location.as_deref().is_some_and(|l| st.wants(l))
                {
                    write_entry(out, &st.tag, entry);
                }
            }
            Change::Removed {
                name,
                previous_location,
                ..
            } => {
                if st.wants(previous_location) {
                    codec::write_delete(out, &st.tag, name);
                }
            }
        }
    }
    Ok(())
}

impl Streaming {
    /// Whether a partial UPDATE (`UPDATE server…`) covers `location`.
    fn wants(&self, location: &str) -> bool {
        self.servers.is_empty() || self.servers.iter().any(|s| s == server_of(location))
    }
}

fn write_entry(out: &mut Vec<u8>, tag: &str, e: &MailboxEntry) {
    match e.state {
        MailboxState::Active => codec::write_mailbox(out, tag, &e.name, &e.location, &e.acl),
        MailboxState::Reserved => codec::write_reserve(out, tag, &e.name, &e.location),
    }
}

fn registry_command(command: Command) -> Option<RegistryCommand> {
    Some(match command {
        Command::Reserve { name, location } => RegistryCommand::Reserve { name, location },
        Command::Activate {
            name,
            location,
            acl,
        } => RegistryCommand::Activate {
            name,
            location,
            acl,
        },
        Command::Deactivate { name, location } => RegistryCommand::Deactivate { name, location },
        Command::Delete { name } => RegistryCommand::Delete { name },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    //! Sessions driven by hand against a one-node registry in a temporary
    //! directory, so that an UPDATE subscriber can be made to fall behind
    //! (it reads no event while more changes than the broadcast holds are
    //! committed) without depending on socket buffer sizes.

    use super::*;
    use crate::model::ClientTag;
    use crate::mupdate::codec::{ResponseDecoder, ServerLine};
    use crate::raft::{RaftSettings, Registry};
    use std::path::Path;

    /// More than the store's event broadcast holds.
    const LAG: usize = 4200;

    async fn registry(dir: &Path, tweak: impl FnOnce(&mut RaftSettings)) -> Registry {
        let mut settings = RaftSettings {
            // Thousands of writes in a unit test: durability is not tested.
            unsafe_test_ack_before_fsync: true,
            ..RaftSettings::default()
        };
        tweak(&mut settings);
        let r = Registry::start(dir, &settings, "127.0.0.1:1")
            .await
            .unwrap();
        r.raft()
            .wait(Some(Duration::from_secs(10)))
            .state(openraft::ServerState::Leader, "one-node leader")
            .await
            .unwrap();
        r
    }

    async fn activate(r: &Registry, name: &str, location: &str) {
        let out = r
            .write_as(
                ClientTag::once(),
                RegistryCommand::Activate {
                    name: name.into(),
                    location: location.into(),
                    acl: "anyone\tlrs\t".into(),
                },
            )
            .await
            .unwrap();
        assert!(matches!(out, Outcome::Done), "{out:?}");
    }

    /// A session on a real loopback socket; the other end is returned.
    async fn session(r: &Registry, dir: &Path) -> (Session, tokio::net::TcpStream) {
        let ctx = Arc::new(ServerContext::new(
            Directory::Master(r.clone()),
            SaslServer::new(Arc::new(crate::auth::CredentialStore::new(
                dir.join("users.toml"),
            ))),
            None,
            ServerSettings::default(),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let slot = LoginSlot::new(Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap());
        (
            Session::new(ctx, MaybeTls::Plain(server), peer, slot),
            client,
        )
    }

    fn lines(bytes: &[u8]) -> Vec<ServerLine> {
        let mut decoder = ResponseDecoder::new(Limits::default());
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(line) = decoder.decode(&mut buf).unwrap() {
            out.push(line);
        }
        assert!(buf.is_empty(), "a partial line: {buf:?}");
        out
    }

    /// Pipelined FINDs, all in one write, get every answer, in the order
    /// the commands came, whether or not the mailbox exists; a line that
    /// does not parse in the middle is answered BAD in its place.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_finds_are_answered_in_order() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path(), |_| {}).await;
        activate(&r, "user.a", "be1!default").await;
        activate(&r, "user.c", "be2!default").await;
        let (mut s, mut client) = session(&r, dir.path()).await;
        s.identity = Some(Identity {
            user: "admin".into(),
            admin: true,
        });
        s.login = None;
        let names = ["user.a", "user.b", "user.c", "user.a", "user.zz", "user.c"];
        let mut batch = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let command = Command::Find {
                name: (*name).into(),
            };
            codec::write_request(&mut batch, &format!("F{i}"), &command);
            if i == 2 {
                batch.extend_from_slice(b"X1 FROB\r\n");
            }
        }
        batch.extend_from_slice(b"Q LOGOUT\r\n");
        client.write_all(&batch).await.unwrap();
        let served = tokio::spawn(async move { s.run().await });
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got))
            .await
            .expect("the session answers and closes after LOGOUT")
            .unwrap();
        assert!(matches!(served.await.unwrap(), Err(SessionEnd::Logout)));
        let tagged: Vec<String> = lines(&got)
            .into_iter()
            .filter_map(|l| match l {
                ServerLine::Mailbox { tag, name, .. } => Some(format!("{tag} MAILBOX {name}")),
                ServerLine::Status { tag, status, .. } => Some(format!("{tag} {status:?}")),
                _ => None,
            })
            .collect();
        assert_eq!(
            tagged,
            [
                "F0 MAILBOX user.a",
                "F0 Ok",
                "F1 Ok",
                "F2 MAILBOX user.c",
                "F2 Ok",
                "X1 Bad",
                "F3 MAILBOX user.a",
                "F3 Ok",
                "F4 Ok",
                "F5 MAILBOX user.c",
                "F5 Ok",
                "Q Ok",
            ]
        );
        r.shutdown().await;
    }

    /// Issue 9, section 6: catch-up tells a partial subscriber (`UPDATE
    /// be1`) that a mailbox moved away from its servers while it was
    /// behind, with a DELETE; a stream of changes would have said nothing
    /// it could act on (the move's new location is not its business).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn catch_up_deletes_what_moved_away_from_a_partial_subscriber() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path(), |_| {}).await;
        activate(&r, "user.moved", "be1!default").await;
        activate(&r, "user.stays", "be1!default").await;
        let (mut s, _client) = session(&r, dir.path()).await;
        s.start_update("U1", vec!["be1".into()]).await.unwrap();
        let dump = lines(&std::mem::take(&mut s.output));
        assert_eq!(dump.len(), 3, "two MAILBOX lines and the OK: {dump:?}");

        // While the subscriber reads nothing: the move, a new mailbox on
        // its server, and enough other changes to overflow the broadcast.
        activate(&r, "user.moved", "be2!default").await;
        activate(&r, "user.new", "be1!default").await;
        for _ in 0..LAG {
            activate(&r, "user.fill", "be1!default").await;
        }
        s.drain_stream().await.unwrap();
        let pushed = lines(&s.output);
        assert!(
            pushed.contains(&ServerLine::Delete {
                tag: "U1".into(),
                name: "user.moved".into()
            }),
            "a DELETE for the mailbox that left be1: {pushed:?}"
        );
        assert!(
            pushed.iter().any(|l| matches!(l,
                ServerLine::Mailbox { name, location, .. }
                    if name == "user.new" && location == "be1!default")),
            "{pushed:?}"
        );
        assert!(
            !pushed.iter().any(|l| matches!(l,
                ServerLine::Mailbox { name, .. } | ServerLine::Reserve { name, .. }
                    if name == "user.moved")),
            "the new location is not sent to a be1 subscriber: {pushed:?}"
        );
        // Caught up in one pass: the current entries, not the 4,200 changes.
        assert!(pushed.len() < 10, "{} lines", pushed.len());
        r.shutdown().await;
    }

    /// Issue 9, section 6: a subscriber that fell behind past the kept log
    /// cannot be caught up and is dropped; the BYE that tells it to
    /// resynchronise reaches it before the connection closes (written by
    /// `catch_up`, flushed by `Session::run` on the way out).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscriber_dropped_in_catch_up_reads_bye_before_eof() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path(), |s| {
            s.snapshot_after_entries = 50;
            s.keep_log_entries = 5;
        })
        .await;
        activate(&r, "user.a", "be1!default").await;
        let (mut s, mut client) = session(&r, dir.path()).await;
        s.start_update("U1", vec![]).await.unwrap();
        s.output.clear();
        let from = s.streaming.as_ref().unwrap().sent_up_to + 1;
        for _ in 0..LAG {
            activate(&r, "user.fill", "be1!default").await;
        }
        // The log behind the subscriber is compacted away by now (a snapshot
        // every 50 entries, 5 kept): wait until it really is.
        let applied = *r.store().watch_applied().borrow();
        let deadline = Instant::now() + Duration::from_secs(20);
        while r
            .store()
            .committed_records(from, applied, 1)
            .unwrap()
            .is_some()
        {
            assert!(Instant::now() < deadline, "the log was never compacted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ended = tokio::time::timeout(Duration::from_secs(20), s.run())
            .await
            .expect("the session gives up the stream at once");
        assert!(ended.is_err(), "the stream ended: {ended:?}");
        drop(s);
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got))
            .await
            .expect("EOF")
            .unwrap();
        let got = lines(&got);
        assert!(
            matches!(got.last(), Some(ServerLine::Bye(_))),
            "the last thing before EOF is a BYE: {got:?}"
        );
        r.shutdown().await;
    }
}
