//! corvid-proxy's LMTP side against the real binary, with no backend and
//! a replica that has never synchronised (its master is not there): what
//! the MTA is told when the proxy cannot know a recipient, and bad or
//! oversized input. Deliveries to real Cyrus backends are in
//! `tests/interop/proxy.sh`.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::{TcpStream, UnixStream};

mod common;

use common::Proxy;

fn start() -> Proxy {
    common::start(
        "[replica]\nmasters = [\"127.0.0.1:9\"]\nlookup_sync_ms = 200\n\
         [lmtp]\nlisten = \"127.0.0.1:0\"\nunix_socket = \"{dir}/lmtp.sock\"\n\
         max_message_bytes = 10000\nmax_recipients = 3\n\
         [backends]\nbe1 = \"127.0.0.1:9\"\n",
    )
}

/// Sends `input`, then reads `replies` reply lines (5 s bound each).
async fn exchange<S>(conn: &mut TokioBufReader<S>, input: &[u8], replies: usize) -> Vec<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    conn.get_mut().write_all(input).await.unwrap();
    let mut out = Vec::new();
    while out.len() < replies {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read_line(&mut line))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no reply to {:?}; got {out:?}",
                    String::from_utf8_lossy(input)
                )
            })
            .unwrap();
        if n == 0 {
            out.push("<EOF>".into());
            break;
        }
        // Multi-line replies (LHLO) count once, at their last line.
        if line.as_bytes().get(3) != Some(&b'-') {
            out.push(line.trim_end().to_string());
        }
    }
    out
}

#[tokio::test]
async fn an_unknown_recipient_is_deferred_while_the_replica_has_never_synchronised() {
    let proxy = start();
    let mut conn = TokioBufReader::new(TcpStream::connect(&proxy.addr("lmtp")).await.unwrap());
    let greeting = exchange(&mut conn, b"", 1).await;
    assert!(greeting[0].starts_with("220 "), "{greeting:?}");
    let r = exchange(
        &mut conn,
        b"LHLO mx\r\nMAIL FROM:<a@b>\r\nRCPT TO:<alice@example.org>\r\n",
        3,
    )
    .await;
    assert!(r[0].starts_with("250 "), "{r:?}");
    assert!(r[1].starts_with("250 "), "{r:?}");
    // Never 550: the proxy does not know yet, so the MTA must try again.
    assert!(r[2].starts_with("451 4.3.0"), "{r:?}");
    let r = exchange(&mut conn, b"DATA\r\n", 1).await;
    assert!(r[0].starts_with("503 5.5.1"), "{r:?}");
}

#[tokio::test]
async fn bad_commands_and_limits_get_clear_replies() {
    let proxy = start();
    let mut conn = TokioBufReader::new(
        UnixStream::connect(proxy.dir.path().join("lmtp.sock"))
            .await
            .unwrap(),
    );
    exchange(&mut conn, b"", 1).await;
    let cases: &[(&[u8], &str)] = &[
        (b"MAIL FROM:<a@b>\r\n", "503 5.5.1"),
        (b"LHLO\r\n", "501 5.5.4"),
        (b"LHLO mx\r\n", "250 "),
        (b"MAIL FROM:<a@b> SIZE=99999\r\n", "552 5.3.4"),
        (b"MAIL FROM:<a@b> FROB=1\r\n", "555 5.5.4"),
        (b"MAIL FROM:a@b\r\n", "501 5.5.4"),
        (b"HELO x\r\n", "500 5.5.2"),
        (b"\xff\xfe\r\n", "501 5.5.4"),
        (b"MAIL FROM:<>\r\n", "250 "),
        (b"MAIL FROM:<>\r\n", "503 5.5.1"),
        (b"RCPT TO:<@bad>\r\n", "550 5.1.3"),
        (b"RCPT TO:<x@y> NOTIFY=NEVER\r\n", "555 5.5.4"),
        (b"RSET\r\n", "250 "),
        (b"NOOP\r\n", "250 "),
        (b"VRFY alice\r\n", "252 "),
    ];
    for (input, want) in cases {
        let r = exchange(&mut conn, input, 1).await;
        assert!(
            r[0].starts_with(want),
            "{:?} → {r:?}",
            String::from_utf8_lossy(input)
        );
    }
    // A line over the limit gets a reply and is skipped; the session goes on.
    let mut long = b"NOOP ".to_vec();
    long.extend(std::iter::repeat_n(b'x', 10_000));
    long.extend_from_slice(b"\r\nNOOP\r\n");
    let r = exchange(&mut conn, &long, 2).await;
    assert!(r[0].starts_with("500 5.5.2"), "{r:?}");
    assert!(r[1].starts_with("250 "), "{r:?}");
    let r = exchange(&mut conn, b"QUIT\r\n", 2).await;
    assert_eq!(r, ["221 2.0.0 Bye", "<EOF>"]);
}
