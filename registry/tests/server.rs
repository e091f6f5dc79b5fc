//! The MUPDATE server over real TCP (and TLS) against a real one-node
//! registry on RocksDB.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{start_node, ADMIN, READER};
use corvid_registry::model::MailboxState;
use corvid_registry::mupdate::client::Client;
use corvid_registry::mupdate::codec::{Command, ServerLine, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw connection for byte-level protocol checks.
struct Raw {
    stream: TcpStream,
    seen: Vec<u8>,
}

impl Raw {
    async fn connect(addr: &str) -> Raw {
        let mut r = Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            seen: Vec::new(),
        };
        let greeting = r.read_until("* OK MUPDATE").await;
        assert!(greeting.contains("* AUTH"), "{greeting}");
        r
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads until a line starting with `prefix` has been received; returns
    /// everything up to and including that line.
    async fn read_until(&mut self, prefix: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = String::from_utf8_lossy(&self.seen).to_string();
            let mut offset = 0;
            for line in text.split_inclusive('\n') {
                offset += line.len();
                if line.starts_with(prefix) && line.ends_with('\n') {
                    self.seen.drain(..offset);
                    return text[..offset].to_string();
                }
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {prefix:?}; got {text:?}"))
                .unwrap();
            assert!(
                n > 0,
                "connection closed waiting for {prefix:?}; got {text:?}"
            );
            self.seen.extend_from_slice(&buf[..n]);
        }
    }

    async fn login_admin(&mut self) {
        use base64::Engine;
        let ir =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{}\0{}", ADMIN.0, ADMIN.1));
        self.send(format!("L1 AUTHENTICATE \"PLAIN\" \"{ir}\"\r\n").as_bytes())
            .await;
        let out = self.read_until("L1 ").await;
        assert!(out.contains("L1 OK"), "{out}");
    }
}

fn reserve(name: &str, location: &str) -> Command {
    Command::Reserve {
        name: name.into(),
        location: location.into(),
    }
}
fn activate(name: &str, location: &str, acl: &str) -> Command {
    Command::Activate {
        name: name.into(),
        location: location.into(),
        acl: acl.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_follow_cyrus_semantics() {
    let node = start_node(|_| {}).await;
    let mut c = node.admin().await;
    let acl = "alice\tlrswipkxtecdan\t";

    let r = c
        .command(&reserve("user.alice", "be1!default"))
        .await
        .unwrap();
    assert_eq!((r.status, r.text.as_str()), (Status::Ok, "done"));
    let e = c.find("user.alice").await.unwrap().expect("reserved entry");
    assert_eq!(
        (e.location.as_str(), e.state),
        ("be1!default", MailboxState::Reserved)
    );

    // RESERVE elsewhere is refused; at the same location it is accepted.
    let r = c
        .command(&reserve("user.alice", "be2!default"))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.text.as_str()),
        (Status::No, "mailbox already exists")
    );
    let r = c
        .command(&reserve("user.alice", "be1!default"))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Ok);

    // DEACTIVATE of a reservation: newer Cyrus's NO (3.6.1 would crash).
    let r = c
        .command(&Command::Deactivate {
            name: "user.alice".into(),
            location: "be1!default".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.text.as_str()),
        (Status::No, "mailbox not currently active")
    );

    c.command(&activate("user.alice", "be1!default", acl))
        .await
        .unwrap()
        .ok()
        .unwrap();
    let e = c.find("user.alice").await.unwrap().unwrap();
    assert_eq!((e.state, e.acl.as_str()), (MailboxState::Active, acl));

    c.command(&activate("user.bob", "be2!default", "bob\tlrs\t"))
        .await
        .unwrap()
        .ok()
        .unwrap();
    let names: Vec<String> = c
        .list(Some("be1!"))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["user.alice"]);
    assert_eq!(c.list(None).await.unwrap().len(), 2);

    let r = c
        .command(&Command::Delete {
            name: "user.nobody".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.text.as_str()),
        (Status::No, "mailbox doesn't exist")
    );
    c.command(&Command::Delete {
        name: "user.alice".into(),
    })
    .await
    .unwrap()
    .ok()
    .unwrap();
    assert!(c.find("user.alice").await.unwrap().is_none());
    c.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_depends_on_authentication_and_role() {
    let node = start_node(|_| {}).await;
    let mut raw = Raw::connect(&node.addr()).await;
    raw.send(b"A1 FIND \"user.alice\"\r\nA2 NOOP\r\nA3 RESERVE \"x\" \"be1!p\"\r\n")
        .await;
    let out = raw.read_until("A3 ").await;
    assert!(out.contains("A1 BAD \"Please login first\""), "{out}");
    assert!(out.contains("A2 OK \"Noop done\""), "{out}");
    assert!(out.contains("A3 BAD \"Please login first\""), "{out}");

    let mut reader = Client::connect(&node.addr()).await.unwrap();
    reader.authenticate_plain(READER.0, READER.1).await.unwrap();
    assert!(reader.find("user.x").await.unwrap().is_none());
    let r = reader
        .command(&reserve("user.x", "be1!default"))
        .await
        .unwrap();
    assert_eq!(r.status, Status::No, "{r:?}");
    assert!(r.text.contains("permission denied"), "{r:?}");

    let mut bad = Client::connect(&node.addr()).await.unwrap();
    assert!(bad.authenticate_plain(ADMIN.0, "wrong").await.is_err());
    assert!(bad.authenticate_plain("nobody", "x").await.is_err());
    // A failed login leaves the connection usable.
    bad.authenticate_plain(ADMIN.0, ADMIN.1).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha256_authenticates() {
    let node = start_node(|_| {}).await;
    let mut c = Client::connect(&node.addr()).await.unwrap();
    assert!(
        c.mechanisms().iter().any(|m| m == "SCRAM-SHA-256"),
        "{:?}",
        c.mechanisms()
    );
    c.authenticate_scram_sha256(ADMIN.0, ADMIN.1).await.unwrap();
    c.command(&reserve("user.scram", "be1!default"))
        .await
        .unwrap()
        .ok()
        .unwrap();

    let mut wrong = Client::connect(&node.addr()).await.unwrap();
    assert!(wrong
        .authenticate_scram_sha256(ADMIN.0, "not-it")
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_literals_and_bad_input() {
    let node = start_node(|c| c.mupdate.max_line_bytes = 1024).await;
    let mut raw = Raw::connect(&node.addr()).await;
    raw.login_admin().await;
    // Pipelined: quoted strings, a non-synchronizing literal, escapes.
    raw.send(
        b"P1 RESERVE \"user.p\" \"be1!default\"\r\n\
          P2 ACTIVATE {6+}\r\nuser.p {11+}\r\nbe1!default \"a\\\\b\\tc\"\r\n\
          P3 FIND \"user.p\"\r\n",
    )
    .await;
    let out = raw.read_until("P3 OK").await;
    assert!(out.contains("P1 OK \"done\""), "{out}");
    assert!(out.contains("P2 OK \"done\""), "{out}");
    assert!(
        out.contains("P3 MAILBOX {6+}\r\nuser.p {11+}\r\nbe1!default {"),
        "{out}"
    );

    // A synchronizing literal gets "+ go ahead" first.
    raw.send(b"S1 FIND {6}\r\n").await;
    raw.read_until("+ go ahead").await;
    raw.send(b"user.p\r\n").await;
    let out = raw.read_until("S1 OK").await;
    assert!(out.contains("S1 MAILBOX"), "{out}");

    // Garbage, then an oversized line: each answered BAD, and the stream
    // recovers for the next command.
    raw.send(b"B1 FROBNICATE\r\nB2 FIND\r\nB3 FIND atom\r\n")
        .await;
    let out = raw.read_until("B3 ").await;
    assert!(out.contains("B1 BAD \"Unrecognized command\""), "{out}");
    assert!(out.contains("B2 BAD \"Missing arguments\""), "{out}");
    assert!(out.contains("B3 BAD"), "{out}");
    let mut long = b"B4 FIND \"".to_vec();
    long.extend(std::iter::repeat_n(b'x', 5000));
    long.extend_from_slice(b"\"\r\nB5 NOOP\r\n");
    raw.send(&long).await;
    let out = raw.read_until("B5 ").await;
    assert!(out.contains("BAD"), "{out}");
    assert!(out.contains("B5 OK"), "{out}");
    // An oversized synchronizing literal is refused without a go-ahead.
    raw.send(b"B6 FIND {999999}\r\nB7 NOOP\r\n").await;
    let out = raw.read_until("B7 ").await;
    assert!(out.contains("B6 BAD"), "{out}");
    assert!(!out.contains("+ go ahead"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_and_idle_timeout_say_bye() {
    let node = start_node(|c| {
        c.mupdate.max_connections = 2;
        c.mupdate.idle_timeout_secs = 1;
    })
    .await;
    let _a = Raw::connect(&node.addr()).await;
    let _b = Raw::connect(&node.addr()).await;
    let mut third = TcpStream::connect(node.addr()).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), third.read_to_string(&mut text))
        .await
        .unwrap()
        .unwrap();
    assert!(text.starts_with("* BYE"), "{text}");

    let mut idle = _a;
    let out = idle.read_until("* BYE").await;
    assert!(out.contains("idle for too long"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_dumps_then_streams_in_commit_order() {
    let node = start_node(|_| {}).await;
    let mut writer = node.admin().await;
    writer
        .command(&activate("user.a", "be1!default", "a\tlrs\t"))
        .await
        .unwrap()
        .ok()
        .unwrap();
    writer
        .command(&reserve("user.b", "be2!default"))
        .await
        .unwrap()
        .ok()
        .unwrap();

    let mut full = node.admin().await;
    let reply = full
        .command(&Command::Update { servers: vec![] })
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(reply.text, "streaming starts");
    assert_eq!(reply.entries().len(), 2);
    let mut partial = node.admin().await;
    let reply = partial
        .command(&Command::Update {
            servers: vec!["be1".into()],
        })
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(reply.entries().len(), 1);

    writer
        .command(&activate("user.c", "be1!default", "c\tlrs\t"))
        .await
        .unwrap()
        .ok()
        .unwrap();
    writer
        .command(&activate("user.b", "be1!default", "b\tlrs\t"))
        .await
        .unwrap()
        .ok()
        .unwrap();
    writer
        .command(&Command::Delete {
            name: "user.a".into(),
        })
        .await
        .unwrap()
        .ok()
        .unwrap();
    writer
        .command(&reserve("user.d", "be2!default"))
        .await
        .unwrap()
        .ok()
        .unwrap();

    let mut pushes = Vec::new();
    for _ in 0..4 {
        pushes.push(
            tokio::time::timeout(Duration::from_secs(5), full.next_push())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let summary: Vec<String> = pushes
        .iter()
        .map(|l| match l {
            ServerLine::Mailbox { name, .. } => format!("M {name}"),
            ServerLine::Reserve { name, .. } => format!("R {name}"),
            ServerLine::Delete { name, .. } => format!("D {name}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(summary, ["M user.c", "M user.b", "D user.a", "R user.d"]);

    // The partial stream gets changes whose old or new server is be1, and a
    // NOOP answers only after every earlier change was pushed.
    let reply = partial.command(&Command::Noop).await.unwrap();
    assert_eq!(reply.status, Status::Ok);
    let names: Vec<String> = reply
        .lines
        .iter()
        .map(|l| match l {
            ServerLine::Mailbox { name, .. } | ServerLine::Delete { name, .. } => name.clone(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(names, ["user.c", "user.b", "user.a"]);
    let r = partial
        .command(&Command::Find {
            name: "user.c".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.text.as_str()),
        (Status::Bad, "not legal when streaming")
    );
}

fn tls_material(
    dir: &std::path::Path,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    rustls::pki_types::CertificateDer<'static>,
) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    (cert_path, key_path, cert.cert.der().clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_upgrades_then_authenticates() {
    let tls_dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = tls_material(tls_dir.path());
    let node = start_node(|c| {
        c.tls.cert = Some(cert);
        c.tls.key = Some(key);
    })
    .await;
    let mut c = Client::connect(&node.addr()).await.unwrap();
    assert!(c.starttls_offered());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.starttls(Arc::new(config), "localhost").await.unwrap();
    assert!(
        !c.starttls_offered(),
        "the greeting after TLS offers no STARTTLS"
    );
    c.authenticate_plain(ADMIN.0, ADMIN.1).await.unwrap();
    c.command(&reserve("user.tls", "be1!default"))
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert!(c.find("user.tls").await.unwrap().is_some());
    let r = c.command(&Command::Starttls).await.unwrap();
    assert_eq!(r.status, Status::Bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_without_tls_configured_says_no() {
    let node = start_node(|_| {}).await;
    let mut c = Client::connect(&node.addr()).await.unwrap();
    assert!(!c.starttls_offered());
    let r = c.command(&Command::Starttls).await.unwrap();
    assert_eq!(r.status, Status::No);
    // Still usable afterwards.
    c.authenticate_plain(ADMIN.0, ADMIN.1).await.unwrap();
}
