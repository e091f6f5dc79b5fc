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
use corvid_registry::peer::{
    AdminRequest, AdminResponse, NodeStatus, PeerClient, PeerRequest, PeerResponse,
};

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

/// The `corvid-registry` binary under test: cargo's, or the one in
/// `$CORVID_BIN_DIR` (a copy taken right after a build, when several work
/// trees share one target directory).
pub fn registry_bin() -> PathBuf {
    match std::env::var_os("CORVID_BIN_DIR") {
        Some(dir) => PathBuf::from(dir).join("corvid-registry"),
        None => PathBuf::from(env!("CARGO_BIN_EXE_corvid-registry")),
    }
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

/// Sends each "corvid-registry ready" line the daemon prints on `stdout`.
pub fn ready_lines(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("corvid-registry ready") {
                let _ = tx.send(line);
            }
        }
    });
    rx
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
                    .filter(|_| !extra.contains(&"--peer-listen") && !extra.contains(&"replica")),
            )
            .args(extra)
            .env(
                "CORVID_LOG",
                std::env::var("CORVID_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn corvid-registry");
        let rx = ready_lines(child.stdout.take().unwrap());
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("corvid-registry printed its ready line");
        Daemon::from_ready_line(&line, child)
    }

    /// The daemon `child` whose ready line is `line`
    /// (`corvid-registry ready mupdate=… metrics=… [peer=…]`).
    pub fn from_ready_line(line: &str, child: Child) -> Daemon {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_default()
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

/// Waits up to `limit` until the unlabelled metric `name` at `addr` is at
/// least `min`; whether it got there.
pub async fn metric_reaches(addr: &str, name: &str, min: f64, limit: Duration) -> bool {
    wait_for(limit, || async {
        metric(addr, name).await.filter(|&v| v >= min)
    })
    .await
    .is_some()
}

/// A port that is free now (the OS picks it; the node keeps it across restarts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One node's fixed identity: id, ports and data directory.
pub struct NodeSpec {
    pub id: u64,
    pub mupdate: String,
    pub peer: String,
    pub data: PathBuf,
}

pub struct TestCluster {
    /// Client side of mutual TLS on the peer port, when the cluster uses it.
    pub peer_tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    dir: tempfile::TempDir,
    config: PathBuf,
    users: PathBuf,
    specs: Vec<NodeSpec>,
    nodes: Vec<Option<Daemon>>,
}

impl TestCluster {
    /// Starts `n` nodes (not yet a cluster) with `raft_toml` appended to
    /// their `[raft]` section.
    pub fn start(n: u64, raft_toml: &str) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("corvid.toml");
        std::fs::write(
            &config,
            format!("[mupdate]\nfailed_auth_delay_ms = 10\n[raft]\nwrite_timeout_ms = 3000\n{raft_toml}\n"),
        )
        .unwrap();
        let users = dir.path().join("users.toml");
        write_users(&users);
        let mut c = TestCluster {
            peer_tls: None,
            config,
            users,
            specs: Vec::new(),
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..n {
            c.add_node();
        }
        c
    }

    /// Starts one more node, outside the cluster until it is added.
    pub fn add_node(&mut self) -> u64 {
        let id = self.specs.len() as u64 + 1;
        self.specs.push(NodeSpec {
            id,
            mupdate: format!("127.0.0.1:{}", free_port()),
            peer: format!("127.0.0.1:{}", free_port()),
            data: self.dir.path().join(format!("node{id}")),
        });
        self.nodes.push(None);
        self.restart(id);
        id
    }

    /// Starts one more node and adds it as a learner through node `via`.
    pub async fn add_learner(&mut self, via: u64) -> u64 {
        let new = self.add_node();
        self.make_learner(new, via).await;
        new
    }

    /// Adds the running node `id` as a learner through node `via`.
    pub async fn make_learner(&self, id: u64, via: u64) {
        let addr = self.spec(id).peer.clone();
        self.admin(via, AdminRequest::AddLearner { id, addr })
            .await
            .unwrap();
    }

    /// The credentials file every node reads (re-read when it changes).
    pub fn users_file(&self) -> &Path {
        &self.users
    }

    pub fn spec(&self, id: u64) -> &NodeSpec {
        &self.specs[(id - 1) as usize]
    }

    pub fn restart(&mut self, id: u64) {
        self.restart_with(id, &[]);
    }

    /// Restarts node `id` on its data and ports with `extra` flags added
    /// (e.g. a test-only switch for this run of the process only).
    pub fn restart_with(&mut self, id: u64, extra: &[&str]) {
        let s = self.spec(id);
        let id_s = s.id.to_string();
        let mut args = vec![
            "--config",
            self.config.to_str().unwrap(),
            "--users-file",
            self.users.to_str().unwrap(),
            "--node-id",
            &id_s,
            "--no-bootstrap",
            "--listen",
            &s.mupdate,
            "--peer-listen",
            &s.peer,
        ];
        args.extend_from_slice(extra);
        let d = Daemon::start(&s.data, &args);
        self.nodes[(id - 1) as usize] = Some(d);
    }

    /// Starts (or restarts, on the same data and MUPDATE port) the replica
    /// named `name`, following the nodes in `masters`.
    pub fn replica(&self, name: &str, masters: &[u64], mupdate: &str) -> Daemon {
        let masters: Vec<&str> = masters
            .iter()
            .map(|&id| self.spec(id).peer.as_str())
            .collect();
        Daemon::start(
            &self.dir.path().join(name),
            &[
                "--config",
                self.config.to_str().unwrap(),
                "--users-file",
                self.users.to_str().unwrap(),
                "--role",
                "replica",
                "--masters",
                &masters.join(","),
                "--listen",
                mupdate,
            ],
        )
    }

    pub fn kill(&mut self, id: u64) {
        if let Some(d) = self.nodes[(id - 1) as usize].take() {
            d.kill9();
        }
    }

    pub fn daemon(&self, id: u64) -> &Daemon {
        self.nodes[(id - 1) as usize]
            .as_ref()
            .expect("node is running")
    }

    pub async fn admin(&self, id: u64, request: AdminRequest) -> Result<AdminResponse, String> {
        let mut c = PeerClient::with_tls(self.spec(id).peer.clone(), self.peer_tls.clone());
        match c
            .call(&PeerRequest::Admin(request), Duration::from_secs(60))
            .await
        {
            Ok(PeerResponse::Admin(r)) => Ok(r),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    pub async fn status(&self, id: u64) -> Option<NodeStatus> {
        match self.admin(id, AdminRequest::Status).await {
            Ok(AdminResponse::Status(s)) => Some(s),
            _ => None,
        }
    }

    /// Initializes nodes `1..=n` as the voters.
    pub async fn init(&self, n: u64) {
        let members = (1..=n).map(|id| (id, self.spec(id).peer.clone())).collect();
        self.admin(1, AdminRequest::Init { members }).await.unwrap();
    }

    /// The leader as seen by `from`, once one is elected.
    /// The leader of the nodes in `from`, once every running one of them
    /// agrees on it and it says it leads (a restarted node may briefly
    /// believe in an old leader).
    pub async fn leader(&self, from: &[u64]) -> u64 {
        wait_for(Duration::from_secs(15), || async {
            let mut agreed = None;
            for &id in from {
                let s = self.status(id).await?;
                let l = s.leader?;
                if *agreed.get_or_insert(l) != l {
                    return None;
                }
            }
            let l = agreed?;
            (from.contains(&l) && self.status(l).await?.role == "Leader").then_some(l)
        })
        .await
        .expect("a leader is elected")
    }

    pub async fn client(&self, id: u64) -> Client {
        let mut c = Client::connect(&self.spec(id).mupdate).await.unwrap();
        c.authenticate_plain(ADMIN.0, ADMIN.1).await.unwrap();
        c
    }
}

/// ACTIVATEs `name` at `be1!default`; panics unless the server says OK.
pub async fn activate(c: &mut Client, name: &str) {
    c.command(&corvid_registry::mupdate::codec::Command::Activate {
        name: name.into(),
        location: "be1!default".into(),
        acl: "anyone\tlrs\t".into(),
    })
    .await
    .unwrap()
    .ok()
    .unwrap();
}

/// Every mailbox name the server lists.
pub async fn names(c: &mut Client) -> std::collections::BTreeSet<String> {
    c.list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect()
}
