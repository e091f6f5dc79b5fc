//! An async MUPDATE client, as Cyrus's own client behaves: every argument is
//! sent as a `{n+}` literal, one command at a time (or pipelined with
//! [`Client::send`] / [`Client::receive`]).
//!
//! Used by `corvidctl` (shell, find, list, bench) and by the tests.

use std::sync::Arc;

use base64::Engine;
use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::codec::{self, Command, DecodeError, Limits, ResponseDecoder, ServerLine, Status};
use crate::model::{MailboxEntry, MailboxState};

/// Client errors.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Socket error.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent bytes that are not MUPDATE.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The server closed the connection.
    #[error("server closed the connection{0}")]
    Closed(String),
    /// The server answered NO or BAD.
    #[error("{status:?} {text}")]
    Refused {
        /// NO or BAD.
        status: Status,
        /// The server's reason.
        text: String,
    },
    /// TLS set-up failed.
    #[error("TLS: {0}")]
    Tls(String),
}

impl From<DecodeError> for ClientError {
    fn from(e: DecodeError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The answer to one command: its data lines and its final status.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Untagged or tagged data lines before the status (MAILBOX, RESERVE…).
    pub lines: Vec<ServerLine>,
    /// OK, NO or BAD.
    pub status: Status,
    /// The status text.
    pub text: String,
}

impl Reply {
    /// `Ok(self)` for OK, else [`ClientError::Refused`].
    pub fn ok(self) -> Result<Reply, ClientError> {
        match self.status {
            Status::Ok => Ok(self),
            status => Err(ClientError::Refused {
                status,
                text: self.text,
            }),
        }
    }

    /// The mailbox entries among the data lines.
    pub fn entries(&self) -> Vec<MailboxEntry> {
        self.lines.iter().filter_map(line_entry).collect()
    }
}

/// Turns a MAILBOX or RESERVE line into an entry (log index unknown: 0).
pub fn line_entry(line: &ServerLine) -> Option<MailboxEntry> {
    let (name, location, acl, state) = match line {
        ServerLine::Mailbox {
            name,
            location,
            acl,
            ..
        } => (name, location, acl.as_str(), MailboxState::Active),
        ServerLine::Reserve { name, location, .. } => (name, location, "", MailboxState::Reserved),
        _ => return None,
    };
    Some(MailboxEntry {
        name: name.clone(),
        location: location.clone(),
        acl: acl.to_owned(),
        state,
        last_change: 0,
    })
}

/// A connection to a MUPDATE server.
pub struct Client {
    stream: Box<dyn Io>,
    decoder: ResponseDecoder,
    input: BytesMut,
    output: Vec<u8>,
    next_tag: u64,
    capabilities: Vec<ServerLine>,
}

impl Client {
    /// Connects and reads the greeting.
    pub async fn connect(addr: &str) -> Result<Client, ClientError> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut c = Client {
            stream: Box::new(tcp),
            decoder: ResponseDecoder::new(Limits {
                max_line: 1 << 20,
                max_literal: 1 << 20,
                ..Limits::default()
            }),
            input: BytesMut::with_capacity(8192),
            output: Vec::with_capacity(1024),
            next_tag: 1,
            capabilities: Vec::new(),
        };
        c.read_greeting().await?;
        Ok(c)
    }

    async fn read_greeting(&mut self) -> Result<(), ClientError> {
        self.capabilities.clear();
        loop {
            match self.next_line().await? {
                ServerLine::Greeting { .. } => return Ok(()),
                ServerLine::Bye(text) => return Err(ClientError::Closed(format!(": {text}"))),
                line => self.capabilities.push(line),
            }
        }
    }

    /// The SASL mechanisms the greeting offered.
    pub fn mechanisms(&self) -> Vec<String> {
        self.capabilities
            .iter()
            .find_map(|l| match l {
                ServerLine::Capability { name, args } if name.eq_ignore_ascii_case("AUTH") => {
                    Some(args.clone())
                }
                _ => None,
            })
            .unwrap_or_default()
    }

    /// Whether the greeting offered STARTTLS.
    pub fn starttls_offered(&self) -> bool {
        self.capabilities
            .iter()
            .any(|l| matches!(l, ServerLine::Capability { name, .. } if name.eq_ignore_ascii_case("STARTTLS")))
    }

    async fn next_line(&mut self) -> Result<ServerLine, ClientError> {
        loop {
            if let Some(line) = self.decoder.decode(&mut self.input)? {
                return Ok(line);
            }
            if self.stream.read_buf(&mut self.input).await? == 0 {
                return Err(ClientError::Closed(String::new()));
            }
        }
    }

    fn tag(&mut self) -> String {
        let t = format!("C{}", self.next_tag);
        self.next_tag += 1;
        t
    }

    /// Queues a command without waiting; returns its tag. Call
    /// [`Client::flush`] then [`Client::receive`] once per command, in order.
    pub fn send(&mut self, command: &Command) -> String {
        let tag = self.tag();
        codec::write_request(&mut self.output, &tag, command);
        tag
    }

    /// Writes queued commands.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.stream.write_all(&self.output).await?;
        self.stream.flush().await?;
        self.output.clear();
        Ok(())
    }

    /// Reads the reply of the command tagged `tag`.
    pub async fn receive(&mut self, tag: &str) -> Result<Reply, ClientError> {
        let mut lines = Vec::new();
        loop {
            match self.next_line().await? {
                ServerLine::Status {
                    tag: t,
                    status,
                    text,
                } if t == tag => {
                    return Ok(Reply {
                        lines,
                        status,
                        text,
                    });
                }
                ServerLine::Bye(text) => return Err(ClientError::Closed(format!(": {text}"))),
                ServerLine::GoAhead => {}
                line => lines.push(line),
            }
        }
    }

    /// Sends one command and waits for its reply.
    pub async fn command(&mut self, command: &Command) -> Result<Reply, ClientError> {
        let tag = self.send(command);
        self.flush().await?;
        self.receive(&tag).await
    }

    /// Upgrades the connection with STARTTLS and reads the new greeting.
    pub async fn starttls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<(), ClientError> {
        self.command(&Command::Starttls).await?.ok()?;
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let plain = std::mem::replace(&mut self.stream, Box::new(tokio::io::duplex(1).0));
        let tls = connector.connect(name, plain).await?;
        self.stream = Box::new(tls);
        self.input.clear();
        self.read_greeting().await
    }

    /// Authenticates with SASL `mechanism`. `step` computes each client
    /// message from the server's challenge (the first call gets `None` and
    /// may return the initial response).
    pub async fn authenticate(
        &mut self,
        mechanism: &str,
        mut step: impl FnMut(Option<&[u8]>) -> Result<Option<Vec<u8>>, String>,
    ) -> Result<(), ClientError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let initial = step(None).map_err(ClientError::Protocol)?;
        let tag = self.tag();
        codec::write_request(
            &mut self.output,
            &tag,
            &Command::Authenticate {
                mechanism: mechanism.to_owned(),
                initial_response: initial.map(|i| {
                    if i.is_empty() {
                        b"=".to_vec()
                    } else {
                        b64.encode(i).into_bytes()
                    }
                }),
            },
        );
        self.flush().await?;
        loop {
            match self.next_line().await? {
                ServerLine::Status {
                    tag: t,
                    status,
                    text,
                } if t == tag => {
                    return Reply {
                        lines: vec![],
                        status,
                        text,
                    }
                    .ok()
                    .map(|_| ());
                }
                ServerLine::Bye(text) => return Err(ClientError::Closed(format!(": {text}"))),
                // Anything else is the next challenge (as Cyrus's client reads it).
                other => {
                    let raw = match other {
                        ServerLine::Other(raw) => raw,
                        line => {
                            return Err(ClientError::Protocol(format!(
                                "unexpected line during SASL: {line:?}"
                            )))
                        }
                    };
                    let challenge = b64
                        .decode(&raw)
                        .map_err(|e| ClientError::Protocol(format!("bad base64 challenge: {e}")))?;
                    let answer = step(Some(&challenge))
                        .map_err(ClientError::Protocol)?
                        .unwrap_or_default();
                    self.output.extend_from_slice(b64.encode(answer).as_bytes());
                    self.output.extend_from_slice(b"\r\n");
                    self.flush().await?;
                }
            }
        }
    }

    /// Authenticates with PLAIN.
    pub async fn authenticate_plain(
        &mut self,
        user: &str,
        password: &str,
    ) -> Result<(), ClientError> {
        let message = format!("\0{user}\0{password}").into_bytes();
        let mut sent = false;
        self.authenticate("PLAIN", |challenge| match (challenge, sent) {
            (None, false) => {
                sent = true;
                Ok(Some(message.clone()))
            }
            _ => Err("unexpected PLAIN challenge".into()),
        })
        .await
    }

    /// Authenticates with SCRAM-SHA-256 (rsasl's client side).
    pub async fn authenticate_scram_sha256(
        &mut self,
        user: &str,
        password: &str,
    ) -> Result<(), ClientError> {
        use rsasl::prelude::{Mechname, SASLClient, SASLConfig};
        let sasl_err = |e: &dyn std::fmt::Display| ClientError::Protocol(format!("SASL: {e}"));
        let config = SASLConfig::with_credentials(None, user.to_owned(), password.to_owned())
            .map_err(|e| sasl_err(&e))?;
        let mech = Mechname::parse(b"SCRAM-SHA-256").map_err(|e| sasl_err(&e))?;
        let mut session = SASLClient::new(config)
            .start_suggested(&[mech])
            .map_err(|e| sasl_err(&e))?;
        self.authenticate("SCRAM-SHA-256", |challenge| {
            let mut out = Vec::new();
            session
                .step(challenge, &mut out)
                .map_err(|e| e.to_string())?;
            Ok(Some(out))
        })
        .await
    }

    /// FIND: the entry named `name`, if any.
    pub async fn find(&mut self, name: &str) -> Result<Option<MailboxEntry>, ClientError> {
        let reply = self
            .command(&Command::Find {
                name: name.to_owned(),
            })
            .await?
            .ok()?;
        Ok(reply.entries().into_iter().next())
    }

    /// LIST: every entry whose location starts with `prefix`.
    pub async fn list(&mut self, prefix: Option<&str>) -> Result<Vec<MailboxEntry>, ClientError> {
        let reply = self
            .command(&Command::List {
                prefix: prefix.map(str::to_owned),
            })
            .await?
            .ok()?;
        Ok(reply.entries())
    }

    /// LOGOUT, waiting for the server's answer.
    pub async fn logout(mut self) -> Result<(), ClientError> {
        self.command(&Command::Logout).await?.ok()?;
        Ok(())
    }

    /// Reads the next line the server sends unprompted (UPDATE pushes).
    pub async fn next_push(&mut self) -> Result<ServerLine, ClientError> {
        self.next_line().await
    }

    /// Writes raw bytes (for the interactive shell and protocol tests).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }
}

impl Client {
    /// Reads whatever bytes the server sends next, undecoded (for the
    /// interactive shell). Returns an empty vector at end of stream.
    pub async fn read_raw(&mut self) -> Result<Vec<u8>, ClientError> {
        if !self.input.is_empty() {
            return Ok(self.input.split().to_vec());
        }
        let mut buf = vec![0u8; 16 * 1024];
        let n = self.stream.read(&mut buf).await?;
        buf.truncate(n);
        Ok(buf)
    }
}
