//! Shared set-up for integration tests: nodes with their own temporary data
//! directory, listening on ports chosen by the OS on 127.0.0.1.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::Duration;

use corvid_registry::auth::UserFile;
use corvid_registry::config::Config;
use corvid_registry::daemon::{self, Running};
use corvid_registry::mupdate::client::Client;

/// Administrator created in every test node.
pub const ADMIN: (&str, &str) = ("admin", "admin-secret");
/// A non-admin user.
pub const READER: (&str, &str) = ("reader", "reader-secret");

/// An in-process node and its temporary directory.
pub struct TestNode {
    pub running: Running,
    pub dir: tempfile::TempDir,
}

impl TestNode {
    pub fn addr(&self) -> String {
        self.running.mupdate_addr.to_string()
    }

    pub async fn admin(&self) -> Client {
        let mut c = Client::connect(&self.addr()).await.expect("connect");
        c.authenticate_plain(ADMIN.0, ADMIN.1)
            .await
            .expect("admin login");
        c
    }
}

/// Writes a users file with ADMIN and READER.
pub fn write_users(path: &Path) {
    let mut users = UserFile::load(path).unwrap();
    users.add(ADMIN.0, ADMIN.1, true).unwrap();
    users.add(READER.0, READER.1, false).unwrap();
    users.save(path).unwrap();
}

/// A test configuration for a node in `dir`.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.node.data_dir = dir.join("data");
    c.node.server_name = "corvid-test".into();
    c.mupdate.listen = "127.0.0.1:0".parse().unwrap();
    c.metrics.listen = "127.0.0.1:0".parse().unwrap();
    c.raft.peer_listen = "127.0.0.1:0".parse().unwrap();
    c.mupdate.failed_auth_delay_ms = 10;
    c.auth.users_file = Some(dir.join("users.toml"));
    c
}

/// Starts a node with `tweak` applied to the test configuration.
pub async fn start_node(tweak: impl FnOnce(&mut Config)) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    write_users(&config.users_file());
    tweak(&mut config);
    let running = daemon::start(&config).await.expect("node starts");
    TestNode { running, dir }
}

/// Path of the `corvid-registry` binary built with the tests.
pub fn registry_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_corvid-registry"))
}

/// Polls `f` until it returns `Some`, for at most `limit`.
pub async fn wait_for<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running `corvid-registry` child process.
pub struct Daemon {
    pub child: Child,
    pub mupdate: String,
    pub metrics: String,
    pub peer: String,
}

impl Daemon {
    /// Starts the binary on `data` with OS-chosen ports and waits for its
    /// "ready" line.
    pub fn start(data: &Path, extra: &[&str]) -> Daemon {
        let mut child = Process::new(registry_bin())
            .args(["--data-dir", data.to_str().unwrap()])
            .args(["--metrics-listen", "127.0.0.1:0"])
            // Ports from the OS unless the caller fixes them.
            .args(
                ["--listen", "127.0.0.1:0"]
                    .iter()
                    .filter(|_| !extra.contains(&"--listen")),
            )
            .args(
                ["--peer-listen", "127.0.0.1:0"]
                    .iter()
                    .filter(|_| !extra.contains(&"--peer-listen")),
            )
            .args(extra)
            .env("CORVID_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn corvid-registry");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("corvid-registry ready") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("corvid-registry printed its ready line");
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap()
                .to_string()
        };
        Daemon {
            mupdate: field("mupdate="),
            metrics: field("metrics="),
            peer: field("peer="),
            child,
        }
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of an unlabelled metric.
pub async fn metric(addr: &str, name: &str) -> Option<f64> {
    let text = http_get(addr, "/metrics").await;
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
}
