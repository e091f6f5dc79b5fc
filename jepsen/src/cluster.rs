//! The system under test: `corvid-registry` processes, each in its own
//! network namespace (see [`crate::netns`]), and the signals and membership
//! changes the nemesis applies to them.
//!
//! Master `n{i}` listens on `192.0.2.{10+i}` (MUPDATE 3905, peer 3906,
//! metrics 9905); replica `r{j}` on `192.0.2.{20+j}`. Fixed ports are safe
//! here: each namespace is made for the run and nothing else listens in it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::powerfs::PowerDisk;
use anyhow::{bail, Context};
use corvid_registry::mupdate::client::Client;
use corvid_registry::peer::{
    AdminRequest, AdminResponse, NodeStatus, PeerClient, PeerRequest, PeerResponse,
};

/// The administrator every node and replica accepts.
pub const ADMIN: (&str, &str) = ("admin", "jepsen-secret");

/// How to start the cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Directory with `corvid-registry` and `corvidctl`.
    pub bin_dir: PathBuf,
    /// Where node data and logs go.
    pub dir: PathBuf,
    /// Master nodes (3 or 5).
    pub nodes: usize,
    /// Replicas following them.
    pub replicas: usize,
    /// Test-only safety-breaking registry switches to start the masters
    /// with (`--unsafe-test-…`).
    pub unsafe_switches: Vec<String>,
    /// Start the masters with `--lease-reads` (leader reads from its lease).
    pub lease_reads: bool,
    /// Put each master's data directory on a [`PowerDisk`], so that the
    /// power-loss fault can drop what was never fsynced.
    pub power_disks: bool,
    /// The run namespace (each process runs in its node namespace, see
    /// [`crate::netns::node_namespace`]).
    pub run_ns: String,
    /// Raft `snapshot_after_entries` and `keep_log_entries`.
    pub snapshots: (u64, u64),
}

/// One registry process (master or replica) and how to reach it.
pub struct Process {
    /// `n1`… or `r1`….
    pub name: String,
    /// Its address (on its namespace's veth).
    pub ip: String,
    /// Its network namespace.
    pub netns: String,
    /// Raft node id (0 for replicas).
    pub id: u64,
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
    /// Stopped with SIGSTOP.
    pub paused: bool,
}

impl Process {
    /// A process not started yet, to run in namespace `netns`, logging to
    /// `dir/<name>.log`.
    fn new(
        dir: &Path,
        (name, ip, netns): (String, String, String),
        id: u64,
        args: Vec<String>,
    ) -> Process {
        Process {
            log: dir.join(format!("{name}.log")),
            name,
            ip,
            netns,
            id,
            child: None,
            args,
            paused: false,
        }
    }

    /// `ip:3905`.
    pub fn mupdate(&self) -> String {
        format!("{}:3905", self.ip)
    }

    /// `ip:3906`.
    pub fn peer(&self) -> String {
        format!("{}:3906", self.ip)
    }

    /// `ip:9905`.
    pub fn metrics(&self) -> String {
        format!("{}:9905", self.ip)
    }

    /// Whether the process is running (possibly paused).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    fn start(&mut self, bin: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        // `ip netns exec` execs the registry: the child's pid is the
        // registry's, so signals reach it directly.
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(bin.join("corvid-registry"))
            .args(&self.args)
            .env("CORVID_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("corvid-registry ready") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} did not become ready (see {})",
                self.name,
                self.log.display()
            );
        }
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused = false;
    }

    /// SIGSTOP.
    pub fn pause(&mut self) {
        self.signal("-STOP");
        self.paused = true;
    }

    /// SIGCONT.
    pub fn resume(&mut self) {
        self.signal("-CONT");
        self.paused = false;
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}

/// The running cluster.
pub struct Cluster {
    spec: ClusterSpec,
    /// Masters, `n1` first.
    pub nodes: Vec<Process>,
    /// Replicas.
    pub replicas: Vec<Process>,
    /// Node ids removed from the membership by the nemesis.
    pub removed: Vec<u64>,
    /// The masters' power-loss disks, by name (after the processes: they
    /// are unmounted once the processes are gone).
    disks: BTreeMap<String, PowerDisk>,
}

impl Cluster {
    /// Starts every process and forms the cluster.
    pub async fn start(spec: ClusterSpec) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(&spec.dir)?;
        let users = spec.dir.join("users.toml");
        let mut file = corvid_registry::auth::UserFile::load(&users)?;
        file.add(ADMIN.0, ADMIN.1, true)?;
        file.save(&users)?;
        let config = spec.dir.join("corvid.toml");
        // Short timeouts so that a run sees many faults and recoveries; a
        // snapshot every 2,000 entries so that catch-up by snapshot happens.
        // Clients come from the bridge's address, not loopback: PLAIN
        // without TLS must be allowed. Peers listen on 192.0.2.x without
        // mutual TLS, inside the run's namespaces only: say so explicitly.
        let (snapshot_after, keep_log) = spec.snapshots;
        std::fs::write(
            &config,
            format!(
                "[mupdate]\nfailed_auth_delay_ms = 0\nallow_plaintext = true\n\
                 [raft]\nallow_insecure_peer = true\nwrite_timeout_ms = 2000\n\
                 snapshot_after_entries = {snapshot_after}\nkeep_log_entries = {keep_log}\n\
                 [replica]\nsilence_timeout_ms = 2000\nleaderless_timeout_ms = 1500\nwrite_timeout_ms = 2000\n"
            ),
        )?;
        let common = |name: &str, ip: &str| -> Vec<String> {
            vec![
                "--config".into(),
                config.display().to_string(),
                "--users-file".into(),
                users.display().to_string(),
                "--data-dir".into(),
                spec.dir.join(name).display().to_string(),
                "--server-name".into(),
                name.into(),
                "--listen".into(),
                format!("{ip}:3905"),
                "--metrics-listen".into(),
                format!("{ip}:9905"),
            ]
        };
        let mut disks = BTreeMap::new();
        if spec.power_disks {
            for i in 1..=spec.nodes {
                let name = format!("n{i}");
                let disk = PowerDisk::mount(
                    &spec.dir.join("platters").join(&name),
                    &spec.dir.join(&name),
                )?;
                disks.insert(name, disk);
            }
        }
        let mut nodes = Vec::new();
        for i in 1..=spec.nodes {
            let name = format!("n{i}");
            let ip = crate::netns::master_ip(i);
            let netns = crate::netns::node_namespace(&spec.run_ns, &name);
            let mut args = common(&name, &ip);
            args.extend([
                "--node-id".into(),
                i.to_string(),
                "--no-bootstrap".into(),
                "--peer-listen".into(),
                format!("{ip}:3906"),
            ]);
            args.extend(spec.unsafe_switches.iter().cloned());
            if spec.lease_reads {
                args.push("--lease-reads".into());
            }
            nodes.push(Process::new(&spec.dir, (name, ip, netns), i as u64, args));
        }
        for n in &mut nodes {
            n.start(&spec.bin_dir)?;
        }
        let members = nodes.iter().map(|n| (n.id, n.peer())).collect();
        admin(&nodes[0].peer(), AdminRequest::Init { members })
            .await
            .context("initializing the cluster")?;
        let masters: Vec<String> = nodes.iter().map(Process::peer).collect();
        let mut replicas = Vec::new();
        for j in 1..=spec.replicas {
            let name = format!("r{j}");
            let ip = crate::netns::replica_ip(j);
            let netns = crate::netns::node_namespace(&spec.run_ns, &name);
            let mut args = common(&name, &ip);
            args.extend([
                "--role".into(),
                "replica".into(),
                "--masters".into(),
                masters.join(","),
            ]);
            replicas.push(Process::new(&spec.dir, (name, ip, netns), 0, args));
        }
        for r in &mut replicas {
            r.start(&spec.bin_dir)?;
        }
        let cluster = Cluster {
            spec,
            nodes,
            replicas,
            removed: Vec::new(),
            disks,
        };
        cluster
            .leader(Duration::from_secs(20))
            .await
            .context("no leader elected")?;
        Ok(cluster)
    }

    /// Restarts a killed process.
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let bin = self.spec.bin_dir.clone();
        let p = self
            .nodes
            .iter_mut()
            .chain(self.replicas.iter_mut())
            .find(|p| p.name == name)
            .context("no such process")?;
        if !p.running() {
            p.start(&bin)?;
        }
        Ok(())
    }

    /// Whether the masters' data directories can lose power.
    pub fn has_power_disks(&self) -> bool {
        !self.disks.is_empty()
    }

    /// The power cut on master `name`, which must already be killed: drops
    /// every write its disk never fsynced. Returns the files and bytes lost.
    pub fn power_cut(&mut self, name: &str) -> anyhow::Result<(usize, u64)> {
        let running = self.nodes.iter().any(|n| n.name == name && n.running());
        anyhow::ensure!(!running, "{name} must be down before its power cut");
        self.disks
            .get_mut(name)
            .with_context(|| format!("{name} has no power-loss disk"))?
            .power_cut()
    }

    /// Waits until every running master has applied what the leader had
    /// in its log when asked, so that the clients' first reads do not
    /// race the followers' start-up catch-up.
    pub async fn wait_caught_up(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let target = loop {
            let mut last = None;
            for n in &self.nodes {
                if let Some(s) = self.status(n).await {
                    if s.role == "Leader" {
                        last = Some(s.last_log_index);
                    }
                }
            }
            match last {
                Some(i) => break i,
                None if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                None => bail!("no leader to catch up with"),
            }
        };
        loop {
            let mut behind = Vec::new();
            for n in &self.nodes {
                match self.status(n).await {
                    Some(s) if s.applied_index >= target => {}
                    Some(s) => behind.push(format!("{} at {}", n.name, s.applied_index)),
                    None => behind.push(format!("{} unreachable", n.name)),
                }
            }
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "masters did not catch up with index {target}: {}",
                    behind.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The status of node `n` as it sees itself.
    pub async fn status(&self, n: &Process) -> Option<NodeStatus> {
        if !n.running() || n.paused {
            return None;
        }
        match admin(&n.peer(), AdminRequest::Status).await {
            Ok(AdminResponse::Status(s)) => Some(s),
            _ => None,
        }
    }

    /// The leader's id, once a running node says it leads.
    pub async fn leader(&self, within: Duration) -> Option<u64> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            for n in &self.nodes {
                if let Some(s) = self.status(n).await {
                    if s.role == "Leader" {
                        return Some(s.id);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// The master named by id.
    pub fn node(&self, id: u64) -> Option<&Process> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Ask the cluster (through any reachable node) to change membership.
    pub async fn membership(&self, request: AdminRequest) -> anyhow::Result<()> {
        let mut last = anyhow::anyhow!("no node reachable");
        for n in self.nodes.iter().filter(|n| n.running() && !n.paused) {
            match admin(&n.peer(), request.clone()).await {
                Ok(_) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// A logged-in MUPDATE connection to `addr`.
    pub async fn client(addr: &str, timeout: Duration) -> anyhow::Result<Client> {
        let connect = async {
            let mut c = Client::connect(addr).await?;
            c.authenticate_plain(ADMIN.0, ADMIN.1).await?;
            anyhow::Ok(c)
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| anyhow::anyhow!("connecting to {addr} timed out"))?
    }
}

/// One administration request to a node's peer port.
pub async fn admin(peer: &str, request: AdminRequest) -> anyhow::Result<AdminResponse> {
    let mut c = PeerClient::new(peer);
    match c
        .call(&PeerRequest::Admin(request), Duration::from_secs(10))
        .await?
    {
        PeerResponse::Admin(r) => Ok(r),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// Runs a system tool (`ip`, `iptables`); its standard error becomes the
/// error, with `hint` saying where the tool comes from.
pub fn system_tool(program: &str, args: &[&str], hint: &str) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} ({hint})"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {} ({hint})",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Every mailbox LIST shows on `addr`, by name.
pub async fn list_state(
    addr: &str,
) -> anyhow::Result<BTreeMap<String, Option<crate::history::Entry>>> {
    let mut c = Cluster::client(addr, Duration::from_secs(5)).await?;
    let entries = tokio::time::timeout(Duration::from_secs(10), c.list(None))
        .await
        .map_err(|_| anyhow::anyhow!("LIST on {addr} timed out"))??;
    Ok(entries
        .into_iter()
        .map(|e| {
            let entry = crate::history::Entry {
                location: e.location.clone(),
                acl: e.acl.clone(),
                active: e.state == corvid_registry::model::MailboxState::Active,
            };
            (e.name, Some(entry))
        })
        .collect())
}
