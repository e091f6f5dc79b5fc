//! The proxy's login on a backend's pop3d, the Cyrus way: greeting, STLS
//! when the address says `/tls`, then `AUTH PLAIN` with the client's user
//! as authorization id and the proxy's own credentials (Cyrus pop3d
//! accepts that from a login listed in `proxyservers`).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend::{BackendError, BackendSettings, BackendStream};
use crate::pop3::codec::{self, Line, LineReader, Status};
use crate::routing::BackendAddr;

/// Longest backend line read during login (greeting, STLS and AUTH
/// answers are one short line each).
const MAX_BACKEND_LINE: usize = 4096;

/// What the backend said to the proxy's login.
pub enum Login {
    /// Logged in: the backend's `+OK` line (without CRLF), the stream, and
    /// any bytes it sent after that line (none expected; relayed anyway).
    Ready {
        /// The `+OK …` line, for the client.
        line: Bytes,
        /// The logged-in connection.
        stream: BackendStream,
        /// Bytes already read past `line`.
        extra: BytesMut,
    },
    /// The backend refused: its `-ERR …` line and response code.
    Refused {
        /// The `-ERR …` line.
        line: Bytes,
        /// Its response code (`IN-USE`, `SYS/TEMP`, …), if any.
        code: Option<String>,
    },
}

struct Conn {
    stream: BackendStream,
    rbuf: BytesMut,
    lines: LineReader,
    timeout: Duration,
}

impl Conn {
    async fn line(&mut self) -> Result<Bytes, BackendError> {
        loop {
            match self.lines.next(&mut self.rbuf) {
                Some(Line::Text(l)) => return Ok(l),
                Some(Line::TooLong) => {
                    return Err(BackendError::Protocol("line too long".into()));
                }
                None => {}
            }
            self.rbuf.reserve(4096);
            let n = tokio::time::timeout(self.timeout, self.stream.read_buf(&mut self.rbuf))
                .await
                .map_err(|_| BackendError::Timeout(self.timeout))??;
            if n == 0 {
                return Err(BackendError::Closed);
            }
        }
    }

    async fn send(&mut self, line: &str) -> Result<(), BackendError> {
        self.stream.write_all(line.as_bytes()).await?;
        self.stream.write_all(b"\r\n").await?;
        self.stream.flush().await?;
        Ok(())
    }
}

fn unexpected(what: &str, line: &[u8]) -> BackendError {
    BackendError::Unusable(format!(
        "{what}: {:?}",
        String::from_utf8_lossy(line)
            .chars()
            .take(200)
            .collect::<String>()
    ))
}

/// Connects to `addr`'s pop3d and logs in as the proxy on behalf of
/// `user`, all within `settings.connect_timeout`.
pub async fn login(
    addr: &BackendAddr,
    settings: &BackendSettings,
    user: &str,
) -> Result<Login, BackendError> {
    tokio::time::timeout(
        settings.connect_timeout,
        login_untimed(addr, settings, user),
    )
    .await
    .unwrap_or(Err(BackendError::Timeout(settings.connect_timeout)))
}

async fn login_untimed(
    addr: &BackendAddr,
    settings: &BackendSettings,
    user: &str,
) -> Result<Login, BackendError> {
    let tcp = TcpStream::connect(addr.host_port()).await?;
    let _ = tcp.set_nodelay(true);
    let mut conn = Conn {
        stream: corvid_registry::tls::MaybeTls::Plain(tcp),
        rbuf: BytesMut::with_capacity(1024),
        lines: LineReader::new(MAX_BACKEND_LINE),
        timeout: settings.command_timeout,
    };
    let greeting = conn.line().await?;
    if codec::status(&greeting) != Status::Ok {
        return Err(unexpected("greeting", &greeting));
    }
    if addr.tls {
        let tls = settings
            .tls
            .clone()
            .ok_or_else(|| BackendError::Unusable("/tls backend but no backend.tls_ca".into()))?;
        conn.send("STLS").await?;
        let answer = conn.line().await?;
        if codec::status(&answer) != Status::Ok {
            return Err(unexpected("STLS refused", &answer));
        }
        // Nothing the backend sent before the handshake may be used.
        conn.rbuf.clear();
        crate::backend::upgrade_to_tls(&mut conn.stream, &addr.host, tls).await?;
    }
    let token = codec::encode_plain(user, &settings.authname, &settings.password);
    conn.send(&format!("AUTH PLAIN {token}")).await?;
    loop {
        let answer = conn.line().await?;
        match codec::status(&answer) {
            Status::Ok => {
                return Ok(Login::Ready {
                    line: answer,
                    stream: conn.stream,
                    extra: conn.rbuf,
                })
            }
            // A pop3d that takes no initial response asks for it.
            Status::Continue => conn.send(&token).await?,
            Status::Err(code) => return Ok(Login::Refused { line: answer, code }),
            Status::Other => return Err(unexpected("AUTH answer", &answer)),
        }
    }
}
