//! The `lmtp` and `pop3` workloads of `corvidctl imap-bench`: the same
//! plain style as the IMAP client (one command in flight, every read
//! bounded), so that corvid-proxy's LMTP and POP3 paths are measured like
//! its IMAP path.
//!
//! * `lmtp`: each connection says LHLO once (and AUTH PLAIN when
//!   `--lmtp-auth` is given, as a frontend does to a backend's TCP lmtpd),
//!   then repeats MAIL, one RCPT per recipient, DATA, and reads one reply per
//!   accepted recipient. The recipients are grouped by target (`--rcpt
//!   TARGET=ADDR` goes to TARGET, a bare `--rcpt ADDR` to `--server`); one
//!   delivery is one transaction per target, the targets in parallel (as
//!   corvid-proxy does across backends). Every non-2xx recipient reply is
//!   counted in `rcpt_errors` and makes the delivery an error.
//! * `pop3`: one operation is a whole session: connect, USER/PASS, STAT,
//!   RETR 1, QUIT. Connection i logs in as user i (modulo the users):
//!   Cyrus's pop3d locks the maildrop, so two connections must not share a
//!   user.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};

use super::{Shared, Workload};
use crate::probe;

/// A byte stream to a server: TCP or a UNIX socket.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Longest reply line accepted.
const MAX_REPLY_LINE: u64 = 64 << 10;
/// Longest multi-line reply (LHLO's list), in lines.
const MAX_REPLY_LINES: usize = 100;

/// Connects to `host:port` or `unix:PATH`.
async fn connect(target: &str, timeout: Duration) -> anyhow::Result<BufReader<Box<dyn Io>>> {
    let io: Box<dyn Io> = tokio::time::timeout(timeout, async {
        anyhow::Ok(if let Some(path) = target.strip_prefix("unix:") {
            Box::new(
                UnixStream::connect(path)
                    .await
                    .with_context(|| format!("connecting to {target}"))?,
            ) as Box<dyn Io>
        } else {
            let tcp = TcpStream::connect(target)
                .await
                .with_context(|| format!("connecting to {target}"))?;
            tcp.set_nodelay(true).ok();
            Box::new(tcp)
        })
    })
    .await
    .context("connect timed out")??;
    Ok(BufReader::with_capacity(16 << 10, io))
}

/// Reads one line (without its CRLF).
async fn read_line(io: &mut BufReader<Box<dyn Io>>, line: &mut Vec<u8>) -> anyhow::Result<String> {
    line.clear();
    let n = io.take(MAX_REPLY_LINE).read_until(b'\n', line).await?;
    if n == 0 {
        bail!("server closed the connection");
    }
    if !line.ends_with(b"\n") {
        bail!("reply line longer than {MAX_REPLY_LINE} bytes");
    }
    Ok(String::from_utf8_lossy(line).trim_end().to_owned())
}

/// The first word of `to` (the recipient) for messages.
fn rcpt_of(command: &str) -> &str {
    command.split(' ').nth(1).unwrap_or(command)
}

// ---------------------------------------------------------------- LMTP

/// Recipients going to one target in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Route {
    pub target: String,
    /// Addresses; `{}` is replaced by the connection's user number.
    pub rcpts: Vec<String>,
}

/// Groups `--rcpt` values by target, in order of first appearance: `ADDR`
/// goes to `server`, `TARGET=ADDR` (TARGET holds a ':', `host:port` or
/// `unix:PATH`; an address never does) to TARGET.
pub(super) fn routes(server: &str, rcpts: &[String]) -> Vec<Route> {
    let mut out: Vec<Route> = Vec::new();
    for r in rcpts {
        let (target, addr) = match r.split_once('=') {
            Some((t, a)) if t.contains(':') => (t, a),
            _ => (server, r.as_str()),
        };
        match out.iter_mut().find(|x| x.target == target) {
            Some(x) => x.rcpts.push(addr.to_owned()),
            None => out.push(Route {
                target: target.to_owned(),
                rcpts: vec![addr.to_owned()],
            }),
        }
    }
    out
}

/// A reply: its code and last line.
struct Reply {
    code: u16,
    text: String,
}

impl Reply {
    fn ok(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

/// Parses the code of a reply line ("250-..." or "250 ..."); returns it and
/// whether more lines follow.
fn reply_code(line: &str) -> anyhow::Result<(u16, bool)> {
    let b = line.as_bytes();
    if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) {
        bail!("not a reply: {line:?}");
    }
    let code = line[..3].parse()?;
    Ok((code, b.get(3) == Some(&b'-')))
}

/// An LMTP connection: LHLO said, authenticated if asked.
struct Lmtp {
    io: BufReader<Box<dyn Io>>,
    line: Vec<u8>,
    timeout: Duration,
}

impl Lmtp {
    async fn open(target: &str, auth: Option<&str>, timeout: Duration) -> anyhow::Result<Lmtp> {
        let mut c = Lmtp {
            io: connect(target, timeout).await?,
            line: Vec::new(),
            timeout,
        };
        let greeting = c.reply().await.context("greeting")?;
        if greeting.code != 220 {
            bail!("greeting: {}", greeting.text);
        }
        c.expect("LHLO bench.example.org", 250).await?;
        if let Some(auth) = auth {
            let (user, password) = auth.split_once(':').context("--lmtp-auth USER:PASSWORD")?;
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
            let r = c.command(&format!("AUTH PLAIN {token}")).await?;
            if r.code != 235 {
                bail!("AUTH PLAIN as {user}: {}", r.text);
            }
        }
        Ok(c)
    }

    /// Reads one (possibly multi-line) reply.
    async fn reply(&mut self) -> anyhow::Result<Reply> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, async {
            for _ in 0..MAX_REPLY_LINES {
                let text = read_line(&mut self.io, &mut self.line).await?;
                let (code, more) = reply_code(&text)?;
                if !more {
                    return Ok(Reply { code, text });
                }
            }
            bail!("reply of more than {MAX_REPLY_LINES} lines")
        })
        .await
        .map_err(|_| anyhow::anyhow!("no reply within {timeout:?}"))?
    }

    async fn command(&mut self, command: &str) -> anyhow::Result<Reply> {
        // One write per command line (the socket has TCP_NODELAY).
        self.io
            .get_mut()
            .write_all(format!("{command}\r\n").as_bytes())
            .await?;
        self.reply().await
    }

    async fn expect(&mut self, command: &str, code: u16) -> anyhow::Result<()> {
        let r = self.command(command).await?;
        if r.code != code {
            let verb = command.split(' ').next().unwrap_or(command);
            bail!("{verb}: {}", r.text);
        }
        Ok(())
    }

    /// One transaction; returns the recipients refused (at RCPT or after
    /// DATA) with their replies, and the message bytes sent.
    async fn deliver(
        &mut self,
        rcpts: &[String],
        message: &[&[u8]],
    ) -> anyhow::Result<(Vec<String>, u64)> {
        self.expect("MAIL FROM:<bench@example.org>", 250).await?;
        let mut refused = Vec::new();
        let mut accepted = 0;
        for r in rcpts {
            let command = format!("RCPT TO:<{r}>");
            let reply = self.command(&command).await?;
            if reply.ok() {
                accepted += 1;
            } else {
                refused.push(format!("{}: {}", rcpt_of(&command), reply.text));
            }
        }
        if accepted == 0 {
            self.expect("RSET", 250).await?;
            return Ok((refused, 0));
        }
        self.expect("DATA", 354).await?;
        let io = self.io.get_mut();
        let mut bytes = 0;
        for part in message {
            io.write_all(part).await?;
            bytes += part.len() as u64;
        }
        io.write_all(b".\r\n").await?;
        for _ in 0..accepted {
            let reply = self.reply().await?;
            if !reply.ok() {
                refused.push(format!("after DATA: {}", reply.text));
            }
        }
        Ok((refused, bytes))
    }
}

/// The recipients of `route` for user number `u`.
fn expand(route: &Route, u: u64) -> Vec<String> {
    route
        .rcpts
        .iter()
        .map(|r| r.replace("{}", &u.to_string()))
        .collect()
}

/// The message of delivery `k`: `message` with a Message-ID of its own
/// (Cyrus suppresses a second delivery of one Message-ID to one mailbox).
fn with_message_id<'a>(message: &'a [u8], id: &'a str) -> [&'a [u8]; 3] {
    const MARK: &[u8] = b"<imap-bench@";
    match message.windows(MARK.len()).position(|w| w == MARK) {
        Some(at) => [
            &message[..at + 1],
            id.as_bytes(),
            &message[at + MARK.len() - 1..],
        ],
        None => [message, b"", b""],
    }
}

/// One transaction of a delivery, on `slot`'s connection (opened if
/// needed, dropped after an error).
async fn route_delivery(
    route: &Route,
    slot: &mut Option<Lmtp>,
    user: u64,
    auth: Option<&str>,
    timeout: Duration,
    message: &[&[u8]],
) -> anyhow::Result<(Vec<String>, u64)> {
    let rcpts = expand(route, user);
    let result = async {
        if slot.is_none() {
            *slot = Some(Lmtp::open(&route.target, auth, timeout).await?);
        }
        slot.as_mut()
            .expect("just opened")
            .deliver(&rcpts, message)
            .await
    }
    .await;
    if result.is_err() {
        *slot = None;
    }
    result.with_context(|| format!("to {}", route.target))
}

/// One delivery over every route (in parallel), on the connection's open
/// connections (opened on first use, dropped after a transport error).
async fn delivery(
    shared: &Shared,
    conns: &mut [Option<Lmtp>],
    user: u64,
    k: u64,
) -> anyhow::Result<(u64, u64)> {
    let id = format!("lmtp-{}-{k}", shared.nonce);
    let message = with_message_id(&shared.message, &id);
    let auth = shared.args.lmtp_auth.as_deref();
    let timeout = shared.timeout();
    let results = futures::future::join_all(
        shared
            .routes
            .iter()
            .zip(conns.iter_mut())
            .map(|(route, slot)| route_delivery(route, slot, user, auth, timeout, &message)),
    )
    .await;
    // The message counts once per delivery, however many transactions.
    let mut refused = Vec::new();
    let mut bytes = 0;
    for r in results {
        let (rf, b) = r?;
        refused.extend(rf);
        bytes = bytes.max(b);
    }
    let n = refused.len() as u64;
    if n > 0 {
        shared.rcpt_errors.fetch_add(n, Ordering::Relaxed);
        bail!("{n} recipient(s) refused: {}", refused.join("; "));
    }
    Ok((bytes, 0))
}

// ---------------------------------------------------------------- POP3

/// Sends `command` (if any) and reads its one-line answer, which must be
/// +OK.
async fn pop_status(
    io: &mut BufReader<Box<dyn Io>>,
    line: &mut Vec<u8>,
    command: Option<&str>,
) -> anyhow::Result<String> {
    if let Some(c) = command {
        io.get_mut()
            .write_all(format!("{c}\r\n").as_bytes())
            .await?;
    }
    let text = read_line(io, line).await?;
    if !text.starts_with("+OK") {
        let verb = command.map_or("greeting", |c| c.split(' ').next().unwrap_or(c));
        bail!("{verb}: {text}");
    }
    Ok(text)
}

/// One POP3 session: USER/PASS, STAT, RETR 1, QUIT; returns the bytes of
/// the message retrieved (dot-unstuffed lines, CRLFs counted).
async fn pop3_session(
    target: &str,
    user: &str,
    password: &str,
    timeout: Duration,
) -> anyhow::Result<u64> {
    let mut io = connect(target, timeout).await?;
    let mut line = Vec::new();
    tokio::time::timeout(timeout, async {
        let io = &mut io;
        let line = &mut line;
        pop_status(io, line, None).await?;
        pop_status(io, line, Some(&format!("USER {user}"))).await?;
        pop_status(io, line, Some(&format!("PASS {password}"))).await?;
        let stat = pop_status(io, line, Some("STAT")).await?;
        if stat.split_whitespace().nth(1).is_none_or(|n| n == "0") {
            bail!("STAT: {stat} (an empty maildrop: RETR 1 would fail)");
        }
        pop_status(io, line, Some("RETR 1")).await?;
        let mut bytes = 0u64;
        let mut body = Vec::new();
        loop {
            body.clear();
            let n = (&mut *io)
                .take(MAX_REPLY_LINE)
                .read_until(b'\n', &mut body)
                .await?;
            if n == 0 {
                bail!("server closed the connection inside RETR");
            }
            if body == b".\r\n" || body == b".\n" {
                break;
            }
            bytes += n as u64 - u64::from(body.starts_with(b".."));
        }
        pop_status(io, line, Some("QUIT")).await?;
        Ok(bytes)
    })
    .await
    .map_err(|_| anyhow::anyhow!("POP3 session not done within {timeout:?}"))?
}

// ---------------------------------------------------------------- runs

/// One operation of connection `i` (operation number `k`): returns the
/// message bytes moved and, unused, 0.
async fn op(shared: &Shared, conns: &mut [Option<Lmtp>], i: u64, k: u64) -> anyhow::Result<u64> {
    match shared.args.workload {
        Workload::Lmtp => Ok(
            delivery(shared, conns, i % shared.args.users.max(1) as u64, k)
                .await?
                .0,
        ),
        Workload::Pop3 => {
            let (u, p) = shared.users.get(i);
            pop3_session(&shared.args.server, u, p, shared.timeout()).await
        }
        _ => unreachable!("not a mail workload"),
    }
}

/// Checks the targets (one operation, not counted) before the clock starts.
pub(super) async fn probe(shared: &Shared) -> anyhow::Result<()> {
    let mut conns: Vec<Option<Lmtp>> = shared.routes.iter().map(|_| None).collect();
    op(shared, &mut conns, 0, u64::MAX).await.map(drop)
}

/// One connection's loop (see the module comment); returns the latencies
/// of its successful operations.
pub(super) async fn worker(shared: Arc<Shared>, i: u64) -> Vec<u32> {
    let mut latencies = Vec::new();
    let mut conns: Vec<Option<Lmtp>> = shared.routes.iter().map(|_| None).collect();
    while let Some(k) = shared.claim() {
        let started = Instant::now();
        match op(&shared, &mut conns, i, k).await {
            Ok(bytes) => {
                shared.bytes.fetch_add(bytes, Ordering::Relaxed);
                latencies.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
            Err(e) => {
                if shared.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("imap-bench: {e:#}");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    for c in conns.iter_mut().flatten() {
        c.command("QUIT").await.ok();
    }
    latencies
}

// ---------------------------------------------------------------- masters

/// The masters' MUPDATE commands so far, summed over `addrs`.
pub(super) async fn master_commands(addrs: &[String]) -> anyhow::Result<u64> {
    let mut total = 0;
    for a in addrs {
        total += probe::metric_sum(
            &probe::fetch_metrics(a).await?,
            "corvid_mupdate_commands_total",
        ) as u64;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_group_by_target() {
        let r = routes(
            "unix:/x/be1.sock",
            &[
                "a{}@example.org".into(),
                "127.0.0.3:24=c{}@example.org".into(),
                "b{}@example.org".into(),
                "127.0.0.3:24=d@example.org".into(),
            ],
        );
        assert_eq!(
            r,
            vec![
                Route {
                    target: "unix:/x/be1.sock".into(),
                    rcpts: vec!["a{}@example.org".into(), "b{}@example.org".into()],
                },
                Route {
                    target: "127.0.0.3:24".into(),
                    rcpts: vec!["c{}@example.org".into(), "d@example.org".into()],
                },
            ]
        );
        // '=' in a local part without a ':' before it stays in the address.
        assert_eq!(routes("s:1", &["a=b@example.org".into()])[0].target, "s:1");
        assert_eq!(
            expand(&r[0], 7),
            vec!["a7@example.org".to_owned(), "b7@example.org".to_owned()]
        );
    }

    #[test]
    fn message_ids_are_replaced() {
        let m = super::super::message(4096);
        let parts = with_message_id(&m, "lmtp-1-2");
        let joined: Vec<u8> = parts.concat();
        let text = String::from_utf8(joined).unwrap();
        assert!(
            text.contains("Message-ID: <lmtp-1-2@example.org>\r\n"),
            "{text}"
        );
        assert_eq!(text.len(), m.len() - "imap-bench".len() + "lmtp-1-2".len());
        // No line starts with a dot: the message needs no dot-stuffing.
        assert!(!m.starts_with(b".") && !m.windows(3).any(|w| w == b"\n.\r" || w == b"\n.."));
        assert!(m.ends_with(b"\r\n"));
    }

    #[test]
    fn reply_codes() {
        assert_eq!(reply_code("250-PIPELINING").unwrap(), (250, true));
        assert_eq!(reply_code("250 2.1.5 ok").unwrap(), (250, false));
        assert_eq!(reply_code("550").unwrap(), (550, false));
        assert!(reply_code("+OK").is_err());
    }

    /// A scripted LMTP server: LHLO, AUTH, then one transaction with a
    /// refused recipient and one refused after DATA.
    #[tokio::test]
    async fn lmtp_transaction_counts_refusals() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = BufReader::new(s);
            s.get_mut().write_all(b"220 hi LMTP\r\n").await.unwrap();
            let mut got = Vec::new();
            let mut line = String::new();
            loop {
                line.clear();
                s.read_line(&mut line).await.unwrap();
                got.push(line.trim_end().to_owned());
                let answer: &[u8] = match line.trim_end() {
                    l if l.starts_with("LHLO") => b"250-hi\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n",
                    l if l.starts_with("AUTH PLAIN ") => b"235 ok\r\n",
                    l if l.starts_with("MAIL") => b"250 ok\r\n",
                    "RCPT TO:<x@example.org>" => b"550 5.1.1 no\r\n",
                    l if l.starts_with("RCPT") => b"250 ok\r\n",
                    "DATA" => {
                        s.get_mut().write_all(b"354 go\r\n").await.unwrap();
                        let mut body = String::new();
                        loop {
                            body.clear();
                            s.read_line(&mut body).await.unwrap();
                            if body == ".\r\n" {
                                break;
                            }
                        }
                        b"250 2.1.5 a ok\r\n452 4.2.2 b over quota\r\n"
                    }
                    "QUIT" => {
                        s.get_mut().write_all(b"221 bye\r\n").await.unwrap();
                        break;
                    }
                    _ => b"500 what\r\n",
                };
                s.get_mut().write_all(answer).await.unwrap();
            }
            got
        });
        let mut c = Lmtp::open(&addr, Some("proxy:secret"), Duration::from_secs(5))
            .await
            .unwrap();
        let m = b"Subject: x\r\n\r\nbody\r\n".as_slice();
        let (refused, bytes) = c
            .deliver(
                &[
                    "a@example.org".into(),
                    "x@example.org".into(),
                    "b@example.org".into(),
                ],
                &[m],
            )
            .await
            .unwrap();
        assert_eq!(bytes, m.len() as u64);
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused[0].contains("550 5.1.1"), "{refused:?}");
        assert!(refused[1].contains("452 4.2.2"), "{refused:?}");
        c.command("QUIT").await.unwrap();
        let got = server.await.unwrap();
        let token = base64::engine::general_purpose::STANDARD.encode("\0proxy\0secret");
        assert_eq!(got[1], format!("AUTH PLAIN {token}"));
    }

    /// A scripted POP3 server: the session's commands in order, RETR
    /// unstuffed.
    #[tokio::test]
    async fn pop3_session_retrieves() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = BufReader::new(s);
            s.get_mut().write_all(b"+OK hi\r\n").await.unwrap();
            let mut got = Vec::new();
            let mut line = String::new();
            loop {
                line.clear();
                if s.read_line(&mut line).await.unwrap() == 0 {
                    break;
                }
                got.push(line.trim_end().to_owned());
                let answer: &[u8] = match line.trim_end() {
                    "STAT" => b"+OK 2 300\r\n",
                    "RETR 1" => b"+OK 9 octets\r\nab\r\n..c\r\n.\r\n",
                    _ => b"+OK\r\n",
                };
                s.get_mut().write_all(answer).await.unwrap();
            }
            got
        });
        let bytes = pop3_session(&addr, "u", "p", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(bytes, 4 + 4);
        assert_eq!(
            server.await.unwrap(),
            vec!["USER u", "PASS p", "STAT", "RETR 1", "QUIT"]
        );
    }
}
