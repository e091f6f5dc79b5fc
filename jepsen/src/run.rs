//! One harness run: the private network namespace, the cluster, clients
//! and nemesis for a bounded time, healing, final reads, the checker and
//! the report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::checker::{self, Anomaly};
use crate::cluster::{list_state, Cluster, ClusterSpec};
use crate::evidence;
use crate::history::{Entry, Record};
use crate::monitor::Monitor;
use crate::nemesis::{Fault, Nemesis};
use crate::netns::{self, RunNetwork};
use crate::report;
use crate::workload::{self, ClientPlan, ClientSettings, Recorder, Targets, Workload};

/// The monitor's samples inside a run directory (JSON lines).
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Environment variable naming the namespace a re-executed harness runs in.
pub const NETNS_ENV: &str = "CORVID_JEPSEN_NETNS";

/// Options of one run.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Master nodes (3 or 5).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Replicas following them.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Seconds of load and faults (healing and final reads come after).
    #[arg(long, default_value_t = 60)]
    pub time_limit: u64,
    /// Clients per workload.
    #[arg(long, default_value_t = 5)]
    pub concurrency: u64,
    /// Names in the registry workload (few, so that conflicts are frequent).
    #[arg(long, default_value_t = 6)]
    pub mailboxes: usize,
    /// Workloads, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "registry,ownership,replicas"
    )]
    pub workload: Vec<Workload>,
    /// Faults, comma-separated; `none` for none.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "partition,kill,pause,membership"
    )]
    pub nemesis: Vec<Fault>,
    /// Raft snapshot every this many entries (small values make followers
    /// and replicas catch up by snapshot, and purge entries that a retried
    /// write may have reached).
    #[arg(long, default_value_t = 2000)]
    pub snapshot_after: u64,
    /// Log entries kept behind a snapshot.
    #[arg(long, default_value_t = 500)]
    pub keep_log: u64,
    /// Seconds between faults (each then holds 2–5 s).
    #[arg(long, default_value_t = 3)]
    pub nemesis_interval: u64,
    /// Where the run's directory goes (a new directory per run inside).
    #[arg(long, default_value = "jepsen/runs")]
    pub out: PathBuf,
    /// Directory with corvid-registry.
    #[arg(long, env = "CORVID_BIN_DIR")]
    pub bin_dir: PathBuf,
    /// Random seed (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Start the masters with `--lease-reads`: the leader answers read
    /// indexes from its lease (safe under pauses and partitions, given
    /// clocks that run at the same rate).
    #[arg(long)]
    pub lease_reads: bool,
    /// TEST ONLY: start the masters with `--unsafe-test-stale-reads`
    /// (every node reads its own state). Partitions catch it.
    #[arg(long)]
    pub unsafe_stale_reads: bool,
    /// TEST ONLY: start the masters with
    /// `--unsafe-test-leader-local-reads` (the leader reads its own state
    /// without confirming it still leads). A partition that cuts the
    /// leader off catches it.
    #[arg(long)]
    pub unsafe_leader_local_reads: bool,
    /// TEST ONLY: start the masters with `--unsafe-test-ack-before-fsync`
    /// (log appends acknowledged without a WAL fsync). The power-loss
    /// fault catches it.
    #[arg(long)]
    pub unsafe_ack_before_fsync: bool,
    /// Put the masters' data on power-loss disks even without the
    /// power-loss fault (implied by `--nemesis power-loss`), so that a run
    /// without it differs from one with it only by the fault.
    #[arg(long)]
    pub power_disks: bool,
    /// Succeed only if the checker finds an anomaly (to prove it is not
    /// vacuous, with an unsafe switch and its fault).
    #[arg(long, conflicts_with = "expect_valid")]
    pub expect_anomaly: bool,
    /// Succeed only if the checker finds nothing (the default; spelled out
    /// for an unsafe switch run without its fault).
    #[arg(long)]
    pub expect_valid: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// The verdict file of a run.
#[derive(Debug, Serialize)]
pub struct RunVerdict {
    /// No anomaly and nothing unknown.
    pub valid: bool,
    /// Seed, for reproduction.
    pub seed: u64,
    /// Client operations completed.
    pub operations: usize,
    /// Mailboxes checked for linearizability.
    pub checked_mailboxes: usize,
    /// Mailboxes whose search ran out of budget.
    pub unknown: Vec<String>,
    /// Everything that went wrong.
    pub anomalies: Vec<Anomaly>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, usize>,
    /// Faults that showed no effect ("nemesis had no effect: …"); any
    /// fails the run.
    pub nemesis_problems: Vec<String>,
}

/// Runs the harness: outside a namespace, makes the run's namespaces and
/// re-executes itself inside the run namespace; inside, runs the test.
/// Returns whether the run met expectations.
pub async fn run(args: RunArgs) -> anyhow::Result<bool> {
    if args.nodes == 0 || args.nodes > netns::MAX_PER_KIND || args.replicas > netns::MAX_PER_KIND {
        bail!(
            "--nodes must be 1 to {0} and --replicas at most {0}",
            netns::MAX_PER_KIND
        );
    }
    match std::env::var(NETNS_ENV) {
        Ok(ns) => run_inside(args, ns).await,
        Err(_) => run_in_new_namespaces(&args).await,
    }
}

impl RunArgs {
    /// The registry flags of the unsafe switches asked for.
    pub fn unsafe_switches(&self) -> Vec<String> {
        [
            (self.unsafe_stale_reads, "--unsafe-test-stale-reads"),
            (
                self.unsafe_leader_local_reads,
                "--unsafe-test-leader-local-reads",
            ),
            (
                self.unsafe_ack_before_fsync,
                "--unsafe-test-ack-before-fsync",
            ),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, flag)| flag.to_owned())
        .collect()
    }

    /// Replicas started: none unless the replicas workload runs.
    pub fn replica_count(&self) -> usize {
        if self.workload.contains(&Workload::Replicas) {
            self.replicas
        } else {
            0
        }
    }
}

/// Makes the run's namespaces (see [`netns`]), runs this same command
/// inside the run namespace, and removes every namespace whatever happens:
/// the run ending, failing, or being interrupted (Ctrl-C, SIGTERM).
async fn run_in_new_namespaces(args: &RunArgs) -> anyhow::Result<bool> {
    let id = std::process::id().to_string();
    let processes = netns::processes(args.nodes, args.replica_count());
    let mut network = RunNetwork::create(&id, &processes)?;
    let result = run_child_in(&network.run_ns).await;
    // Deleting the namespaces also drops every veth, the bridge and every
    // iptables rule made in them.
    let deleted = network.delete();
    let ok = result?;
    deleted?;
    Ok(ok)
}

async fn run_child_in(ns: &str) -> anyhow::Result<bool> {
    let mut child = tokio::process::Command::new("ip");
    child
        .args(["netns", "exec", ns])
        .arg(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .env(NETNS_ENV, ns)
        // Its own process group: on the way out every process of the run
        // (the harness and the registry nodes) goes with it.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = child.spawn().context("re-executing inside the namespace")?;
    let group = format!("-{}", child.id().context("child pid")?);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let status = tokio::select! {
        s = child.wait() => Some(s?),
        _ = tokio::signal::ctrl_c() => None,
        _ = term.recv() => None,
    };
    if status.is_none() {
        eprintln!("corvid-jepsen: interrupted; stopping the run and removing its namespaces");
        let _ = Command::new("kill")
            .args(["-INT", "--", &group])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    }
    // Whatever is left of the group (nothing, after a clean end).
    let _ = Command::new("kill")
        .args(["-KILL", "--", &group])
        .stderr(std::process::Stdio::null())
        .status();
    let _ = child.wait().await;
    Ok(status.is_some_and(|s| s.success()))
}

async fn run_inside(mut args: RunArgs, run_ns: String) -> anyhow::Result<bool> {
    args.nemesis.retain(|f| *f != Fault::None);
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dir = args.out.join(format!("run-{stamp}-{seed:016x}"));
    std::fs::create_dir_all(&dir)?;
    eprintln!("corvid-jepsen: run directory {}", dir.display());
    let mut cluster = Cluster::start(ClusterSpec {
        bin_dir: args.bin_dir.clone(),
        dir: dir.join("nodes"),
        nodes: args.nodes,
        replicas: args.replica_count(),
        run_ns,
        snapshots: (args.snapshot_after, args.keep_log),
        unsafe_switches: args.unsafe_switches(),
        lease_reads: args.lease_reads,
        power_disks: args.power_disks || args.nemesis.contains(&Fault::PowerLoss),
    })
    .await?;
    // The first read waits for every master to apply the set-up: an unsafe
    // read switch must be caught by a fault, not by start-up lag.
    cluster
        .wait_caught_up(Duration::from_secs(20))
        .await
        .context("waiting for the masters to catch up before the first operation")?;
    let started = Instant::now();
    let recorder = Recorder::new(started);
    let mut nemesis = Nemesis::new(started);
    let monitor = Monitor::spawn(
        cluster
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.metrics()))
            .collect(),
        started,
        // A bound, whatever happens: the run, healing and some slack.
        Instant::now() + Duration::from_secs(args.time_limit + 120),
    );
    let outcome = exercise(&args, seed, &mut cluster, &recorder, &mut nemesis).await;
    // Heal whatever the outcome, before anything else.
    nemesis.heal_all(&mut cluster).await;
    outcome?;
    let finals = final_states(&cluster, &args).await;
    // The monitor also saw the recovery.
    let samples = monitor.finish().await;
    let events = recorder.events();
    let mut records: Vec<Record> = events.iter().cloned().map(Record::Client).collect();
    records.extend(nemesis.events.iter().cloned().map(Record::Nemesis));
    records.sort_by_key(|r| match r {
        Record::Client(e) => e.time_ns,
        Record::Nemesis(e) => e.time_ns,
    });
    report::write_history(&dir, &records)?;
    report::write_jsonl(&dir.join(METRICS_FILE), &samples)?;
    let windows = evidence::analyse(&events, &nemesis.events, &samples);
    let table = evidence::table(&windows);
    std::fs::write(dir.join("faults.md"), &table)?;
    std::fs::write(
        dir.join("faults.json"),
        serde_json::to_string_pretty(&windows)?,
    )?;
    // Whatever happened to the final reads, the history and the fault
    // table are on disk.
    let (masters, replicas) = finals?;
    // The final read of every key, so that `check DIR` finds a lost write
    // that no client read again.
    std::fs::write(
        dir.join(FINAL_STATES_FILE),
        serde_json::to_string_pretty(&SavedFinals {
            masters: Some(masters.clone()),
            replicas: replicas.clone(),
        })?,
    )?;

    let checked = checker::check_all(
        &events,
        &checker::FinalStates {
            masters: Some(masters),
            replicas,
        },
    );
    let mut nemesis_problems = evidence::problems(&windows);
    nemesis_problems.extend(nemesis.problems.iter().cloned());
    let mut faults = BTreeMap::new();
    for e in nemesis.events.iter().filter(|e| e.phase == "start") {
        *faults.entry(e.fault.clone()).or_insert(0) += 1;
    }
    let verdict = RunVerdict {
        valid: checked.valid,
        seed,
        operations: events
            .iter()
            .filter(|e| e.kind != crate::history::EventType::Invoke)
            .count(),
        checked_mailboxes: checked.checked_mailboxes,
        unknown: checked.unknown,
        anomalies: checked.anomalies,
        faults,
        nemesis_problems,
    };
    std::fs::write(
        dir.join("verdict.json"),
        serde_json::to_string_pretty(&verdict)?,
    )?;
    report::plot_latency(&dir.join("latency.svg"), &events, &nemesis.events)?;
    report::plot_throughput(&dir.join("throughput.svg"), &events, &nemesis.events)?;
    report::plot_terms(&dir.join("terms.svg"), &samples, &nemesis.events)?;
    if !windows.is_empty() {
        println!("fault windows (also in faults.md):\n{table}");
    }
    println!(
        "{}",
        report::summary(
            &events,
            &nemesis.events,
            verdict.valid,
            verdict.anomalies.len()
        )
    );
    print_anomalies(&verdict.anomalies, 10);
    for p in &verdict.nemesis_problems {
        println!("FAILED: {p}");
    }
    println!("run directory: {}", dir.display());
    if args.expect_anomaly {
        println!(
            "{}",
            if verdict.valid {
                "FAILED: --expect-anomaly, but the checker found nothing"
            } else {
                "as expected (--expect-anomaly): the anomalies above were found, so the checker is not vacuous"
            }
        );
    }
    if args.expect_valid {
        println!(
            "{}",
            if verdict.valid {
                "as expected (--expect-valid): no anomaly"
            } else {
                "FAILED: --expect-valid, but the checker found anomalies"
            }
        );
    }
    // A fault without effect fails the run either way: it tested nothing.
    let effective = verdict.nemesis_problems.is_empty();
    Ok(effective
        && if args.expect_anomaly {
            !verdict.valid
        } else {
            verdict.valid
        })
}

/// Clients and nemesis until the time limit.
async fn exercise(
    args: &RunArgs,
    seed: u64,
    cluster: &mut Cluster,
    recorder: &Recorder,
    nemesis: &mut Nemesis,
) -> anyhow::Result<()> {
    let targets = Targets {
        masters: cluster
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.mupdate()))
            .collect(),
        replicas: cluster
            .replicas
            .iter()
            .map(|r| (r.name.clone(), r.mupdate()))
            .collect(),
    };
    let settings = ClientSettings {
        op_timeout: Duration::from_secs(3),
        mailboxes: args.mailboxes,
    };
    let until = Instant::now() + Duration::from_secs(args.time_limit);
    let mut tasks = Vec::new();
    let mut process = 0;
    for &w in &args.workload {
        for _ in 0..args.concurrency {
            let plan = ClientPlan {
                process,
                workload: w,
                clients_of_workload: args.concurrency,
                targets: targets.clone(),
                settings: settings.clone(),
                seed,
                until,
            };
            tasks.push(tokio::spawn(workload::client(plan, recorder.clone())));
            process += 1;
        }
    }
    let progress = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let p = indicatif::ProgressBar::new(args.time_limit);
        p.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:40}] {pos}/{len} s {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        p
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut next_fault = Instant::now() + Duration::from_secs(args.nemesis_interval);
    let mut active: Option<(String, Instant)> = None;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        progress.set_position(
            args.time_limit - until.saturating_duration_since(Instant::now()).as_secs(),
        );
        progress.set_message(format!(
            "{} ops, {}",
            recorder
                .completed
                .load(std::sync::atomic::Ordering::Relaxed),
            active.as_ref().map_or("no fault", |(f, _)| f.as_str())
        ));
        match &active {
            Some((name, ends)) if Instant::now() >= *ends => {
                let name = name.clone();
                active = None;
                nemesis.stop(cluster, &name).await?;
                next_fault = Instant::now() + Duration::from_secs(args.nemesis_interval);
            }
            None if !args.nemesis.is_empty()
                && Instant::now() >= next_fault
                // No fault starts in the last 5 s: the end is for recovery.
                && until.saturating_duration_since(Instant::now()) > Duration::from_secs(5) =>
            {
                let fault = args.nemesis[rng.gen_range(0..args.nemesis.len())];
                let name = nemesis.start(cluster, fault, &mut rng).await?;
                let hold = Duration::from_millis(rng.gen_range(2000..5000)).max(fault.min_hold());
                active = Some((name, Instant::now() + hold));
            }
            _ => {}
        }
    }
    progress.finish_and_clear();
    if let Some((name, _)) = active {
        nemesis.stop(cluster, &name).await?;
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

type State = BTreeMap<String, Option<Entry>>;

/// After healing: the masters' state (read through a linearizable LIST on
/// a node that can serve it) and each replica's once it has caught up.
async fn final_states(
    cluster: &Cluster,
    args: &RunArgs,
) -> anyhow::Result<(State, BTreeMap<String, State>)> {
    cluster
        .leader(Duration::from_secs(30))
        .await
        .context("no leader after healing")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let masters = loop {
        let mut got = None;
        for n in &cluster.nodes {
            if let Ok(s) = list_state(&n.mupdate()).await {
                got = Some(s);
                break;
            }
        }
        match got {
            Some(s) => break s,
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            None => bail!("no master could serve the final LIST"),
        }
    };
    let mut replicas = BTreeMap::new();
    if args.workload.contains(&Workload::Replicas) {
        for r in &cluster.replicas {
            // Converged or not, after 30 s what it holds is its answer.
            let deadline = Instant::now() + Duration::from_secs(30);
            let state = loop {
                let s = list_state(&r.mupdate()).await.unwrap_or_default();
                if s == masters || Instant::now() >= deadline {
                    break s;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            replicas.insert(r.name.clone(), state);
        }
    }
    Ok((masters, replicas))
}

/// The final states of a run (masters and replicas), in the run directory.
pub const FINAL_STATES_FILE: &str = "final-states.json";

/// What [`FINAL_STATES_FILE`] holds.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct SavedFinals {
    /// The masters' state after healing (a linearizable LIST), if read.
    pub masters: Option<State>,
    /// Each replica's state, by name.
    pub replicas: BTreeMap<String, State>,
}

/// Re-checks a run directory's history (after changing the checker), with
/// the final states it saved (runs older than that file: the clients'
/// view only).
pub fn recheck(dir: &Path) -> anyhow::Result<bool> {
    let records = report::read_history(&dir.join(report::HISTORY_FILE))?;
    let (events, _) = report::split_records(&records);
    let finals = match std::fs::read_to_string(dir.join(FINAL_STATES_FILE)) {
        Ok(text) => serde_json::from_str::<SavedFinals>(&text)
            .with_context(|| format!("reading {FINAL_STATES_FILE}"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("no {FINAL_STATES_FILE} in this run: checking the clients' view only");
            SavedFinals::default()
        }
        Err(e) => return Err(e.into()),
    };
    let checked = checker::check_all(
        &events,
        &checker::FinalStates {
            masters: finals.masters,
            replicas: finals.replicas,
        },
    );
    print_anomalies(&checked.anomalies, usize::MAX);
    println!(
        "{} operations, {} mailboxes, {} unknown, {} anomalies",
        events.len(),
        checked.checked_mailboxes,
        checked.unknown.len(),
        checked.anomalies.len()
    );
    Ok(checked.valid)
}

/// Prints up to `most` anomalies, one line each.
fn print_anomalies(anomalies: &[Anomaly], most: usize) {
    for a in anomalies.iter().take(most) {
        println!(
            "anomaly [{}] {}: {}",
            a.check,
            a.mailbox.as_deref().unwrap_or("-"),
            a.message
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `check DIR` uses the saved final states: an acknowledged write that
    /// no client read again is lost only in the final LIST.
    #[test]
    fn recheck_finds_a_lost_write_only_in_the_saved_final_states() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(report::HISTORY_FILE),
            concat!(
                r#"{"time_ns":1,"process":0,"type":"invoke","mailbox":"user.a","node":"n1","f":"reserve","location":"be1!default"}"#,
                "\n",
                r#"{"time_ns":2,"process":0,"type":"ok","mailbox":"user.a","node":"n1","f":"reserve","location":"be1!default","value":{"kind":"done"}}"#,
                "\n"
            ),
        )
        .unwrap();
        // Without final states the clients' view alone is consistent.
        assert!(recheck(dir.path()).unwrap());
        let save = |masters: State| {
            let finals = SavedFinals {
                masters: Some(masters),
                replicas: BTreeMap::new(),
            };
            std::fs::write(
                dir.path().join(FINAL_STATES_FILE),
                serde_json::to_string(&finals).unwrap(),
            )
            .unwrap();
        };
        save(State::new());
        assert!(!recheck(dir.path()).unwrap(), "the lost RESERVE is found");
        save(State::from([(
            "user.a".to_owned(),
            Some(Entry {
                location: "be1!default".into(),
                acl: String::new(),
                active: false,
            }),
        )]));
        assert!(recheck(dir.path()).unwrap());
    }
}
