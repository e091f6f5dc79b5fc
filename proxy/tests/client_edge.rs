//! corvid-proxy's client side before login, against the real binary: TLS,
//! the STARTTLS injection case, and bad or oversized input. No backend is
//! needed for any of it (the replica follows a master that is not there).
//! What needs real Cyrus backends is in `tests/interop/proxy.sh`.

use std::time::{Duration, Instant};

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
    BufReader as TokioBufReader,
};
use tokio::net::TcpStream;

mod common;

use common::{tls_connector, Proxy};

/// corvid-proxy with both IMAP listeners (or the `[imap]` of `extra`).
fn start(extra: &str) -> Proxy {
    if extra.contains("[imap]") {
        common::start(extra)
    } else {
        common::start(&format!(
            "[imap]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\n{extra}"
        ))
    }
}

/// Reads lines until one starts with `prefix` (5 s bound); returns them all.
async fn read_until<S: AsyncRead + Unpin>(r: &mut TokioBufReader<S>, prefix: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut line = String::new();
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, r.read_line(&mut line))
            .await
            .unwrap_or_else(|_| panic!("no line starting {prefix:?}; got {lines:?}"))
            .unwrap();
        if n == 0 {
            lines.push("<EOF>".into());
            return lines;
        }
        let done = line.starts_with(prefix);
        lines.push(line.trim_end().to_string());
        if done {
            return lines;
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) {
    s.write_all(bytes).await.unwrap();
    s.flush().await.unwrap();
}

#[tokio::test]
async fn starttls_discards_what_was_sent_before_the_handshake() {
    let proxy = start("");
    let mut conn = TokioBufReader::new(TcpStream::connect(&proxy.addr("imap")).await.unwrap());
    let greeting = read_until(&mut conn, "* OK").await;
    assert!(greeting[0].contains("STARTTLS"), "{greeting:?}");
    // The injection: a command pipelined behind STARTTLS in the same
    // packet must not be executed after the handshake.
    send(conn.get_mut(), b"a STARTTLS\r\nb LOGOUT\r\n").await;
    let answer = read_until(&mut conn, "a ").await;
    assert_eq!(answer.last().unwrap(), "a OK Begin TLS negotiation now");
    let tcp = conn.into_inner();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tls_connector(&proxy.cert).connect(name, tcp).await.unwrap();
    let mut tls = TokioBufReader::new(tls);
    send(tls.get_mut(), b"c CAPABILITY\r\n").await;
    let lines = read_until(&mut tls, "c ").await;
    assert!(
        lines
            .iter()
            .all(|l| !l.starts_with("b ") && !l.starts_with("* BYE")),
        "the injected command ran: {lines:?}"
    );
    assert!(lines[0].starts_with("* CAPABILITY") && !lines[0].contains("STARTTLS"));
    assert_eq!(lines.last().unwrap(), "c OK Completed");
}

#[tokio::test]
async fn implicit_tls_greets_inside_tls() {
    let proxy = start("");
    let tcp = TcpStream::connect(&proxy.addr("imaps")).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tls_connector(&proxy.cert).connect(name, tcp).await.unwrap();
    let mut tls = TokioBufReader::new(tls);
    let greeting = read_until(&mut tls, "* OK").await;
    assert!(greeting[0].contains("AUTH=PLAIN") && !greeting[0].contains("STARTTLS"));
    send(tls.get_mut(), b"z LOGOUT\r\n").await;
    let lines = read_until(&mut tls, "z ").await;
    assert_eq!(lines, ["* BYE LOGOUT received", "z OK Completed"]);
}

#[tokio::test]
async fn bad_input_gets_bad_and_the_session_goes_on() {
    let proxy = start("[imap]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\nmax_line_bytes = 1024\nmax_literal_bytes = 4096\n");
    let mut conn = TokioBufReader::new(TcpStream::connect(&proxy.addr("imap")).await.unwrap());
    read_until(&mut conn, "* OK").await;
    let cases: &[(&[u8], &str)] = &[
        (b"\x00\xff\xfe garbage\r\n", "BAD"),
        (b"a1 FETCH 1:* FLAGS\r\n", "a1 BAD Please login first"),
        (b"a2 SELECT INBOX\r\n", "a2 BAD Please login first"),
        (b"a3 LOGIN \"unterminated\r\n", "a3 BAD"),
        (b"a4 LOGIN {999999}\r\n", "a4 BAD [TOOBIG]"),
        (b"a5 AUTHENTICATE PLAIN !!!notbase64\r\n", "a5 BAD"),
        (b"a6 AUTHENTICATE CRAM-MD5\r\n", "a6 NO"),
        (b"a7 NOOP\r\n", "a7 OK"),
    ];
    for (input, want) in cases {
        send(conn.get_mut(), input).await;
        let tag = want.split(' ').next().unwrap();
        let prefix = if tag == "BAD" { "" } else { tag };
        let lines = read_until(&mut conn, prefix).await;
        let last = lines.last().unwrap();
        assert!(
            last.contains(want),
            "{:?} → {lines:?}",
            String::from_utf8_lossy(input)
        );
    }
    // A line over the limit: BAD, then the session reads the next command.
    let mut long = b"a8 NOOP ".to_vec();
    long.extend(std::iter::repeat_n(b'x', 5000));
    long.extend_from_slice(b"\r\na9 NOOP\r\n");
    send(conn.get_mut(), &long).await;
    let lines = read_until(&mut conn, "a9 ").await;
    assert!(lines.iter().any(|l| l.contains("BAD")), "{lines:?}");
    assert_eq!(lines.last().unwrap(), "a9 OK Completed");
    // A non-synchronising literal far over the limit: BAD and the session
    // ends (its data is already on the way).
    send(conn.get_mut(), b"b1 LOGIN {99999999+}\r\n").await;
    let lines = read_until(&mut conn, "* BYE").await;
    assert!(lines.iter().any(|l| l.contains("BAD")), "{lines:?}");
}

#[tokio::test]
async fn idle_unauthenticated_sessions_are_closed_and_sessions_are_capped() {
    let proxy = start(
        "[imap]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\nlogin_timeout_secs = 1\nmax_sessions = 2\n",
    );
    let mut a = TokioBufReader::new(TcpStream::connect(&proxy.addr("imap")).await.unwrap());
    read_until(&mut a, "* OK").await;
    let mut b = TokioBufReader::new(TcpStream::connect(&proxy.addr("imap")).await.unwrap());
    read_until(&mut b, "* OK").await;
    let mut c = TokioBufReader::new(TcpStream::connect(&proxy.addr("imap")).await.unwrap());
    let refused = read_until(&mut c, "* ").await;
    assert!(refused[0].starts_with("* BYE"), "{refused:?}");
    // The login timeout ends the first two.
    let ended = read_until(&mut a, "* BYE").await;
    assert!(ended.last().unwrap().contains("login timeout"), "{ended:?}");
    let _ = read_until(&mut b, "* BYE").await;
    // …and close the connection.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), a.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the session stayed open after its BYE");
}
