//! One LMTP session with the MTA: commands answered in order (pipelined
//! input is read and answered as it comes), recipients routed at RCPT time
//! from the replica, the message spooled once and delivered to each backend
//! concerned in parallel, one reply per recipient after DATA.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::imap::session::acl_allows;
use crate::lmtp::codec::{
    parse_command, parse_recipient, Command, DataScanner, Recipient, MAX_COMMAND_LINE,
};
use crate::lmtp::deliver::{deliver, BackendRecipient, Envelope};
use crate::lmtp::spool::Spool;
use crate::lmtp::Shared;
use crate::routing::{RouteError, Service};

/// A recipient accepted at RCPT time.
struct Accepted {
    address: String,
    ignore_quota: bool,
    server: String,
}

/// The transaction in progress.
#[derive(Default)]
struct Transaction {
    mail: Option<Envelope>,
    declared_size: Option<u64>,
    rcpts: Vec<Accepted>,
}

/// Runs one LMTP session on `stream`.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut stream: S,
    peer: String,
) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("lmtp", session = id, peer = %peer);
    metrics::gauge!("corvid_proxy_sessions_open", "protocol" => "lmtp").increment(1.0);
    let result = tracing::Instrument::instrument(session(&shared, &mut stream), span).await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "LMTP session ended");
    }
    metrics::gauge!("corvid_proxy_sessions_open", "protocol" => "lmtp").decrement(1.0);
}

async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    stream: &mut S,
) -> std::io::Result<()> {
    let mut rbuf = BytesMut::with_capacity(8 * 1024);
    let mut out = Vec::with_capacity(1024);
    let mut lhlo = false;
    let mut discarding = false;
    let mut txn = Transaction::default();
    let mut spool = Spool::new(shared.spool_memory_bytes, shared.spool_dir.clone());
    out.extend_from_slice(
        format!("220 {} LMTP corvid-proxy ready\r\n", shared.hostname).as_bytes(),
    );
    stream.write_all(&out).await?;
    out.clear();
    loop {
        // Answers to pipelined commands go out together, once the input
        // that is already here is used up.
        let next = if discarding {
            // The rest of an over-long line: dropped up to its end.
            match rbuf.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    rbuf.advance(i + 1);
                    discarding = false;
                    continue;
                }
                None => {
                    rbuf.clear();
                    None
                }
            }
        } else {
            take_line(&mut rbuf)
        };
        let line = match next {
            Some(Ok(line)) => line,
            Some(Err(())) => {
                reply(&mut out, "500 5.5.2 Line too long");
                discarding = true;
                continue;
            }
            None => {
                if !out.is_empty() {
                    stream.write_all(&out).await?;
                    out.clear();
                }
                if rbuf.capacity() - rbuf.len() < 1024 {
                    rbuf.reserve(8 * 1024);
                }
                let n = tokio::time::timeout(shared.timeout, stream.read_buf(&mut rbuf))
                    .await
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "MTA idle"))??;
                if n == 0 {
                    return Ok(());
                }
                continue;
            }
        };
        let command = match parse_command(&line) {
            Ok(c) => c,
            Err(e) => {
                reply(&mut out, &e.reply());
                continue;
            }
        };
        match command {
            Command::Lhlo(_) => {
                lhlo = true;
                txn = Transaction::default();
                let lines = [
                    shared.hostname.clone(),
                    "PIPELINING".into(),
                    "8BITMIME".into(),
                    "ENHANCEDSTATUSCODES".into(),
                    format!("SIZE {}", shared.max_message_bytes),
                    "IGNOREQUOTA".into(),
                ];
                for (i, l) in lines.iter().enumerate() {
                    let sep = if i + 1 == lines.len() { ' ' } else { '-' };
                    out.extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
                }
            }
            Command::Mail {
                from,
                size,
                auth,
                body,
            } => {
                if !lhlo {
                    reply(&mut out, "503 5.5.1 Send LHLO first");
                } else if txn.mail.is_some() {
                    reply(&mut out, "503 5.5.1 Nested MAIL command");
                } else if size.is_some_and(|s| s > shared.max_message_bytes) {
                    reply(&mut out, "552 5.3.4 Message size exceeds the limit");
                } else {
                    txn.mail = Some(Envelope {
                        from,
                        auth,
                        body,
                        size: 0,
                    });
                    txn.declared_size = size;
                    reply(&mut out, "250 2.1.0 Sender ok");
                }
            }
            Command::Rcpt { to, ignore_quota } => {
                if txn.mail.is_none() {
                    reply(&mut out, "503 5.5.1 Need MAIL before RCPT");
                } else if txn.rcpts.len() >= shared.max_recipients {
                    reply(&mut out, "452 4.5.3 Too many recipients");
                } else {
                    match route_recipient(shared, &to).await {
                        Ok(server) => {
                            txn.rcpts.push(Accepted {
                                address: to,
                                ignore_quota,
                                server,
                            });
                            reply(&mut out, "250 2.1.5 Recipient ok");
                        }
                        Err(answer) => {
                            metrics::counter!("corvid_proxy_lmtp_recipients_total", "result" => "refused_at_rcpt")
                                .increment(1);
                            reply(&mut out, &answer)
                        }
                    }
                }
            }
            Command::Data => {
                if txn.mail.is_none() {
                    reply(&mut out, "503 5.5.1 Need MAIL before DATA");
                } else if txn.rcpts.is_empty() {
                    reply(&mut out, "503 5.5.1 No valid recipients");
                } else {
                    reply(&mut out, "354 Go ahead; end with <CRLF>.<CRLF>");
                    stream.write_all(&out).await?;
                    out.clear();
                    spool.clear();
                    let too_big = read_data(shared, stream, &mut rbuf, &mut spool).await?;
                    let answers = if too_big {
                        metrics::counter!("corvid_proxy_lmtp_recipients_total", "result" => "too_big")
                            .increment(txn.rcpts.len() as u64);
                        vec![
                            "552 5.3.4 Message size exceeds the limit".to_string();
                            txn.rcpts.len()
                        ]
                    } else {
                        let mut envelope = txn.mail.clone().expect("checked above");
                        envelope.size = spool.len();
                        metrics::counter!("corvid_proxy_lmtp_spool_bytes_total")
                            .increment(spool.len());
                        deliver_all(shared, &envelope, &txn.rcpts, &mut spool).await
                    };
                    for a in &answers {
                        reply(&mut out, a);
                    }
                    spool.clear();
                    txn = Transaction::default();
                }
            }
            Command::Rset => {
                txn = Transaction::default();
                reply(&mut out, "250 2.0.0 Ok");
            }
            Command::Noop => reply(&mut out, "250 2.0.0 Ok"),
            Command::Vrfy => reply(&mut out, "252 2.5.2 Cannot VRFY; send the message and see"),
            Command::Quit => {
                reply(&mut out, "221 2.0.0 Bye");
                stream.write_all(&out).await?;
                return Ok(());
            }
        }
    }
}

fn reply(out: &mut Vec<u8>, line: &str) {
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The next command line out of `buf` (`Err` when it is over the limit).
fn take_line(buf: &mut BytesMut) -> Option<Result<Vec<u8>, ()>> {
    match buf.iter().position(|b| *b == b'\n') {
        Some(i) if i < MAX_COMMAND_LINE => {
            let line = buf.split_to(i + 1).to_vec();
            Some(Ok(line))
        }
        Some(_) => Some(Err(())),
        None if buf.len() >= MAX_COMMAND_LINE => Some(Err(())),
        None => None,
    }
}

/// Reads DATA into the spool up to the terminator. Returns true when the
/// message was over the size limit (its bytes were read and dropped).
async fn read_data<S: AsyncRead + Unpin>(
    shared: &Shared,
    stream: &mut S,
    rbuf: &mut BytesMut,
    spool: &mut Spool,
) -> std::io::Result<bool> {
    let mut scanner = DataScanner::default();
    let mut size = 0u64;
    let mut too_big = false;
    loop {
        if !rbuf.is_empty() {
            let scanned = scanner.scan(rbuf);
            size += scanned.consumed as u64;
            if size > shared.max_message_bytes.saturating_add(5) {
                too_big = true;
            }
            if !too_big {
                spool.write(&rbuf[..scanned.consumed]).await?;
            }
            rbuf.advance(scanned.consumed);
            if scanned.done {
                return Ok(too_big);
            }
        }
        rbuf.reserve(64 * 1024);
        let n = tokio::time::timeout(shared.timeout, stream.read_buf(rbuf))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "MTA silent during DATA")
            })??;
        if n == 0 {
            // The MTA went away mid-message: nothing was acknowledged.
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "EOF during DATA",
            ));
        }
    }
}

/// Routes one recipient at RCPT time: the server, or the reply refusing it.
async fn route_recipient(shared: &Shared, address: &str) -> Result<String, String> {
    let Some(recipient) = parse_recipient(address, &shared.postuser, shared.namespace.virtdomains)
    else {
        return Err("550 5.1.3 Bad recipient address syntax".into());
    };
    let (internal, shared_folder) = match &recipient {
        Recipient::User { user, .. } => match shared.namespace.inbox(user) {
            Ok(n) => (n, false),
            Err(_) => return Err("550 5.1.1 User unknown".into()),
        },
        Recipient::Shared { folder } => (shared_folder_name(shared, folder), true),
    };
    match shared.router.locate(&internal).await {
        Ok(route) => {
            if shared_folder
                && !(acl_allows(&route.entry.acl, "anyone", 'p')
                    || acl_allows(&route.entry.acl, "anonymous", 'p'))
            {
                return Err("550 5.7.1 Posting to this folder is not permitted".into());
            }
            if shared
                .router
                .service(&route.server, Service::Lmtp)
                .is_none()
            {
                return Err("451 4.3.5 The mailbox's server is not configured here".into());
            }
            Ok(route.server)
        }
        Err(RouteError::NotFound) => Err(if shared_folder {
            "550 5.1.1 Mailbox unknown".into()
        } else {
            "550 5.1.1 User unknown".into()
        }),
        Err(RouteError::Reserved) => {
            Err("451 4.2.1 Mailbox is being created or moved; try again later".into())
        }
        Err(RouteError::UnknownServer(_)) => {
            Err("451 4.3.5 The mailbox's server is not configured here".into())
        }
        Err(RouteError::Registry(e)) => Err(format!("451 4.3.0 Registry unavailable: {e}")),
    }
}

/// A shared folder as the sender names it (`shared.team`, or `shared/team`
/// with `unixhierarchysep`) → its internal name.
fn shared_folder_name(shared: &Shared, folder: &str) -> String {
    if shared.namespace.unixhierarchysep {
        folder.replace('.', "^").replace('/', ".")
    } else {
        folder.to_string()
    }
}

/// Delivers to every backend concerned at once; replies in RCPT order.
async fn deliver_all(
    shared: &Shared,
    envelope: &Envelope,
    rcpts: &[Accepted],
    spool: &mut Spool,
) -> Vec<String> {
    let mut by_server: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, r) in rcpts.iter().enumerate() {
        by_server.entry(r.server.as_str()).or_default().push(i);
    }
    let message = spool.reader();
    let jobs = by_server.into_iter().map(|(server, idx)| {
        let message = message.clone();
        let list: Vec<BackendRecipient> = idx
            .iter()
            .map(|&i| BackendRecipient {
                address: rcpts[i].address.clone(),
                ignore_quota: rcpts[i].ignore_quota,
            })
            .collect();
        async move {
            let replies = match shared.router.service(server, Service::Lmtp) {
                Some(addr) => {
                    deliver(
                        server,
                        &addr,
                        &shared.backend,
                        &shared.pool,
                        envelope,
                        &list,
                        &message,
                        shared.timeout,
                    )
                    .await
                }
                None => vec![
                    "451 4.3.5 The mailbox's server is not configured here".to_string();
                    list.len()
                ],
            };
            (idx, replies)
        }
    });
    let mut answers = vec![String::new(); rcpts.len()];
    for (idx, replies) in futures::future::join_all(jobs).await {
        for (i, r) in idx.into_iter().zip(replies) {
            let result = match r.as_bytes().first() {
                Some(b'2') => "delivered",
                Some(b'4') => "deferred",
                _ => "failed",
            };
            metrics::counter!("corvid_proxy_lmtp_recipients_total", "result" => result)
                .increment(1);
            answers[i] = r;
        }
    }
    answers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded() {
        let mut b = BytesMut::from(&b"NOOP\r\nRSET"[..]);
        assert_eq!(take_line(&mut b), Some(Ok(b"NOOP\r\n".to_vec())));
        assert_eq!(take_line(&mut b), None);
        let mut b = BytesMut::from(vec![b'x'; MAX_COMMAND_LINE].as_slice());
        assert_eq!(take_line(&mut b), Some(Err(())));
    }
}
