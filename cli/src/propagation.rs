//! `corvidctl propagation`: how long a committed change takes to become
//! visible elsewhere (a replica, a Cyrus mupdate slave).
//!
//! One writer ACTIVATEs new names on the master, one at a time. For each,
//! the time runs from the master's OK (the write is committed and applied
//! there) to the moment the watched server shows the name: by an UPDATE push
//! received on a subscription (`--via update`), or by FINDs repeated back to
//! back until one answers (`--via find`, for servers whose UPDATE cannot be
//! watched, such as a Cyrus slave).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{Args, ValueEnum};
use corvid_registry::mupdate::client::{line_entry, Client, ClientError};
use corvid_registry::mupdate::codec::{Command, Status};
use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};

use crate::bench::{write_result, BenchResult, Percentiles, ReportArgs};
use crate::conn::ConnectArgs;

/// How visibility is detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// An UPDATE subscription on the watched server pushes the change.
    Update,
    /// FIND on the watched server, repeated until it answers.
    Find,
}

/// Options of `corvidctl propagation`.
#[derive(Debug, Args)]
pub struct PropagationArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// The server to watch (same credentials as the master).
    #[arg(long)]
    watch: String,
    /// How to see the change on the watched server.
    #[arg(long, value_enum, default_value = "update")]
    via: Via,
    /// Changes to measure.
    #[arg(long, short = 'n', default_value_t = 1000)]
    ops: u64,
    /// Wait a random time below this many milliseconds before each write,
    /// so that writes fall at random points of a server's push cycle (a
    /// Cyrus master pushes to its slaves every 5 s).
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Give up on one change after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout_seconds: u64,
    /// Names are PREFIX.N.
    #[arg(long, default_value = "propagation")]
    prefix: String,
    /// Location of the created mailboxes.
    #[arg(long, default_value = "bench!default")]
    location: String,
    #[command(flatten)]
    report: ReportArgs,
}

/// Runs the measurement and prints its report.
pub async fn run(mut args: PropagationArgs) -> anyhow::Result<()> {
    let (user, password) = args.conn.credentials()?;
    args.conn.user = Some(user);
    args.conn.password = Some(password);
    let watch_conn = ConnectArgs {
        server: args.watch.clone(),
        ..args.conn.clone()
    };
    let mut master = args.conn.connect().await?;
    let mut watcher = watch_conn.connect().await?;
    // Arrival time of each name pushed by the subscription.
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let notify = Arc::new(tokio::sync::Notify::new());
    let mut subscription = None;
    if args.via == Via::Update {
        let tag = watcher.send(&Command::Update { servers: vec![] });
        watcher.flush().await?;
        let dump = watcher.receive(&tag).await?;
        if dump.status != Status::Ok {
            bail!("UPDATE on {}: {}", args.watch, dump.text);
        }
        let (seen, notify) = (seen.clone(), notify.clone());
        subscription = Some(tokio::spawn(async move {
            while let Ok(line) = watcher.next_push().await {
                if let Some(e) = line_entry(&line) {
                    if let Ok(mut m) = seen.lock() {
                        m.insert(e.name, Instant::now());
                    }
                    notify.notify_waiters();
                }
            }
        }));
        watcher = watch_conn.connect().await?;
    }
    let progress = if args.report.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.ops)
    };
    let limit = Duration::from_secs(args.timeout_seconds);
    let mut latencies = Vec::with_capacity(args.ops as usize);
    let mut early = 0u64;
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::from_entropy();
    // One change first, untimed, with a long wait: the watched server may
    // still be working through a backlog (a Cyrus slave applies a few
    // thousand changes a second), and everything is applied in order.
    let warmup = Instant::now();
    let name = format!("{}.warmup", args.prefix);
    activate(&mut master, &name, &args).await?;
    let drain = Duration::from_secs(300);
    match args.via {
        Via::Update => wait_pushed(&seen, &notify, &name, drain).await?,
        Via::Find => wait_found(&mut watcher, &name, drain).await?,
    };
    if !args.report.quiet {
        eprintln!("warm-up change visible after {:?}", warmup.elapsed());
    }
    for k in 0..args.ops {
        if args.jitter_ms > 0 {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..args.jitter_ms))).await;
        }
        let name = format!("{}.{k}", args.prefix);
        activate(&mut master, &name, &args).await?;
        let acked = Instant::now();
        let visible = match args.via {
            Via::Update => wait_pushed(&seen, &notify, &name, limit).await?,
            Via::Find => wait_found(&mut watcher, &name, limit).await?,
        };
        // A push may arrive before the OK does: visible no later than the ack.
        let lag = visible.checked_duration_since(acked).unwrap_or_else(|| {
            early += 1;
            Duration::ZERO
        });
        latencies.push(lag.as_micros().min(u128::from(u32::MAX)) as u32);
        progress.inc(1);
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    if let Some(s) = subscription {
        s.abort();
    }
    master.logout().await.ok();
    let p = Percentiles::of(latencies);
    let result = BenchResult {
        label: args
            .report
            .label
            .clone()
            .unwrap_or_else(|| args.watch.clone()),
        server: format!("{} -> {}", args.conn.server, args.watch),
        workload: "propagation".into(),
        connections: 1,
        ops: p.count,
        writes: p.count,
        errors: 0,
        seconds,
        ops_per_sec: p.count as f64 / seconds,
        writes_per_sec: p.count as f64 / seconds,
        p50_ms: p.p50_ms,
        p99_ms: p.p99_ms,
        max_ms: p.max_ms,
        entries: early,
        server_user_us_per_op: None,
        server_sys_us_per_op: None,
        log_entries: None,
        wal_fsyncs: None,
    };
    write_result(&result, args.report.json.as_deref())
}

async fn activate(master: &mut Client, name: &str, args: &PropagationArgs) -> anyhow::Result<()> {
    let reply = master
        .command(&Command::Activate {
            name: name.to_owned(),
            location: args.location.clone(),
            acl: "anyone\tlrs\t".into(),
        })
        .await?;
    if reply.status != Status::Ok {
        bail!("ACTIVATE {name} on {}: {}", args.conn.server, reply.text);
    }
    Ok(())
}

/// When the subscription received `name`.
async fn wait_pushed(
    seen: &Mutex<HashMap<String, Instant>>,
    notify: &tokio::sync::Notify,
    name: &str,
    limit: Duration,
) -> anyhow::Result<Instant> {
    tokio::time::timeout(limit, async {
        loop {
            let wait = notify.notified();
            if let Some(t) = seen.lock().ok().and_then(|m| m.get(name).copied()) {
                return t;
            }
            wait.await;
        }
    })
    .await
    .map_err(|_| anyhow!("no UPDATE push of {name} within {limit:?}"))
}

/// When FIND `name` first answered with an entry.
async fn wait_found(watcher: &mut Client, name: &str, limit: Duration) -> anyhow::Result<Instant> {
    match tokio::time::timeout(limit, async {
        loop {
            if watcher.find(name).await?.is_some() {
                return Ok::<_, ClientError>(Instant::now());
            }
        }
    })
    .await
    {
        Err(_) => bail!("FIND did not find {name} within {limit:?}"),
        Ok(r) => r.context("FIND on the watched server"),
    }
}
