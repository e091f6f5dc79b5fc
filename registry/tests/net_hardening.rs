//! Network input that must not stop or tie up a node (issue 9, section 1),
//! against an in-process one-node registry: the pre-login timeout, the cap
//! on unauthenticated connections, over-large literals, and password checks
//! off the async workers.

mod common;

use std::time::Duration;

use common::{start_node, ADMIN};
use corvid_registry::mupdate::client::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every wait in this file ends by then.
const DEADLINE: Duration = Duration::from_secs(15);

/// A raw connection for byte-level checks.
struct Raw {
    stream: TcpStream,
    seen: Vec<u8>,
}

impl Raw {
    /// Connects and reads the first line (a greeting or a `* BYE`).
    async fn connect(addr: &str) -> (Raw, String) {
        let mut r = Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            seen: Vec::new(),
        };
        let first = r.read_until("* ").await.expect("a first line");
        (r, first)
    }

    /// Connects and expects the greeting.
    async fn greeted(addr: &str) -> Raw {
        let (mut r, first) = Raw::connect(addr).await;
        assert!(!first.starts_with("* BYE"), "refused: {first}");
        r.read_until("* OK MUPDATE").await.expect("greeting");
        r
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads until a line starting with `prefix` arrives; returns everything
    /// up to and including it, or `None` if the connection closed first.
    async fn read_until(&mut self, prefix: &str) -> Option<String> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let text = String::from_utf8_lossy(&self.seen).to_string();
            let mut offset = 0;
            for line in text.split_inclusive('\n') {
                offset += line.len();
                if line.starts_with(prefix) && line.ends_with('\n') {
                    self.seen.drain(..offset);
                    return Some(text[..offset].to_string());
                }
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {prefix:?}; got {text:?}"))
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.seen.extend_from_slice(&buf[..n]);
        }
    }

    /// Reads until the server closes; returns what came before.
    async fn read_to_close(&mut self) -> String {
        let mut rest = Vec::new();
        tokio::time::timeout(DEADLINE, async {
            let mut buf = [0u8; 4096];
            loop {
                match self.stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => rest.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await
        .expect("the server closes the connection");
        self.seen.extend_from_slice(&rest);
        String::from_utf8_lossy(&std::mem::take(&mut self.seen)).into_owned()
    }
}

async fn admin(addr: &str) -> Client {
    let mut c = Client::connect(addr).await.unwrap();
    c.authenticate_plain(ADMIN.0, ADMIN.1).await.unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_time_out_but_sessions_do_not() {
    let node = start_node(|c| {
        c.mupdate.login_timeout_secs = 1;
        c.mupdate.idle_timeout_secs = 3600;
    })
    .await;
    let mut session = admin(&node.addr()).await;
    let started = std::time::Instant::now();
    let mut stranger = Raw::greeted(&node.addr()).await;
    // Trickling bytes does not extend the login timeout.
    stranger.send(b"A1 NOOP\r\n").await;
    assert!(stranger.read_until("A1 OK").await.is_some());
    let rest = stranger.read_to_close().await;
    let waited = started.elapsed();
    assert!(rest.contains("* BYE \"login timeout\""), "{rest:?}");
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    // The authenticated session, older than the login timeout, is served.
    session.find("user.nobody").await.unwrap();
    session
        .command(&corvid_registry::mupdate::codec::Command::Noop)
        .await
        .unwrap()
        .ok()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_cap_refuses_strangers_not_sessions() {
    const CAP: usize = 4;
    let node = start_node(|c| c.mupdate.max_unauthenticated = CAP).await;
    // Sessions logged in before the flood.
    let mut sessions = Vec::new();
    for _ in 0..CAP + 2 {
        sessions.push(admin(&node.addr()).await);
    }
    let mut strangers = Vec::new();
    for _ in 0..CAP {
        strangers.push(Raw::greeted(&node.addr()).await);
    }
    // Over the cap: BYE with a reason at once, then closed.
    for _ in 0..3 {
        let (mut r, first) = Raw::connect(&node.addr()).await;
        assert!(
            first.starts_with("* BYE") && first.contains("waiting to log in"),
            "{first:?}"
        );
        r.read_to_close().await;
    }
    // Every authenticated session is still served.
    for s in &mut sessions {
        assert_eq!(s.find("user.nobody").await.unwrap(), None);
    }
    // A stranger that leaves gives its place back.
    drop(strangers.pop());
    let again = common::wait_for(DEADLINE, || async {
        let (r, first) = Raw::connect(&node.addr()).await;
        (!first.starts_with("* BYE")).then_some(r)
    })
    .await;
    assert!(again.is_some(), "a place became free");
    drop(again);
    // Logging in gives the place back too: a stranger that authenticates no
    // longer counts.
    let mut s = strangers.pop().unwrap();
    use base64::Engine;
    let ir =
        base64::engine::general_purpose::STANDARD.encode(format!("\0{}\0{}", ADMIN.0, ADMIN.1));
    s.send(format!("L1 AUTHENTICATE \"PLAIN\" \"{ir}\"\r\n").as_bytes())
        .await;
    assert!(s.read_until("L1 OK").await.is_some());
    let fresh = common::wait_for(DEADLINE, || async {
        let (r, first) = Raw::connect(&node.addr()).await;
        (!first.starts_with("* BYE")).then_some(r)
    })
    .await;
    assert!(fresh.is_some(), "login freed a place");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_large_literal_is_refused_before_its_data() {
    // 64 KiB literals (the default): 100,000 bytes is over, but within 16x.
    let node = start_node(|_| {}).await;
    let mut r = Raw::greeted(&node.addr()).await;
    r.send(b"A1 FIND {100000+}\r\n").await;
    // Answered before a single payload byte is sent.
    let out = r.read_until("A1 ").await.expect("an answer");
    assert!(out.contains("A1 BAD \"Literal too large\""), "{out:?}");
    // The payload that follows is skipped, even where it looks like commands.
    let payload = "X1 LOGOUT\r\n".repeat(100_000 / 11) + &"x".repeat(100_000 % 11);
    r.send(payload.as_bytes()).await;
    r.send(b" \"more\"\r\nA2 NOOP\r\n").await;
    let out = r.read_until("A2 ").await.expect("the connection goes on");
    assert!(out.contains("A2 OK"), "{out:?}");
    assert!(!out.contains("X1"), "{out:?}");

    // Synchronizing: refused at once (the client sends nothing more).
    r.send(b"A3 FIND {100000}\r\n").await;
    let out = r.read_until("A3 ").await.unwrap();
    assert!(out.contains("A3 BAD \"Literal too large\""), "{out:?}");
    assert!(!out.contains("go ahead"), "{out:?}");

    // Far over the limit (1 GiB): answered, then closed, nothing read on.
    r.send(b"A4 FIND {1073741824+}\r\n").await;
    let rest = r.read_to_close().await;
    assert!(rest.contains("A4 BAD \"Literal too large\""), "{rest:?}");

    // The node serves others as before.
    let mut c = admin(&node.addr()).await;
    assert_eq!(c.find("user.x").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_wrong_passwords_all_fail_and_right_ones_succeed() {
    let node = start_node(|c| c.mupdate.max_parallel_auth = 2).await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let addr = node.addr();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&addr).await.unwrap();
            // Half known users with a wrong password, half unknown (decoy).
            let user = if i % 2 == 0 {
                ADMIN.0.to_string()
            } else {
                format!("nobody{i}")
            };
            c.authenticate_plain(&user, "wrong").await.is_err()
        }));
    }
    let ok = admin(&node.addr()).await;
    drop(ok);
    for t in tasks {
        assert!(t.await.unwrap(), "a wrong password was accepted");
    }
}
