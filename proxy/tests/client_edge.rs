//! corvid-proxy's client side before login, against the real binary: TLS,
//! the STARTTLS injection case, and bad or oversized input. No backend is
//! needed for any of it (the replica follows a master that is not there).
//! What needs real Cyrus backends is in `tests/interop/proxy.sh`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
    BufReader as TokioBufReader,
};
use tokio::net::TcpStream;

fn proxy_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("CORVID_BIN_DIR") {
        return Path::new(&dir).join("corvid-proxy");
    }
    PathBuf::from(env!("CARGO_BIN_EXE_corvid-proxy"))
}

struct Proxy {
    child: Child,
    imap: String,
    imaps: String,
    cert: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts corvid-proxy with a self-signed certificate and `extra` TOML.
fn start(extra: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = cert.cert.pem();
    std::fs::write(dir.path().join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let config = format!(
        "[proxy]\ndata_dir = \"{d}/replica\"\n\
         [replica]\nmasters = [\"127.0.0.1:9\"]\n\
         [tls]\ncert = \"{d}/cert.pem\"\nkey = \"{d}/key.pem\"\n\
         [backend]\npassword = \"unused\"\n\
         [metrics]\nlisten = \"\"\n\
         {extra}\n",
        d = dir.path().display()
    );
    let config = if config.contains("[imap]") {
        config
    } else {
        config + "[imap]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\n"
    };
    std::fs::write(dir.path().join("proxy.toml"), config).unwrap();
    let mut child = Command::new(proxy_bin())
        .arg("--config")
        .arg(dir.path().join("proxy.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("corvid-proxy starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("corvid-proxy ready"),
        "ready line: {line:?}"
    );
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap()
            .to_string()
    };
    Proxy {
        imap: field("imap="),
        imaps: field("imaps="),
        cert: cert_pem.into_bytes(),
        child,
        _dir: dir,
    }
}

fn tls_connector(cert_pem: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &cert_pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
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
    let mut conn = TokioBufReader::new(TcpStream::connect(&proxy.imap).await.unwrap());
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
    let tcp = TcpStream::connect(&proxy.imaps).await.unwrap();
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
    let mut conn = TokioBufReader::new(TcpStream::connect(&proxy.imap).await.unwrap());
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
    let mut a = TokioBufReader::new(TcpStream::connect(&proxy.imap).await.unwrap());
    read_until(&mut a, "* OK").await;
    let mut b = TokioBufReader::new(TcpStream::connect(&proxy.imap).await.unwrap());
    read_until(&mut b, "* OK").await;
    let mut c = TokioBufReader::new(TcpStream::connect(&proxy.imap).await.unwrap());
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
