//! openraft glue: the type configuration, the peer network, and [`Registry`],
//! the handle through which MUPDATE sessions write and read.
//!
//! Every write goes through Raft, even on a single node, so that the log is
//! the registry's event log and a single node can later grow into a cluster.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Config, RaftNetworkV2, ReadPolicy, ServerState};
use thiserror::Error;

use crate::model::{MailboxEntry, Outcome, RegistryCommand};
use crate::store::{LogStore, StateMachine, Store};

openraft::declare_raft_types!(
    /// Corvid's Raft types: log entries carry registry commands and answer
    /// with their outcome.
    pub TypeConfig:
        D = RegistryCommand,
        R = Outcome,
        Node = BasicNode,
);

/// The Raft node type.
pub type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// Raft timing and log-retention settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftSettings {
    /// Node id of this node (unique in the cluster).
    pub node_id: u64,
    /// Heartbeat interval in milliseconds.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomized election timeout in milliseconds.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout in milliseconds.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_after_entries: u64,
    /// Log entries kept behind a snapshot (for followers slightly behind).
    pub keep_log_entries: u64,
    /// A write that is not committed within this many milliseconds is
    /// answered `NO` instead of hanging.
    pub write_timeout_ms: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            node_id: 1,
            heartbeat_ms: 50,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            snapshot_after_entries: 50_000,
            keep_log_entries: 10_000,
            write_timeout_ms: 5_000,
        }
    }
}

/// Errors of registry reads and writes, as a MUPDATE session reports them.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// No leader is known, or it could not confirm its leadership in time.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// The write was not committed in time; it may still commit.
    #[error("registry write timed out after {0:?}; it may still be applied")]
    Timeout(Duration),
    /// Reading the local store failed.
    #[error("registry storage error: {0}")]
    Storage(#[from] std::io::Error),
}

/// A running registry node: Raft plus its RocksDB store.
#[derive(Clone)]
pub struct Registry {
    raft: Raft,
    store: Store,
    write_timeout: Duration,
}

impl Registry {
    /// Opens the store under `data_dir`, starts Raft, and on first start
    /// bootstraps a one-node cluster whose member address is `addr`.
    pub async fn start(
        data_dir: &Path,
        settings: &RaftSettings,
        addr: &str,
    ) -> anyhow::Result<Registry> {
        let store = Store::open(data_dir)?;
        let config = Config {
            cluster_name: "corvid".into(),
            heartbeat_interval: settings.heartbeat_ms,
            election_timeout_min: settings.election_timeout_min_ms,
            election_timeout_max: settings.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(
                settings.snapshot_after_entries,
            ),
            max_in_snapshot_log_to_keep: settings.keep_log_entries,
            ..Default::default()
        }
        .validate()?;
        let raft = Raft::new(
            settings.node_id,
            Arc::new(config),
            Network,
            LogStore::new(store.clone()),
            StateMachine::new(store.clone()),
        )
        .await?;
        if !raft.is_initialized().await? {
            let members = BTreeMap::from([(
                settings.node_id,
                BasicNode {
                    addr: addr.to_owned(),
                },
            )]);
            raft.initialize(members).await?;
            tracing::info!(
                node_id = settings.node_id,
                "bootstrapped a new one-node registry cluster"
            );
        }
        // Serve nothing until the state machine has caught up with what was
        // committed before a restart, so no read goes backwards.
        raft.wait_for_recovery(Some(Duration::from_secs(60)))
            .await
            .map_err(|e| anyhow::anyhow!("registry did not recover its committed state: {e}"))?;
        let registry = Registry {
            raft,
            store,
            write_timeout: Duration::from_millis(settings.write_timeout_ms),
        };
        registry.spawn_metrics();
        Ok(registry)
    }

    /// The local store (for scans and UPDATE subscriptions).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The Raft node.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Commits `command` through Raft and returns its outcome once applied.
    pub async fn write(&self, command: RegistryCommand) -> Result<Outcome, RegistryError> {
        let started = Instant::now();
        let res = tokio::time::timeout(self.write_timeout, self.raft.client_write(command)).await;
        let out = match res {
            Err(_) => Err(RegistryError::Timeout(self.write_timeout)),
            Ok(Err(e)) => Err(RegistryError::Unavailable(e.to_string())),
            Ok(Ok(resp)) => Ok(resp.data),
        };
        metrics::histogram!("corvid_raft_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        out
    }

    /// Waits until a read on this node reflects every write committed before
    /// the call (ReadIndex: the leader confirms its leadership, then the state
    /// machine applies up to the read index).
    pub async fn read_barrier(&self) -> Result<(), RegistryError> {
        let res = tokio::time::timeout(
            self.write_timeout,
            self.raft.ensure_linearizable(ReadPolicy::ReadIndex),
        )
        .await;
        match res {
            Err(_) => Err(RegistryError::Timeout(self.write_timeout)),
            Ok(Err(e)) => Err(RegistryError::Unavailable(e.to_string())),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Linearizable lookup of one mailbox.
    pub async fn find(&self, name: &str) -> Result<Option<MailboxEntry>, RegistryError> {
        self.read_barrier().await?;
        Ok(self.store.mailbox(name)?)
    }

    /// Linearizable list of the mailboxes whose location starts with `prefix`.
    pub async fn list(&self, prefix: Option<&str>) -> Result<Vec<MailboxEntry>, RegistryError> {
        self.read_barrier().await?;
        let prefix = prefix.unwrap_or("");
        Ok(self.store.scan(|e| e.location.starts_with(prefix))?.1)
    }

    /// Stops Raft.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
    }

    /// Mirrors Raft's metrics into Prometheus gauges as they change.
    fn spawn_metrics(&self) {
        let mut rx = self.raft.metrics();
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut last_leader = None;
            loop {
                {
                    let m = rx.borrow_and_update().clone();
                    metrics::gauge!("corvid_raft_term").set(m.current_term as f64);
                    metrics::gauge!("corvid_raft_last_log_index")
                        .set(m.last_log_index.unwrap_or(0) as f64);
                    metrics::gauge!("corvid_raft_applied_index")
                        .set(m.last_applied.as_ref().map_or(0, |l| l.index) as f64);
                    metrics::gauge!("corvid_raft_leader_id")
                        .set(m.current_leader.unwrap_or(0) as f64);
                    metrics::gauge!("corvid_server_has_leader")
                        .set(f64::from(u8::from(m.current_leader.is_some())));
                    metrics::gauge!("corvid_server_is_leader")
                        .set(f64::from(u8::from(m.state == ServerState::Leader)));
                    metrics::gauge!("corvid_disk_sst_bytes").set(store.disk_bytes() as f64);
                    if m.current_leader != last_leader {
                        if m.current_leader.is_some() {
                            metrics::counter!("corvid_server_leader_changes_seen_total")
                                .increment(1);
                        }
                        last_leader = m.current_leader;
                    }
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Peer network. This release runs one-node clusters only, so there is no
/// peer to reach: every RPC reports the target unreachable.
#[derive(Debug, Clone, Copy)]
pub struct Network;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Network;

    async fn new_client(&mut self, _target: u64, _node: &BasicNode) -> Self::Network {
        Network
    }
}

fn unreachable() -> Unreachable<TypeConfig> {
    Unreachable::new(&std::io::Error::other(
        "multi-node clusters are not supported by this release",
    ))
}

impl RaftNetworkV2<TypeConfig> for Network {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(RPCError::Unreachable(unreachable()))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(RPCError::Unreachable(unreachable()))
    }

    async fn full_snapshot(
        &mut self,
        _vote: openraft::alias::VoteOf<TypeConfig>,
        _snapshot: openraft::alias::SnapshotOf<TypeConfig, Self::SnapshotData>,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        Err(StreamingError::Unreachable(unreachable()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MailboxState, Refusal};

    fn reserve(name: &str) -> RegistryCommand {
        RegistryCommand::Reserve {
            name: name.into(),
            location: "be1!default".into(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_go_through_raft_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let settings = RaftSettings::default();
        let r = Registry::start(dir.path(), &settings, "127.0.0.1:1")
            .await
            .unwrap();
        assert_eq!(r.write(reserve("user.a")).await.unwrap(), Outcome::Done);
        let batch = RegistryCommand::Batch(vec![
            reserve("user.b"),
            reserve("user.a"),
            RegistryCommand::Delete { name: "x".into() },
        ]);
        assert_eq!(
            r.write(batch).await.unwrap(),
            Outcome::Batch(vec![
                Outcome::Done,
                Outcome::Done,
                Outcome::Refused(Refusal::DoesNotExist)
            ])
        );
        let e = r.find("user.b").await.unwrap().unwrap();
        assert_eq!(e.state, MailboxState::Reserved);
        assert!(e.last_change > 0);
        r.shutdown().await;
        drop(r);

        // Raft's tasks release the database shortly after shutdown.
        let mut reopened = None;
        for _ in 0..100 {
            match Registry::start(dir.path(), &settings, "127.0.0.1:1").await {
                Ok(r) => {
                    reopened = Some(r);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let r = reopened.expect("the registry reopens its data");
        assert_eq!(r.list(None).await.unwrap().len(), 2);
        assert_eq!(r.write(reserve("user.c")).await.unwrap(), Outcome::Done);
        assert_eq!(r.list(Some("be1!")).await.unwrap().len(), 3);
        assert!(r.list(Some("be2!")).await.unwrap().is_empty());
        r.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_all_applied() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::start(dir.path(), &RaftSettings::default(), "127.0.0.1:1")
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for w in 0..16 {
            let r = r.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    assert_eq!(
                        r.write(reserve(&format!("user.w{w}n{i}"))).await.unwrap(),
                        Outcome::Done
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(r.list(None).await.unwrap().len(), 800);
        r.shutdown().await;
    }
}
