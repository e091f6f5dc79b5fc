//! Bulk loading: many registry commands per Raft log entry, several entries
//! in flight, through a node's peer port (a follower forwards to the
//! leader). `corvidctl bench-load` uses it to fill a registry with millions
//! of mailboxes in minutes; an importer can hand it any commands.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use corvid_registry::model::{ClientTag, Outcome, RegistryCommand};
use corvid_registry::peer::{PeerPool, PeerRequest, PeerResponse};

/// How [`bulk_write`] sends.
#[derive(Debug, Clone)]
pub struct BulkOptions {
    /// Peer address of any master node.
    pub peer: String,
    /// Mutual TLS towards the peer port, when the cluster uses it.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Commands per log entry.
    pub per_entry: usize,
    /// Log entries in flight at once.
    pub in_flight: usize,
    /// Time allowed for one entry to commit.
    pub timeout: Duration,
}

fn tracing_retry(peer: &str, e: &dyn std::fmt::Display) {
    eprintln!("bulk write to {peer} failed, retrying: {e}");
}

/// What [`bulk_write`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct BulkReport {
    /// Commands applied.
    pub done: u64,
    /// Commands refused by the registry (e.g. a RESERVE of a name that
    /// exists elsewhere); the rest of their entry still applied.
    pub refused: u64,
    /// Log entries written.
    pub entries: u64,
}

/// Commits `commands` in order of entries (commands of one entry apply in
/// order; entries in flight together may commit in any order), `per_entry`
/// to a [`RegistryCommand::Batch`]. Each entry carries its own client tag,
/// kept across retries, so an entry retried after a lost answer or a
/// leader change is never applied twice. An entry is retried while the
/// cluster is between leaders, for up to `timeout`; the load stops at the
/// first entry that fails for good. `progress` is called with the commands
/// committed so far.
pub async fn bulk_write(
    opts: &BulkOptions,
    commands: impl Iterator<Item = RegistryCommand>,
    progress: impl Fn(u64),
) -> anyhow::Result<BulkReport> {
    if opts.per_entry == 0 || opts.in_flight == 0 {
        bail!("per_entry and in_flight must be positive");
    }
    let pool = PeerPool::new(opts.tls.clone());
    let committed = Arc::new(AtomicU64::new(0));
    let mut report = BulkReport::default();
    let mut tasks = tokio::task::JoinSet::new();
    let mut commands = commands.peekable();
    while commands.peek().is_some() || !tasks.is_empty() {
        while tasks.len() < opts.in_flight && commands.peek().is_some() {
            let batch: Vec<RegistryCommand> = commands.by_ref().take(opts.per_entry).collect();
            let (pool, peer, timeout, committed) = (
                pool.clone(),
                opts.peer.clone(),
                opts.timeout,
                committed.clone(),
            );
            tasks.spawn(async move {
                let n = batch.len() as u64;
                let request = PeerRequest::ClientWrite {
                    client: ClientTag::once(),
                    command: RegistryCommand::Batch(batch),
                };
                let deadline = tokio::time::Instant::now() + timeout;
                let answer = loop {
                    match pool.call(&peer, &request, timeout).await {
                        Err(e) if tokio::time::Instant::now() < deadline => {
                            tracing_retry(&peer, &e);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        res => break res.with_context(|| format!("bulk write to {peer}"))?,
                    }
                };
                committed.fetch_add(n, Ordering::Relaxed);
                match answer {
                    PeerResponse::Write(Outcome::Batch(outcomes)) => Ok(outcomes),
                    other => bail!("unexpected answer to a bulk write: {other:?}"),
                }
            });
        }
        if let Some(done) = tasks.join_next().await {
            let outcomes = done??;
            report.entries += 1;
            for o in outcomes {
                match o {
                    Outcome::Done => report.done += 1,
                    _ => report.refused += 1,
                }
            }
            progress(committed.load(Ordering::Relaxed));
        }
    }
    Ok(report)
}
