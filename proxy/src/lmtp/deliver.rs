//! One LMTP transaction with one backend: the proxy logs in with its own
//! authentication id and an **empty** authorization id (as Cyrus frontends
//! do; backends list the proxy in `lmtp_admins`), sends MAIL, the RCPTs
//! and the spooled message, and maps each recipient's answer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::backend::BackendSettings;
use crate::lmtp::codec::{reply_class, reply_continues};
use crate::lmtp::spool::SpoolReader;
use crate::routing::BackendAddr;

/// Longest reply line read from a backend.
const MAX_REPLY_LINE: usize = 4096;

/// The envelope of a transaction.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Reverse path (empty: `<>`).
    pub from: String,
    /// `AUTH=` parameter as the MTA gave it.
    pub auth: Option<String>,
    /// `BODY=` parameter.
    pub body: Option<String>,
    /// Size of the message as spooled.
    pub size: u64,
}

/// One recipient sent to this backend.
#[derive(Debug, Clone)]
pub struct BackendRecipient {
    /// The address as the MTA gave it.
    pub address: String,
    /// Cyrus's `IGNOREQUOTA`.
    pub ignore_quota: bool,
}

/// A logged-in backend LMTP connection.
type Conn = BufReader<TcpStream>;

/// Longest a pooled connection may idle before it is used again (lmtpd
/// itself drops idle clients after a while; older ones are closed).
const POOL_MAX_IDLE: Duration = Duration::from_secs(30);

/// Idle, logged-in connections to backends' lmtpd, so that a delivery
/// does not pay a TCP connect, LHLO and a password check on the backend.
pub struct Pool {
    idle: Mutex<HashMap<String, Vec<(Conn, Instant)>>>,
    max_per_server: usize,
}

impl Pool {
    /// A pool keeping at most `max_per_server` idle connections per
    /// backend. It should cover the MTA's concurrent deliveries: a
    /// connection that does not fit is closed, and the next delivery then
    /// pays a new lmtpd process and a password check on the backend.
    pub fn new(max_per_server: usize) -> Pool {
        Pool {
            idle: Mutex::new(HashMap::new()),
            max_per_server,
        }
    }

    fn take(&self, server: &str) -> Option<Conn> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.get_mut(server)?;
        while let Some((conn, since)) = list.pop() {
            if since.elapsed() < POOL_MAX_IDLE {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, server: &str, conn: Conn) {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.entry(server.to_string()).or_default();
        if list.len() < self.max_per_server {
            list.push((conn, Instant::now()));
        }
    }
}

/// Delivers to every recipient of `rcpts` on backend `server`; returns one
/// reply line per recipient, in order (never acknowledging what the
/// backend did not accept).
#[allow(clippy::too_many_arguments)]
pub async fn deliver(
    server: &str,
    addr: &BackendAddr,
    settings: &BackendSettings,
    pool: &Pool,
    envelope: &Envelope,
    rcpts: &[BackendRecipient],
    message: &SpoolReader,
    timeout: Duration,
) -> Vec<String> {
    let started = Instant::now();
    let result = tokio::time::timeout(timeout, async {
        // A pooled connection the backend has closed in the meantime fails
        // before DATA is sent: then the transaction is safely tried again
        // on a fresh one. After DATA it is not (it could deliver twice).
        if let Some(conn) = pool.take(server) {
            match transaction(conn, envelope, rcpts, message).await {
                Ok((replies, conn)) => {
                    pool.put(server, conn);
                    return Ok(replies);
                }
                Err((e, false)) => {
                    metrics::counter!("corvid_proxy_lmtp_pool_stale_total").increment(1);
                    tracing::debug!(server, error = %e, "pooled LMTP connection failed before DATA; retrying on a new one");
                }
                Err((e, true)) => return Err(e),
            }
        }
        metrics::counter!("corvid_proxy_lmtp_backend_logins_total", "server" => server.to_string())
            .increment(1);
        let conn = open(addr, settings).await?;
        match transaction(conn, envelope, rcpts, message).await {
            Ok((replies, conn)) => {
                pool.put(server, conn);
                Ok(replies)
            }
            Err((e, _)) => Err(e),
        }
    })
    .await;
    metrics::histogram!("corvid_proxy_lmtp_backend_seconds", "server" => server.to_string())
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(Ok(replies)) => replies,
        Ok(Err(e)) => {
            tracing::warn!(server, error = %e, "LMTP delivery to backend failed");
            metrics::counter!("corvid_proxy_backend_errors_total", "server" => server.to_string(), "kind" => "lmtp")
                .increment(1);
            unavailable(server, rcpts.len())
        }
        Err(_) => {
            tracing::warn!(server, "LMTP delivery to backend timed out");
            metrics::counter!("corvid_proxy_backend_errors_total", "server" => server.to_string(), "kind" => "lmtp")
                .increment(1);
            unavailable(server, rcpts.len())
        }
    }
}

fn unavailable(server: &str, n: usize) -> Vec<String> {
    vec![format!("451 4.4.1 Mailbox server {server} is unavailable; try again later"); n]
}

/// Why a transaction could not go on.
#[derive(Debug, thiserror::Error)]
enum LmtpError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("backend answered {0:?}")]
    Refused(String),
    #[error("backend closed the connection")]
    Closed,
}

/// Connects, reads the greeting, LHLO, and logs in as the proxy with an
/// empty authorization id when the backend offers AUTH PLAIN.
async fn open(addr: &BackendAddr, settings: &BackendSettings) -> Result<Conn, LmtpError> {
    if addr.tls {
        // STARTTLS towards an LMTP backend is left to a later version;
        // refusing is better than sending mail in the clear unasked.
        return Err(LmtpError::Refused(
            "/tls is not supported for LMTP backends".into(),
        ));
    }
    let tcp = TcpStream::connect(addr.host_port()).await?;
    let _ = tcp.set_nodelay(true);
    let mut conn = BufReader::new(tcp);
    expect_class(&read_reply(&mut conn).await?, 2)?;
    send(&mut conn, b"LHLO corvid-proxy\r\n").await?;
    let caps = read_reply(&mut conn).await?;
    expect_class(&caps, 2)?;
    let caps_text = caps.join("\n").to_ascii_uppercase();
    if caps_text.contains("AUTH") && caps_text.contains("PLAIN") {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("\0{}\0{}", settings.authname, settings.password));
        send(&mut conn, format!("AUTH PLAIN {token}\r\n").as_bytes()).await?;
        expect_class(&read_reply(&mut conn).await?, 2)?;
    }
    Ok(conn)
}

/// One transaction on a logged-in connection; on success the connection
/// is clean for the next one. A failure says whether DATA had been sent.
async fn transaction(
    mut conn: Conn,
    envelope: &Envelope,
    rcpts: &[BackendRecipient],
    message: &SpoolReader,
) -> Result<(Vec<String>, Conn), (LmtpError, bool)> {
    let before = |e: LmtpError| (e, false);
    let after = |e: LmtpError| (e, true);
    // MAIL and every RCPT in one write (both sides speak PIPELINING).
    let mut out = format!("MAIL FROM:<{}>", envelope.from);
    if let Some(a) = &envelope.auth {
        out.push_str(&format!(" AUTH={a}"));
    }
    if let Some(b) = &envelope.body {
        out.push_str(&format!(" BODY={b}"));
    }
    out.push_str("\r\n");
    for r in rcpts {
        out.push_str(&format!("RCPT TO:<{}>", r.address));
        if r.ignore_quota {
            out.push_str(" IGNOREQUOTA");
        }
        out.push_str("\r\n");
    }
    send(&mut conn, out.as_bytes()).await.map_err(before)?;
    let mail = read_reply(&mut conn).await.map_err(before)?;
    let mail_ok = reply_class(mail.last().map_or(&b""[..], |l| l.as_bytes())) == Some(2);
    let mut replies: Vec<Option<String>> = Vec::with_capacity(rcpts.len());
    for _ in rcpts {
        let r = read_reply(&mut conn).await.map_err(before)?;
        let line = r.last().cloned().unwrap_or_default();
        if !mail_ok {
            replies.push(Some(map_failure(mail.last().cloned().unwrap_or_default())));
        } else if reply_class(line.as_bytes()) == Some(2) {
            replies.push(None);
        } else {
            replies.push(Some(map_failure(line)));
        }
    }
    let accepted = replies.iter().filter(|r| r.is_none()).count();
    if accepted == 0 {
        // Close the transaction so that the connection can be used again.
        send(&mut conn, b"RSET\r\n").await.map_err(before)?;
        let r = read_reply(&mut conn).await.map_err(before)?;
        expect_class(&r, 2).map_err(before)?;
        let replies = replies.into_iter().map(Option::unwrap_or_default).collect();
        return Ok((replies, conn));
    }
    send(&mut conn, b"DATA\r\n").await.map_err(after)?;
    let go = read_reply(&mut conn).await.map_err(after)?;
    expect_class(&go, 3).map_err(after)?;
    message
        .copy_to(conn.get_mut())
        .await
        .map_err(|e| after(e.into()))?;
    conn.get_mut().flush().await.map_err(|e| after(e.into()))?;
    metrics::counter!("corvid_proxy_bytes_relayed_total", "direction" => "to_backend")
        .increment(envelope.size);
    // One reply per accepted recipient, in order (RFC 2033).
    for slot in replies.iter_mut().filter(|r| r.is_none()) {
        let r = read_reply(&mut conn).await.map_err(after)?;
        let line = r.last().cloned().unwrap_or_default();
        *slot = Some(if reply_class(line.as_bytes()) == Some(2) {
            line
        } else {
            map_failure(line)
        });
    }
    let replies = replies.into_iter().map(Option::unwrap_or_default).collect();
    Ok((replies, conn))
}

/// A backend's refusal as the MTA should see it. "Mailbox does not exist"
/// becomes temporary: the proxy's list may be stale (the mailbox may have
/// just moved), so the MTA tries again.
fn map_failure(line: String) -> String {
    let lower = line.to_ascii_lowercase();
    if line.starts_with("550")
        && (lower.contains("5.1.1")
            || lower.contains("does not exist")
            || lower.contains("unknown"))
    {
        return "451 4.2.0 Mailbox is not on the server the registry names (it may be moving); try again later".into();
    }
    if reply_class(line.as_bytes()).is_none() {
        return "451 4.3.0 Unexpected answer from the mailbox server".into();
    }
    line
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut BufReader<S>,
    bytes: &[u8],
) -> Result<(), LmtpError> {
    conn.get_mut().write_all(bytes).await?;
    conn.get_mut().flush().await?;
    Ok(())
}

/// One (possibly multi-line) reply, lines without CRLF.
async fn read_reply<S: AsyncRead + Unpin>(
    conn: &mut BufReader<S>,
) -> Result<Vec<String>, LmtpError> {
    let mut lines = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = AsyncReadExt::take(&mut *conn, MAX_REPLY_LINE as u64)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Err(LmtpError::Closed);
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let more = reply_continues(text.as_bytes());
        lines.push(text);
        if !more || lines.len() > 100 {
            return Ok(lines);
        }
    }
}

fn expect_class(reply: &[String], class: u8) -> Result<(), LmtpError> {
    let last = reply.last().map(String::as_str).unwrap_or("");
    if reply_class(last.as_bytes()) == Some(class) {
        Ok(())
    } else {
        Err(LmtpError::Refused(last.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_mailboxes_become_temporary() {
        assert!(map_failure("550 5.1.1 User unknown".into()).starts_with("451 4.2.0"));
        assert!(map_failure(
            "550-Mailbox unknown.  Either there is no mailbox associated with this".into()
        )
        .starts_with("451"));
        assert_eq!(
            map_failure("552 5.2.2 Over quota".into()),
            "552 5.2.2 Over quota"
        );
        assert!(map_failure("garbage".into()).starts_with("451 4.3.0"));
    }
}
