//! `corvidctl bench`: a MUPDATE load generator for Corvid or Cyrus.
//!
//! C connections each keep one command in flight, as Cyrus clients do. Every
//! operation's latency is recorded; the report gives throughput and
//! p50/p99/max as a table and, with `--json`, as one JSON object per run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use corvid_registry::mupdate::client::{Client, ClientError};
use corvid_registry::mupdate::codec::{Command, Status};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::conn::ConnectArgs;
use crate::probe;

/// What each operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// RESERVE then ACTIVATE a new name (a mailbox creation: two writes).
    ReserveActivate,
    /// ACTIVATE a new name (one write, as `ctl_mboxlist -m` pushes a
    /// backend's list); also the fastest way to load a registry.
    Activate,
    /// FIND a name created by an earlier reserve-activate run.
    Find,
    /// DELETE a name created by an earlier reserve-activate run.
    Delete,
    /// 70% FIND, 20% create, 10% ACTIVATE (ACL change). No DELETE: a Cyrus
    /// master crashes on DELETE of a name that is already gone.
    Mix,
    /// What Cyrus backends do: a new connection per creation (greeting,
    /// AUTHENTICATE PLAIN, RESERVE, ACTIVATE, LOGOUT).
    Backend,
    /// What a Cyrus mupdate slave does when it (re)connects: a new
    /// connection, UPDATE, and the whole list read until the OK. The
    /// latency is the time of the dump; the report counts the entries.
    UpdateDump,
}

/// Options of `corvidctl bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// The operation to repeat.
    #[arg(long, value_enum, default_value = "reserve-activate")]
    workload: Workload,
    /// Concurrent connections.
    #[arg(long, short = 'C', default_value_t = 32)]
    connections: usize,
    /// Operations in all.
    #[arg(long, short = 'n', default_value_t = 20_000)]
    ops: u64,
    /// Stop after this many seconds even if operations remain.
    #[arg(long, default_value_t = 120)]
    max_seconds: u64,
    /// Mailbox names are PREFIX.N; use the same prefix for find/delete runs
    /// as for the reserve-activate run that created the names.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Names that exist for find/mix (default: --ops).
    #[arg(long)]
    keyspace: Option<u64>,
    /// Location of created mailboxes.
    #[arg(long, default_value = "bench!default")]
    location: String,
    /// A process of the server under test (repeat for several): its user
    /// and system CPU time from /proc is read before and after the run and
    /// reported per operation.
    #[arg(long)]
    server_pid: Vec<u32>,
    /// Metrics address (host:port) of the Corvid node under test: its WAL
    /// counters are read before and after the run (entries per fsync).
    #[arg(long)]
    metrics: Option<String>,
    #[command(flatten)]
    report: ReportArgs,
}

/// How a measurement reports itself (shared by `bench` and `propagation`).
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Label of this run in the report.
    #[arg(long)]
    pub label: Option<String>,
    /// Append the result as one JSON line to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// One run's figures.
#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub label: String,
    pub server: String,
    pub workload: String,
    pub connections: usize,
    pub ops: u64,
    pub writes: u64,
    pub errors: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub writes_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Workload-specific count: mailboxes received per UPDATE dump; for
    /// propagation, changes visible before the master's OK arrived.
    pub entries: u64,
    /// Server CPU per operation in microseconds (with `--server-pid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_user_us_per_op: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_sys_us_per_op: Option<f64>,
    /// Log entries made durable and WAL fsyncs during the run (with
    /// `--metrics`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_entries: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wal_fsyncs: Option<u64>,
}

/// What a run reads from the server before and after: CPU ticks (user,
/// system) summed over `--server-pid`, and the WAL counters.
#[derive(Debug, Default, Clone, Copy)]
struct ServerSample {
    user_ticks: u64,
    sys_ticks: u64,
    log_entries: f64,
    wal_fsyncs: f64,
}

impl ServerSample {
    async fn take(args: &BenchArgs) -> anyhow::Result<ServerSample> {
        let mut s = ServerSample::default();
        for pid in &args.server_pid {
            let t = probe::proc_times(&pid.to_string())
                .with_context(|| format!("no process {pid} to measure"))?;
            s.user_ticks += t.user_ticks;
            s.sys_ticks += t.sys_ticks;
        }
        if let Some(addr) = &args.metrics {
            let text = probe::fetch_metrics(addr).await?;
            s.log_entries = probe::metric_sum(&text, "corvid_raft_log_entries_appended_total");
            s.wal_fsyncs = probe::metric_sum(&text, "corvid_disk_wal_fsync_duration_seconds_count");
        }
        Ok(s)
    }
}

/// Latency percentiles of microsecond samples.
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// Percentiles of `micros` (in any order).
    pub fn of(mut micros: Vec<u32>) -> Percentiles {
        micros.sort_unstable();
        let pct = |p: f64| -> f64 {
            if micros.is_empty() {
                return 0.0;
            }
            let i = ((micros.len() as f64 * p).ceil() as usize).clamp(1, micros.len()) - 1;
            f64::from(micros[i]) / 1000.0
        };
        Percentiles {
            count: micros.len() as u64,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            max_ms: micros.last().map_or(0.0, |&m| f64::from(m) / 1000.0),
        }
    }
}

/// Prints `result` as a table row and a JSON line, and appends the JSON
/// line to `json` if given.
pub fn write_result(result: &BenchResult, json: Option<&std::path::Path>) -> anyhow::Result<()> {
    println!(
        "{:<24} {:<17} {:>5} {:>8} {:>7} {:>10} {:>10} {:>8} {:>8} {:>8}",
        "label",
        "workload",
        "conns",
        "ops",
        "errors",
        "ops/s",
        "writes/s",
        "p50 ms",
        "p99 ms",
        "max ms"
    );
    println!(
        "{:<24} {:<17} {:>5} {:>8} {:>7} {:>10.0} {:>10.0} {:>8.2} {:>8.2} {:>8.2}",
        result.label,
        result.workload,
        result.connections,
        result.ops,
        result.errors,
        result.ops_per_sec,
        result.writes_per_sec,
        result.p50_ms,
        result.p99_ms,
        result.max_ms
    );
    if let (Some(user), Some(sys)) = (result.server_user_us_per_op, result.server_sys_us_per_op) {
        println!("server CPU per operation: {user:.1} µs user + {sys:.1} µs system");
    }
    if let (Some(entries), Some(fsyncs)) = (result.log_entries, result.wal_fsyncs) {
        println!(
            "WAL: {entries} log entries in {fsyncs} fsyncs ({:.1} per fsync)",
            entries as f64 / fsyncs.max(1) as f64
        );
    }
    let line = serde_json::to_string(result)?;
    println!("{line}");
    if let Some(path) = json {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}

struct Shared {
    args: BenchArgs,
    next: AtomicU64,
    errors: AtomicU64,
    writes: AtomicU64,
    entries: AtomicU64,
    deadline: Instant,
    progress: ProgressBar,
    /// Every worker with its connection open (or failed) and the caller.
    connected: tokio::sync::Barrier,
    /// Set once the clock and the server's CPU sample started.
    go: tokio::sync::watch::Sender<bool>,
}

/// Runs the benchmark and prints its report.
pub async fn run(mut args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.connections > 0, "--connections must be positive");
    if !args.conn.no_auth {
        // Resolve the credentials once, not per connection.
        let (user, password) = args.conn.credentials()?;
        args.conn.user = Some(user);
        args.conn.password = Some(password);
    }
    let progress = if args.report.quiet {
        ProgressBar::hidden()
    } else {
        let p = ProgressBar::new(args.ops);
        p.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        p.set_message(format!("{:?}", args.workload));
        p
    };
    // Check the credentials once before starting the clock.
    args.conn.connect().await?.logout().await.ok();
    let shared = Arc::new(Shared {
        deadline: Instant::now() + Duration::from_secs(args.max_seconds),
        connected: tokio::sync::Barrier::new(args.connections + 1),
        go: tokio::sync::watch::Sender::new(false),
        args,
        next: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        writes: AtomicU64::new(0),
        entries: AtomicU64::new(0),
        progress,
    });
    let mut tasks = Vec::new();
    for _ in 0..shared.args.connections {
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move { worker(shared).await }));
    }
    // The connections (and their logins, a password hash each on the
    // server) are made before the clock starts: the figures are those of
    // the workload, not of 32 logins (the backend workload, which logs in
    // per operation, still counts them).
    shared.connected.wait().await;
    let before = ServerSample::take(&shared.args).await?;
    let started = Instant::now();
    shared.go.send_replace(true);
    let mut latencies: Vec<u32> = Vec::new();
    for t in tasks {
        latencies.extend(t.await.context("worker panicked")??);
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = ServerSample::take(&shared.args).await?;
    shared.progress.finish_and_clear();
    let p = Percentiles::of(latencies);
    let args = &shared.args;
    let per_op_us = |ticks: u64| {
        (!args.server_pid.is_empty())
            .then(|| ticks as f64 / probe::TICKS_PER_SEC * 1e6 / p.count.max(1) as f64)
    };
    let counted = |v: f64| args.metrics.is_some().then_some(v.max(0.0) as u64);
    let writes = shared.writes.load(Ordering::Relaxed);
    let workload = args
        .workload
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_owned());
    let result = BenchResult {
        label: args
            .report
            .label
            .clone()
            .unwrap_or_else(|| args.conn.server.clone()),
        server: args.conn.server.clone(),
        workload,
        connections: args.connections,
        ops: p.count,
        writes,
        errors: shared.errors.load(Ordering::Relaxed),
        seconds,
        ops_per_sec: p.count as f64 / seconds,
        writes_per_sec: writes as f64 / seconds,
        p50_ms: p.p50_ms,
        p99_ms: p.p99_ms,
        max_ms: p.max_ms,
        entries: shared.entries.load(Ordering::Relaxed) / p.count.max(1),
        server_user_us_per_op: per_op_us(after.user_ticks.saturating_sub(before.user_ticks)),
        server_sys_us_per_op: per_op_us(after.sys_ticks.saturating_sub(before.sys_ticks)),
        log_entries: counted(after.log_entries - before.log_entries),
        wal_fsyncs: counted(after.wal_fsyncs - before.wal_fsyncs),
    };
    write_result(&result, args.report.json.as_deref())
}

impl Shared {
    /// Claims the next operation number, or `None` when done.
    fn claim(&self) -> Option<u64> {
        if Instant::now() >= self.deadline {
            return None;
        }
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        (k < self.args.ops).then_some(k)
    }

    fn name(&self, k: u64) -> String {
        format!("{}.{k}", self.args.prefix)
    }

    fn existing(&self, rng: &mut impl Rng) -> String {
        let space = self.args.keyspace.unwrap_or(self.args.ops).max(1);
        self.name(rng.gen_range(0..space))
    }
}

async fn worker(shared: Arc<Shared>) -> anyhow::Result<Vec<u32>> {
    let mut latencies = Vec::new();
    let per_op_connection = matches!(
        shared.args.workload,
        Workload::Backend | Workload::UpdateDump
    );
    let client = if per_op_connection {
        None
    } else {
        Some(shared.args.conn.connect().await)
    };
    // Reached even by a worker whose connection failed, so that the others
    // do not wait for it forever.
    shared.connected.wait().await;
    let mut client = client.transpose()?;
    shared
        .go
        .subscribe()
        .wait_for(|go| *go)
        .await
        .context("the benchmark stopped before it started")?;
    let mut rng = rand::rngs::StdRng::from_entropy();
    let acl = "anyone\tlrs\t".to_string();
    while let Some(k) = shared.claim() {
        let started = Instant::now();
        let commands: Vec<Command> = match shared.args.workload {
            Workload::ReserveActivate | Workload::Backend => create(&shared, k, &acl),
            Workload::UpdateDump => vec![Command::Update { servers: vec![] }],
            Workload::Activate => vec![Command::Activate {
                name: shared.name(k),
                location: shared.args.location.clone(),
                acl: acl.clone(),
            }],
            Workload::Find => vec![Command::Find {
                name: shared.existing(&mut rng),
            }],
            Workload::Delete => vec![Command::Delete {
                name: shared.name(k),
            }],
            Workload::Mix => match rng.gen_range(0..10) {
                0 => create(
                    &shared,
                    shared.args.keyspace.unwrap_or(shared.args.ops) + k,
                    &acl,
                ),
                1 => vec![Command::Activate {
                    name: shared.existing(&mut rng),
                    location: shared.args.location.clone(),
                    acl: format!("anyone\tlrs\tu{k}\tlr\t"),
                }],
                2 => create(
                    &shared,
                    shared.args.keyspace.unwrap_or(shared.args.ops) + k,
                    &acl,
                ),
                _ => vec![Command::Find {
                    name: shared.existing(&mut rng),
                }],
            },
        };
        let writes = commands
            .iter()
            .filter(|c| !matches!(c, Command::Find { .. } | Command::Update { .. }))
            .count() as u64;
        let ok = match &mut client {
            Some(c) => run_commands(c, &commands).await?,
            None if shared.args.workload == Workload::UpdateDump => {
                let entries = update_dump(&shared.args.conn).await?;
                shared.entries.fetch_add(entries, Ordering::Relaxed);
                true
            }
            None => backend_op(&shared.args.conn, &commands).await?,
        };
        if !ok {
            shared.errors.fetch_add(1, Ordering::Relaxed);
        }
        shared.writes.fetch_add(writes, Ordering::Relaxed);
        latencies.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        shared.progress.inc(1);
    }
    if let Some(c) = client {
        c.logout().await.ok();
    }
    Ok(latencies)
}

fn create(shared: &Shared, k: u64, acl: &str) -> Vec<Command> {
    let name = shared.name(k);
    vec![
        Command::Reserve {
            name: name.clone(),
            location: shared.args.location.clone(),
        },
        Command::Activate {
            name,
            location: shared.args.location.clone(),
            acl: acl.to_owned(),
        },
    ]
}

/// Runs commands one at a time; `Ok(false)` if any was refused.
async fn run_commands(client: &mut Client, commands: &[Command]) -> Result<bool, ClientError> {
    let mut ok = true;
    for c in commands {
        let reply = client.command(c).await?;
        ok &= reply.status == Status::Ok;
    }
    Ok(ok)
}

/// One operation the way a Cyrus backend performs it: its own connection.
async fn backend_op(conn: &ConnectArgs, commands: &[Command]) -> anyhow::Result<bool> {
    let mut c = conn.connect().await?;
    let ok = run_commands(&mut c, commands).await?;
    // Cyrus's client sends LOGOUT and closes without waiting for the answer.
    c.send(&Command::Logout);
    c.flush().await.ok();
    Ok(ok)
}

/// One UPDATE dump on a new connection, as a (re)connecting Cyrus slave
/// takes it: the number of entries received before the OK.
async fn update_dump(conn: &ConnectArgs) -> anyhow::Result<u64> {
    let mut c = conn.connect().await?;
    let tag = c.send(&Command::Update { servers: vec![] });
    c.flush().await?;
    let reply = c.receive(&tag).await?;
    anyhow::ensure!(reply.status == Status::Ok, "UPDATE: {}", reply.text);
    // The connection is streaming now; a slave would stay. Just close.
    Ok(reply.lines.len() as u64)
}
