//! A replica: a read-only copy of the registry that follows a master node's
//! log stream (see [`crate::stream`]) into its own RocksDB.
//!
//! [`Replica`] is also the in-process API the proxies use: [`Replica::lookup`]
//! and [`Replica::list_names`] read the local database and never touch the
//! network, so lookups go on while no master is reachable. The replica
//! persists its applied index with every batch it applies, and after a
//! disconnect or a restart asks for the entries after it only. It applies
//! records with the same [`ApplyBatch`] as the Raft state machine, so its
//! state is, at every index, the masters' state at that index.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;

use crate::model::{ClientTag, MailboxEntry, Outcome, RegistryCommand};
use crate::peer::{
    connect, decode_frame, write_frame, PeerError, PeerPool, PeerRequest, PeerResponse,
    MAX_FRAME_BYTES,
};
use crate::raft::RegistryError;
use crate::store::{ApplyBatch, LogRecord, StateEvent, Store};
use crate::stream::StreamFrame;

/// How a replica follows the masters.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// Peer addresses of the master nodes, tried in turn.
    pub masters: Vec<String>,
    /// A stream silent this long (no records, no heartbeat) is given up and
    /// the next master tried.
    pub silence_timeout: Duration,
    /// A master that reports no leader for this long is left for another.
    pub leaderless_timeout: Duration,
    /// Forwarded writes that get no answer in this time fail.
    pub write_timeout: Duration,
    /// Mutual TLS towards the masters' peer ports.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl ReplicaSettings {
    /// Defaults for following `masters`.
    pub fn new(masters: Vec<String>) -> Self {
        ReplicaSettings {
            masters,
            silence_timeout: Duration::from_secs(5),
            leaderless_timeout: Duration::from_secs(3),
            write_timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// Why one stream session ended.
#[derive(Debug, Error)]
enum FollowError {
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("storage: {0}")]
    Storage(#[from] io::Error),
    #[error("stream silent for {0:?}")]
    Silent(Duration),
    #[error("master has known no leader for {0:?}")]
    Leaderless(Duration),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("replica stopped")]
    Stopped,
}

/// A running replica. Cheap to clone.
#[derive(Clone)]
pub struct Replica {
    store: Store,
    inner: Arc<Inner>,
}

struct Inner {
    settings: ReplicaSettings,
    peers: PeerPool,
    /// Index in `masters` of the one followed now (or last).
    current: AtomicUsize,
    connected: AtomicBool,
    master_applied: AtomicU64,
    /// Since when the replica has been behind its master (`None`: caught up).
    behind_since: Mutex<Option<Instant>>,
    stop: tokio::sync::watch::Sender<bool>,
}

/// A replica's view of itself, for status displays.
#[derive(Debug, Clone)]
pub struct ReplicaStatus {
    /// The master followed now, if connected.
    pub master: Option<String>,
    /// Last index applied here.
    pub applied_index: u64,
    /// The master's applied index as last reported.
    pub master_applied_index: u64,
}

impl Replica {
    /// Opens (or creates) the replica's store under `dir` and starts
    /// following the masters in the background. Must run inside a Tokio
    /// runtime.
    pub fn start(dir: &Path, settings: ReplicaSettings) -> io::Result<Replica> {
        if settings.masters.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a replica needs at least one master address",
            ));
        }
        let store = Store::open(dir)?;
        let replica = Replica {
            store,
            inner: Arc::new(Inner {
                peers: PeerPool::new(settings.tls.clone()),
                settings,
                current: AtomicUsize::new(0),
                connected: AtomicBool::new(false),
                master_applied: AtomicU64::new(0),
                behind_since: Mutex::new(None),
                stop: tokio::sync::watch::channel(false).0,
            }),
        };
        tokio::spawn(replica.clone().follow());
        tokio::spawn(replica.clone().report_metrics());
        Ok(replica)
    }

    /// The local store (for scans and UPDATE subscriptions).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether the replica holds a complete state to answer from: false
    /// until its first sync (records or a whole snapshot) completes. A
    /// snapshot received later is staged and swapped in whole, so once true
    /// it stays true.
    pub fn synchronised(&self) -> bool {
        self.store.has_state()
    }

    fn ready(&self) -> Result<(), RegistryError> {
        if self.synchronised() {
            Ok(())
        } else {
            Err(RegistryError::Synchronising)
        }
    }

    /// The mailbox named `name`, from the local copy.
    pub fn lookup(&self, name: &str) -> Result<Option<MailboxEntry>, RegistryError> {
        self.ready()?;
        Ok(self.store.mailbox(name)?)
    }

    /// The mailboxes whose name starts with `prefix`, in Cyrus's order, from
    /// the local copy.
    pub fn list_names(&self, prefix: &str) -> Result<Vec<MailboxEntry>, RegistryError> {
        self.ready()?;
        Ok(self.store.list_names(prefix)?)
    }

    /// The mailboxes whose location starts with `prefix` (MUPDATE's LIST).
    pub fn list_locations(&self, prefix: &str) -> Result<Vec<MailboxEntry>, RegistryError> {
        self.ready()?;
        Ok(self.store.list_location(prefix)?)
    }

    /// Waits, up to `timeout`, until this replica has applied everything the
    /// masters had committed when it asked (the cluster's read index, asked
    /// of a master). Returns whether it got there; on `false` the local copy
    /// is as fresh as the replica could make it in time.
    pub async fn sync(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let s = &self.inner.settings;
        let first = self.inner.current.load(Ordering::Relaxed);
        let mut target = None;
        for k in 0..s.masters.len() {
            let addr = &s.masters[(first + k) % s.masters.len()];
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            if let Ok(PeerResponse::ReadIndex(i)) = self
                .inner
                .peers
                .call(addr, &PeerRequest::SyncIndex, remaining)
                .await
            {
                target = Some(i);
                break;
            }
        }
        let Some(target) = target else {
            metrics::counter!("corvid_replica_sync_timeouts_total").increment(1);
            return false;
        };
        let mut applied = self.store.watch_applied();
        let reached =
            tokio::time::timeout_at(deadline.into(), applied.wait_for(|&a| a >= target)).await;
        let ok = matches!(reached, Ok(Ok(_)));
        if !ok {
            metrics::counter!("corvid_replica_sync_timeouts_total").increment(1);
        }
        ok
    }

    /// Changes as they are applied here; [`StateEvent::Reset`] when a
    /// snapshot replaced the state.
    pub fn watch(&self) -> broadcast::Receiver<StateEvent> {
        self.store.subscribe()
    }

    /// Last log index applied here.
    pub fn applied_index(&self) -> u64 {
        *self.store.watch_applied().borrow()
    }

    /// What the replica follows and how far behind it is.
    pub fn status(&self) -> ReplicaStatus {
        let i = self.inner.current.load(Ordering::Relaxed);
        ReplicaStatus {
            master: self
                .inner
                .connected
                .load(Ordering::Relaxed)
                .then(|| self.inner.settings.masters[i].clone()),
            applied_index: self.applied_index(),
            master_applied_index: self.inner.master_applied.load(Ordering::Relaxed),
        }
    }

    /// Whether this replica should take reads now (`/readyz`): it holds a
    /// complete state, is at most `max_lag_entries` entries behind its
    /// master's last reported applied index, and has not been behind for
    /// longer than `max_lag` (zero: no time limit). A replica cut off from
    /// every master stays ready with its copy, as reads are meant to go on
    /// then; `corvid_replica_connected` tells that case. `Ok` carries a
    /// one-line detail, `Err` the reason.
    pub fn readiness(&self, max_lag_entries: u64, max_lag: Duration) -> Result<String, String> {
        if !self.synchronised() {
            return Err("has not completed its first sync with a master".into());
        }
        let applied = self.applied_index();
        let master = self.inner.master_applied.load(Ordering::Relaxed);
        let lag = master.saturating_sub(applied);
        if lag > max_lag_entries {
            return Err(format!(
                "{lag} entries behind its master (more than {max_lag_entries})"
            ));
        }
        let behind = self.behind_for();
        if !max_lag.is_zero() && behind > max_lag {
            return Err(format!(
                "behind its master for {:.1} s (more than {:.1} s)",
                behind.as_secs_f64(),
                max_lag.as_secs_f64()
            ));
        }
        let stream = if self.inner.connected.load(Ordering::Relaxed) {
            "following a master"
        } else {
            "no master reachable, serving its copy"
        };
        Ok(format!(
            "applied index {applied}, {lag} entries behind, {stream}"
        ))
    }

    /// How long the replica has been behind its master (zero when caught up).
    fn behind_for(&self) -> Duration {
        self.inner
            .behind_since
            .lock()
            .ok()
            .and_then(|s| *s)
            .map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// Stops following (the local copy stays readable).
    pub fn shutdown(&self) {
        self.inner.stop.send_replace(true);
    }

    /// Sends `command`, request `client` of its session, to a master node,
    /// which commits it through Raft. The master followed now is asked
    /// first, then the others in turn while they cannot be reached.
    pub async fn write(
        &self,
        client: ClientTag,
        command: RegistryCommand,
    ) -> Result<Outcome, RegistryError> {
        let s = &self.inner.settings;
        let deadline = Instant::now() + s.write_timeout;
        let first = self.inner.current.load(Ordering::Relaxed);
        let mut last = String::from("no master reachable");
        for k in 0..s.masters.len() {
            let addr = &s.masters[(first + k) % s.masters.len()];
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            metrics::counter!("corvid_replica_forwarded_writes_total").increment(1);
            match self
                .inner
                .peers
                .call(
                    addr,
                    &PeerRequest::ClientWrite {
                        client,
                        command: command.clone(),
                    },
                    remaining,
                )
                .await
            {
                Ok(PeerResponse::Write(outcome)) => return Ok(outcome),
                Ok(other) => {
                    return Err(RegistryError::Unavailable(format!(
                        "master {addr} answered {other:?}"
                    )))
                }
                Err(PeerError::Remote { message, .. }) => {
                    return Err(RegistryError::Unavailable(message))
                }
                Err(PeerError::Timeout(_)) => return Err(RegistryError::Timeout(s.write_timeout)),
                // Unreachable (or the connection broke): another master may
                // take it. The same client tag goes with every attempt, so a
                // write that did land is answered from the session table and
                // not applied twice.
                Err(e) => last = e.to_string(),
            }
        }
        Err(RegistryError::Unavailable(format!(
            "no master node took the write: {last}"
        )))
    }

    /// Follows the masters until shut down: one stream at a time, the next
    /// master after any failure.
    async fn follow(self) {
        let masters = self.inner.settings.masters.len();
        let mut backoff = Duration::from_millis(50);
        let mut stop = self.inner.stop.subscribe();
        loop {
            let i = self.inner.current.load(Ordering::Relaxed);
            let addr = self.inner.settings.masters[i].clone();
            let before = self.applied_index();
            let res = self.follow_one(&addr, &mut stop).await;
            self.inner.connected.store(false, Ordering::Relaxed);
            metrics::gauge!("corvid_replica_connected").set(0.0);
            match res {
                Err(FollowError::Stopped) => return,
                Err(e) => tracing::warn!(master = %addr, "log stream ended: {e}"),
                Ok(()) => {}
            }
            metrics::counter!("corvid_replica_reconnects_total").increment(1);
            // A stream that made progress was healthy: retry promptly.
            if self.applied_index() > before {
                backoff = Duration::from_millis(50);
            }
            self.inner
                .current
                .store((i + 1) % masters, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// One stream session with the master at `addr`.
    async fn follow_one(
        &self,
        addr: &str,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), FollowError> {
        let s = &self.inner.settings;
        let mut socket = connect(addr, s.tls.as_ref()).await?;
        // A snapshot interrupted by a restart or a failover was staged
        // aside and never became live: resume from the live state.
        let after = self.store.applied_index()?;
        let mut out = Vec::new();
        write_frame(&mut out, &PeerRequest::Follow { after }).map_err(FollowError::Protocol)?;
        socket.write_all(&out).await.map_err(|e| PeerError::Io {
            addr: addr.to_owned(),
            source: e,
        })?;
        self.inner.connected.store(true, Ordering::Relaxed);
        metrics::gauge!("corvid_replica_connected").set(1.0);
        tracing::info!(master = %addr, after, "following the log stream");
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut snapshot: Option<Option<openraft::alias::LogIdOf<crate::raft::TypeConfig>>> = None;
        let mut leaderless_since: Option<Instant> = None;
        loop {
            let frame = loop {
                match decode_frame::<StreamFrame>(&mut buf, MAX_FRAME_BYTES) {
                    Ok(Some(f)) => break f,
                    Ok(None) => {}
                    Err(reason) => return Err(FollowError::Protocol(reason)),
                }
                let read = tokio::select! {
                    r = tokio::time::timeout(s.silence_timeout, socket.read_buf(&mut buf)) => r,
                    _ = stop.changed() => return Err(FollowError::Stopped),
                };
                match read {
                    Err(_) => return Err(FollowError::Silent(s.silence_timeout)),
                    Ok(Ok(0)) => {
                        return Err(FollowError::Protocol("master closed the stream".into()))
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        return Err(PeerError::Io {
                            addr: addr.to_owned(),
                            source: e,
                        }
                        .into())
                    }
                }
            };
            match frame {
                StreamFrame::SnapshotBegin { log_id } => {
                    tracing::info!(master = %addr, "receiving a snapshot");
                    let store = self.store.clone();
                    blocking(move || store.begin_reset()).await?;
                    // The master has applied at least this far: until the
                    // snapshot is in, the replica is that far behind.
                    self.note_master(log_id.as_ref().map_or(0, |l| l.index));
                    snapshot = Some(log_id);
                }
                StreamFrame::SnapshotChunk(items) => {
                    if snapshot.is_none() {
                        return Err(FollowError::Protocol(
                            "snapshot chunk outside a snapshot".into(),
                        ));
                    }
                    metrics::counter!("corvid_replica_snapshot_entries_received_total")
                        .increment(items.len() as u64);
                    let store = self.store.clone();
                    blocking(move || store.put_entries(&items)).await?;
                }
                StreamFrame::SnapshotEnd => {
                    let Some(log_id) = snapshot.take() else {
                        return Err(FollowError::Protocol(
                            "snapshot end outside a snapshot".into(),
                        ));
                    };
                    let store = self.store.clone();
                    blocking(move || store.finish_reset(log_id)).await?;
                    metrics::counter!("corvid_replica_snapshots_received_total").increment(1);
                    tracing::info!(master = %addr, index = self.applied_index(), "snapshot installed");
                }
                StreamFrame::Records {
                    records,
                    master_applied,
                } => {
                    self.apply_records(records).await?;
                    self.note_master(master_applied);
                }
                StreamFrame::Heartbeat {
                    master_applied,
                    has_leader,
                } => {
                    self.note_master(master_applied);
                    if has_leader {
                        leaderless_since = None;
                    } else {
                        let since = *leaderless_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= s.leaderless_timeout && s.masters.len() > 1 {
                            return Err(FollowError::Leaderless(since.elapsed()));
                        }
                    }
                }
            }
        }
    }

    async fn apply_records(&self, records: Vec<LogRecord>) -> Result<(), FollowError> {
        let expected = self.applied_index() + 1;
        match records.first() {
            None => return Ok(()),
            Some(r) if r.log_id.index != expected => {
                return Err(FollowError::Protocol(format!(
                    "records start at {} but {expected} is next",
                    r.log_id.index
                )))
            }
            Some(_) => {}
        }
        let n = records.len() as u64;
        let store = self.store.clone();
        blocking(move || {
            // The records first: an UPDATE subscriber catching up reads
            // them up to the applied index, so they must be there by then.
            store.keep_records(&records)?;
            let mut batch = ApplyBatch::new(&store)?;
            for r in &records {
                batch.entry(r.log_id, r.proposal.as_ref())?;
            }
            batch.commit().map(|_| ())
        })
        .await?;
        metrics::counter!("corvid_replica_records_received_total").increment(n);
        Ok(())
    }

    fn note_master(&self, master_applied: u64) {
        self.inner
            .master_applied
            .store(master_applied, Ordering::Relaxed);
        let behind = master_applied > self.applied_index();
        if let Ok(mut since) = self.inner.behind_since.lock() {
            match (behind, *since) {
                (false, _) => *since = None,
                (true, None) => *since = Some(Instant::now()),
                (true, Some(_)) => {}
            }
        }
    }

    /// Publishes lag gauges once a second (lag in seconds grows while the
    /// replica stays behind, also while it cannot reach any master).
    async fn report_metrics(self) {
        let mut stop = self.inner.stop.subscribe();
        loop {
            let applied = self.applied_index();
            let master = self.inner.master_applied.load(Ordering::Relaxed);
            metrics::gauge!("corvid_replica_applied_index").set(applied as f64);
            metrics::gauge!("corvid_replica_master_applied_index").set(master as f64);
            metrics::gauge!("corvid_replica_lag_entries")
                .set(master.saturating_sub(applied) as f64);
            metrics::gauge!("corvid_replica_lag_seconds").set(self.behind_for().as_secs_f64());
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}
