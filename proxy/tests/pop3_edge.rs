//! corvid-proxy's POP3 side before the backend, against the real binary:
//! STLS and the injection case, implicit TLS, bad or oversized input, the
//! login timeout, and the answers to a password check that fails or cannot
//! be made. No backend is needed (the replica follows a master that is not
//! there; a stand-in `saslauthd` answers password checks). Logins through
//! to real Cyrus pop3d backends are in `tests/interop/proxy.sh`.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
    BufReader as TokioBufReader,
};
use tokio::net::{TcpStream, UnixListener};

mod common;

use common::{tls_connector, Proxy};

/// corvid-proxy with both POP3 listeners; `pop3_extra` goes into `[pop3]`,
/// `extra` after it (`{dir}` is the proxy's directory).
fn start(pop3_extra: &str, extra: &str) -> Proxy {
    common::start(&format!(
        "[replica]\nmasters = [\"127.0.0.1:9\"]\nlookup_sync_ms = 200\n\
         [imap]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"\"\nfailed_login_delay_ms = 300\n\
         [pop3]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\n{pop3_extra}\n{extra}\n"
    ))
}

/// One line (5 s bound), without CRLF; `<EOF>` when the proxy closed.
async fn line<S: AsyncRead + Unpin>(r: &mut TokioBufReader<S>) -> String {
    let mut line = String::new();
    let n = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
        .await
        .expect("a line within 5 s")
        .unwrap();
    if n == 0 {
        return "<EOF>".into();
    }
    line.trim_end().to_string()
}

/// A multi-line answer up to its `.` (the status line first).
async fn multiline<S: AsyncRead + Unpin>(r: &mut TokioBufReader<S>) -> Vec<String> {
    let mut lines = vec![line(r).await];
    if !lines[0].starts_with("+OK") {
        return lines;
    }
    loop {
        let l = line(r).await;
        let done = l == "." || l == "<EOF>";
        lines.push(l);
        if done {
            return lines;
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) {
    s.write_all(bytes).await.unwrap();
    s.flush().await.unwrap();
}

async fn connect(addr: &str) -> TokioBufReader<TcpStream> {
    let mut conn = TokioBufReader::new(TcpStream::connect(addr).await.unwrap());
    assert_eq!(line(&mut conn).await, "+OK corvid-proxy POP3 ready");
    conn
}

fn plain(authz: &str, authn: &str, pass: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{authz}\0{authn}\0{pass}"))
}

#[tokio::test]
async fn stls_discards_what_was_sent_before_the_handshake() {
    let proxy = start("", "");
    let mut conn = connect(&proxy.addr("pop3")).await;
    send(conn.get_mut(), b"CAPA\r\n").await;
    let capa = multiline(&mut conn).await;
    assert!(capa.contains(&"STLS".to_string()), "{capa:?}");
    // The injection: a QUIT pipelined behind STLS in the same packet must
    // not run after the handshake (it would end the session).
    send(conn.get_mut(), b"STLS\r\nQUIT\r\n").await;
    assert_eq!(line(&mut conn).await, "+OK Begin TLS negotiation now");
    assert!(conn.buffer().is_empty(), "nothing but the STLS answer");
    let tcp = conn.into_inner();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tls_connector(&proxy.cert).connect(name, tcp).await.unwrap();
    let mut tls = TokioBufReader::new(tls);
    send(tls.get_mut(), b"CAPA\r\n").await;
    let capa = multiline(&mut tls).await;
    assert_eq!(
        capa[0], "+OK List of capabilities follows",
        "the injected QUIT ran: {capa:?}"
    );
    assert!(!capa.contains(&"STLS".to_string()), "{capa:?}");
    assert!(capa.contains(&"USER".to_string()), "{capa:?}");
    send(tls.get_mut(), b"STLS\r\n").await;
    assert_eq!(line(&mut tls).await, "-ERR Already in TLS");
    send(tls.get_mut(), b"QUIT\r\n").await;
    assert_eq!(line(&mut tls).await, "+OK corvid-proxy signing off");
    assert_eq!(line(&mut tls).await, "<EOF>");
}

#[tokio::test]
async fn implicit_tls_greets_inside_tls() {
    let proxy = start("", "");
    let tcp = TcpStream::connect(&proxy.addr("pop3s")).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tls_connector(&proxy.cert).connect(name, tcp).await.unwrap();
    let mut tls = TokioBufReader::new(tls);
    assert_eq!(line(&mut tls).await, "+OK corvid-proxy POP3 ready");
    send(tls.get_mut(), b"CAPA\r\n").await;
    let capa = multiline(&mut tls).await;
    for want in [
        "USER",
        "SASL PLAIN",
        "RESP-CODES",
        "AUTH-RESP-CODE",
        "PIPELINING",
    ] {
        assert!(capa.contains(&want.to_string()), "{want} in {capa:?}");
    }
    assert!(!capa.contains(&"STLS".to_string()), "{capa:?}");
    assert!(capa
        .iter()
        .any(|l| l.starts_with("IMPLEMENTATION corvid-proxy")));
    send(tls.get_mut(), b"QUIT\r\n").await;
    assert_eq!(line(&mut tls).await, "+OK corvid-proxy signing off");
}

#[tokio::test]
async fn bad_input_gets_err_and_the_session_goes_on() {
    let proxy = start("", "");
    let mut conn = connect(&proxy.addr("pop3")).await;
    let long = format!("USER {}\r\n", "x".repeat(100_000));
    let two_fields = format!(
        "AUTH PLAIN {}\r\n",
        base64::engine::general_purpose::STANDARD.encode("alice\0secret")
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"\x00\xff\xfe garbage\r\n".to_vec(),
            "-ERR Unrecognized command",
        ),
        (b"\r\n".to_vec(), "-ERR Empty command"),
        (long.into_bytes(), "-ERR Line too long"),
        (b"STAT\r\n".to_vec(), "-ERR STAT needs a login first"),
        (b"RETR 1\r\n".to_vec(), "-ERR RETR needs a login first"),
        (b"PASS secret\r\n".to_vec(), "-ERR Give USER first"),
        (b"USER\r\n".to_vec(), "-ERR Syntax error in USER arguments"),
        (
            b"USER a b\r\n".to_vec(),
            "-ERR Syntax error in USER arguments",
        ),
        (b"CAPA please\r\n".to_vec(), "-ERR Syntax error in CAPA"),
        (b"APOP alice 0123\r\n".to_vec(), "-ERR APOP is not offered"),
        (
            b"AUTH PLAIN !!!notbase64\r\n".to_vec(),
            "-ERR Invalid base64",
        ),
        (two_fields.into_bytes(), "-ERR Malformed PLAIN response"),
        (
            b"AUTH PLAIN =\r\n".to_vec(),
            "-ERR Malformed PLAIN response",
        ),
        (
            b"AUTH CRAM-MD5\r\n".to_vec(),
            "-ERR Unsupported SASL mechanism",
        ),
        (
            format!("AUTH PLAIN {}\r\n", plain("bob", "alice", "pw")).into_bytes(),
            "-ERR [AUTH] Proxy authorization is not offered",
        ),
    ];
    for (input, want) in &cases {
        send(conn.get_mut(), input).await;
        let got = line(&mut conn).await;
        assert!(
            got.starts_with(want),
            "{:?} → {got:?}, wanted {want:?}",
            String::from_utf8_lossy(&input[..input.len().min(60)])
        );
    }
    // The continuation form: "+ " then the response; "*" cancels.
    send(conn.get_mut(), b"AUTH PLAIN\r\n").await;
    assert_eq!(line(&mut conn).await, "+");
    send(conn.get_mut(), b"*\r\n").await;
    assert_eq!(line(&mut conn).await, "-ERR Authentication cancelled");
    send(conn.get_mut(), b"AUTH PLAIN\r\n").await;
    assert_eq!(line(&mut conn).await, "+");
    send(conn.get_mut(), b"%%%\r\n").await;
    assert_eq!(line(&mut conn).await, "-ERR Invalid base64 string");
    // The mechanism list (the pre-RFC 5034 form).
    send(conn.get_mut(), b"AUTH\r\n").await;
    assert_eq!(multiline(&mut conn).await, ["+OK", "PLAIN", "."]);
    // Pipelined commands are answered in order, and the session is intact.
    send(conn.get_mut(), b"NOOP\r\nCAPA\r\nQUIT\r\nCAPA\r\n").await;
    assert_eq!(line(&mut conn).await, "-ERR NOOP needs a login first");
    assert_eq!(
        multiline(&mut conn).await[0],
        "+OK List of capabilities follows"
    );
    assert_eq!(line(&mut conn).await, "+OK corvid-proxy signing off");
    assert_eq!(line(&mut conn).await, "<EOF>");
}

#[tokio::test]
async fn login_timeout_closes_the_session() {
    let proxy = start("login_timeout_secs = 1", "");
    let mut conn = connect(&proxy.addr("pop3")).await;
    let started = Instant::now();
    // Activity does not extend it: the timeout is for the whole login.
    send(conn.get_mut(), b"CAPA\r\n").await;
    multiline(&mut conn).await;
    assert_eq!(line(&mut conn).await, "-ERR Login timeout");
    assert_eq!(line(&mut conn).await, "<EOF>");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

#[tokio::test]
async fn password_check_unavailable_is_sys_temp() {
    // check = "backend" with no backend configured: nobody can check.
    let proxy = start("", "");
    let mut conn = connect(&proxy.addr("pop3")).await;
    send(conn.get_mut(), b"USER alice\r\nPASS secret\r\n").await;
    assert_eq!(line(&mut conn).await, "+OK Name is a valid mailbox");
    assert_eq!(
        line(&mut conn).await,
        "-ERR [SYS/TEMP] Authentication is temporarily unavailable"
    );
    // PASS forgot the USER.
    send(conn.get_mut(), b"PASS secret\r\n").await;
    assert_eq!(line(&mut conn).await, "-ERR Give USER first");
}

/// A stand-in `saslauthd` on `path`: "right" is everybody's password.
fn fake_saslauthd(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut fields = Vec::new();
                for _ in 0..4 {
                    let mut len = [0u8; 2];
                    s.read_exact(&mut len).await?;
                    let mut f = vec![0u8; u16::from_be_bytes(len) as usize];
                    s.read_exact(&mut f).await?;
                    fields.push(f);
                }
                let reply: &[u8] = if fields[1] == b"right" { b"OK" } else { b"NO" };
                s.write_all(&(reply.len() as u16).to_be_bytes()).await?;
                s.write_all(reply).await?;
                Ok::<_, std::io::Error>(())
            });
        }
    });
}

#[tokio::test]
async fn wrong_password_is_auth_after_the_delay_and_a_right_one_finds_no_inbox() {
    let proxy = start(
        "",
        "[login]\ncheck = \"saslauthd\"\nsaslauthd_socket = \"{dir}/mux\"\n",
    );
    fake_saslauthd(&proxy.dir.path().join("mux"));
    let mut conn = connect(&proxy.addr("pop3")).await;
    let started = Instant::now();
    send(conn.get_mut(), b"USER alice\r\nPASS wrong\r\n").await;
    assert_eq!(line(&mut conn).await, "+OK Name is a valid mailbox");
    assert_eq!(line(&mut conn).await, "-ERR [AUTH] Authentication failed");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "failed-login delay"
    );
    let auth = format!("AUTH PLAIN {}\r\n", plain("", "alice", "wrong"));
    send(conn.get_mut(), auth.as_bytes()).await;
    assert_eq!(line(&mut conn).await, "-ERR [AUTH] Authentication failed");
    // The right password, but the replica has no INBOX for alice (it has
    // never reached a master): a SYS error, not AUTH, and the session
    // stays in the AUTHORIZATION state.
    send(conn.get_mut(), b"AUTH PLAIN\r\n").await;
    assert_eq!(line(&mut conn).await, "+");
    send(
        conn.get_mut(),
        format!("{}\r\n", plain("alice", "alice", "right")).as_bytes(),
    )
    .await;
    let got = line(&mut conn).await;
    assert!(got.starts_with("-ERR [SYS/"), "{got}");
    send(conn.get_mut(), b"QUIT\r\n").await;
    assert_eq!(line(&mut conn).await, "+OK corvid-proxy signing off");
}
